//! Wire compatibility with EVE: Cairn's hand-written prost messages (`src/proto.rs`) must decode
//! with EVE's own protobuf definitions, and EVE's messages must decode with Cairn's.
//!
//! `tests/eve-proto/` holds EVE's messages for the subset Cairn speaks (transcribed from
//! lf-edge/eve-api, with EVE's packages, message and field names, numbers and types, plus some
//! real EVE fields Cairn does not declare). They are compiled at test time with `protox` and
//! used through `prost-reflect`'s `DynamicMessage`:
//! - Cairn → EVE: a fully populated Cairn message decodes under EVE's descriptor with every
//!   field, addressed by EVE's field name, holding the expected value and no unknown fields
//!   left over (so a wrong field number or wire type fails).
//! - EVE → Cairn: an EVE message that also sets fields Cairn does not declare decodes into
//!   Cairn's type with Cairn's fields equal (the extra fields are skipped).
//! - Cairn's extension fields (numbers ≥ 1000) decode under EVE's descriptor as unknown fields.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::OnceLock;

use cairn_config_agent::proto as c;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value};

// ---------------------------------------------------------------------------------------------
// EVE's descriptors

const EVE_FILES: &[&str] = &[
    "evecommon/evecommon.proto",
    "evecommon/acipherinfo.proto",
    "auth/auth.proto",
    "register/register.proto",
    "eveuuid/eveuuid.proto",
    "certs/certs.proto",
    "config/devcommon.proto",
    "config/vm.proto",
    "config/netconfig.proto",
    "config/storage.proto",
    "config/appconfig.proto",
    "config/devconfig.proto",
    "info/common.proto",
    "info/info.proto",
];

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/eve-proto");
        let mut compiler = protox::Compiler::new([&root]).unwrap();
        compiler.include_imports(true);
        compiler
            .open_files(EVE_FILES.iter().map(|f| root.join(f)))
            .unwrap_or_else(|e| panic!("EVE descriptors do not compile: {e:?}"));
        compiler.descriptor_pool()
    })
}

/// An EVE message (`full_name` without the `org.lfedge.eve.` prefix) with fields set by EVE's
/// field names. Panics on a name EVE's message lacks or a value of the wrong protobuf type.
fn eve(name: &str, fields: Vec<(&str, Value)>) -> DynamicMessage {
    let full = if name.starts_with("google.") {
        name.to_string()
    } else {
        format!("org.lfedge.eve.{name}")
    };
    let desc = pool()
        .get_message_by_name(&full)
        .unwrap_or_else(|| panic!("EVE has no message {full}"));
    let mut msg = DynamicMessage::new(desc);
    for (field, value) in fields {
        msg.try_set_field_by_name(field, value)
            .unwrap_or_else(|e| panic!("{full}.{field}: {e}"));
    }
    msg
}

/// `fields` plus, when `extras`, the EVE-only `extra` fields.
fn with<'a>(
    mut fields: Vec<(&'a str, Value)>,
    extras: bool,
    extra: impl FnOnce() -> Vec<(&'a str, Value)>,
) -> Vec<(&'a str, Value)> {
    if extras {
        fields.extend(extra());
    }
    fields
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}
fn b(v: &[u8]) -> Value {
    Value::Bytes(bytes::Bytes::copy_from_slice(v))
}
fn e(n: i32) -> Value {
    Value::EnumNumber(n)
}
fn m(v: DynamicMessage) -> Value {
    Value::Message(v)
}
fn list(v: impl IntoIterator<Item = Value>) -> Value {
    Value::List(v.into_iter().collect())
}
fn msgs(v: impl IntoIterator<Item = DynamicMessage>) -> Value {
    list(v.into_iter().map(Value::Message))
}
fn strs(v: &[&str]) -> Value {
    list(v.iter().map(|x| s(x)))
}

// ---------------------------------------------------------------------------------------------
// Checks

/// Every field number a decoded message (recursively) did not recognise, as `path#number`.
fn unknown_fields(path: &str, msg: &DynamicMessage) -> Vec<String> {
    let mut out: Vec<String> = msg
        .unknown_fields()
        .map(|f| format!("{path}#{}", f.number()))
        .collect();
    for (field, value) in msg.fields() {
        let p = format!("{path}.{}", field.name());
        match value {
            Value::Message(inner) => out.extend(unknown_fields(&p, inner)),
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(inner) = item {
                        out.extend(unknown_fields(&format!("{p}[{i}]"), inner));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Compares every field of EVE's message by name, recursively, with a readable failure.
/// Fields set in `want` must be non-default, so a check cannot pass vacuously.
fn assert_same(path: &str, got: &DynamicMessage, want: &DynamicMessage) {
    assert_eq!(got.descriptor(), want.descriptor(), "{path}: message type");
    for field in want.descriptor().fields() {
        let p = format!("{path}.{}", field.name());
        let (g, w) = (got.get_field(&field), want.get_field(&field));
        if want.has_field(&field) {
            assert!(
                !w.is_default_for_field(&field),
                "{p}: expectation is the default value"
            );
        }
        assert_eq!(
            got.has_field(&field),
            want.has_field(&field),
            "{p}: presence ({g:?})"
        );
        match (g.as_ref(), w.as_ref()) {
            (Value::Message(g), Value::Message(w)) => assert_same(&p, g, w),
            (Value::List(g), Value::List(w)) => {
                assert_eq!(g.len(), w.len(), "{p}: number of entries");
                for (i, (g, w)) in g.iter().zip(w).enumerate() {
                    match (g, w) {
                        (Value::Message(g), Value::Message(w)) => {
                            assert_same(&format!("{p}[{i}]"), g, w)
                        }
                        _ => assert_eq!(g, w, "{p}[{i}]"),
                    }
                }
            }
            _ => assert_eq!(g, w, "{p}"),
        }
    }
}

/// Cairn's extension fields (≥ 1000) when unset: EVE's side cannot carry them, so the
/// both-ways checks leave them empty (`cairn_extensions_are_unknown_fields_to_eve` sets them).
const UNSET_EXTENSIONS: &[&str] = &[
    "cairn_domain: None",
    "cairn_tenant: \"\"",
    "cairn_clone: None",
    "cairn_quiesce: None",
    "cairn_format: \"\"",
    "cairn_base_image: \"\"",
    "cairn_base_sha256: \"\"",
    "cairn_purgeable: false",
    "cairn_restore_mode: \"\"",
    "cairn_schedule: \"\"",
    "cairn_time_zone: \"\"",
    "cairn_schedule_when_stopped: false",
    "cairn_expiry: \"\"",
    "cairn_retention: None",
    "cairn_pattern: \"\"",
    "cairn_schedule_mode: \"\"",
    "cairn_name: \"\"",
    "cairn_description: \"\"",
    "cairn_expiry: \"\"",
    "cairn_group: \"\"",
    "cairn_mode: \"\"",
    "cairn_pause_ms: 0",
    "cairn_groups: []",
    "cairn_restart_policy: \"\"",
    "cairn_restarts: 0",
    "cairn_last_failure: None",
];

/// A Cairn message must be fully populated for a check to mean anything: no empty string,
/// zero number, false, `None`, empty list/map or zero enum anywhere in it (by its `Debug`),
/// apart from unset extension fields.
fn assert_fully_populated(msg: &impl Debug) {
    let mut text = format!("{msg:?}");
    for unset in UNSET_EXTENSIONS {
        text = text.replace(unset, "");
    }
    for default in [
        ": \"\"",
        ": 0,",
        ": 0 }",
        ": false",
        ": None",
        ": []",
        ": {}",
        ": Invalid",
        ": Unspecified",
        ": ZiNop",
        ": VcotUnknown",
        ": CertTypeControllerNone",
    ] {
        assert!(!text.contains(default), "`{default}` in {text}");
    }
}

/// Cairn → EVE: Cairn's encoding decodes under EVE's descriptor to exactly `want`.
fn cairn_to_eve<M: Message + Debug>(cairn: &M, want: &DynamicMessage) {
    assert_fully_populated(cairn);
    let bytes = cairn.encode_to_vec();
    let got = DynamicMessage::decode(want.descriptor(), bytes.as_slice())
        .unwrap_or_else(|e| panic!("EVE cannot decode Cairn's {cairn:?}: {e}"));
    let name = want.descriptor().full_name().to_string();
    let unknown = unknown_fields(&name, &got);
    assert!(unknown.is_empty(), "fields EVE does not know: {unknown:?}");
    assert_same(&name, &got, want);
    assert_eq!(&got, want);
}

/// EVE → Cairn: EVE's encoding (with fields Cairn does not declare) decodes into `want`.
fn eve_to_cairn<M: Message + Default + PartialEq + Debug>(eve: &DynamicMessage, want: &M) {
    let bytes = eve.encode_to_vec();
    let got = M::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("Cairn cannot decode EVE's {eve:?}: {e}"));
    assert_eq!(&got, want);
}

/// Both directions for one message; `eve(extras)` builds EVE's form, with EVE-only fields
/// (recursively) when `extras`.
fn both_ways<M: Message + Default + PartialEq + Debug>(
    cairn: M,
    eve: impl Fn(bool) -> DynamicMessage,
) {
    let plain = eve(false);
    cairn_to_eve(&cairn, &plain);
    eve_to_cairn(&plain, &cairn);
    let extended = eve(true);
    if extended != plain {
        eve_to_cairn(&extended, &cairn);
    }
}

// ---------------------------------------------------------------------------------------------
// Well-known types

fn cairn_ts(n: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: 1_780_000_000 + n,
        nanos: 123_456_789,
    }
}
fn eve_ts(n: i64) -> DynamicMessage {
    eve(
        "google.protobuf.Timestamp",
        vec![
            ("seconds", Value::I64(1_780_000_000 + n)),
            ("nanos", Value::I32(123_456_789)),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// org.lfedge.eve.auth

fn cairn_auth_body() -> c::AuthBody {
    c::AuthBody {
        payload: b"signed payload".to_vec(),
    }
}
fn eve_auth_body() -> DynamicMessage {
    eve("auth.AuthBody", vec![("payload", b(b"signed payload"))])
}

fn cairn_auth_container() -> c::AuthContainer {
    c::AuthContainer {
        protected_payload: Some(cairn_auth_body()),
        algo: c::HashAlgorithm::Sha25632bytes as i32,
        sender_cert_hash: vec![0xaa; 32],
        signature_hash: vec![0x5c; 64],
        sender_cert: b"LS0tLS1CRUdJTi".to_vec(),
    }
}
fn eve_auth_container(extras: bool) -> DynamicMessage {
    let fields = vec![
        ("protectedPayload", m(eve_auth_body())),
        ("algo", e(2)),
        ("senderCertHash", b(&[0xaa; 32])),
        ("signatureHash", b(&[0x5c; 64])),
        ("senderCert", b(b"LS0tLS1CRUdJTi")),
    ];
    let fields = with(fields, extras, || {
        vec![
            (
                "cipherContext",
                m(eve(
                    "common.CipherContext",
                    vec![
                        ("contextId", s("ctx-1")),
                        ("hashScheme", e(1)),
                        ("keyExchangeScheme", e(1)),
                        ("encryptionScheme", e(1)),
                        ("deviceCertHash", b(&[1; 16])),
                        ("controllerCertHash", b(&[2; 16])),
                    ],
                )),
            ),
            (
                "cipherData",
                m(eve(
                    "common.CipherBlock",
                    vec![
                        ("cipherContextId", s("ctx-1")),
                        ("initialValue", b(&[3; 16])),
                        ("cipherData", b(b"ciphertext")),
                        ("clearTextSha256", b(&[4; 32])),
                    ],
                )),
            ),
        ]
    });
    eve("auth.AuthContainer", fields)
}

// ---------------------------------------------------------------------------------------------
// org.lfedge.eve.register, .uuid, .certs

fn cairn_register() -> c::ZRegisterMsg {
    c::ZRegisterMsg {
        on_board_key: "deprecated-key".into(),
        pem_cert: b"-----BEGIN CERTIFICATE-----".to_vec(),
        serial: "SN-0042".into(),
        soft_serial: "soft_serial-7".into(),
    }
}
fn eve_register() -> DynamicMessage {
    eve(
        "register.ZRegisterMsg",
        vec![
            ("onBoardKey", s("deprecated-key")),
            ("pemCert", b(b"-----BEGIN CERTIFICATE-----")),
            ("serial", s("SN-0042")),
            ("softSerial", s("soft_serial-7")),
        ],
    )
}

fn cairn_uuid_response() -> c::UuidResponse {
    c::UuidResponse {
        uuid: "4d3c2b1a-0f9e-4d8c-b7a6-554433221100".into(),
        manufacturer: "Acme".into(),
        product_name: "Edge-1".into(),
    }
}
fn eve_uuid_response() -> DynamicMessage {
    eve(
        "uuid.UuidResponse",
        vec![
            ("uuid", s("4d3c2b1a-0f9e-4d8c-b7a6-554433221100")),
            ("manufacturer", s("Acme")),
            ("product_name", s("Edge-1")),
        ],
    )
}

fn cairn_cert(n: u8) -> c::ZCert {
    c::ZCert {
        hash_algo: c::HashAlgorithm::Sha25616bytes as i32,
        cert_hash: vec![n; 16],
        r#type: if n.is_multiple_of(2) {
            c::ZCertType::CertTypeControllerSigning as i32
        } else {
            c::ZCertType::CertTypeDeviceEcdhExchange as i32
        },
        cert: format!("PEM {n}").into_bytes(),
    }
}
fn eve_cert(n: u8, extras: bool) -> DynamicMessage {
    let fields = vec![
        ("hashAlgo", e(1)),
        ("certHash", b(&[n; 16])),
        ("type", e(if n.is_multiple_of(2) { 1 } else { 13 })),
        ("cert", b(format!("PEM {n}").as_bytes())),
    ];
    let fields = with(fields, extras, || {
        let meta = |k: u8| {
            eve(
                "certs.ZCertMetaData",
                vec![("type", e(1)), ("meta_data", b(&[k; 8]))],
            )
        };
        vec![
            (
                "attributes",
                m(eve(
                    "certs.ZCertAttr",
                    vec![
                        ("is_mutable", Value::Bool(true)),
                        ("is_tpm", Value::Bool(true)),
                    ],
                )),
            ),
            ("meta_data_items", msgs([meta(1), meta(2)])),
        ]
    });
    eve("certs.ZCert", fields)
}

fn cairn_controller_cert() -> c::ZControllerCert {
    c::ZControllerCert {
        certs: vec![cairn_cert(2), cairn_cert(3)],
    }
}
fn eve_controller_cert(extras: bool) -> DynamicMessage {
    eve(
        "certs.ZControllerCert",
        vec![("certs", msgs([eve_cert(2, extras), eve_cert(3, extras)]))],
    )
}

// ---------------------------------------------------------------------------------------------
// org.lfedge.eve.config

fn cairn_uv(n: u32) -> c::UuidAndVersion {
    c::UuidAndVersion {
        uuid: format!("00000000-0000-4000-8000-{n:012}"),
        version: format!("{}", n + 1),
    }
}
fn eve_uv(n: u32) -> DynamicMessage {
    eve(
        "config.UUIDandVersion",
        vec![
            ("uuid", s(&format!("00000000-0000-4000-8000-{n:012}"))),
            ("version", s(&format!("{}", n + 1))),
        ],
    )
}

fn cairn_config_item(n: u32) -> c::ConfigItem {
    c::ConfigItem {
        key: format!("timer.config.interval.{n}"),
        value: format!("{}", 60 + n),
    }
}
fn eve_config_item(n: u32) -> DynamicMessage {
    eve(
        "config.ConfigItem",
        vec![
            ("key", s(&format!("timer.config.interval.{n}"))),
            ("value", s(&format!("{}", 60 + n))),
        ],
    )
}

fn cairn_config_request() -> c::ConfigRequest {
    c::ConfigRequest {
        config_hash: "sha-of-last-config".into(),
        integrity_token: vec![9, 8, 7, 6],
    }
}
fn eve_config_request() -> DynamicMessage {
    eve(
        "config.ConfigRequest",
        vec![
            ("configHash", s("sha-of-last-config")),
            ("integrity_token", b(&[9, 8, 7, 6])),
        ],
    )
}

/// uint32 values above `i32::MAX` tell uint32 from int32 on the wire.
const BIG_U32: u32 = 3_000_000_000;
/// int64 values above `u32::MAX`.
const BIG_I64: i64 = 5_000_000_000;

fn cairn_ops(n: u32) -> c::InstanceOpsCmd {
    c::InstanceOpsCmd {
        counter: BIG_U32 + n,
        ops_time: format!("2026-05-0{n}T00:00:00Z"),
    }
}
fn eve_ops(n: u32) -> DynamicMessage {
    eve(
        "config.InstanceOpsCmd",
        vec![
            ("counter", Value::U32(BIG_U32 + n)),
            ("opsTime", s(&format!("2026-05-0{n}T00:00:00Z"))),
        ],
    )
}

fn cairn_snapshot_desc(n: u32) -> c::SnapshotDesc {
    c::SnapshotDesc {
        id: format!("11111111-2222-4333-8444-{n:012}"),
        r#type: if n.is_multiple_of(2) {
            c::SnapshotType::Immediate as i32
        } else {
            c::SnapshotType::AppUpdate as i32
        },
        ..Default::default()
    }
}
fn eve_snapshot_desc(n: u32) -> DynamicMessage {
    eve(
        "config.SnapshotDesc",
        vec![
            ("id", s(&format!("11111111-2222-4333-8444-{n:012}"))),
            ("type", e(if n.is_multiple_of(2) { 2 } else { 1 })),
        ],
    )
}

fn cairn_snapshot_config() -> c::SnapshotConfig {
    c::SnapshotConfig {
        active_snapshot: "11111111-2222-4333-8444-000000000001".into(),
        rollback_cmd: Some(cairn_ops(3)),
        max_snapshots: BIG_U32 + 1,
        snapshots: vec![cairn_snapshot_desc(1), cairn_snapshot_desc(2)],
        ..Default::default()
    }
}
fn eve_snapshot_config() -> DynamicMessage {
    eve(
        "config.SnapshotConfig",
        vec![
            ("active_snapshot", s("11111111-2222-4333-8444-000000000001")),
            ("rollback_cmd", m(eve_ops(3))),
            ("max_snapshots", Value::U32(BIG_U32 + 1)),
            (
                "snapshots",
                msgs([eve_snapshot_desc(1), eve_snapshot_desc(2)]),
            ),
        ],
    )
}

fn cairn_volume_ref(n: u32) -> c::VolumeRef {
    c::VolumeRef {
        uuid: format!("0a1b2c3d-4e5f-4a6b-8c7d-{n:012}"),
        generation_count: BIG_I64 + i64::from(n),
        mount_dir: format!("/data/{n}"),
    }
}
fn eve_volume_ref(n: u32) -> DynamicMessage {
    eve(
        "config.VolumeRef",
        vec![
            ("uuid", s(&format!("0a1b2c3d-4e5f-4a6b-8c7d-{n:012}"))),
            ("generationCount", Value::I64(BIG_I64 + i64::from(n))),
            ("mount_dir", s(&format!("/data/{n}"))),
        ],
    )
}

fn cairn_app(n: u32) -> c::AppInstanceConfig {
    c::AppInstanceConfig {
        uuidandversion: Some(cairn_uv(100 + n)),
        displayname: format!("app-{n}"),
        activate: true,
        restart: Some(cairn_ops(4)),
        purge: Some(cairn_ops(5)),
        volume_ref_list: vec![cairn_volume_ref(10 * n + 1), cairn_volume_ref(10 * n + 2)],
        snapshot: Some(cairn_snapshot_config()),
        cairn_domain: None,
        cairn_tenant: String::new(),
        cairn_clone: None,
        cairn_quiesce: None,
        cairn_restart_policy: String::new(),
    }
}
fn eve_app(n: u32, extras: bool) -> DynamicMessage {
    let fields = vec![
        ("uuidandversion", m(eve_uv(100 + n))),
        ("displayname", s(&format!("app-{n}"))),
        ("activate", Value::Bool(true)),
        ("restart", m(eve_ops(4))),
        ("purge", m(eve_ops(5))),
        (
            "volumeRefList",
            msgs([eve_volume_ref(10 * n + 1), eve_volume_ref(10 * n + 2)]),
        ),
        ("snapshot", m(eve_snapshot_config())),
    ];
    let fields = with(fields, extras, || {
        let drive = |k: i64| {
            eve(
                "config.Drive",
                vec![
                    ("readonly", Value::Bool(true)),
                    ("preserve", Value::Bool(true)),
                    ("drvtype", e(2)),
                    ("target", e(1)),
                    ("maxsizebytes", Value::I64(BIG_I64 * k)),
                ],
            )
        };
        let adapter = |k: u32| {
            eve(
                "config.NetworkAdapter",
                vec![
                    ("name", s(&format!("eth{k}"))),
                    ("networkId", s(&format!("net-{k}"))),
                    ("macAddress", s(&format!("02:00:00:00:00:0{k}"))),
                ],
            )
        };
        vec![
            (
                "fixedresources",
                m(eve(
                    "config.VmConfig",
                    vec![
                        ("kernel", s("/boot/vmlinuz")),
                        ("ramdisk", s("/boot/initrd")),
                        ("memory", Value::U32(1_048_576)),
                        ("maxmem", Value::U32(2_097_152)),
                        ("vcpus", Value::U32(2)),
                        ("maxcpus", Value::U32(4)),
                    ],
                )),
            ),
            ("drives", msgs([drive(1), drive(2)])),
            ("interfaces", msgs([adapter(0), adapter(1)])),
            ("userData", s("I2Nsb3VkLWNvbmZpZw==")),
            ("remoteConsole", Value::Bool(true)),
            ("metaDataType", e(2)),
            ("profile_list", strs(&["edge", "lab"])),
            ("start_delay_in_seconds", Value::U32(30)),
            ("service", Value::Bool(true)),
            ("cloud_init_version", Value::U32(2)),
            ("designated_node_id", s("node-7")),
            ("vm_resolution", s("1920x1080")),
            ("runtime_type", e(1)),
            ("affinity", e(1)),
        ]
    });
    eve("config.AppInstanceConfig", fields)
}

fn cairn_origin(n: u32) -> c::VolumeContentOrigin {
    c::VolumeContentOrigin {
        r#type: c::VolumeContentOriginType::VcotDownload as i32,
        download_content_tree_id: format!("c0ffee00-0000-4000-8000-{n:012}"),
    }
}
fn eve_origin(n: u32) -> DynamicMessage {
    eve(
        "config.VolumeContentOrigin",
        vec![
            ("type", e(2)),
            (
                "downloadContentTreeID",
                s(&format!("c0ffee00-0000-4000-8000-{n:012}")),
            ),
        ],
    )
}

fn cairn_volume(n: u32) -> c::Volume {
    c::Volume {
        uuid: format!("0a1b2c3d-4e5f-4a6b-8c7d-{n:012}"),
        origin: Some(cairn_origin(n)),
        generation_count: BIG_I64 + i64::from(n),
        maxsizebytes: BIG_I64 * 2 + i64::from(n),
        readonly: true,
        display_name: format!("volume-{n}"),
        cairn_format: String::new(),
        cairn_base_image: String::new(),
        cairn_base_sha256: String::new(),
        cairn_purgeable: false,
        cairn_restore_mode: String::new(),
    }
}
fn eve_volume(n: u32, extras: bool) -> DynamicMessage {
    let fields = vec![
        ("uuid", s(&format!("0a1b2c3d-4e5f-4a6b-8c7d-{n:012}"))),
        ("origin", m(eve_origin(n))),
        ("generationCount", Value::I64(BIG_I64 + i64::from(n))),
        ("maxsizebytes", Value::I64(BIG_I64 * 2 + i64::from(n))),
        ("readonly", Value::Bool(true)),
        ("displayName", s(&format!("volume-{n}"))),
    ];
    let fields = with(fields, extras, || {
        vec![
            // A packed repeated enum: Cairn must skip a length-delimited unknown field.
            ("protocols", list([e(1), e(0), e(1)])),
            ("clear_text", Value::Bool(true)),
            ("target", e(5)),
            ("designated_node_id", s("node-7")),
        ]
    });
    eve("config.Volume", fields)
}

fn cairn_edge_dev_config() -> c::EdgeDevConfig {
    c::EdgeDevConfig {
        id: Some(cairn_uv(1)),
        apps: vec![cairn_app(1), cairn_app(2)],
        config_items: vec![cairn_config_item(1), cairn_config_item(2)],
        volumes: vec![cairn_volume(11), cairn_volume(12)],
        cairn_groups: Vec::new(),
    }
}
fn eve_edge_dev_config(extras: bool) -> DynamicMessage {
    let fields = vec![
        ("id", m(eve_uv(1))),
        ("apps", msgs([eve_app(1, extras), eve_app(2, extras)])),
        (
            "configItems",
            msgs([eve_config_item(1), eve_config_item(2)]),
        ),
        (
            "volumes",
            msgs([eve_volume(11, extras), eve_volume(12, extras)]),
        ),
    ];
    let fields = with(fields, extras, || {
        let network = |k: u32| {
            eve(
                "config.NetworkConfig",
                vec![
                    ("id", s(&format!("net-{k}"))),
                    ("mtu", Value::U32(1500 + k)),
                ],
            )
        };
        vec![
            ("networks", msgs([network(1), network(2)])),
            (
                "reboot",
                m(eve(
                    "config.DeviceOpsCmd",
                    vec![
                        ("counter", Value::U32(7)),
                        ("desiredState", Value::Bool(true)),
                        ("opsTime", s("now")),
                    ],
                )),
            ),
            ("manufacturer", s("Acme")),
            ("productName", s("Edge-1")),
            ("controllercert_confighash", s("cert-hash")),
            ("maintenance_mode", Value::Bool(true)),
            ("controller_epoch", Value::I64(BIG_I64)),
            ("device_name", s("edge-device")),
            ("config_timestamp", m(eve_ts(40))),
            (
                "loc_config",
                m(eve(
                    "config.LOCConfig",
                    vec![
                        ("loc_url", s("https://loc.example")),
                        ("datastore_collect_info_id", strs(&["ds-1", "ds-2"])),
                    ],
                )),
            ),
        ]
    });
    eve("config.EdgeDevConfig", fields)
}

fn cairn_config_response() -> c::ConfigResponse {
    c::ConfigResponse {
        config: Some(cairn_edge_dev_config()),
        config_hash: "sha-of-this-config".into(),
    }
}
fn eve_config_response(extras: bool) -> DynamicMessage {
    eve(
        "config.ConfigResponse",
        vec![
            ("config", m(eve_edge_dev_config(extras))),
            ("configHash", s("sha-of-this-config")),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// org.lfedge.eve.info

fn cairn_error(n: i64) -> c::ErrorInfo {
    c::ErrorInfo {
        description: format!("error {n}"),
        timestamp: Some(cairn_ts(n)),
        severity: c::Severity::Warning as i32,
        retry_condition: format!("retry {n}"),
    }
}
fn eve_error(n: i64, extras: bool) -> DynamicMessage {
    let fields = vec![
        ("description", s(&format!("error {n}"))),
        ("timestamp", m(eve_ts(n))),
        ("severity", e(2)),
        ("retry_condition", s(&format!("retry {n}"))),
    ];
    let fields = with(fields, extras, || {
        let entity = |k: i32| {
            eve(
                "info.DeviceEntity",
                vec![
                    ("entity", e(k)),
                    ("entity_id", s(&format!("id-{k}"))),
                    ("entity_name", s(&format!("name-{k}"))),
                ],
            )
        };
        vec![("entities", msgs([entity(5), entity(11)]))]
    });
    eve("info.ErrorInfo", fields)
}

fn cairn_info_snapshot(n: u32) -> c::ZInfoSnapshot {
    c::ZInfoSnapshot {
        id: format!("11111111-2222-4333-8444-{n:012}"),
        config_id: "config-uuid".into(),
        config_version: format!("{n}"),
        create_time: Some(cairn_ts(i64::from(n))),
        r#type: c::SnapshotType::Immediate as i32,
        snap_err: Some(cairn_error(i64::from(n))),
        ..Default::default()
    }
}
fn eve_info_snapshot(n: u32, extras: bool) -> DynamicMessage {
    eve(
        "info.ZInfoSnapshot",
        vec![
            ("id", s(&format!("11111111-2222-4333-8444-{n:012}"))),
            ("config_id", s("config-uuid")),
            ("config_version", s(&format!("{n}"))),
            ("create_time", m(eve_ts(i64::from(n)))),
            ("type", e(2)),
            ("snap_err", m(eve_error(i64::from(n), extras))),
        ],
    )
}

fn cairn_info_app() -> c::ZInfoApp {
    c::ZInfoApp {
        app_id: "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".into(),
        app_version: "3".into(),
        app_name: "sensor".into(),
        boot_time: Some(cairn_ts(12)),
        app_err: vec![cairn_error(1), cairn_error(2)],
        state: c::ZSwState::Running as i32,
        volume_refs: vec!["vol-a".into(), "vol-b".into()],
        snapshots: vec![cairn_info_snapshot(1), cairn_info_snapshot(2)],
        cairn_restarts: 0,
        cairn_last_failure: None,
    }
}
fn eve_info_app(extras: bool) -> DynamicMessage {
    let fields = vec![
        ("AppID", s("6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9")),
        ("appVersion", s("3")),
        ("AppName", s("sensor")),
        ("bootTime", m(eve_ts(12))),
        ("appErr", msgs([eve_error(1, extras), eve_error(2, extras)])),
        ("state", e(7)),
        ("volumeRefs", strs(&["vol-a", "vol-b"])),
        (
            "snapshots",
            msgs([eve_info_snapshot(1, extras), eve_info_snapshot(2, extras)]),
        ),
    ];
    let fields = with(fields, extras, || {
        let bundle = |k: u32| {
            eve(
                "info.ZioBundle",
                vec![
                    ("name", s(&format!("com{k}"))),
                    ("members", strs(&["com1", "com2"])),
                    ("usedByAppUUID", s("6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9")),
                    ("usedByBaseOS", Value::Bool(true)),
                ],
            )
        };
        let network = |k: u32| {
            eve(
                "info.ZInfoNetwork",
                vec![
                    ("macAddr", s(&format!("02:00:00:00:00:0{k}"))),
                    ("devName", s(&format!("eth{k}"))),
                    ("IPAddrs", strs(&["10.0.0.2/24", "fd00::2/64"])),
                    ("uplink", Value::Bool(true)),
                ],
            )
        };
        vec![
            ("systemApp", Value::Bool(true)),
            ("assignedAdapters", msgs([bundle(1), bundle(2)])),
            ("network", msgs([network(0), network(1)])),
            ("cluster_app_running", Value::Bool(true)),
        ]
    });
    eve("info.ZInfoApp", fields)
}

fn cairn_info_msg() -> c::ZInfoMsg {
    c::ZInfoMsg {
        ztype: c::ZInfoTypes::ZiApp as i32,
        dev_id: "4d3c2b1a-0f9e-4d8c-b7a6-554433221100".into(),
        info_content: Some(c::InfoContent::Ainfo(cairn_info_app())),
        at_time_stamp: Some(cairn_ts(6)),
    }
}
fn eve_info_msg(extras: bool) -> DynamicMessage {
    eve(
        "info.ZInfoMsg",
        vec![
            ("ztype", e(3)),
            ("devId", s("4d3c2b1a-0f9e-4d8c-b7a6-554433221100")),
            ("ainfo", m(eve_info_app(extras))),
            ("atTimeStamp", m(eve_ts(6))),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Tests: every message of the subset, both ways

#[test]
fn eve_descriptors_compile() {
    for name in [
        "auth.AuthContainer",
        "auth.AuthBody",
        "register.ZRegisterMsg",
        "uuid.UuidRequest",
        "uuid.UuidResponse",
        "certs.ZCert",
        "certs.ZControllerCert",
        "config.ConfigRequest",
        "config.ConfigResponse",
        "config.EdgeDevConfig",
        "config.ConfigItem",
        "config.UUIDandVersion",
        "config.AppInstanceConfig",
        "config.InstanceOpsCmd",
        "config.VolumeRef",
        "config.Volume",
        "config.VolumeContentOrigin",
        "config.SnapshotConfig",
        "config.SnapshotDesc",
        "info.ZInfoMsg",
        "info.ZInfoApp",
        "info.ZInfoSnapshot",
        "info.ErrorInfo",
    ] {
        let full = format!("org.lfedge.eve.{name}");
        assert!(pool().get_message_by_name(&full).is_some(), "{full}");
    }
}

#[test]
fn auth_body() {
    both_ways(cairn_auth_body(), |_| eve_auth_body());
}

#[test]
fn auth_container() {
    both_ways(cairn_auth_container(), eve_auth_container);
}

#[test]
fn register_msg() {
    both_ways(cairn_register(), |_| eve_register());
}

#[test]
fn uuid_request_and_response() {
    // UuidRequest has no fields on either side: it encodes to nothing and decodes from nothing.
    let request = c::UuidRequest {};
    assert!(request.encode_to_vec().is_empty());
    both_ways(request, |_| eve("uuid.UuidRequest", vec![]));
    both_ways(cairn_uuid_response(), |_| eve_uuid_response());
}

#[test]
fn certs() {
    both_ways(cairn_cert(2), |x| eve_cert(2, x));
    both_ways(cairn_controller_cert(), eve_controller_cert);
}

#[test]
fn config_request_and_response() {
    both_ways(cairn_config_request(), |_| eve_config_request());
    both_ways(cairn_config_response(), eve_config_response);
}

#[test]
fn edge_dev_config_and_parts() {
    both_ways(cairn_uv(7), |_| eve_uv(7));
    both_ways(cairn_config_item(7), |_| eve_config_item(7));
    both_ways(cairn_edge_dev_config(), eve_edge_dev_config);
}

#[test]
fn app_instance_config_and_parts() {
    both_ways(cairn_ops(1), |_| eve_ops(1));
    both_ways(cairn_snapshot_desc(1), |_| eve_snapshot_desc(1));
    both_ways(cairn_snapshot_desc(2), |_| eve_snapshot_desc(2));
    both_ways(cairn_snapshot_config(), |_| eve_snapshot_config());
    both_ways(cairn_volume_ref(1), |_| eve_volume_ref(1));
    both_ways(cairn_app(1), |x| eve_app(1, x));
}

#[test]
fn volume_and_origin() {
    both_ways(cairn_origin(1), |_| eve_origin(1));
    both_ways(cairn_volume(1), |x| eve_volume(1, x));
}

#[test]
fn info_error_and_snapshot() {
    both_ways(cairn_error(1), |x| eve_error(1, x));
    both_ways(cairn_info_snapshot(1), |x| eve_info_snapshot(1, x));
}

#[test]
fn info_app_and_msg() {
    both_ways(cairn_info_app(), eve_info_app);
    both_ways(cairn_info_msg(), eve_info_msg);
}

#[test]
fn zinfo_msg_other_oneof_members_are_skipped() {
    // EVE sends the same oneof with a member Cairn does not declare: Cairn sees no content.
    let want = c::ZInfoMsg {
        info_content: None,
        ..cairn_info_msg()
    };
    let dinfo = eve(
        "info.ZInfoDevice",
        vec![
            ("machineArch", s("x86_64")),
            ("ncpu", Value::U32(4)),
            ("memory", Value::U64(8 << 30)),
            ("HostName", s("edge")),
        ],
    );
    let vinfo = eve(
        "info.ZInfoVolume",
        vec![
            ("uuid", s("vol-a")),
            ("displayName", s("volume-a")),
            ("state", e(15)),
            ("progressPercentage", Value::U32(100)),
            ("volumeErr", m(eve_error(3, true))),
            ("generation_count", Value::I64(BIG_I64)),
        ],
    );
    for (member, content, ztype) in [("dinfo", dinfo, 1), ("vinfo", vinfo, 7)] {
        let msg = eve(
            "info.ZInfoMsg",
            vec![
                ("ztype", e(ztype)),
                ("devId", s("4d3c2b1a-0f9e-4d8c-b7a6-554433221100")),
                (member, m(content)),
                ("atTimeStamp", m(eve_ts(6))),
            ],
        );
        eve_to_cairn(
            &msg,
            &c::ZInfoMsg {
                ztype,
                ..want.clone()
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cairn's extension fields (≥ 1000): EVE decodes them as unknown fields and carries on.

fn cairn_domain() -> c::CairnDomain {
    c::CairnDomain {
        kind: "vm".into(),
        kernel: "/var/lib/cairn/vmlinuz".into(),
        initrd: "/var/lib/cairn/initrd".into(),
        append: "console=ttyS0".into(),
        memory_mib: 512,
        cpus: 2,
        command: "/bin/app".into(),
        args: vec!["--a".into(), "--b".into()],
        env: [
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "2".to_string()),
        ]
        .into(),
        working_dir: "/srv".into(),
        guest_agent: true,
    }
}

/// Decodes Cairn's encoding under EVE's descriptor: no error, EVE's fields equal `want`, and
/// exactly `unknown` (as `path#number`) are left as unknown fields.
fn eve_ignores_extensions<M: Message + Default + PartialEq + Debug>(
    cairn: &M,
    want: &DynamicMessage,
    unknown: &[&str],
) {
    assert_fully_populated(cairn);
    let got = DynamicMessage::decode(want.descriptor(), cairn.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("EVE cannot decode Cairn's {cairn:?}: {e}"));
    let name = want.descriptor().full_name().to_string();
    assert_same(&name, &got, want);
    assert_eq!(unknown_fields(&name, &got), unknown);
    // EVE re-encodes what it did not understand verbatim; Cairn reads its extensions back.
    assert_eq!(&M::decode(got.encode_to_vec().as_slice()).unwrap(), cairn);
}

#[test]
fn cairn_extensions_are_unknown_fields_to_eve() {
    let app = c::AppInstanceConfig {
        cairn_domain: Some(cairn_domain()),
        cairn_tenant: "acme".into(),
        cairn_clone: Some(c::CairnClone {
            app: "a".into(),
            snapshot: "s".into(),
        }),
        cairn_quiesce: Some(c::CairnQuiesce {
            pre: vec!["/usr/bin/flush".into()],
            post: vec!["/usr/bin/resume".into()],
            timeout_seconds: 10,
            proceed_without_guest_agent: true,
        }),
        cairn_restart_policy: "on_failure".into(),
        ..cairn_app(1)
    };
    eve_ignores_extensions(
        &app,
        &eve_app(1, false),
        &[
            "org.lfedge.eve.config.AppInstanceConfig#1000",
            "org.lfedge.eve.config.AppInstanceConfig#1001",
            "org.lfedge.eve.config.AppInstanceConfig#1002",
            "org.lfedge.eve.config.AppInstanceConfig#1003",
            "org.lfedge.eve.config.AppInstanceConfig#1004",
        ],
    );

    let volume = c::Volume {
        cairn_format: "qcow2".into(),
        cairn_base_image: "/var/lib/cairn/base.qcow2".into(),
        cairn_base_sha256: "ab".repeat(32),
        cairn_purgeable: true,
        cairn_restore_mode: "squashfs_overlay".into(),
        ..cairn_volume(1)
    };
    eve_ignores_extensions(
        &volume,
        &eve_volume(1, false),
        &[
            "org.lfedge.eve.config.Volume#1000",
            "org.lfedge.eve.config.Volume#1001",
            "org.lfedge.eve.config.Volume#1002",
            "org.lfedge.eve.config.Volume#1003",
            "org.lfedge.eve.config.Volume#1004",
        ],
    );

    let policy = c::SnapshotConfig {
        cairn_schedule: "0 3 * * *".into(),
        cairn_time_zone: "Europe/Berlin".into(),
        cairn_schedule_when_stopped: true,
        cairn_expiry: "7d".into(),
        cairn_retention: Some(c::CairnRetention {
            keep_last: 1,
            keep_hourly: 2,
            keep_daily: 3,
            keep_weekly: 4,
            keep_monthly: 5,
            keep_yearly: 6,
        }),
        cairn_pattern: "auto-%Y%m%d".into(),
        cairn_schedule_mode: "live".into(),
        ..cairn_snapshot_config()
    };
    eve_ignores_extensions(
        &policy,
        &eve_snapshot_config(),
        &(1000..=1006)
            .map(|n| format!("org.lfedge.eve.config.SnapshotConfig#{n}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    let desc = c::SnapshotDesc {
        cairn_name: "before-upgrade".into(),
        cairn_description: "taken by hand".into(),
        cairn_expiry: "7d".into(),
        cairn_group: "99999999-8888-4777-8666-555555555555".into(),
        cairn_mode: "live".into(),
        ..cairn_snapshot_desc(1)
    };
    eve_ignores_extensions(
        &desc,
        &eve_snapshot_desc(1),
        &[
            "org.lfedge.eve.config.SnapshotDesc#1000",
            "org.lfedge.eve.config.SnapshotDesc#1001",
            "org.lfedge.eve.config.SnapshotDesc#1002",
            "org.lfedge.eve.config.SnapshotDesc#1003",
            "org.lfedge.eve.config.SnapshotDesc#1004",
        ],
    );
    let reported = c::ZInfoSnapshot {
        cairn_name: "auto-20260702-0300".into(),
        cairn_description: "scheduled".into(),
        cairn_pause_ms: 42,
        ..cairn_info_snapshot(1)
    };
    eve_ignores_extensions(
        &reported,
        &eve_info_snapshot(1, false),
        &[
            "org.lfedge.eve.info.ZInfoSnapshot#1000",
            "org.lfedge.eve.info.ZInfoSnapshot#1001",
            "org.lfedge.eve.info.ZInfoSnapshot#1002",
        ],
    );

    // Nested inside the whole config, too.
    let config = c::EdgeDevConfig {
        apps: vec![app.clone(), app],
        volumes: vec![volume.clone(), volume],
        cairn_groups: vec![c::CairnGroup {
            id: "99999999-8888-4777-8666-555555555555".into(),
            name: "plant".into(),
            members: vec!["00000000-0000-4000-8000-000000000101".into()],
            schedule: "@hourly".into(),
            time_zone: "Europe/Berlin".into(),
            expiry: "2w".into(),
            retention: Some(c::CairnRetention {
                keep_last: 1,
                keep_hourly: 2,
                keep_daily: 3,
                keep_weekly: 4,
                keep_monthly: 5,
                keep_yearly: 6,
            }),
            pattern: "plant-%n".into(),
        }],
        ..cairn_edge_dev_config()
    };
    let mut want = eve_edge_dev_config(false);
    want.set_field_by_name("apps", msgs([eve_app(1, false), eve_app(1, false)]));
    want.set_field_by_name(
        "volumes",
        msgs([eve_volume(1, false), eve_volume(1, false)]),
    );
    let mut unknown = vec!["org.lfedge.eve.config.EdgeDevConfig#1000".to_string()];
    for i in 0..2 {
        for n in 1000..=1004 {
            unknown.push(format!("org.lfedge.eve.config.EdgeDevConfig.apps[{i}]#{n}"));
        }
    }
    for i in 0..2 {
        for n in 1000..=1004 {
            unknown.push(format!(
                "org.lfedge.eve.config.EdgeDevConfig.volumes[{i}]#{n}"
            ));
        }
    }
    let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
    eve_ignores_extensions(&config, &want, &unknown);
}

// ---------------------------------------------------------------------------------------------
// Enums: every value Cairn declares has EVE's number for the EVE value of that name.

fn check_enum<E>(eve_enum: &str, eve_name: fn(E) -> &'static str)
where
    E: TryFrom<i32> + Copy + Debug,
{
    let desc = pool()
        .get_enum_by_name(eve_enum)
        .unwrap_or_else(|| panic!("EVE has no enum {eve_enum}"));
    let mut declared = 0;
    for n in -1..=2048 {
        if let Ok(value) = E::try_from(n) {
            declared += 1;
            let name = eve_name(value);
            let eve_value = desc
                .get_value_by_name(name)
                .unwrap_or_else(|| panic!("{eve_enum} has no value {name}"));
            assert_eq!(eve_value.number(), n, "{eve_enum}.{name} (Cairn {value:?})");
        }
    }
    assert!(
        declared >= 2,
        "{eve_enum}: Cairn declares {declared} values"
    );
}

#[test]
fn enums_match_eves_numbers() {
    use c::HashAlgorithm as H;
    check_enum("org.lfedge.eve.common.HashAlgorithm", |v: H| match v {
        H::Invalid => "HASH_ALGORITHM_INVALID",
        H::Sha25616bytes => "HASH_ALGORITHM_SHA256_16BYTES",
        H::Sha25632bytes => "HASH_ALGORITHM_SHA256_32BYTES",
    });

    use c::ZCertType as Z;
    check_enum("org.lfedge.eve.certs.ZCertType", |v: Z| match v {
        Z::CertTypeControllerNone => "CERT_TYPE_CONTROLLER_NONE",
        Z::CertTypeControllerSigning => "CERT_TYPE_CONTROLLER_SIGNING",
        Z::CertTypeControllerIntermediate => "CERT_TYPE_CONTROLLER_INTERMEDIATE",
        Z::CertTypeControllerEcdhExchange => "CERT_TYPE_CONTROLLER_ECDH_EXCHANGE",
        Z::CertTypeDeviceOnboarding => "CERT_TYPE_DEVICE_ONBOARDING",
        Z::CertTypeDeviceRestrictedSigning => "CERT_TYPE_DEVICE_RESTRICTED_SIGNING",
        Z::CertTypeDeviceEndorsementRsa => "CERT_TYPE_DEVICE_ENDORSEMENT_RSA",
        Z::CertTypeDeviceEcdhExchange => "CERT_TYPE_DEVICE_ECDH_EXCHANGE",
    });

    // Cairn uses one SnapshotType for config's and info's (identical) enums.
    use c::SnapshotType as S;
    let snapshot_type = |v: S| match v {
        S::Unspecified => "SNAPSHOT_TYPE_UNSPECIFIED",
        S::AppUpdate => "SNAPSHOT_TYPE_APP_UPDATE",
        S::Immediate => "SNAPSHOT_TYPE_IMMEDIATE",
    };
    check_enum("org.lfedge.eve.config.SnapshotType", snapshot_type);
    check_enum("org.lfedge.eve.info.SnapshotType", snapshot_type);

    use c::VolumeContentOriginType as V;
    check_enum(
        "org.lfedge.eve.config.VolumeContentOriginType",
        |v: V| match v {
            V::VcotUnknown => "VCOT_UNKNOWN",
            V::VcotBlank => "VCOT_BLANK",
            V::VcotDownload => "VCOT_DOWNLOAD",
        },
    );

    use c::ZInfoTypes as T;
    check_enum("org.lfedge.eve.info.ZInfoTypes", |v: T| match v {
        T::ZiNop => "ZiNop",
        T::ZiDevice => "ZiDevice",
        T::ZiApp => "ZiApp",
        T::ZiVolume => "ZiVolume",
    });

    use c::ZSwState as W;
    check_enum("org.lfedge.eve.info.ZSwState", |v: W| match v {
        W::Invalid => "INVALID",
        W::Initial => "INITIAL",
        W::Installed => "INSTALLED",
        W::Booting => "BOOTING",
        W::Running => "RUNNING",
        W::Halting => "HALTING",
        W::Halted => "HALTED",
        W::Restarting => "RESTARTING",
        W::Purging => "PURGING",
        W::Error => "ERROR",
        W::Pending => "PENDING",
    });

    use c::Severity as V2;
    check_enum("org.lfedge.eve.info.Severity", |v: V2| match v {
        V2::Unspecified => "SEVERITY_UNSPECIFIED",
        V2::Notice => "SEVERITY_NOTICE",
        V2::Warning => "SEVERITY_WARNING",
        V2::Error => "SEVERITY_ERROR",
    });
}
