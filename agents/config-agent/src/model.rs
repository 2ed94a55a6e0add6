//! The device's desired state, from either source — the controller's `EdgeDevConfig` or the
//! local JSON file — converted into the bus messages and validated as a whole. A config with
//! any fault is refused entirely; the error names the field and the fault.
//!
//! The smallest local config is an object naming `apps` or `volumes` (or both):
//! `{"apps": [], "volumes": []}` is a device that runs nothing, said on purpose. Anything else
//! at the top level — an array (serde would read it as a struct with every field defaulted),
//! `{}`, `null`, a number, a string, an object with only `config_items` or `groups` — is refused
//! by name, because applying it would remove every app and volume by accident. (The controller's
//! protobuf cannot tell an empty list from an absent one: there an empty config is EVE's "run
//! nothing"; the volume-manager's deletion grace is what protects the data then.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use cairn_types::{
    AppInstanceConfig, AppInstanceOpsCmd, ConsistencyGroup, ContentFormat, ContentTreeConfig,
    DatastoreConfig, DirRestoreMode, DomainSpec, ProcessSpec, Retention, SnapshotConfig,
    SnapshotDesc, SnapshotPolicy, SnapshotType, UUIDandVersion, VmSpec, VolumeConfig, VolumeFormat,
    VolumeOrigin, VolumeRefConfig,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::proto;

/// What the config-agent publishes: one `AppInstanceConfig` per app, one `VolumeConfig` per
/// volume, one `ContentTreeConfig` per content tree (with its datastores), and the device's
/// config items.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceConfig {
    pub apps: Vec<AppInstanceConfig>,
    pub volumes: Vec<VolumeConfig>,
    pub content_trees: Vec<ContentTreeConfig>,
    pub config_items: BTreeMap<String, String>,
}

/// A refused config: `path` locates the field (`apps[1].snapshot.snapshots[0].id`).
/// An empty `path` is the whole file (its top level).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

// ---- the local JSON file (snake_case, the same content as the protobuf subset) ----

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
    dir: PathBuf,
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
        config_items: local.config_items,
    };
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
        ..Default::default()
    })
}

/// Quiesce hooks as either source gives them: `None` where a field is absent.
struct QuiesceText {
    pre: Option<Vec<String>>,
    post: Option<Vec<String>>,
    timeout_seconds: Option<u32>,
    proceed_without_guest_agent: bool,
}

/// Checks an app's quiesce hooks: a hook given is a runnable argv, the timeout at least 1 s,
/// and at least one hook is given.
fn quiesce_hooks(
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
            (None, Some(export), _) => VolumeOrigin::Export {
                dir: export.dir,
                volume: export.volume_uuid,
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
fn unique_datastores(
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
fn content_tree(
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

fn counter(counter: u32) -> AppInstanceOpsCmd {
    AppInstanceOpsCmd {
        counter,
        apply_time: String::new(),
    }
}

// ---- the controller's EdgeDevConfig ----

/// Converts and validates the controller's config.
pub fn from_proto(config: &proto::EdgeDevConfig) -> Result<DeviceConfig, ConfigError> {
    let mut apps = Vec::new();
    let mut clones = Vec::new();
    for (i, app) in config.apps.iter().enumerate() {
        apps.push(proto_app(app, &format!("apps[{i}]"))?);
        if let Some(clone) = &app.cairn_clone {
            let at = format!("apps[{i}].cairn_clone");
            clones.push(CloneSpec {
                app: i,
                field: "cairn_clone",
                source: parse_uuid(&clone.app, &format!("{at}.app"))?,
                snapshot: parse_uuid(&clone.snapshot, &format!("{at}.snapshot"))?,
            });
        }
    }
    let mut volumes = Vec::new();
    for (i, volume) in config.volumes.iter().enumerate() {
        volumes.push(proto_volume(volume, &format!("volumes[{i}]"))?);
    }
    let mut groups = Vec::new();
    for (i, group) in config.cairn_groups.iter().enumerate() {
        groups.push(proto_group(group, &format!("cairn_groups[{i}]"))?);
    }
    let mut datastores = Vec::new();
    for (i, ds) in config.datastores.iter().enumerate() {
        datastores.push(DatastoreConfig {
            uuid: parse_uuid(&ds.id, &format!("datastores[{i}].id"))?,
            // EVE publishes `DType.String()`; an unknown number stays visible as its number.
            ds_type: proto::DsType::try_from(ds.d_type)
                .map(|t| t.as_str_name().to_string())
                .unwrap_or_else(|_| format!("DsType({})", ds.d_type)),
            fqdn: ds.fqdn.clone(),
            dpath: ds.dpath.clone(),
            ds_cert_pem: ds
                .ds_cert_pem
                .iter()
                .map(|pem| String::from_utf8_lossy(pem).into_owned())
                .collect(),
            api_key: ds.api_key.clone(),
            password: ds.password.clone(),
        });
    }
    let datastores = unique_datastores(datastores, "datastores")?;
    let mut content_trees = Vec::new();
    for (i, tree) in config.content_info.iter().enumerate() {
        content_trees.push(proto_content_tree(
            tree,
            &datastores,
            &format!("contentInfo[{i}]"),
        )?);
    }
    let mut config = DeviceConfig {
        apps,
        volumes,
        content_trees,
        config_items: config
            .config_items
            .iter()
            .map(|item| (item.key.clone(), item.value.clone()))
            .collect(),
    };
    crate::container::image_volumes_are_dirs(&mut config);
    mark_unusable_volumes(&mut config);
    validate(&config)?;
    apply_groups(&mut config, groups, "cairn_groups")?;
    apply_clones(&mut config, &clones)?;
    Ok(config)
}

fn proto_group(group: &proto::CairnGroup, path: &str) -> Result<ConsistencyGroup, ConfigError> {
    let members = group
        .members
        .iter()
        .enumerate()
        .map(|(j, m)| parse_uuid(m, &format!("{path}.members[{j}]")))
        .collect::<Result<_, _>>()?;
    let policy = policy(
        PolicyText {
            schedule: &group.schedule,
            time_zone: &group.time_zone,
            when_stopped: false,
            expiry: &group.expiry,
            retention: group
                .retention
                .as_ref()
                .map(proto_retention)
                .unwrap_or_default(),
            pattern: &group.pattern,
            // A group snapshot stops its members (they meet at stop barriers).
            mode: cairn_types::SnapshotMode::Stopped,
        },
        path,
    )?;
    Ok(ConsistencyGroup {
        id: parse_uuid(&group.id, &format!("{path}.id"))?,
        name: group.name.clone(),
        members,
        policy,
    })
}

/// A snapshot policy as either source spells it.
struct PolicyText<'a> {
    schedule: &'a str,
    time_zone: &'a str,
    when_stopped: bool,
    expiry: &'a str,
    retention: Retention,
    pattern: &'a str,
    mode: cairn_types::SnapshotMode,
}

/// Checks every part of a policy, naming the field at fault.
fn policy(text: PolicyText<'_>, path: &str) -> Result<Option<Box<SnapshotPolicy>>, ConfigError> {
    let wrong = |field: &str, e: cairn_types::policy::PolicyError| {
        ConfigError::at(format!("{path}.{field}"), e.to_string())
    };
    cairn_types::policy::parse_zone(text.time_zone).map_err(|e| wrong("time_zone", e))?;
    if !text.schedule.trim().is_empty() {
        cairn_types::policy::Schedule::parse(text.schedule, text.time_zone)
            .map_err(|e| wrong("schedule", e))?;
    }
    let expiry_seconds = if text.expiry.trim().is_empty() {
        0
    } else {
        cairn_types::policy::parse_duration(text.expiry).map_err(|e| wrong("expiry", e))?
    };
    cairn_types::policy::check_pattern(text.pattern).map_err(|e| wrong("pattern", e))?;
    let policy = SnapshotPolicy {
        schedule: text.schedule.trim().to_string(),
        time_zone: text.time_zone.trim().to_string(),
        schedule_when_stopped: text.when_stopped,
        mode: text.mode,
        expiry_seconds,
        retention: text.retention,
        pattern: text.pattern.to_string(),
    };
    Ok((policy != SnapshotPolicy::default()).then(|| Box::new(policy)))
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

fn proto_retention(r: &proto::CairnRetention) -> Retention {
    Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_yearly: r.keep_yearly,
    }
}

/// A per-snapshot expiry: empty is 0 (as the policy says).
fn expiry(text: &str, path: &str) -> Result<u64, ConfigError> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    cairn_types::policy::parse_duration(text).map_err(|e| ConfigError::at(path, e.to_string()))
}

fn parse_uuid(text: &str, path: &str) -> Result<Uuid, ConfigError> {
    text.parse()
        .map_err(|e| ConfigError::at(path, format!("{text:?} is not a UUID: {e}")))
}

fn proto_counter(cmd: &Option<proto::InstanceOpsCmd>) -> AppInstanceOpsCmd {
    let cmd = cmd.clone().unwrap_or_default();
    AppInstanceOpsCmd {
        counter: cmd.counter,
        apply_time: cmd.ops_time,
    }
}

fn proto_app(app: &proto::AppInstanceConfig, path: &str) -> Result<AppInstanceConfig, ConfigError> {
    let id = app
        .uuidandversion
        .as_ref()
        .ok_or_else(|| ConfigError::at(format!("{path}.uuidandversion"), "missing"))?;
    let snapshot = app.snapshot.clone().unwrap_or_default();
    let mut snapshots = Vec::new();
    for (i, desc) in snapshot.snapshots.iter().enumerate() {
        let at = format!("{path}.snapshot.snapshots[{i}]");
        snapshots.push(SnapshotDesc {
            snapshot_id: parse_uuid(&desc.id, &format!("{at}.id"))?,
            snapshot_type: match proto::SnapshotType::try_from(desc.r#type) {
                Ok(proto::SnapshotType::AppUpdate) => SnapshotType::AppUpdate,
                Ok(proto::SnapshotType::Immediate) => SnapshotType::Immediate,
                Ok(proto::SnapshotType::Unspecified) => SnapshotType::Unspecified,
                Err(_) => {
                    return Err(ConfigError::at(
                        format!("{at}.type"),
                        format!("unknown snapshot type {}", desc.r#type),
                    ));
                }
            },
            name: desc.cairn_name.clone(),
            description: desc.cairn_description.clone(),
            expiry_seconds: expiry(&desc.cairn_expiry, &format!("{at}.cairn_expiry"))?,
            group_id: if desc.cairn_group.trim().is_empty() {
                Uuid::nil()
            } else {
                parse_uuid(desc.cairn_group.trim(), &format!("{at}.cairn_group"))?
            },
            mode: snapshot_mode(&desc.cairn_mode, &format!("{at}.cairn_mode"))?,
        });
    }
    let mut refs = Vec::new();
    for (i, volume) in app.volume_ref_list.iter().enumerate() {
        refs.push(VolumeRefConfig {
            volume_id: parse_uuid(&volume.uuid, &format!("{path}.volume_ref_list[{i}].uuid"))?,
            generation_counter: volume.generation_count,
            local_generation_counter: 0,
            mount_dir: volume.mount_dir.clone(),
        });
    }
    // Cairn's extension wins over EVE's fields: only a Cairn-aware controller sends it, and it
    // can say more (a process, a guest agent). EVE's fields alone describe a VM.
    let (domain, unrunnable) = match &app.cairn_domain {
        Some(d) => (
            Some(proto_domain(d, &format!("{path}.cairn_domain"))?),
            None,
        ),
        None => match eve_domain(app) {
            Ok(spec) => (Some(spec), None),
            Err(reason) => (None, Some(reason)),
        },
    };
    check_tenant(&app.cairn_tenant, &format!("{path}.tenant"))?;
    Ok(AppInstanceConfig {
        uuid_and_version: UUIDandVersion {
            uuid: parse_uuid(&id.uuid, &format!("{path}.uuidandversion.uuid"))?,
            version: id.version.clone(),
        },
        display_name: app.displayname.clone(),
        activate: app.activate,
        volume_ref_config_list: refs,
        restart_cmd: proto_counter(&app.restart),
        purge_cmd: proto_counter(&app.purge),
        snapshot: SnapshotConfig {
            active_snapshot: snapshot.active_snapshot,
            max_snapshots: snapshot.max_snapshots,
            rollback_cmd: proto_counter(&snapshot.rollback_cmd),
            snapshots,
            policy: policy(
                PolicyText {
                    schedule: &snapshot.cairn_schedule,
                    time_zone: &snapshot.cairn_time_zone,
                    when_stopped: snapshot.cairn_schedule_when_stopped,
                    expiry: &snapshot.cairn_expiry,
                    retention: snapshot
                        .cairn_retention
                        .as_ref()
                        .map(proto_retention)
                        .unwrap_or_default(),
                    pattern: &snapshot.cairn_pattern,
                    mode: snapshot_mode(
                        &snapshot.cairn_schedule_mode,
                        &format!("{path}.snapshot.cairn_schedule_mode"),
                    )?,
                },
                &format!("{path}.snapshot"),
            )?,
        },
        domain,
        unrunnable,
        tenant: app.cairn_tenant.clone(),
        restart_policy: restart_policy(
            &app.cairn_restart_policy,
            &format!("{path}.cairn_restart_policy"),
        )?,
        quiesce: match &app.cairn_quiesce {
            None => None,
            // Protobuf cannot tell an empty list or a 0 from an absent one: empty is no hook,
            // 0 the default timeout.
            Some(q) => Some(quiesce_hooks(
                QuiesceText {
                    pre: (!q.pre.is_empty()).then(|| q.pre.clone()),
                    post: (!q.post.is_empty()).then(|| q.post.clone()),
                    timeout_seconds: (q.timeout_seconds != 0).then_some(q.timeout_seconds),
                    proceed_without_guest_agent: q.proceed_without_guest_agent,
                },
                parse_uuid(&id.uuid, &format!("{path}.uuidandversion.uuid"))?,
                &format!("{path}.cairn_quiesce"),
            )?),
        },
        ..Default::default()
    })
}

/// The domain of an app described only with EVE's fields: a VM from `fixedresources`, its
/// disks in `volumeRefList` order, booted from `kernel` directly or, without one, from its first
/// disk through the BIOS (EVE's KVM on amd64: no `bootloader` means qemu's SeaBIOS). What EVE
/// can express and Cairn cannot run yet is not a fault of the config: `Err` says which field and why, and the app is
/// accepted and reported broken with it (EVE's field names, as the controller knows them).
fn eve_domain(app: &proto::AppInstanceConfig) -> Result<DomainSpec, String> {
    // EVE: "VolumeRefs ... will supersede drives"; drives name images, not volumes.
    if app.volume_ref_list.is_empty() && !app.drives.is_empty() {
        return Err(
            "drives: EVE's deprecated drives (images, not volumes) are not supported; list the app's volumes in volumeRefList"
                .into(),
        );
    }
    let Some(vm) = &app.fixedresources else {
        return Err(
            "fixedresources: missing: nothing says how to run the app (give fixedresources with memory, kernel and ramdisk)"
                .into(),
        );
    };
    let mode = match proto::VmMode::try_from(vm.virtualization_mode) {
        // On KVM, EVE runs PV and HVM alike as a q35 VM, from a kernel or from the first disk.
        Ok(mode @ (proto::VmMode::Pv | proto::VmMode::Hvm)) => mode.as_str_name(),
        Ok(proto::VmMode::Legacy) => {
            return Err(
                "fixedresources.virtualizationMode LEGACY: emulated IDE disks and e1000 network are not supported; use HVM or PV (virtio)"
                    .into(),
            );
        }
        Ok(proto::VmMode::Fml) => {
            return Err(
                "fixedresources.virtualizationMode FML: the machine-learning mode (GPU passthrough) is not supported; use HVM or PV"
                    .into(),
            );
        }
        Ok(proto::VmMode::Nohyper) => return crate::container::eve_container(app),
        Ok(proto::VmMode::Filler) => {
            return Err(
                "fixedresources.virtualizationMode 2 (PVH): not supported; use HVM or PV".into(),
            );
        }
        Err(_) => {
            return Err(format!(
                "fixedresources.virtualizationMode {}: not a mode EVE defines; use HVM or PV",
                vm.virtualization_mode
            ));
        }
    };
    firmware(vm)?;
    if vm.kernel.is_empty() {
        if !vm.ramdisk.is_empty() {
            return Err(format!(
                "fixedresources.ramdisk {:?} without fixedresources.kernel: a ramdisk needs the kernel it belongs to; give kernel, or neither to boot from the first disk",
                vm.ramdisk
            ));
        }
        // qemu takes a command line only with -kernel; a disk's boot loader has its own.
        if !vm.extraargs.is_empty() {
            return Err(format!(
                "fixedresources.extraargs {:?} without fixedresources.kernel: a disk boot takes its command line from the disk's boot loader; drop extraargs or give kernel",
                vm.extraargs
            ));
        }
        if app.volume_ref_list.is_empty() {
            return Err(format!(
                "fixedresources.virtualizationMode {mode} without fixedresources.kernel boots from the first disk, and volumeRefList is empty: give the app a bootable volume or a kernel"
            ));
        }
    }
    if vm.memory == 0 {
        return Err("fixedresources.memory 0: a VM needs memory (KiB > 0)".into());
    }
    Ok(DomainSpec::Vm(VmSpec {
        // Empty: the domain-manager boots the first disk through SeaBIOS.
        kernel: vm.kernel.clone().into(),
        initrd: vm.ramdisk.clone().into(),
        append: vm.extraargs.clone(),
        // EVE's memory is in KiB, rounded up to whole MiB as EVE's KVM does.
        memory_mib: vm.memory.div_ceil(1024),
        // EVE's default is one VCPU.
        cpus: vm.vcpus.max(1),
        guest_agent: false,
    }))
}

/// EVE's firmware choice for a KVM VM on amd64 (zedmanager's `MaybeAddDomainConfig`): no
/// `bootloader` (or the `pygrub` EVE drops) is qemu's default SeaBIOS, as is EVE's own
/// `seabios.bin`; OVMF (`ovmf.bin`, `OVMF_CODE.fd`) is UEFI. `boot_mode` is read by EVE's
/// kubevirt only; Cairn refuses UEFI there too rather than boot a UEFI disk through a BIOS.
fn firmware(vm: &proto::VmConfig) -> Result<(), String> {
    const UEFI: &str = "UEFI firmware (OVMF) is not supported yet: Cairn boots disks through SeaBIOS (legacy BIOS, MBR disks); use a BIOS-bootable disk or give fixedresources.kernel";
    match vm.bootloader.as_str() {
        "" | "/usr/bin/pygrub" | "/usr/lib/xen/boot/seabios.bin" => {}
        loader if loader.to_ascii_lowercase().contains("ovmf") => {
            return Err(format!("fixedresources.bootloader {loader:?}: {UEFI}"));
        }
        loader => {
            return Err(format!(
                "fixedresources.bootloader {loader:?}: not a firmware Cairn knows (EVE's /usr/lib/xen/boot/seabios.bin or none boots through SeaBIOS)"
            ));
        }
    }
    if vm.boot_mode == proto::VmBootMode::Uefi as i32 {
        return Err(format!("fixedresources.bootMode VM_BOOT_MODE_UEFI: {UEFI}"));
    }
    Ok(())
}

fn proto_domain(d: &proto::CairnDomain, path: &str) -> Result<DomainSpec, ConfigError> {
    match d.kind.as_str() {
        "vm" => Ok(DomainSpec::Vm(VmSpec {
            kernel: d.kernel.clone().into(),
            initrd: d.initrd.clone().into(),
            append: d.append.clone(),
            memory_mib: d.memory_mib,
            cpus: d.cpus.max(1),
            guest_agent: d.guest_agent,
        })),
        "process" => Ok(DomainSpec::Process(ProcessSpec {
            command: d.command.clone().into(),
            args: d.args.clone(),
            env: d.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: (!d.working_dir.is_empty()).then(|| d.working_dir.clone().into()),
        })),
        other => Err(ConfigError::at(
            format!("{path}.kind"),
            format!("{other:?} is not a domain kind (vm or process)"),
        )),
    }
}

fn proto_content_tree(
    tree: &proto::ContentTree,
    datastores: &BTreeMap<Uuid, DatastoreConfig>,
    path: &str,
) -> Result<ContentTreeConfig, ConfigError> {
    // EVE: `ds_ids_list` supersedes the deprecated `dsId`.
    let ids = if tree.ds_ids_list.is_empty() {
        vec![tree.ds_id.clone()]
    } else {
        tree.ds_ids_list.clone()
    };
    let datastore_id_list = ids
        .iter()
        .enumerate()
        .map(|(j, id)| {
            let at = if tree.ds_ids_list.is_empty() {
                format!("{path}.dsId")
            } else {
                format!("{path}.ds_ids_list[{j}]")
            };
            parse_uuid(id, &at)
        })
        .collect::<Result<_, _>>()?;
    let format = match proto::Format::try_from(tree.iformat) {
        Ok(proto::Format::Raw) => ContentFormat::Raw,
        Ok(proto::Format::Qcow) => ContentFormat::Qcow,
        Ok(proto::Format::Qcow2) => ContentFormat::Qcow2,
        Ok(proto::Format::Vhd) => ContentFormat::Vhd,
        Ok(proto::Format::Vmdk) => ContentFormat::Vmdk,
        Ok(proto::Format::Ova) => ContentFormat::Ova,
        Ok(proto::Format::Vhdx) => ContentFormat::Vhdx,
        Ok(proto::Format::Container) => ContentFormat::Container,
        Ok(proto::Format::Iso) => ContentFormat::Iso,
        Ok(proto::Format::Pvc) => ContentFormat::Pvc,
        Ok(proto::Format::FmtUnknown) | Err(_) => ContentFormat::Unknown,
    };
    Ok(content_tree(
        ContentTreeConfig {
            content_id: parse_uuid(&tree.uuid, &format!("{path}.uuid"))?,
            datastore_id_list,
            relative_url: tree.url.clone(),
            format,
            content_sha256: tree.sha256.trim().to_ascii_lowercase(),
            max_download_size: tree.max_size_bytes,
            generation_counter: tree.generation_count,
            display_name: tree.display_name.clone(),
            datastores: Vec::new(),
        },
        datastores,
    ))
}

fn proto_volume(volume: &proto::Volume, path: &str) -> Result<VolumeConfig, ConfigError> {
    let format = match volume.cairn_format.as_str() {
        "" | "qcow2" => VolumeFormat::Qcow2,
        "raw" => VolumeFormat::Raw,
        "dir" => VolumeFormat::Dir,
        other => {
            return Err(ConfigError::at(
                format!("{path}.cairn_format"),
                format!("{other:?} is not a volume format (qcow2, raw or dir)"),
            ));
        }
    };
    let restore_mode = match volume.cairn_restore_mode.as_str() {
        "" | "auto" => DirRestoreMode::Auto,
        "btrfs_swap" => DirRestoreMode::BtrfsSwap,
        "squashfs_overlay" => DirRestoreMode::SquashfsOverlay,
        "rsync" => DirRestoreMode::Rsync,
        "copy" => DirRestoreMode::Copy,
        other => {
            return Err(ConfigError::at(
                format!("{path}.cairn_restore_mode"),
                format!(
                    "{other:?} is not a restore mode (auto, btrfs_swap, squashfs_overlay, rsync or copy)"
                ),
            ));
        }
    };
    let max_vol_size = u64::try_from(volume.maxsizebytes).map_err(|_| {
        ConfigError::at(
            format!("{path}.maxsizebytes"),
            format!("{} is negative", volume.maxsizebytes),
        )
    })?;
    Ok(VolumeConfig {
        volume_id: parse_uuid(&volume.uuid, &format!("{path}.uuid"))?,
        generation_counter: volume.generation_count,
        display_name: volume.display_name.clone(),
        max_vol_size,
        format,
        origin: proto_origin(volume, path)?,
        purgeable: volume.cairn_purgeable,
        restore_mode,
        ..Default::default()
    })
}

/// A volume's origin: EVE's `VCOT_DOWNLOAD` names a content tree; Cairn's base image is the
/// other origin a controller can give, not together with a download.
fn proto_origin(volume: &proto::Volume, path: &str) -> Result<VolumeOrigin, ConfigError> {
    let download = volume
        .origin
        .as_ref()
        .filter(|o| o.r#type == proto::VolumeContentOriginType::VcotDownload as i32);
    match (download, volume.cairn_base_image.is_empty()) {
        (Some(_), false) => Err(ConfigError::at(
            format!("{path}.origin"),
            format!(
                "volume {} is VCOT_DOWNLOAD and has a cairn_base_image: give one origin",
                volume.uuid
            ),
        )),
        (Some(origin), true) => Ok(VolumeOrigin::ContentTree {
            id: parse_uuid(
                &origin.download_content_tree_id,
                &format!("{path}.origin.downloadContentTreeID"),
            )?,
        }),
        (None, false) => Ok(VolumeOrigin::BaseImage {
            path: volume.cairn_base_image.clone().into(),
            sha256: volume.cairn_base_sha256.clone(),
        }),
        (None, true) => Ok(VolumeOrigin::Blank),
    }
}

// ---- validation, shared by both sources ----

/// Faults that no field type can express: duplicates and dangling references.
/// A snapshot mode by its name; empty is `stopped`.
fn snapshot_mode(text: &str, path: &str) -> Result<cairn_types::SnapshotMode, ConfigError> {
    use cairn_types::SnapshotMode;
    match text.trim() {
        "" | "stopped" => Ok(SnapshotMode::Stopped),
        "live" => Ok(SnapshotMode::Live),
        "stateful" => Ok(SnapshotMode::Stateful),
        other => Err(ConfigError::at(
            path,
            format!("unknown snapshot mode {other:?}: use stopped, live or stateful"),
        )),
    }
}

fn restart_policy(text: &str, path: &str) -> Result<cairn_types::RestartPolicy, ConfigError> {
    use cairn_types::RestartPolicy;
    match text.trim() {
        "" | "always" => Ok(RestartPolicy::Always),
        "on_failure" => Ok(RestartPolicy::OnFailure),
        "never" => Ok(RestartPolicy::Never),
        other => Err(ConfigError::at(
            path,
            format!("unknown restart policy {other:?}: use always, on_failure or never"),
        )),
    }
}

/// A volume made from a content tree the config does not have is the controller's fault in
/// that one object: the volume is accepted and reported Failed with the reason (EVE's
/// volumemgr would wait for the tree forever, saying so only in its log), and the rest of the
/// config goes into force.
fn mark_unusable_volumes(config: &mut DeviceConfig) {
    let trees: BTreeSet<Uuid> = config.content_trees.iter().map(|t| t.content_id).collect();
    for volume in &mut config.volumes {
        if let VolumeOrigin::ContentTree { id } = volume.origin
            && !trees.contains(&id)
        {
            volume.unusable = Some(format!(
                "volume {} is made from content tree {id}, which is not in the config's content trees",
                volume.volume_id
            ));
        }
    }
}

pub fn validate(config: &DeviceConfig) -> Result<(), ConfigError> {
    let items = cairn_types::ConfigItemValueMap {
        items: config.config_items.clone(),
    };
    if let Err(why) = items.volume_delete_grace_seconds() {
        return Err(ConfigError::at(
            format!(
                "config_items[{:?}]",
                cairn_types::device::VOLUME_DELETE_GRACE_ITEM
            ),
            why,
        ));
    }
    let mut apps: HashMap<Uuid, usize> = HashMap::new();
    let mut snapshots: HashMap<Uuid, String> = HashMap::new();
    let volumes: BTreeSet<Uuid> = config.volumes.iter().map(|v| v.volume_id).collect();
    for (i, app) in config.apps.iter().enumerate() {
        let uuid = app.app_uuid();
        if let Some(first) = apps.insert(uuid, i) {
            return Err(ConfigError::at(
                format!("apps[{i}].uuid"),
                format!("app {uuid} appears twice (also apps[{first}])"),
            ));
        }
        let mut groups: HashMap<Uuid, usize> = HashMap::new();
        for (j, desc) in app.snapshot.snapshots.iter().enumerate() {
            let at = format!("apps[{i}].snapshot.snapshots[{j}].id");
            if let Some(first) = snapshots.insert(desc.snapshot_id, at.clone()) {
                return Err(ConfigError::at(
                    at,
                    format!("snapshot {} appears twice (also {first})", desc.snapshot_id),
                ));
            }
            // Group members meet at stop barriers: a group snapshot stops them.
            if !desc.group_id.is_nil() && desc.mode != cairn_types::SnapshotMode::Stopped {
                return Err(ConfigError::at(
                    format!("apps[{i}].snapshot.snapshots[{j}].mode"),
                    format!(
                        "snapshot {} of group snapshot {} is {:?}: a group snapshot is taken stopped",
                        desc.snapshot_id, desc.group_id, desc.mode
                    ),
                ));
            }
            // Memory state exists only for a VM.
            if desc.mode == cairn_types::SnapshotMode::Stateful
                && !matches!(app.domain, Some(DomainSpec::Vm(_)))
            {
                return Err(ConfigError::at(
                    format!("apps[{i}].snapshot.snapshots[{j}].mode"),
                    format!(
                        "snapshot {} of app {uuid} ({}) is stateful, but the app is not a VM: only a VM has memory state to save; use live or stopped",
                        desc.snapshot_id, app.display_name
                    ),
                ));
            }
            // A group snapshot is one snapshot per member app, taken now (IMMEDIATE).
            if !desc.group_id.is_nil() {
                let at = format!("apps[{i}].snapshot.snapshots[{j}].group");
                if let Some(first) = groups.insert(desc.group_id, j) {
                    return Err(ConfigError::at(
                        at,
                        format!(
                            "group {} is listed twice by this app (also snapshots[{first}]): a member takes one snapshot of a group",
                            desc.group_id
                        ),
                    ));
                }
                if desc.snapshot_type != SnapshotType::Immediate {
                    return Err(ConfigError::at(
                        at,
                        format!(
                            "snapshot {} of group {} must be of type immediate",
                            desc.snapshot_id, desc.group_id
                        ),
                    ));
                }
            }
        }
        if app
            .snapshot
            .policy
            .as_ref()
            .is_some_and(|p| p.mode == cairn_types::SnapshotMode::Stateful)
            && !matches!(app.domain, Some(DomainSpec::Vm(_)))
        {
            return Err(ConfigError::at(
                format!("apps[{i}].snapshot.schedule_mode"),
                format!(
                    "app {uuid} ({}) schedules stateful snapshots, but it is not a VM: only a VM has memory state to save; use live or stopped",
                    app.display_name
                ),
            ));
        }
        let active = &app.snapshot.active_snapshot;
        if !active.is_empty() && active.parse::<Uuid>().is_err() {
            return Err(ConfigError::at(
                format!("apps[{i}].snapshot.active_snapshot"),
                format!("{active:?} is not a UUID"),
            ));
        }
        for (j, volume) in app.volume_ref_config_list.iter().enumerate() {
            if !volumes.contains(&volume.volume_id) {
                return Err(ConfigError::at(
                    format!("apps[{i}].volume_refs[{j}].uuid"),
                    format!("volume {} is not in the config's volumes", volume.volume_id),
                ));
            }
        }
        if let Some(DomainSpec::Vm(vm)) = &app.domain
            && vm.memory_mib == 0
        {
            return Err(ConfigError::at(
                format!("apps[{i}].domain.memory_mib"),
                "a VM needs memory (MiB > 0)",
            ));
        }
    }
    let mut trees: HashMap<Uuid, usize> = HashMap::new();
    for (i, tree) in config.content_trees.iter().enumerate() {
        if let Some(first) = trees.insert(tree.content_id, i) {
            return Err(ConfigError::at(
                format!("content_trees[{i}].uuid"),
                format!(
                    "content tree {} appears twice (also content_trees[{first}])",
                    tree.content_id
                ),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, volume) in config.volumes.iter().enumerate() {
        crate::container::check_image_volume(volume, &config.content_trees, i)?;
        if let VolumeOrigin::ContentTree { id } = volume.origin
            && volume.format == VolumeFormat::Dir
            && !crate::container::is_container_tree(id, &config.content_trees)
        {
            return Err(ConfigError::at(
                format!("volumes[{i}].format"),
                format!(
                    "volume {} is made from content tree {id} (a disk image): its format must be qcow2 or raw",
                    volume.volume_id
                ),
            ));
        }
        if matches!(volume.origin, VolumeOrigin::Export { .. })
            && volume.format != VolumeFormat::Qcow2
        {
            return Err(ConfigError::at(
                format!("volumes[{i}].format"),
                format!(
                    "volume {} is restored from an export, which holds qcow2 images: its format must be qcow2",
                    volume.volume_id
                ),
            ));
        }
        if !seen.insert((volume.volume_id, volume.generation_counter)) {
            return Err(ConfigError::at(
                format!("volumes[{i}].uuid"),
                format!(
                    "volume {} generation {} appears twice",
                    volume.volume_id, volume.generation_counter
                ),
            ));
        }
    }
    Ok(())
}

// ---- consistency groups ----

/// Checks the groups against the apps and hands each member its group. `list` is the groups'
/// name in the source (`groups` in the local file, `cairn_groups` in the protobuf).
///
/// - a group has an id, members, each an app of this config, each in no other group;
/// - a group snapshot (a snapshot with a group id) is listed by every member of one group, so
///   that its members arrive in one config and none waits for a request that never comes;
/// - an app that lists a group snapshot is a member of a group.
fn apply_groups(
    config: &mut DeviceConfig,
    groups: Vec<ConsistencyGroup>,
    list: &str,
) -> Result<(), ConfigError> {
    let apps: HashMap<Uuid, usize> = config
        .apps
        .iter()
        .enumerate()
        .map(|(i, a)| (a.app_uuid(), i))
        .collect();
    let mut ids: HashMap<Uuid, usize> = HashMap::new();
    let mut member_of: HashMap<Uuid, usize> = HashMap::new();
    for (i, group) in groups.iter().enumerate() {
        let at = format!("{list}[{i}]");
        if group.id.is_nil() {
            return Err(ConfigError::at(
                format!("{at}.id"),
                "a group needs an id (a UUID, not nil)",
            ));
        }
        if let Some(first) = ids.insert(group.id, i) {
            return Err(ConfigError::at(
                format!("{at}.id"),
                format!("group {} appears twice (also {list}[{first}])", group.id),
            ));
        }
        if group.members.is_empty() {
            return Err(ConfigError::at(
                format!("{at}.members"),
                format!("group {} has no members", group.id),
            ));
        }
        for (j, member) in group.members.iter().enumerate() {
            let at = format!("{at}.members[{j}]");
            if !apps.contains_key(member) {
                return Err(ConfigError::at(
                    at,
                    format!("app {member} is not in the config's apps"),
                ));
            }
            if let Some(other) = member_of.insert(*member, i) {
                return Err(ConfigError::at(
                    at,
                    if other == i {
                        format!("app {member} is listed twice")
                    } else {
                        format!(
                            "app {member} is already a member of group {} ({list}[{other}]): an app is in one group at most",
                            groups[other].id
                        )
                    },
                ));
            }
        }
    }
    // Every group snapshot: its group, and which members list it.
    let mut listed: BTreeMap<Uuid, (usize, BTreeSet<Uuid>)> = BTreeMap::new();
    for (i, app) in config.apps.iter().enumerate() {
        for (j, desc) in app.snapshot.snapshots.iter().enumerate() {
            if desc.group_id.is_nil() {
                continue;
            }
            let at = format!("apps[{i}].snapshot.snapshots[{j}].group");
            let Some(&g) = member_of.get(&app.app_uuid()) else {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "app {} lists group snapshot {} but is a member of no group (declare the group and its members in groups)",
                        app.app_uuid(),
                        desc.group_id
                    ),
                ));
            };
            let entry = listed.entry(desc.group_id).or_insert((g, BTreeSet::new()));
            if entry.0 != g {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "group snapshot {} is listed by members of two groups ({} and {})",
                        desc.group_id, groups[entry.0].id, groups[g].id
                    ),
                ));
            }
            entry.1.insert(app.app_uuid());
        }
    }
    for (snapshot, (g, members)) in &listed {
        if let Some(missing) = groups[*g].members.iter().find(|m| !members.contains(m)) {
            return Err(ConfigError::at(
                format!("{list}[{g}].members"),
                format!(
                    "member app {missing} does not list group snapshot {snapshot}: every member lists its own snapshot of it"
                ),
            ));
        }
    }
    for (app, g) in member_of {
        config.apps[apps[&app]].group = Some(Box::new(groups[g].clone()));
    }
    Ok(())
}

// ---- clones ----

/// An app made from another app's snapshot, as either source names it.
#[derive(Debug, Clone)]
struct CloneSpec {
    /// The clone's index in the config's apps.
    app: usize,
    /// The field's name in its source (`clone_of`, `cairn_clone`), for errors.
    field: &'static str,
    /// The app cloned.
    source: Uuid,
    /// The snapshot of `source` the clone starts from.
    snapshot: Uuid,
}

/// Turns each clone spec into origins of the clone's volumes: its volume `j` (a volume of its
/// own, declared in the config's volumes) starts as a copy of the source app's volume `j` in the
/// snapshot (`VolumeOrigin::Snapshot`, made by the volume-manager from the snapshot's record).
/// Checks: the source app is in the config and is not the clone, the snapshot is listed in the
/// source's snapshots, both have as many volumes, of the same format, no volume of the clone is
/// used by another app, and none has a base image. Run after [`validate`] (the volume refs are
/// known to name configured volumes).
///
/// The origin only matters when a volume is made: once the clone exists, its spec may be
/// dropped from the config (it must be before the snapshot leaves the source's list) and the
/// clone lives on as an ordinary app.
fn apply_clones(config: &mut DeviceConfig, clones: &[CloneSpec]) -> Result<(), ConfigError> {
    for spec in clones {
        let i = spec.app;
        let at = format!("apps[{i}].{}", spec.field);
        let clone = &config.apps[i];
        if spec.source == clone.app_uuid() {
            return Err(ConfigError::at(
                format!("{at}.app"),
                "an app cannot be a clone of itself",
            ));
        }
        let Some((k, source)) = config
            .apps
            .iter()
            .enumerate()
            .find(|(_, a)| a.app_uuid() == spec.source)
        else {
            return Err(ConfigError::at(
                format!("{at}.app"),
                format!("app {} is not in the config's apps", spec.source),
            ));
        };
        if !source
            .snapshot
            .snapshots
            .iter()
            .any(|d| d.snapshot_id == spec.snapshot)
        {
            return Err(ConfigError::at(
                format!("{at}.snapshot"),
                format!(
                    "snapshot {} is not in the snapshots of app {} (apps[{k}].snapshot.snapshots)",
                    spec.snapshot, spec.source
                ),
            ));
        }
        let (mine, theirs) = (
            &clone.volume_ref_config_list,
            &source.volume_ref_config_list,
        );
        if mine.len() != theirs.len() {
            return Err(ConfigError::at(
                format!("apps[{i}].volume_refs"),
                format!(
                    "a clone has one volume of its own per volume of its source: {} here, {} in app {} (apps[{k}])",
                    mine.len(),
                    theirs.len(),
                    spec.source
                ),
            ));
        }
        let mut origins = Vec::new();
        for (j, (to, from)) in mine.iter().zip(theirs).enumerate() {
            let at = format!("apps[{i}].volume_refs[{j}].uuid");
            if let Some((n, other)) = config.apps.iter().enumerate().find(|(n, a)| {
                *n != i
                    && a.volume_ref_config_list
                        .iter()
                        .any(|r| r.volume_id == to.volume_id)
            }) {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "volume {} is also used by app {} (apps[{n}]); a clone's volumes must be its own new volumes",
                        to.volume_id,
                        other.app_uuid()
                    ),
                ));
            }
            let format_of = |id: Uuid, generation: i64| {
                config
                    .volumes
                    .iter()
                    .find(|v| v.volume_id == id && v.generation_counter == generation)
                    .or_else(|| config.volumes.iter().find(|v| v.volume_id == id))
                    .map(|v| v.format)
            };
            let (want, have) = (
                format_of(from.volume_id, from.generation_counter),
                format_of(to.volume_id, to.generation_counter),
            );
            if want != have {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "volume {} is {have:?} but the volume it clones ({} of app {}) is {want:?}; a clone has its source's formats",
                        to.volume_id, from.volume_id, spec.source
                    ),
                ));
            }
            origins.push((to.volume_id, from.volume_id));
        }
        for (to, from) in origins {
            for (n, volume) in config.volumes.iter_mut().enumerate() {
                if volume.volume_id != to {
                    continue;
                }
                if matches!(volume.origin, VolumeOrigin::BaseImage { .. }) {
                    return Err(ConfigError::at(
                        format!("volumes[{n}].base_image"),
                        format!(
                            "volume {to} is a clone's volume (app {}): its content comes from snapshot {}, it cannot also have a base image",
                            config.apps[i].app_uuid(),
                            spec.snapshot
                        ),
                    ));
                }
                volume.origin = VolumeOrigin::Snapshot {
                    snapshot: spec.snapshot,
                    volume: from,
                };
            }
        }
    }
    Ok(())
}
