//! The local JSON file (snake_case, the same content as the protobuf subset) into a
//! [`DeviceConfig`](super::DeviceConfig).

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_types::{
    AppInstanceConfig, AppInstanceOpsCmd, ConsistencyGroup, ContentFormat, ContentTreeConfig,
    DatastoreConfig, DirRestoreMode, DomainSpec, ProcessSpec, RemoteConfig, Retention,
    SnapshotConfig, SnapshotDesc, SnapshotType, UUIDandVersion, VmSpec, VolumeConfig, VolumeFormat,
    VolumeOrigin, VolumeRefConfig,
};
use serde::Deserialize;
use uuid::Uuid;

use super::clones::{CloneSpec, apply_clones};
use super::controller::{PolicyText, expiry, policy};
use super::groups::apply_groups;
use super::remotes::{ExportRequestText, export_request, scheduled_export, settle_exports};
use super::validate::{mark_unusable_volumes, restart_policy, validate};
use super::{ConfigError, DeviceConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalConfig {
    #[serde(default)]
    apps: Vec<LocalApp>,
    #[serde(default)]
    volumes: Vec<LocalVolume>,
    #[serde(default)]
    config_items: BTreeMap<String, String>,
    /// Consistency groups: apps snapshotted together, all or none.
    #[serde(default)]
    groups: Vec<LocalGroup>,
    /// Where content trees are downloaded from (EVE `datastores`).
    #[serde(default)]
    datastores: Vec<LocalDatastore>,
    /// Images to download and verify (EVE `contentInfo`); volumes name them in `content_tree`.
    #[serde(default)]
    content_trees: Vec<LocalContentTree>,
    /// Object-store remotes exports may go to.
    #[serde(default)]
    remotes: Vec<LocalRemote>,
    /// EdgeView: EVE's `EdgeViewConfig` fields by their proto names, and the certificate the
    /// token is signed with (a local file has no controller to take it from).
    #[serde(default)]
    edgeview: Option<LocalEdgeview>,
    /// The base OS to run: EVE's `BaseOS` in its JSON form (proto or camelCase names).
    #[serde(default)]
    baseos: Option<LocalBaseOs>,
    /// The device's name, shown to technicians (EVE's `EdgeDevConfig.device_name`).
    #[serde(default)]
    device_name: String,
}

/// EVE's `BaseOS` message as protobuf's JSON mapping writes it (`contentTreeUuid`), or with
/// the proto's own field names (`content_tree_uuid`), which that mapping also accepts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalBaseOs {
    #[serde(alias = "contentTreeUuid")]
    content_tree_uuid: String,
    #[serde(default, alias = "retryUpdate")]
    retry_update: Option<LocalOpsCmd>,
    #[serde(default)]
    activate: bool,
    #[serde(alias = "baseOsVersion")]
    base_os_version: String,
}

/// EVE's `DeviceOpsCmd`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalOpsCmd {
    #[serde(default)]
    counter: u32,
    // EVE's other two fields, accepted and unused, as by EVE's baseosmgr.
    #[serde(default, rename = "desiredState")]
    _desired_state: bool,
    #[serde(default, rename = "opsTime")]
    _ops_time: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalEdgeview {
    token: String,
    #[serde(default)]
    disp_cert_pem: Vec<String>,
    #[serde(default)]
    dev_policy: LocalDevPolicy,
    #[serde(default)]
    app_policy: LocalAppPolicy,
    #[serde(default)]
    ext_policy: LocalExtPolicy,
    #[serde(default)]
    generation_id: u32,
    signing_cert_pem: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalDevPolicy {
    #[serde(default)]
    allow_dev: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalAppPolicy {
    #[serde(default)]
    allow_app: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalExtPolicy {
    #[serde(default)]
    allow_ext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRemote {
    id: String,
    endpoint: String,
    #[serde(default)]
    region: String,
    bucket: String,
    #[serde(default)]
    prefix: String,
    credentials_file: PathBuf,
    #[serde(default)]
    ca_cert_file: PathBuf,
    #[serde(default)]
    bandwidth_limit: u64,
    #[serde(default)]
    encryption_key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalDatastore {
    id: Uuid,
    /// `http`, `https` (EVE's others, `s3`, `sftp`, `container_registry`, `azure_blob`,
    /// `google_storage`, are accepted and reported on the content trees that use them).
    ds_type: LocalDsType,
    fqdn: String,
    #[serde(default)]
    dpath: String,
    /// CA certificates (PEM) for an `https` datastore; when given, the only ones trusted.
    #[serde(default)]
    ds_cert_pem: Vec<String>,
    /// The user name for a `container_registry` (EVE's `apiKey`).
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LocalDsType {
    Http,
    Https,
    S3,
    Sftp,
    ContainerRegistry,
    AzureBlob,
    GoogleStorage,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalContentTree {
    uuid: Uuid,
    ds_id: Uuid,
    /// Appended to the datastore's `fqdn` and `dpath`.
    url: String,
    format: LocalContentFormat,
    sha256: String,
    #[serde(default)]
    max_size_bytes: u64,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    generation_count: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LocalContentFormat {
    Raw,
    Qcow,
    Qcow2,
    Vhd,
    Vmdk,
    Ova,
    Vhdx,
    Container,
    Iso,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalGroup {
    id: Uuid,
    #[serde(default)]
    name: String,
    members: Vec<Uuid>,
    #[serde(default)]
    schedule: String,
    #[serde(default)]
    time_zone: String,
    #[serde(default)]
    expiry: String,
    #[serde(default)]
    retention: LocalRetention,
    #[serde(default)]
    pattern: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalApp {
    uuid: Uuid,
    version: String,
    #[serde(default)]
    display_name: String,
    #[serde(default = "yes")]
    activate: bool,
    #[serde(default)]
    restart: u32,
    #[serde(default)]
    purge: u32,
    #[serde(default)]
    volume_refs: Vec<LocalVolumeRef>,
    #[serde(default)]
    snapshot: LocalSnapshotConfig,
    domain: Option<LocalDomain>,
    /// The tenant the app belongs to; empty: the default tenant.
    #[serde(default)]
    tenant: String,
    /// This app is a clone of another app's snapshot.
    clone_of: Option<LocalCloneOf>,
    /// Commands run on the device around each snapshot of the app.
    quiesce: Option<LocalQuiesce>,
    /// When the device starts the app again by itself: `always` (default), `on_failure`,
    /// `never`.
    #[serde(default)]
    restart_policy: String,
    /// EVE's `start_delay_in_seconds`: wait this long after the device comes up.
    #[serde(default)]
    start_delay_in_seconds: u32,
    /// Exports of the app's snapshots to object-store remotes, each run once.
    #[serde(default)]
    export_requests: Vec<LocalExportRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalExportRequest {
    /// Names the job (a UUID); a new id asks again.
    id: Uuid,
    snapshot: Uuid,
    remote: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    incremental: bool,
}

/// Each scheduled snapshot exported to a remote.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalScheduledExport {
    remote: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    full_every: u32,
    #[serde(default)]
    keep_exports: u32,
}

/// Quiesce hooks: each an argv (`["/usr/bin/flush", "--all"]`) or a shell command string
/// (run by `/bin/sh -c`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalQuiesce {
    pre: Option<LocalCommand>,
    post: Option<LocalCommand>,
    timeout_seconds: Option<u32>,
    /// A VM's guest agent that cannot freeze it does not fail a live snapshot.
    #[serde(default)]
    proceed_without_guest_agent: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LocalCommand {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalCloneOf {
    app: Uuid,
    snapshot: Uuid,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalVolumeRef {
    uuid: Uuid,
    #[serde(default)]
    generation_count: i64,
    #[serde(default)]
    mount_dir: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalSnapshotConfig {
    #[serde(default)]
    active_snapshot: String,
    #[serde(default)]
    rollback_counter: u32,
    #[serde(default)]
    max_snapshots: u32,
    #[serde(default)]
    snapshots: Vec<LocalSnapshotDesc>,
    #[serde(default)]
    schedule: String,
    #[serde(default)]
    time_zone: String,
    #[serde(default)]
    schedule_when_stopped: bool,
    /// How scheduled snapshots are taken.
    #[serde(default)]
    schedule_mode: cairn_types::SnapshotMode,
    #[serde(default)]
    expiry: String,
    #[serde(default)]
    retention: LocalRetention,
    #[serde(default)]
    pattern: String,
    /// Each scheduled snapshot exported to a remote.
    export: Option<LocalScheduledExport>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LocalRetention {
    keep_last: u32,
    keep_hourly: u32,
    keep_daily: u32,
    keep_weekly: u32,
    keep_monthly: u32,
    keep_yearly: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalSnapshotDesc {
    id: Uuid,
    #[serde(rename = "type")]
    kind: LocalSnapshotType,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    expiry: String,
    /// The consistency group this snapshot belongs to.
    #[serde(default)]
    group: Option<Uuid>,
    /// `stopped` (default), `live` or `stateful`.
    #[serde(default)]
    mode: cairn_types::SnapshotMode,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LocalSnapshotType {
    AppUpdate,
    Immediate,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum LocalDomain {
    Vm {
        kernel: PathBuf,
        initrd: PathBuf,
        #[serde(default)]
        append: String,
        memory_mib: u32,
        #[serde(default = "one")]
        cpus: u32,
        /// The guest runs qemu-guest-agent: live snapshots freeze its filesystems.
        #[serde(default)]
        guest_agent: bool,
    },
    Process {
        command: PathBuf,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        working_dir: Option<PathBuf>,
    },
    /// An OCI container run from the app's first volume (one made from a CONTAINER content
    /// tree); limits 0 = none (EVE: NOHYPER).
    Container {
        #[serde(default)]
        memory_mib: u32,
        #[serde(default)]
        cpus: u32,
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalVolume {
    uuid: Uuid,
    #[serde(default)]
    generation_count: i64,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    max_size_bytes: u64,
    format: LocalFormat,
    base_image: Option<LocalBaseImage>,
    /// Made from this content tree (EVE's `VCOT_DOWNLOAD`).
    content_tree: Option<Uuid>,
    /// Restore the volume from an export made by `cairn export` (Cairn).
    from_export: Option<LocalFromExport>,
    #[serde(default)]
    purgeable: bool,
    /// A directory volume's restore mode (Cairn).
    #[serde(default)]
    restore_mode: LocalRestoreMode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LocalRestoreMode {
    #[default]
    Auto,
    BtrfsSwap,
    SquashfsOverlay,
    Rsync,
    Copy,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LocalFormat {
    Qcow2,
    Raw,
    Dir,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalFromExport {
    /// The export directory (the newest link of a chain).
    #[serde(default)]
    dir: Option<PathBuf>,
    /// Or an export at an object-store remote (its id in `remotes`) and the export's key
    /// under the remote's prefix (`cairn export … --to REMOTE` reports `REMOTE:KEY`).
    #[serde(default)]
    remote: Option<String>,
    #[serde(default)]
    key: Option<String>,
    /// The volume's id in the export's manifest.
    volume_uuid: Uuid,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalBaseImage {
    path: PathBuf,
    sha256: String,
}

/// What the top level of a local config file must be; `path` of the error is empty.
fn check_top_level(text: &str) -> Result<(), ConfigError> {
    const WANT: &str = "a device config is an object with `apps` and `volumes` \
                        (`{\"apps\": [], \"volumes\": []}` for a device that runs nothing)";
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ConfigError::at("", format!("not JSON ({e}); {WANT}")))?;
    let kind = match &value {
        serde_json::Value::Object(fields) => {
            let known = [
                "apps",
                "volumes",
                "config_items",
                "groups",
                "datastores",
                "content_trees",
                "remotes",
                "edgeview",
                "baseos",
            ];
            // An unknown key is named by the typed parse below, with its place.
            if fields.keys().any(|k| !known.contains(&k.as_str()))
                || fields.contains_key("apps")
                || fields.contains_key("volumes")
            {
                return Ok(());
            }
            if fields.is_empty() {
                "an empty object"
            } else {
                "an object naming neither `apps` nor `volumes`"
            }
        }
        serde_json::Value::Array(_) => "a JSON array",
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
    };
    Err(ConfigError::at(
        "",
        format!("the top level is {kind}; {WANT}"),
    ))
}

/// Parses and validates the local config file's text.
pub fn from_local_json(text: &str) -> Result<DeviceConfig, ConfigError> {
    check_top_level(text)?;
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let local: LocalConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::at(
            if path == "." {
                "(file)".to_string()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })?;
    let clones: Vec<CloneSpec> = local
        .apps
        .iter()
        .enumerate()
        .filter_map(|(i, app)| {
            app.clone_of.as_ref().map(|c| CloneSpec {
                app: i,
                field: "clone_of",
                source: c.app,
                snapshot: c.snapshot,
            })
        })
        .collect();
    let mut exports = Vec::new();
    for (i, app) in local.apps.iter().enumerate() {
        for (j, request) in app.export_requests.iter().enumerate() {
            let at = format!("apps[{i}].export_requests[{j}]");
            let text = ExportRequestText {
                id: request.id,
                snapshot: request.snapshot,
                remote: &request.remote,
                prefix: &request.prefix,
                incremental: request.incremental,
            };
            exports.push((at.clone(), export_request(app.uuid, text, &at)?));
        }
    }
    let mut config = DeviceConfig {
        apps: local
            .apps
            .into_iter()
            .enumerate()
            .map(|(i, app)| local_app(app, &format!("apps[{i}]")))
            .collect::<Result<_, _>>()?,
        volumes: local
            .volumes
            .into_iter()
            .enumerate()
            .map(|(i, volume)| {
                let origins = [
                    volume.base_image.is_some(),
                    volume.from_export.is_some(),
                    volume.content_tree.is_some(),
                ];
                if let Some(export) = &volume.from_export
                    && !matches!(
                        (&export.dir, &export.remote, &export.key),
                        (Some(_), None, None) | (None, Some(_), Some(_))
                    )
                {
                    return Err(ConfigError::at(
                        format!("volumes[{i}].from_export"),
                        format!(
                            "volume {}: from_export names either a dir, or a remote and a key",
                            volume.uuid
                        ),
                    ));
                }
                if origins.iter().filter(|o| **o).count() > 1 {
                    return Err(ConfigError::at(
                        format!("volumes[{i}]"),
                        format!(
                            "volume {} has more than one origin: give one of base_image, from_export and content_tree",
                            volume.uuid
                        ),
                    ));
                }
                Ok(local_volume(volume))
            })
            .collect::<Result<_, _>>()?,
        content_trees: local_content_trees(local.datastores, local.content_trees, "datastores")?,
        baseos: None,
        config_items: local.config_items,
        // A controller command: the local file has none.
        shutdown_counter: None,
        device_name: local.device_name.trim().to_string(),
        remotes: local
            .remotes
            .into_iter()
            .map(|r| RemoteConfig {
                id: r.id,
                endpoint: r.endpoint,
                region: r.region,
                bucket: r.bucket,
                prefix: r.prefix,
                credentials_file: r.credentials_file,
                ca_cert_file: r.ca_cert_file,
                bandwidth_limit: r.bandwidth_limit,
                encryption_key_file: r.encryption_key_file,
            })
            .collect(),
        exports: Vec::new(),
        edgeview: local.edgeview.map(|ev| cairn_types::EdgeviewConfig {
            jw_token: ev.token,
            disp_cert_pem: ev.disp_cert_pem,
            dev_policy: cairn_types::EvPolicy {
                enabled: ev.dev_policy.allow_dev,
            },
            app_policy: cairn_types::EvPolicy {
                enabled: ev.app_policy.allow_app,
            },
            ext_policy: cairn_types::EvPolicy {
                enabled: ev.ext_policy.allow_ext,
            },
            gen_id: ev.generation_id,
            signing_cert_pem: ev.signing_cert_pem,
            device_uuid: String::new(),
        }),
    };
    settle_exports(&mut config, exports, "export", "remotes")?;
    config.baseos = local.baseos.map(|b| {
        super::baseos_config(
            &b.content_tree_uuid,
            &b.base_os_version,
            b.retry_update.map_or(0, |cmd| cmd.counter),
            b.activate,
            &config.content_trees,
        )
    });
    let groups = local
        .groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| local_group(g, &format!("groups[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    mark_unusable_volumes(&mut config);
    validate(&config)?;
    apply_groups(&mut config, groups, "groups")?;
    apply_clones(&mut config, &clones)?;
    Ok(config)
}

fn local_group(group: LocalGroup, path: &str) -> Result<ConsistencyGroup, ConfigError> {
    let r = &group.retention;
    let policy = policy(
        PolicyText {
            schedule: &group.schedule,
            time_zone: &group.time_zone,
            when_stopped: false,
            expiry: &group.expiry,
            retention: local_retention(r),
            pattern: &group.pattern,
            // A group snapshot stops its members (they meet at stop barriers).
            mode: cairn_types::SnapshotMode::Stopped,
            export: None,
        },
        path,
    )?;
    Ok(ConsistencyGroup {
        id: group.id,
        name: group.name,
        members: group.members,
        policy,
    })
}

fn local_app(app: LocalApp, path: &str) -> Result<AppInstanceConfig, ConfigError> {
    check_tenant(&app.tenant, &format!("{path}.tenant"))?;
    let quiesce = match &app.quiesce {
        None => None,
        Some(q) => {
            let argv = |c: &Option<LocalCommand>| match c {
                None => None,
                Some(LocalCommand::Argv(argv)) => Some(argv.clone()),
                Some(LocalCommand::Shell(line)) if line.trim().is_empty() => Some(Vec::new()),
                Some(LocalCommand::Shell(line)) => {
                    Some(vec!["/bin/sh".into(), "-c".into(), line.clone()])
                }
            };
            Some(quiesce_hooks(
                QuiesceText {
                    pre: argv(&q.pre),
                    post: argv(&q.post),
                    timeout_seconds: q.timeout_seconds,
                    proceed_without_guest_agent: q.proceed_without_guest_agent,
                },
                app.uuid,
                &format!("{path}.quiesce"),
            )?)
        }
    };
    let r = &app.snapshot.retention;
    let policy = policy(
        PolicyText {
            schedule: &app.snapshot.schedule,
            time_zone: &app.snapshot.time_zone,
            when_stopped: app.snapshot.schedule_when_stopped,
            expiry: &app.snapshot.expiry,
            retention: local_retention(r),
            pattern: &app.snapshot.pattern,
            mode: app.snapshot.schedule_mode,
            export: match &app.snapshot.export {
                None => None,
                Some(e) => Some(scheduled_export(
                    &e.remote,
                    &e.prefix,
                    e.full_every,
                    e.keep_exports,
                    &format!("{path}.snapshot.export"),
                )?),
            },
        },
        &format!("{path}.snapshot"),
    )?;
    let mut snapshots = Vec::new();
    for (i, s) in app.snapshot.snapshots.into_iter().enumerate() {
        let at = format!("{path}.snapshot.snapshots[{i}]");
        snapshots.push(SnapshotDesc {
            snapshot_id: s.id,
            snapshot_type: match s.kind {
                LocalSnapshotType::AppUpdate => SnapshotType::AppUpdate,
                LocalSnapshotType::Immediate => SnapshotType::Immediate,
            },
            expiry_seconds: expiry(&s.expiry, &format!("{at}.expiry"))?,
            name: s.name,
            description: s.description,
            group_id: s.group.unwrap_or_default(),
            mode: s.mode,
            // The controller's and the local config's snapshots are asked for, not scheduled.
            scheduled: false,
        });
    }
    Ok(AppInstanceConfig {
        uuid_and_version: UUIDandVersion {
            uuid: app.uuid,
            version: app.version,
        },
        display_name: app.display_name,
        activate: app.activate,
        volume_ref_config_list: app
            .volume_refs
            .into_iter()
            .map(|v| VolumeRefConfig {
                volume_id: v.uuid,
                generation_counter: v.generation_count,
                local_generation_counter: 0,
                mount_dir: v.mount_dir,
            })
            .collect(),
        restart_cmd: counter(app.restart),
        purge_cmd: counter(app.purge),
        snapshot: SnapshotConfig {
            active_snapshot: app.snapshot.active_snapshot,
            max_snapshots: app.snapshot.max_snapshots,
            rollback_cmd: counter(app.snapshot.rollback_counter),
            snapshots,
            policy,
        },
        domain: app.domain.map(|d| match d {
            LocalDomain::Vm {
                kernel,
                initrd,
                append,
                memory_mib,
                cpus,
                guest_agent,
            } => DomainSpec::Vm(VmSpec {
                kernel,
                initrd,
                append,
                memory_mib,
                cpus,
                guest_agent,
            }),
            LocalDomain::Process {
                command,
                args,
                env,
                working_dir,
            } => DomainSpec::Process(ProcessSpec {
                command,
                args,
                env,
                working_dir,
            }),
            LocalDomain::Container {
                memory_mib,
                cpus,
                env,
            } => DomainSpec::Container(cairn_types::ContainerSpec {
                memory_mib,
                cpus,
                env,
            }),
        }),
        tenant: app.tenant,
        quiesce,
        restart_policy: restart_policy(&app.restart_policy, &format!("{path}.restart_policy"))?,
        start_delay_seconds: app.start_delay_in_seconds,
        ..Default::default()
    })
}

/// Quiesce hooks as either source gives them: `None` where a field is absent.
pub(super) struct QuiesceText {
    pub(super) pre: Option<Vec<String>>,
    pub(super) post: Option<Vec<String>>,
    pub(super) timeout_seconds: Option<u32>,
    pub(super) proceed_without_guest_agent: bool,
}

/// Checks an app's quiesce hooks: a hook given is a runnable argv, the timeout at least 1 s,
/// and at least one hook is given.
pub(super) fn quiesce_hooks(
    text: QuiesceText,
    app: Uuid,
    path: &str,
) -> Result<cairn_types::app::QuiesceHooks, ConfigError> {
    let command = |argv: Option<Vec<String>>, field: &str| match argv {
        None => Ok(Vec::new()),
        Some(argv) if argv.first().is_none_or(|c| c.trim().is_empty()) => Err(ConfigError::at(
            format!("{path}.{field}"),
            format!("app {app}: the {field} hook is an empty command"),
        )),
        Some(argv) => Ok(argv),
    };
    let hooks = cairn_types::app::QuiesceHooks {
        pre: command(text.pre, "pre")?,
        post: command(text.post, "post")?,
        timeout_seconds: match text.timeout_seconds {
            None => 0,
            Some(0) => {
                return Err(ConfigError::at(
                    format!("{path}.timeout_seconds"),
                    format!(
                        "app {app}: a hook timeout of 0 s leaves no time to run it; give at \
                         least 1 (or leave it out for {} s)",
                        cairn_types::app::QuiesceHooks::DEFAULT_TIMEOUT_SECONDS
                    ),
                ));
            }
            Some(seconds) => seconds,
        },
        proceed_without_guest_agent: text.proceed_without_guest_agent,
    };
    if hooks == cairn_types::app::QuiesceHooks::default() {
        return Err(ConfigError::at(
            path,
            format!("app {app}: names neither a pre nor a post hook, nor any option"),
        ));
    }
    Ok(hooks)
}

/// A tenant name: empty (the default tenant) or `[a-z0-9][a-z0-9_-]{0,62}`, so that it fits in
/// file names, D-Bus names and command lines as it is.
pub fn check_tenant(tenant: &str, path: &str) -> Result<(), ConfigError> {
    if cairn_types::app::is_tenant_name(tenant) {
        Ok(())
    } else {
        Err(ConfigError::at(
            path,
            format!(
                "{tenant:?} is not a tenant name: 1 to 63 of a-z, 0-9, '_' and '-', starting with a \
                 letter or digit (or empty, for the default tenant)"
            ),
        ))
    }
}

fn local_volume(volume: LocalVolume) -> VolumeConfig {
    VolumeConfig {
        volume_id: volume.uuid,
        generation_counter: volume.generation_count,
        display_name: volume.display_name,
        max_vol_size: volume.max_size_bytes,
        format: match volume.format {
            LocalFormat::Qcow2 => VolumeFormat::Qcow2,
            LocalFormat::Raw => VolumeFormat::Raw,
            LocalFormat::Dir => VolumeFormat::Dir,
        },
        origin: match (volume.base_image, volume.from_export, volume.content_tree) {
            (Some(base), _, _) => VolumeOrigin::BaseImage {
                path: base.path,
                sha256: base.sha256,
            },
            (None, Some(export), _) => match (export.dir, export.remote, export.key) {
                (Some(dir), _, _) => VolumeOrigin::Export {
                    dir,
                    volume: export.volume_uuid,
                },
                (None, remote, key) => VolumeOrigin::RemoteExport {
                    remote: remote.unwrap_or_default(),
                    key: key.unwrap_or_default(),
                    volume: export.volume_uuid,
                },
            },
            (None, None, Some(id)) => VolumeOrigin::ContentTree { id },
            (None, None, None) => VolumeOrigin::Blank,
        },
        purgeable: volume.purgeable,
        restore_mode: match volume.restore_mode {
            LocalRestoreMode::Auto => DirRestoreMode::Auto,
            LocalRestoreMode::BtrfsSwap => DirRestoreMode::BtrfsSwap,
            LocalRestoreMode::SquashfsOverlay => DirRestoreMode::SquashfsOverlay,
            LocalRestoreMode::Rsync => DirRestoreMode::Rsync,
            LocalRestoreMode::Copy => DirRestoreMode::Copy,
        },
        ..Default::default()
    }
}

/// The local file's content trees, each with the datastore it names (EVE's type names); a
/// datastore listed twice is refused, one missing is reported by the downloader.
fn local_content_trees(
    datastores: Vec<LocalDatastore>,
    trees: Vec<LocalContentTree>,
    list: &str,
) -> Result<Vec<ContentTreeConfig>, ConfigError> {
    let datastores = datastores
        .into_iter()
        .map(|d| DatastoreConfig {
            uuid: d.id,
            ds_type: match d.ds_type {
                LocalDsType::Http => "DsHttp",
                LocalDsType::Https => "DsHttps",
                LocalDsType::S3 => "DsS3",
                LocalDsType::Sftp => "DsSFTP",
                LocalDsType::ContainerRegistry => "DsContainerRegistry",
                LocalDsType::AzureBlob => "DsAzureBlob",
                LocalDsType::GoogleStorage => "DsGoogleStorage",
            }
            .to_string(),
            fqdn: d.fqdn,
            dpath: d.dpath,
            ds_cert_pem: d.ds_cert_pem,
            api_key: d.api_key,
            password: d.password,
        })
        .collect::<Vec<_>>();
    let datastores = unique_datastores(datastores, list)?;
    Ok(trees
        .into_iter()
        .map(|t| {
            content_tree(
                ContentTreeConfig {
                    content_id: t.uuid,
                    datastore_id_list: vec![t.ds_id],
                    relative_url: t.url,
                    format: match t.format {
                        LocalContentFormat::Raw => ContentFormat::Raw,
                        LocalContentFormat::Qcow => ContentFormat::Qcow,
                        LocalContentFormat::Qcow2 => ContentFormat::Qcow2,
                        LocalContentFormat::Vhd => ContentFormat::Vhd,
                        LocalContentFormat::Vmdk => ContentFormat::Vmdk,
                        LocalContentFormat::Ova => ContentFormat::Ova,
                        LocalContentFormat::Vhdx => ContentFormat::Vhdx,
                        LocalContentFormat::Container => ContentFormat::Container,
                        LocalContentFormat::Iso => ContentFormat::Iso,
                    },
                    content_sha256: t.sha256.trim().to_ascii_lowercase(),
                    max_download_size: t.max_size_bytes,
                    generation_counter: t.generation_count,
                    display_name: t.display_name,
                    datastores: Vec::new(),
                },
                &datastores,
            )
        })
        .collect())
}

/// The datastores by id; an id listed twice is refused (`list`: the source's name for them).
pub(super) fn unique_datastores(
    datastores: Vec<DatastoreConfig>,
    list: &str,
) -> Result<BTreeMap<Uuid, DatastoreConfig>, ConfigError> {
    let mut by_id = BTreeMap::new();
    for (i, d) in datastores.into_iter().enumerate() {
        let id = d.uuid;
        if by_id.insert(id, d).is_some() {
            return Err(ConfigError::at(
                format!("{list}[{i}].id"),
                format!("datastore {id} appears twice"),
            ));
        }
    }
    Ok(by_id)
}

/// A content tree with the datastores it names that the config has (in its order).
pub(super) fn content_tree(
    mut tree: ContentTreeConfig,
    datastores: &BTreeMap<Uuid, DatastoreConfig>,
) -> ContentTreeConfig {
    tree.datastores = tree
        .datastore_id_list
        .iter()
        .filter_map(|id| datastores.get(id).cloned())
        .collect();
    tree
}

fn local_retention(r: &LocalRetention) -> Retention {
    Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_yearly: r.keep_yearly,
    }
}

pub(super) fn counter(counter: u32) -> AppInstanceOpsCmd {
    AppInstanceOpsCmd {
        counter,
        apply_time: String::new(),
    }
}
