//! The subset of EVE's API v2 that Cairn speaks, as prost messages with EVE's message names,
//! field numbers and types (eve-api `proto/{auth,register,eveuuid,certs,config,info}`). Fields
//! Cairn does not use are simply not declared: protobuf skips unknown fields on decode.
//! Cairn's own extensions use field numbers ≥ 1000, which an EVE controller never sends.

// ---- org.lfedge.eve.common ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum HashAlgorithm {
    Invalid = 0,
    Sha25616bytes = 1,
    Sha25632bytes = 2,
}

// ---- org.lfedge.eve.auth ----

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthBody {
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthContainer {
    #[prost(message, optional, tag = "1")]
    pub protected_payload: Option<AuthBody>,
    #[prost(enumeration = "HashAlgorithm", tag = "2")]
    pub algo: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub sender_cert_hash: Vec<u8>,
    /// ECDSA P-256 over SHA-256 of the payload, raw r‖s (64 bytes).
    #[prost(bytes = "vec", tag = "4")]
    pub signature_hash: Vec<u8>,
    /// The full PEM certificate, base64 (registration only).
    #[prost(bytes = "vec", tag = "5")]
    pub sender_cert: Vec<u8>,
}

// ---- org.lfedge.eve.register ----

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZRegisterMsg {
    #[prost(string, tag = "1")]
    pub on_board_key: String,
    #[prost(bytes = "vec", tag = "2")]
    pub pem_cert: Vec<u8>,
    #[prost(string, tag = "3")]
    pub serial: String,
    #[prost(string, tag = "4")]
    pub soft_serial: String,
}

// ---- org.lfedge.eve.uuid ----

#[derive(Clone, PartialEq, prost::Message)]
pub struct UuidRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UuidResponse {
    #[prost(string, tag = "1")]
    pub uuid: String,
    #[prost(string, tag = "2")]
    pub manufacturer: String,
    #[prost(string, tag = "3")]
    pub product_name: String,
}

// ---- org.lfedge.eve.certs ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ZCertType {
    CertTypeControllerNone = 0,
    CertTypeControllerSigning = 1,
    CertTypeControllerIntermediate = 2,
    CertTypeControllerEcdhExchange = 3,
    CertTypeDeviceOnboarding = 10,
    CertTypeDeviceRestrictedSigning = 11,
    CertTypeDeviceEndorsementRsa = 12,
    CertTypeDeviceEcdhExchange = 13,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZCert {
    #[prost(enumeration = "HashAlgorithm", tag = "1")]
    pub hash_algo: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub cert_hash: Vec<u8>,
    #[prost(enumeration = "ZCertType", tag = "3")]
    pub r#type: i32,
    /// PEM.
    #[prost(bytes = "vec", tag = "4")]
    pub cert: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZControllerCert {
    #[prost(message, repeated, tag = "1")]
    pub certs: Vec<ZCert>,
}

// ---- org.lfedge.eve.config ----

#[derive(Clone, PartialEq, prost::Message)]
pub struct UuidAndVersion {
    #[prost(string, tag = "1")]
    pub uuid: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigItem {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigRequest {
    #[prost(string, tag = "1")]
    pub config_hash: String,
    #[prost(bytes = "vec", tag = "2")]
    pub integrity_token: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigResponse {
    #[prost(message, optional, tag = "1")]
    pub config: Option<EdgeDevConfig>,
    #[prost(string, tag = "2")]
    pub config_hash: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EdgeDevConfig {
    #[prost(message, optional, tag = "1")]
    pub id: Option<UuidAndVersion>,
    #[prost(message, repeated, tag = "4")]
    pub apps: Vec<AppInstanceConfig>,
    #[prost(message, repeated, tag = "11")]
    pub config_items: Vec<ConfigItem>,
    #[prost(message, repeated, tag = "21")]
    pub volumes: Vec<Volume>,
    /// Cairn: the consistency groups.
    #[prost(message, repeated, tag = "1000")]
    pub cairn_groups: Vec<CairnGroup>,
}

/// Cairn extension (field 1000 of `EdgeDevConfig`): a consistency group, its members (app
/// UUIDs) and the policy of its scheduled group snapshots.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CairnGroup {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, repeated, tag = "3")]
    pub members: Vec<String>,
    #[prost(string, tag = "4")]
    pub schedule: String,
    #[prost(string, tag = "5")]
    pub time_zone: String,
    #[prost(string, tag = "6")]
    pub expiry: String,
    #[prost(message, optional, tag = "7")]
    pub retention: Option<CairnRetention>,
    #[prost(string, tag = "8")]
    pub pattern: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InstanceOpsCmd {
    #[prost(uint32, tag = "2")]
    pub counter: u32,
    #[prost(string, tag = "4")]
    pub ops_time: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SnapshotType {
    Unspecified = 0,
    AppUpdate = 1,
    Immediate = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotDesc {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(enumeration = "SnapshotType", tag = "2")]
    pub r#type: i32,
    /// Cairn: a name and a description for people.
    #[prost(string, tag = "1000")]
    pub cairn_name: String,
    #[prost(string, tag = "1001")]
    pub cairn_description: String,
    /// Cairn: `7d`, `12h`: this snapshot expires that long after it was taken.
    #[prost(string, tag = "1002")]
    pub cairn_expiry: String,
    /// Cairn: the consistency group (a UUID) of this snapshot; empty when none.
    #[prost(string, tag = "1003")]
    pub cairn_group: String,
    /// Cairn: `stopped` (empty: the same), `live` or `stateful` (issue 11).
    #[prost(string, tag = "1004")]
    pub cairn_mode: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotConfig {
    #[prost(string, tag = "1")]
    pub active_snapshot: String,
    #[prost(message, optional, tag = "2")]
    pub rollback_cmd: Option<InstanceOpsCmd>,
    #[prost(uint32, tag = "3")]
    pub max_snapshots: u32,
    #[prost(message, repeated, tag = "4")]
    pub snapshots: Vec<SnapshotDesc>,
    /// Cairn: 5-field cron or `@daily`-style schedule of device-originated snapshots.
    #[prost(string, tag = "1000")]
    pub cairn_schedule: String,
    /// Cairn: the IANA zone of the schedule (empty = UTC).
    #[prost(string, tag = "1001")]
    pub cairn_time_zone: String,
    #[prost(bool, tag = "1002")]
    pub cairn_schedule_when_stopped: bool,
    /// Cairn: `7d`, `2w`, `12h`: scheduled snapshots older than this are deleted.
    #[prost(string, tag = "1003")]
    pub cairn_expiry: String,
    #[prost(message, optional, tag = "1004")]
    pub cairn_retention: Option<CairnRetention>,
    /// Cairn: names of scheduled snapshots (`auto-%Y%m%d-%H%M`, `%n`, `%a`).
    #[prost(string, tag = "1005")]
    pub cairn_pattern: String,
    /// Cairn: how scheduled snapshots are taken: `stopped` (empty), `live` or `stateful`.
    #[prost(string, tag = "1006")]
    pub cairn_schedule_mode: String,
}

/// Cairn extension (field 1004 of `SnapshotConfig`): keep counts, 0 = rule off.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CairnRetention {
    #[prost(uint32, tag = "1")]
    pub keep_last: u32,
    #[prost(uint32, tag = "2")]
    pub keep_hourly: u32,
    #[prost(uint32, tag = "3")]
    pub keep_daily: u32,
    #[prost(uint32, tag = "4")]
    pub keep_weekly: u32,
    #[prost(uint32, tag = "5")]
    pub keep_monthly: u32,
    #[prost(uint32, tag = "6")]
    pub keep_yearly: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeRef {
    #[prost(string, tag = "1")]
    pub uuid: String,
    #[prost(int64, tag = "2")]
    pub generation_count: i64,
    #[prost(string, tag = "3")]
    pub mount_dir: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppInstanceConfig {
    #[prost(message, optional, tag = "1")]
    pub uuidandversion: Option<UuidAndVersion>,
    #[prost(string, tag = "2")]
    pub displayname: String,
    #[prost(bool, tag = "5")]
    pub activate: bool,
    #[prost(message, optional, tag = "9")]
    pub restart: Option<InstanceOpsCmd>,
    #[prost(message, optional, tag = "10")]
    pub purge: Option<InstanceOpsCmd>,
    #[prost(message, repeated, tag = "16")]
    pub volume_ref_list: Vec<VolumeRef>,
    #[prost(message, optional, tag = "22")]
    pub snapshot: Option<SnapshotConfig>,
    /// Cairn: how the app runs (EVE derives it from its images and `fixedresources`).
    #[prost(message, optional, tag = "1000")]
    pub cairn_domain: Option<CairnDomain>,
    /// Cairn: the tenant the app belongs to (`[a-z0-9][a-z0-9_-]{0,62}`, empty: the default
    /// tenant).
    #[prost(string, tag = "1001")]
    pub cairn_tenant: String,
    /// Cairn: this app is a clone of another app's snapshot (its volumes start as copies of
    /// the snapshot's volumes).
    #[prost(message, optional, tag = "1002")]
    pub cairn_clone: Option<CairnClone>,
    /// Cairn: commands run on the device around each snapshot of the app (issue 11).
    #[prost(message, optional, tag = "1003")]
    pub cairn_quiesce: Option<CairnQuiesce>,
    /// Cairn: when the device starts the app again by itself: `always` (empty), `on_failure`,
    /// `never` (issue 17).
    #[prost(string, tag = "1004")]
    pub cairn_restart_policy: String,
}

/// Cairn extension (field 1003 of `AppInstanceConfig`): quiesce hooks, each an argv (empty:
/// none); `timeout_seconds` 0 is the default (30 s).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CairnQuiesce {
    #[prost(string, repeated, tag = "1")]
    pub pre: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub post: Vec<String>,
    #[prost(uint32, tag = "3")]
    pub timeout_seconds: u32,
    /// A guest agent that cannot freeze the guest does not fail a live snapshot.
    #[prost(bool, tag = "4")]
    pub proceed_without_guest_agent: bool,
}

/// Cairn extension (field 1002 of `AppInstanceConfig`): the app and the snapshot (UUIDs) a
/// clone is made from.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CairnClone {
    #[prost(string, tag = "1")]
    pub app: String,
    #[prost(string, tag = "2")]
    pub snapshot: String,
}

/// Cairn extension (field 1000 of `AppInstanceConfig`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CairnDomain {
    /// `vm` or `process`.
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub kernel: String,
    #[prost(string, tag = "3")]
    pub initrd: String,
    #[prost(string, tag = "4")]
    pub append: String,
    #[prost(uint32, tag = "5")]
    pub memory_mib: u32,
    #[prost(uint32, tag = "6")]
    pub cpus: u32,
    #[prost(string, tag = "7")]
    pub command: String,
    #[prost(string, repeated, tag = "8")]
    pub args: Vec<String>,
    #[prost(map = "string, string", tag = "9")]
    pub env: std::collections::HashMap<String, String>,
    #[prost(string, tag = "10")]
    pub working_dir: String,
    /// `vm`: the guest runs qemu-guest-agent (issue 11).
    #[prost(bool, tag = "11")]
    pub guest_agent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum VolumeContentOriginType {
    VcotUnknown = 0,
    VcotBlank = 1,
    VcotDownload = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeContentOrigin {
    #[prost(enumeration = "VolumeContentOriginType", tag = "1")]
    pub r#type: i32,
    #[prost(string, tag = "2")]
    pub download_content_tree_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Volume {
    #[prost(string, tag = "1")]
    pub uuid: String,
    #[prost(message, optional, tag = "2")]
    pub origin: Option<VolumeContentOrigin>,
    #[prost(int64, tag = "4")]
    pub generation_count: i64,
    #[prost(int64, tag = "5")]
    pub maxsizebytes: i64,
    #[prost(bool, tag = "6")]
    pub readonly: bool,
    #[prost(string, tag = "7")]
    pub display_name: String,
    /// Cairn: `qcow2`, `raw` or `dir` (EVE takes the format from the content tree).
    #[prost(string, tag = "1000")]
    pub cairn_format: String,
    /// Cairn: a local base image to copy, and its sha256.
    #[prost(string, tag = "1001")]
    pub cairn_base_image: String,
    #[prost(string, tag = "1002")]
    pub cairn_base_sha256: String,
    #[prost(bool, tag = "1003")]
    pub cairn_purgeable: bool,
    /// Cairn: a directory volume's restore mode: `auto` (or empty), `btrfs_swap`,
    /// `squashfs_overlay`, `rsync` or `copy`.
    #[prost(string, tag = "1004")]
    pub cairn_restore_mode: String,
}

// ---- org.lfedge.eve.info ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ZInfoTypes {
    ZiNop = 0,
    ZiDevice = 1,
    ZiApp = 3,
    ZiVolume = 7,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ZSwState {
    Invalid = 0,
    Initial = 1,
    Installed = 5,
    Booting = 6,
    Running = 7,
    Halting = 8,
    Halted = 9,
    Restarting = 10,
    Purging = 11,
    Error = 21,
    Pending = 23,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Severity {
    Unspecified = 0,
    Notice = 1,
    Warning = 2,
    Error = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorInfo {
    #[prost(string, tag = "1")]
    pub description: String,
    #[prost(message, optional, tag = "2")]
    pub timestamp: Option<prost_types::Timestamp>,
    #[prost(enumeration = "Severity", tag = "3")]
    pub severity: i32,
    #[prost(string, tag = "5")]
    pub retry_condition: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZInfoSnapshot {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub config_id: String,
    #[prost(string, tag = "3")]
    pub config_version: String,
    #[prost(message, optional, tag = "4")]
    pub create_time: Option<prost_types::Timestamp>,
    #[prost(enumeration = "SnapshotType", tag = "5")]
    pub r#type: i32,
    #[prost(message, optional, tag = "6")]
    pub snap_err: Option<ErrorInfo>,
    /// Cairn: the snapshot's name and description (device-originated ones have theirs from the
    /// policy's pattern).
    #[prost(string, tag = "1000")]
    pub cairn_name: String,
    #[prost(string, tag = "1001")]
    pub cairn_description: String,
    /// Cairn: how long a live or stateful snapshot paused the VM, in milliseconds.
    #[prost(uint64, tag = "1002")]
    pub cairn_pause_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZInfoApp {
    #[prost(string, tag = "1")]
    pub app_id: String,
    #[prost(string, tag = "2")]
    pub app_version: String,
    #[prost(string, tag = "7")]
    pub app_name: String,
    #[prost(message, optional, tag = "12")]
    pub boot_time: Option<prost_types::Timestamp>,
    #[prost(message, repeated, tag = "14")]
    pub app_err: Vec<ErrorInfo>,
    #[prost(enumeration = "ZSwState", tag = "15")]
    pub state: i32,
    #[prost(string, repeated, tag = "17")]
    pub volume_refs: Vec<String>,
    #[prost(message, repeated, tag = "18")]
    pub snapshots: Vec<ZInfoSnapshot>,
    /// Cairn: how many times the device started the app again by its restart policy.
    #[prost(uint32, tag = "1000")]
    pub cairn_restarts: u32,
    /// Cairn: the app's last unasked end or failed start, kept after it runs again.
    #[prost(message, optional, tag = "1001")]
    pub cairn_last_failure: Option<ErrorInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZInfoMsg {
    #[prost(enumeration = "ZInfoTypes", tag = "1")]
    pub ztype: i32,
    #[prost(string, tag = "2")]
    pub dev_id: String,
    #[prost(oneof = "InfoContent", tags = "5")]
    pub info_content: Option<InfoContent>,
    #[prost(message, optional, tag = "6")]
    pub at_time_stamp: Option<prost_types::Timestamp>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum InfoContent {
    #[prost(message, tag = "5")]
    Ainfo(ZInfoApp),
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Wire keys: (field number << 3) | wire type.
    fn keys(bytes: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut buf = bytes;
        while !buf.is_empty() {
            let key = prost::encoding::decode_varint(&mut buf).expect("key");
            let wire = key & 7;
            out.push(key);
            match wire {
                0 => {
                    prost::encoding::decode_varint(&mut buf).expect("varint");
                }
                2 => {
                    let len = prost::encoding::decode_varint(&mut buf).expect("len") as usize;
                    buf = &buf[len..];
                }
                other => panic!("unexpected wire type {other}"),
            }
        }
        out
    }

    #[test]
    fn app_instance_config_uses_eves_field_numbers() {
        let app = AppInstanceConfig {
            uuidandversion: Some(UuidAndVersion {
                uuid: "u".into(),
                version: "1".into(),
            }),
            displayname: "d".into(),
            activate: true,
            restart: Some(InstanceOpsCmd {
                counter: 1,
                ops_time: String::new(),
            }),
            purge: Some(InstanceOpsCmd {
                counter: 1,
                ops_time: String::new(),
            }),
            volume_ref_list: vec![VolumeRef::default()],
            snapshot: Some(SnapshotConfig::default()),
            cairn_domain: None,
            cairn_tenant: String::new(),
            cairn_clone: None,
            cairn_quiesce: None,
            cairn_restart_policy: String::new(),
        };
        let fields: Vec<u64> = keys(&app.encode_to_vec()).iter().map(|k| k >> 3).collect();
        assert_eq!(fields, vec![1, 2, 5, 9, 10, 16, 22]);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // An EdgeDevConfig with fields Cairn does not declare (networks = 5, a string at 35).
        let mut bytes = Vec::new();
        prost::encoding::message::encode(
            5,
            &ConfigItem {
                key: "x".into(),
                value: "y".into(),
            },
            &mut bytes,
        );
        prost::encoding::string::encode(35, &"device-name".to_string(), &mut bytes);
        prost::encoding::message::encode(
            11,
            &ConfigItem {
                key: "k".into(),
                value: "v".into(),
            },
            &mut bytes,
        );
        let config = EdgeDevConfig::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(config.config_items.len(), 1);
        assert_eq!(config.config_items[0].key, "k");
    }

    #[test]
    fn zinfo_app_snapshots_sit_at_field_18_of_field_5() {
        let msg = ZInfoMsg {
            ztype: ZInfoTypes::ZiApp as i32,
            dev_id: "dev".into(),
            info_content: Some(InfoContent::Ainfo(ZInfoApp {
                snapshots: vec![ZInfoSnapshot::default()],
                ..Default::default()
            })),
            at_time_stamp: None,
        };
        let bytes = msg.encode_to_vec();
        let fields: Vec<u64> = keys(&bytes).iter().map(|k| k >> 3).collect();
        assert_eq!(fields, vec![1, 2, 5]);
        let back = ZInfoMsg::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, msg);
    }
}
