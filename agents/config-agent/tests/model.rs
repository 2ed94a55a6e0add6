//! Both config sources become the same bus messages, and every fault refuses the whole config
//! with an error naming the field.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use cairn_config_agent::model::{ConfigError, from_local_json, from_proto};
use cairn_config_agent::proto;
use cairn_types::{DomainSpec, SnapshotType, VolumeFormat, VolumeOrigin};
use prost::Message;

const APP: &str = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const VOLUME: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const SNAP1: &str = "11111111-2222-4333-8444-555555555555";
const SNAP2: &str = "66666666-7777-4888-8999-aaaaaaaaaaaa";

fn local(snapshots: &str) -> String {
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "3", "display_name": "sensor",
    "volume_refs": [{{"uuid": "{VOLUME}", "mount_dir": "/data"}}],
    "snapshot": {{"max_snapshots": 2, "snapshots": [{snapshots}]}},
    "domain": {{"kind": "process", "command": "/bin/sh", "args": ["-c", "sleep 1000"]}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "format": "qcow2", "max_size_bytes": 1048576}}],
  "config_items": {{"timer.config.interval": "60"}}
}}"#
    )
}

fn err(result: Result<cairn_config_agent::model::DeviceConfig, ConfigError>) -> ConfigError {
    result.expect_err("the config must be refused")
}

#[test]
fn a_local_config_becomes_the_bus_messages() {
    let config = from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate"}}, {{"id": "{SNAP2}", "type": "app_update"}}"#
    )))
    .unwrap();
    let app = &config.apps[0];
    assert_eq!(app.app_uuid().to_string(), APP);
    assert_eq!(app.uuid_and_version.version, "3");
    assert!(app.activate, "activate defaults to true");
    assert_eq!(app.snapshot.max_snapshots, 2);
    assert_eq!(
        app.snapshot.snapshots[0].snapshot_type,
        SnapshotType::Immediate
    );
    assert_eq!(
        app.snapshot.snapshots[1].snapshot_type,
        SnapshotType::AppUpdate
    );
    assert_eq!(app.volume_ref_config_list[0].mount_dir, "/data");
    assert!(matches!(&app.domain, Some(DomainSpec::Process(p)) if p.args.len() == 2));
    assert_eq!(config.volumes[0].format, VolumeFormat::Qcow2);
    assert_eq!(config.config_items["timer.config.interval"], "60");
}

#[test]
fn a_malformed_uuid_names_its_field() {
    let e = err(from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate"}}, {{"id": "not-a-uuid", "type": "immediate"}}"#
    ))));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[1].id");
    assert!(e.message.contains("UUID"), "{e}");
}

#[test]
fn a_misspelt_field_is_refused_with_its_path() {
    let text = local("").replace("\"max_snapshots\"", "\"max_snapshot\"");
    let e = err(from_local_json(&text));
    assert_eq!(e.path, "apps[0].snapshot.max_snapshot");
    assert!(e.message.contains("unknown field"), "{e}");
}

#[test]
fn an_unknown_snapshot_type_is_refused() {
    let e = err(from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "hourly"}}"#
    ))));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].type");
}

#[test]
fn a_duplicate_snapshot_id_is_refused() {
    let e = err(from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate"}}, {{"id": "{SNAP1}", "type": "app_update"}}"#
    ))));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[1].id");
    assert!(e.message.contains("appears twice"), "{e}");
}

#[test]
fn a_reference_to_a_missing_volume_is_refused() {
    let text = local("").replace(
        &format!(r#""volumes": [{{"uuid": "{VOLUME}""#),
        r#""volumes": [{"uuid": "99999999-9999-4999-8999-999999999999""#,
    );
    let e = err(from_local_json(&text));
    assert_eq!(e.path, "apps[0].volume_refs[0].uuid");
}

#[test]
fn a_vm_without_memory_is_refused() {
    let text = local("").replace(
        r#"{"kind": "process", "command": "/bin/sh", "args": ["-c", "sleep 1000"]}"#,
        r#"{"kind": "vm", "kernel": "/k", "initrd": "/i", "memory_mib": 0}"#,
    );
    let e = err(from_local_json(&text));
    assert_eq!(e.path, "apps[0].domain.memory_mib");
}

#[test]
fn text_that_is_not_json_is_refused() {
    let e = err(from_local_json("{\"apps\": [ {"));
    assert!(e.message.contains("EOF"), "{e}");
}

fn proto_config(snapshot_ids: &[&str]) -> proto::EdgeDevConfig {
    proto::EdgeDevConfig {
        id: Some(proto::UuidAndVersion {
            uuid: "dev".into(),
            version: "1".into(),
        }),
        apps: vec![proto::AppInstanceConfig {
            uuidandversion: Some(proto::UuidAndVersion {
                uuid: APP.into(),
                version: "3".into(),
            }),
            displayname: "sensor".into(),
            activate: true,
            volume_ref_list: vec![proto::VolumeRef {
                uuid: VOLUME.into(),
                generation_count: 0,
                mount_dir: "/data".into(),
            }],
            snapshot: Some(proto::SnapshotConfig {
                max_snapshots: 2,
                snapshots: snapshot_ids
                    .iter()
                    .map(|id| proto::SnapshotDesc {
                        id: id.to_string(),
                        r#type: proto::SnapshotType::Immediate as i32,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            cairn_domain: Some(proto::CairnDomain {
                kind: "process".into(),
                command: "/bin/sh".into(),
                args: vec!["-c".into(), "sleep 1000".into()],
                ..Default::default()
            }),
            ..Default::default()
        }],
        volumes: vec![proto::Volume {
            uuid: VOLUME.into(),
            maxsizebytes: 1 << 20,
            cairn_format: "qcow2".into(),
            ..Default::default()
        }],
        config_items: vec![proto::ConfigItem {
            key: "timer.config.interval".into(),
            value: "60".into(),
        }],
        cairn_groups: Vec::new(),
        ..Default::default()
    }
}

#[test]
fn the_controller_config_and_the_local_file_give_the_same_messages() {
    let bytes = proto_config(&[SNAP1]).encode_to_vec();
    let decoded = proto::EdgeDevConfig::decode(bytes.as_slice()).unwrap();
    let from_controller = from_proto(&decoded).unwrap();
    let from_file = from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate"}}"#
    )))
    .unwrap();
    assert_eq!(from_controller, from_file);
}

#[test]
fn a_controller_config_with_an_invalid_uuid_or_duplicate_snapshot_is_refused() {
    let e = err(from_proto(&proto_config(&["zzz"])));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].id");
    let e = err(from_proto(&proto_config(&[SNAP1, SNAP1])));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[1].id");
    let mut bad_kind = proto_config(&[]);
    bad_kind.apps[0].cairn_domain.as_mut().unwrap().kind = "container".into();
    let e = err(from_proto(&bad_kind));
    assert_eq!(e.path, "apps[0].cairn_domain.kind");
    let mut no_id = proto_config(&[]);
    no_id.apps[0].uuidandversion = None;
    assert_eq!(err(from_proto(&no_id)).path, "apps[0].uuidandversion");
}

/// The local config with `policy` (JSON members) added to the app's snapshot block.
fn with_policy(policy: &str) -> String {
    local("").replace(
        r#""snapshot": {"max_snapshots": 2, "snapshots": []}"#,
        &format!(r#""snapshot": {{"max_snapshots": 2, "snapshots": [], {policy}}}"#),
    )
}

#[test]
fn a_snapshot_policy_is_read_from_both_sources_alike() {
    let local = from_local_json(&with_policy(
        r#""schedule": "30 2 * * *", "time_zone": "Europe/Berlin", "schedule_when_stopped": true,
           "expiry": "2w", "retention": {"keep_last": 3, "keep_daily": 7}, "pattern": "%a-%Y%m%d""#,
    ))
    .unwrap();
    let policy = local.apps[0].snapshot.policy.as_deref().unwrap();
    assert_eq!(policy.schedule, "30 2 * * *");
    assert_eq!(policy.time_zone, "Europe/Berlin");
    assert!(policy.schedule_when_stopped);
    assert_eq!(policy.expiry_seconds, 14 * 86_400);
    assert_eq!(policy.retention.keep_last, 3);
    assert_eq!(policy.retention.keep_daily, 7);
    assert_eq!(policy.pattern, "%a-%Y%m%d");

    let mut edge = proto_config(&[]);
    let snapshot = edge.apps[0].snapshot.get_or_insert_default();
    snapshot.cairn_schedule = "30 2 * * *".into();
    snapshot.cairn_time_zone = "Europe/Berlin".into();
    snapshot.cairn_schedule_when_stopped = true;
    snapshot.cairn_expiry = "2w".into();
    snapshot.cairn_retention = Some(proto::CairnRetention {
        keep_last: 3,
        keep_daily: 7,
        ..Default::default()
    });
    snapshot.cairn_pattern = "%a-%Y%m%d".into();
    let controller = from_proto(&edge).unwrap();
    assert_eq!(controller.apps[0].snapshot.policy.as_deref(), Some(policy));
    // No policy fields, no policy: EVE's configs carry none.
    assert!(
        from_proto(&proto_config(&[])).unwrap().apps[0]
            .snapshot
            .policy
            .is_none()
    );
}

#[test]
fn a_bad_policy_is_refused_naming_its_field() {
    for (policy, field, says) in [
        (
            r#""schedule": "0 3 * *""#,
            "apps[0].snapshot.schedule",
            "5 fields",
        ),
        (
            r#""schedule": "@fortnightly""#,
            "apps[0].snapshot.schedule",
            "@fortnightly",
        ),
        (
            r#""time_zone": "Mars/Olympus""#,
            "apps[0].snapshot.time_zone",
            "IANA",
        ),
        (
            r#""expiry": "7""#,
            "apps[0].snapshot.expiry",
            "without a unit",
        ),
        (r#""expiry": "7y""#, "apps[0].snapshot.expiry", "units are"),
        (r#""pattern": "auto-%q""#, "apps[0].snapshot.pattern", "%q"),
        (
            r#""retention": {"keep_lots": 3}"#,
            "apps[0].snapshot.retention",
            "keep_lots",
        ),
    ] {
        let e = err(from_local_json(&with_policy(policy)));
        assert!(e.path.starts_with(field), "{policy}: {e}");
        assert!(e.to_string().contains(says), "{policy}: {e}");
    }
}

#[test]
fn snapshots_carry_a_name_a_description_and_their_own_expiry() {
    let config = from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate", "name": "before-upgrade",
             "description": "taken by hand", "expiry": "3d"}}"#
    )))
    .unwrap();
    let desc = &config.apps[0].snapshot.snapshots[0];
    assert_eq!(desc.name, "before-upgrade");
    assert_eq!(desc.description, "taken by hand");
    assert_eq!(desc.expiry_seconds, 3 * 86_400);

    let e = err(from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate", "expiry": "soon"}}"#
    ))));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].expiry", "{e}");
}

/// The local config of `local(snapshots)` with `groups` (a JSON list) added.
fn with_groups(config: String, groups: &str) -> String {
    config.replacen(
        r#""config_items""#,
        &format!(r#""groups": {groups}, "config_items""#),
        1,
    )
}

const GROUP: &str = "99999999-8888-4777-8666-555555555555";
const GROUP_SNAPSHOT: &str = "99999999-8888-4777-8666-5555555555aa";

#[test]
fn a_snapshot_names_its_group_snapshot_in_either_source_and_is_checked() {
    let only_member = format!(r#"[{{"id": "{GROUP}", "name": "plant", "members": ["{APP}"]}}]"#);
    let config = from_local_json(&with_groups(
        local(&format!(
            r#"{{"id": "{SNAP1}", "type": "immediate", "group": "{GROUP_SNAPSHOT}"}}"#
        )),
        &only_member,
    ))
    .unwrap();
    let desc = &config.apps[0].snapshot.snapshots[0];
    assert_eq!(desc.group_id, GROUP_SNAPSHOT.parse::<uuid::Uuid>().unwrap());
    let group = config.apps[0]
        .group
        .as_ref()
        .expect("the member has its group");
    assert_eq!(group.id, GROUP.parse::<uuid::Uuid>().unwrap());
    assert_eq!(group.name, "plant");
    // No group snapshot: nil.
    let config = from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate"}}"#
    )))
    .unwrap();
    assert!(config.apps[0].snapshot.snapshots[0].group_id.is_nil());
    assert!(config.apps[0].group.is_none());

    // A group snapshot on an app that is in no group.
    let e = err(from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate", "group": "{GROUP_SNAPSHOT}"}}"#
    ))));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].group", "{e}");
    assert!(e.message.contains("member of no group"), "{e}");
    // A member takes one snapshot of a group snapshot, an immediate one.
    let e = err(from_local_json(&with_groups(
        local(&format!(
            r#"{{"id": "{SNAP1}", "type": "immediate", "group": "{GROUP_SNAPSHOT}"}},
               {{"id": "{SNAP2}", "type": "immediate", "group": "{GROUP_SNAPSHOT}"}}"#
        )),
        &only_member,
    )));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[1].group", "{e}");
    let e = err(from_local_json(&with_groups(
        local(&format!(
            r#"{{"id": "{SNAP1}", "type": "app_update", "group": "{GROUP_SNAPSHOT}"}}"#
        )),
        &only_member,
    )));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].group", "{e}");
    assert!(e.to_string().contains("immediate"), "{e}");

    let mut edge = proto_config(&[SNAP1]);
    edge.apps[0].snapshot.as_mut().unwrap().snapshots[0].cairn_group = GROUP_SNAPSHOT.into();
    edge.cairn_groups.push(proto::CairnGroup {
        id: GROUP.into(),
        name: "plant".into(),
        members: vec![APP.into()],
        schedule: "@hourly".into(),
        retention: Some(proto::CairnRetention {
            keep_last: 3,
            ..Default::default()
        }),
        ..Default::default()
    });
    let controller = from_proto(&edge).unwrap();
    assert_eq!(
        controller.apps[0].snapshot.snapshots[0].group_id,
        GROUP_SNAPSHOT.parse::<uuid::Uuid>().unwrap()
    );
    let policy = controller.apps[0]
        .group
        .as_ref()
        .unwrap()
        .policy
        .as_ref()
        .unwrap();
    assert_eq!(policy.schedule, "@hourly");
    assert_eq!(policy.retention.keep_last, 3);
    edge.cairn_groups[0].schedule = "every hour".into();
    let e = err(from_proto(&edge));
    assert_eq!(e.path, "cairn_groups[0].schedule", "{e}");
    edge.cairn_groups[0].schedule = "@hourly".into();
    edge.apps[0].snapshot.as_mut().unwrap().snapshots[0].cairn_group = "nope".into();
    let e = err(from_proto(&edge));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].cairn_group", "{e}");
}

/// Two apps, `APP` and `OTHER`, each listing `snapshots(app)`, with `groups`.
fn two_apps(groups: &str, snapshots: impl Fn(&str) -> String) -> String {
    let app = |uuid: &str, volume: &str| {
        format!(
            r#"{{"uuid": "{uuid}", "version": "1", "volume_refs": [{{"uuid": "{volume}"}}],
                "snapshot": {{"snapshots": [{}]}},
                "domain": {{"kind": "process", "command": "/bin/sh", "args": ["-c", "sleep 1000"]}}}}"#,
            snapshots(uuid)
        )
    };
    format!(
        r#"{{"apps": [{}, {}],
            "volumes": [{{"uuid": "{VOLUME}", "format": "dir"}}, {{"uuid": "{OTHER_VOLUME}", "format": "dir"}}],
            "groups": {groups}}}"#,
        app(APP, VOLUME),
        app(OTHER, OTHER_VOLUME)
    )
}

const OTHER: &str = "0ede0000-0000-4000-8000-000000000002";
const OTHER_VOLUME: &str = "0ede0000-0000-4000-8000-0000000000b2";

#[test]
fn a_group_names_its_members_and_every_member_lists_each_group_snapshot() {
    let group = format!(
        r#"[{{"id": "{GROUP}", "members": ["{APP}", "{OTHER}"], "schedule": "@daily",
              "time_zone": "Europe/Berlin", "expiry": "2w", "retention": {{"keep_daily": 7}},
              "pattern": "plant-%Y%m%d"}}]"#
    );
    let snapshot = |app: &str| {
        let id = if app == APP { SNAP1 } else { SNAP2 };
        format!(r#"{{"id": "{id}", "type": "immediate", "group": "{GROUP_SNAPSHOT}"}}"#)
    };
    let config = from_local_json(&two_apps(&group, snapshot)).unwrap();
    for app in &config.apps {
        let group = app.group.as_ref().expect("each member has its group");
        assert_eq!(group.members.len(), 2);
        let policy = group.policy.as_ref().unwrap();
        assert_eq!(policy.time_zone, "Europe/Berlin");
        assert_eq!(policy.expiry_seconds, 14 * 24 * 3600);
        assert_eq!(policy.retention.keep_daily, 7);
        assert_eq!(policy.pattern, "plant-%Y%m%d");
    }

    // One member does not list the group snapshot: it would never join.
    let e = err(from_local_json(&two_apps(&group, |app| {
        if app == APP {
            snapshot(app)
        } else {
            String::new()
        }
    })));
    assert_eq!(e.path, "groups[0].members", "{e}");
    assert!(
        e.message.contains(OTHER) && e.message.contains(GROUP_SNAPSHOT),
        "{e}"
    );

    // A member that is not an app of the config.
    let stranger = "0ede0000-0000-4000-8000-00000000dead";
    let e = err(from_local_json(&two_apps(
        &format!(r#"[{{"id": "{GROUP}", "members": ["{APP}", "{stranger}"]}}]"#),
        |_| String::new(),
    )));
    assert_eq!(e.path, "groups[0].members[1]", "{e}");
    assert!(e.message.contains(stranger), "{e}");

    // An app in two groups.
    let e = err(from_local_json(&two_apps(
        &format!(
            r#"[{{"id": "{GROUP}", "members": ["{APP}"]}},
                {{"id": "{GROUP_SNAPSHOT}", "members": ["{OTHER}", "{APP}"]}}]"#
        ),
        |_| String::new(),
    )));
    assert_eq!(e.path, "groups[1].members[1]", "{e}");
    assert!(e.message.contains("one group at most"), "{e}");

    // No members; a nil id; the same id twice.
    let e = err(from_local_json(&two_apps(
        &format!(r#"[{{"id": "{GROUP}", "members": []}}]"#),
        |_| String::new(),
    )));
    assert_eq!(e.path, "groups[0].members", "{e}");
    let e = err(from_local_json(&two_apps(
        r#"[{"id": "00000000-0000-0000-0000-000000000000", "members": []}]"#,
        |_| String::new(),
    )));
    assert_eq!(e.path, "groups[0].id", "{e}");
    let e = err(from_local_json(&two_apps(
        &format!(
            r#"[{{"id": "{GROUP}", "members": ["{APP}"]}}, {{"id": "{GROUP}", "members": ["{OTHER}"]}}]"#
        ),
        |_| String::new(),
    )));
    assert_eq!(e.path, "groups[1].id", "{e}");
    // A group policy is checked like an app's.
    let e = err(from_local_json(&two_apps(
        &format!(r#"[{{"id": "{GROUP}", "members": ["{APP}"], "expiry": "soon"}}]"#),
        |_| String::new(),
    )));
    assert_eq!(e.path, "groups[0].expiry", "{e}");
}

#[test]
fn the_tenant_of_an_app_comes_from_either_source_and_is_checked() {
    let with_tenant = |tenant: &str| {
        local("").replace(
            r#""display_name": "sensor","#,
            &format!(r#""display_name": "sensor", "tenant": "{tenant}","#),
        )
    };
    let config = from_local_json(&with_tenant("acme-2")).unwrap();
    assert_eq!(config.apps[0].tenant, "acme-2");
    assert_eq!(
        from_local_json(&local("")).unwrap().apps[0].tenant,
        "",
        "no tenant: the default tenant"
    );

    let mut controller = proto_config(&[]);
    controller.apps[0].cairn_tenant = "acme-2".into();
    let decoded = proto::EdgeDevConfig::decode(controller.encode_to_vec().as_slice()).unwrap();
    assert_eq!(from_proto(&decoded).unwrap().apps[0].tenant, "acme-2");
    assert_eq!(from_proto(&decoded).unwrap(), config);

    for bad in ["Acme", "-acme", "_a", "a b", "a.b", "ä", &"a".repeat(64)] {
        let e = err(from_local_json(&with_tenant(bad)));
        assert_eq!(e.path, "apps[0].tenant", "{bad:?}: {e}");
        assert!(e.message.contains("tenant name"), "{e}");
        controller.apps[0].cairn_tenant = bad.to_string();
        assert_eq!(
            err(from_proto(&controller)).path,
            "apps[0].tenant",
            "{bad:?}"
        );
    }
    for good in ["a", "0", "a_b-c", &"z".repeat(63)] {
        assert_eq!(
            from_local_json(&with_tenant(good)).unwrap().apps[0].tenant,
            good
        );
    }
}

// ---- clones ----

const CLONE: &str = "c10e0000-0000-4000-8000-000000000001";
const CLONE_VOLUME: &str = "c10e0000-0000-4000-8000-0000000000b1";

/// The `local` config plus app CLONE cloned from (APP, SNAP1) onto its own volume.
fn local_clone(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate"}}"#
    )))
    .unwrap();
    v["apps"].as_array_mut().unwrap().push(serde_json::json!({
        "uuid": CLONE, "version": "1",
        "volume_refs": [{"uuid": CLONE_VOLUME}],
        "clone_of": {"app": APP, "snapshot": SNAP1},
    }));
    v["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"uuid": CLONE_VOLUME, "format": "qcow2"}));
    edit(&mut v);
    v.to_string()
}

#[test]
fn a_clone_spec_gives_the_clone_volumes_their_snapshot_origin() {
    let config = from_local_json(&local_clone(|_| {})).unwrap();
    let volume = |id: &str| {
        config
            .volumes
            .iter()
            .find(|v| v.volume_id.to_string() == id)
            .unwrap()
    };
    assert_eq!(
        volume(CLONE_VOLUME).origin,
        VolumeOrigin::Snapshot {
            snapshot: SNAP1.parse().unwrap(),
            volume: VOLUME.parse().unwrap(),
        }
    );
    assert_eq!(volume(VOLUME).origin, VolumeOrigin::Blank);
    assert_eq!(config.apps[1].app_uuid().to_string(), CLONE);

    // The controller's field 1002 says the same.
    let mut controller = proto_config(&[SNAP1]);
    let mut app = controller.apps[0].clone();
    app.uuidandversion = Some(proto::UuidAndVersion {
        uuid: CLONE.into(),
        version: "1".into(),
    });
    app.volume_ref_list[0].uuid = CLONE_VOLUME.into();
    app.snapshot = None;
    app.cairn_clone = Some(proto::CairnClone {
        app: APP.into(),
        snapshot: SNAP1.into(),
    });
    controller.apps.push(app);
    let mut volume = controller.volumes[0].clone();
    volume.uuid = CLONE_VOLUME.into();
    controller.volumes.push(volume);
    let bytes = controller.encode_to_vec();
    let decoded = proto::EdgeDevConfig::decode(bytes.as_slice()).unwrap();
    let from_controller = from_proto(&decoded).unwrap();
    assert_eq!(
        from_controller
            .volumes
            .iter()
            .find(|v| v.volume_id.to_string() == CLONE_VOLUME)
            .unwrap()
            .origin,
        volume_origin_of_clone()
    );

    let mut bad = decoded.clone();
    bad.apps[1].cairn_clone.as_mut().unwrap().snapshot = "nope".into();
    assert_eq!(err(from_proto(&bad)).path, "apps[1].cairn_clone.snapshot");
    let mut bad = decoded;
    bad.apps[1].cairn_clone.as_mut().unwrap().snapshot = SNAP2.into();
    assert_eq!(err(from_proto(&bad)).path, "apps[1].cairn_clone.snapshot");
}

fn volume_origin_of_clone() -> VolumeOrigin {
    VolumeOrigin::Snapshot {
        snapshot: SNAP1.parse().unwrap(),
        volume: VOLUME.parse().unwrap(),
    }
}

#[test]
fn a_bad_clone_spec_is_refused_naming_its_field() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|v| v["apps"][1]["clone_of"]["app"] = CLONE_VOLUME.into()),
            "apps[1].clone_of.app",
            "not in the config's apps",
        ),
        (
            Box::new(|v| v["apps"][1]["clone_of"]["app"] = CLONE.into()),
            "apps[1].clone_of.app",
            "itself",
        ),
        (
            Box::new(|v| v["apps"][1]["clone_of"]["snapshot"] = SNAP2.into()),
            "apps[1].clone_of.snapshot",
            "is not in the snapshots of app",
        ),
        (
            Box::new(|v| v["apps"][1]["clone_of"]["snapshot"] = "x".into()),
            "apps[1].clone_of.snapshot",
            "UUID",
        ),
        (
            Box::new(|v| v["apps"][1]["volume_refs"] = serde_json::json!([])),
            "apps[1].volume_refs",
            "0 here, 1 in app",
        ),
        (
            Box::new(|v| v["apps"][1]["volume_refs"][0]["uuid"] = VOLUME.into()),
            "apps[1].volume_refs[0].uuid",
            "also used by app",
        ),
        (
            Box::new(|v| v["volumes"][1]["format"] = "dir".into()),
            "apps[1].volume_refs[0].uuid",
            "a clone has its source's formats",
        ),
        (
            Box::new(|v| {
                v["volumes"][1]["base_image"] = serde_json::json!({"path": "/b", "sha256": "ab"})
            }),
            "volumes[1].base_image",
            "cannot also have a base image",
        ),
    ];
    for (edit, path, words) in cases {
        let e = err(from_local_json(&local_clone(edit)));
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(words), "{e}");
    }
}

// ---- quiesce hooks (issue 11) ----

/// The local config with `quiesce` (a JSON object) on its app.
fn local_quiesce(quiesce: &str) -> String {
    local("").replace(
        r#""domain":"#,
        &format!(r#""quiesce": {quiesce}, "domain":"#),
    )
}

#[test]
fn quiesce_hooks_are_an_argv_or_a_shell_command_with_a_default_timeout() {
    let config = from_local_json(&local_quiesce(
        r#"{"pre": ["/usr/bin/flush", "--all"], "post": "echo thawed >> /tmp/log"}"#,
    ))
    .unwrap();
    let hooks = config.apps[0].quiesce.clone().unwrap();
    assert_eq!(hooks.pre, ["/usr/bin/flush", "--all"]);
    assert_eq!(hooks.post, ["/bin/sh", "-c", "echo thawed >> /tmp/log"]);
    assert_eq!(hooks.timeout_seconds(), 30);
    assert_eq!(from_local_json(&local("")).unwrap().apps[0].quiesce, None);
}

#[test]
fn an_empty_hook_command_is_refused_naming_the_app_and_the_field() {
    for pre in [r#"[]"#, r#""  ""#, r#"["", "x"]"#] {
        let e = err(from_local_json(&local_quiesce(&format!(
            r#"{{"pre": {pre}, "post": ["/bin/true"]}}"#
        ))));
        assert_eq!(e.path, "apps[0].quiesce.pre", "{pre}: {e}");
        assert!(e.message.contains(APP), "{e}");
    }
}

#[test]
fn a_zero_hook_timeout_or_a_block_without_hooks_is_refused() {
    let e = err(from_local_json(&local_quiesce(
        r#"{"pre": ["/bin/true"], "timeout_seconds": 0}"#,
    )));
    assert_eq!(e.path, "apps[0].quiesce.timeout_seconds");
    assert!(e.message.contains(APP), "{e}");
    let e = err(from_local_json(&local_quiesce(r#"{}"#)));
    assert_eq!(e.path, "apps[0].quiesce");
}

#[test]
fn quiesce_hooks_travel_in_the_cairn_extension_of_the_protobuf() {
    let mut config = proto_config(&[]);
    config.apps[0].cairn_quiesce = Some(proto::CairnQuiesce {
        pre: vec!["/usr/bin/flush".into()],
        post: vec![],
        timeout_seconds: 0,
        proceed_without_guest_agent: false,
    });
    let decoded = proto::EdgeDevConfig::decode(config.encode_to_vec().as_slice()).unwrap();
    let hooks = from_proto(&decoded).unwrap().apps[0]
        .quiesce
        .clone()
        .unwrap();
    assert_eq!(hooks.pre, ["/usr/bin/flush"]);
    assert!(hooks.post.is_empty());
    assert_eq!(hooks.timeout_seconds(), 30);

    config.apps[0].cairn_quiesce = Some(proto::CairnQuiesce {
        pre: vec![String::new()],
        post: vec![],
        timeout_seconds: 3,
        proceed_without_guest_agent: false,
    });
    let e = err(from_proto(&config));
    assert_eq!(e.path, "apps[0].cairn_quiesce.pre");
}

// ---- issue 11: snapshot modes ----

#[test]
fn a_snapshot_mode_is_read_from_both_sources_alike() {
    use cairn_types::SnapshotMode;
    let from_file = from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate", "mode": "live"}}, {{"id": "{SNAP2}", "type": "immediate"}}"#
    )))
    .unwrap();
    let modes: Vec<_> = from_file.apps[0]
        .snapshot
        .snapshots
        .iter()
        .map(|d| d.mode)
        .collect();
    assert_eq!(modes, vec![SnapshotMode::Live, SnapshotMode::Stopped]);
    let mut edge = proto_config(&[SNAP1, SNAP2]);
    edge.apps[0].snapshot.as_mut().unwrap().snapshots[0].cairn_mode = "live".into();
    let bytes = edge.encode_to_vec();
    let from_controller =
        from_proto(&proto::EdgeDevConfig::decode(bytes.as_slice()).unwrap()).unwrap();
    assert_eq!(from_controller, from_file);

    edge.apps[0].snapshot.as_mut().unwrap().snapshots[0].cairn_mode = "hot".into();
    let e = err(from_proto(&edge));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].cairn_mode", "{e}");
    assert!(e.message.contains("hot"), "{e}");
}

#[test]
fn a_stateful_snapshot_of_a_process_is_refused_naming_the_app_and_snapshot() {
    let e = err(from_local_json(&local(&format!(
        r#"{{"id": "{SNAP1}", "type": "immediate", "mode": "stateful"}}"#
    ))));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].mode", "{e}");
    assert!(e.message.contains(APP), "names the app: {e}");
    assert!(e.message.contains(SNAP1), "names the snapshot: {e}");
    assert!(e.message.contains("not a VM"), "says why: {e}");
}

#[test]
fn a_schedule_mode_is_read_from_both_sources_and_stateful_needs_a_vm() {
    let with_mode = |mode: &str| {
        local("").replacen(
            r#""max_snapshots": 2,"#,
            &format!(r#""max_snapshots": 2, "schedule": "@daily", "schedule_mode": "{mode}","#),
            1,
        )
    };
    let config = from_local_json(&with_mode("live")).unwrap();
    let policy = config.apps[0].snapshot.policy.as_ref().unwrap();
    assert_eq!(policy.mode, cairn_types::SnapshotMode::Live);
    // The test app is a process: it has no memory state to save.
    let e = err(from_local_json(&with_mode("stateful")));
    assert_eq!(e.path, "apps[0].snapshot.schedule_mode", "{e}");
    assert!(e.message.contains("not a VM"), "{e}");
    let e = err(from_local_json(&with_mode("paused")));
    assert_eq!(e.path, "apps[0].snapshot.schedule_mode", "{e}");

    let mut edge = proto_config(&[]);
    let snapshot = edge.apps[0].snapshot.as_mut().unwrap();
    snapshot.cairn_schedule = "@daily".into();
    snapshot.cairn_schedule_mode = "live".into();
    let controller = from_proto(&edge).unwrap();
    assert_eq!(
        controller.apps[0].snapshot.policy,
        config.apps[0].snapshot.policy
    );
    edge.apps[0].snapshot.as_mut().unwrap().cairn_schedule_mode = "sometimes".into();
    let e = err(from_proto(&edge));
    assert_eq!(e.path, "apps[0].snapshot.cairn_schedule_mode", "{e}");
}

#[test]
fn a_group_snapshot_is_taken_stopped_and_says_so_when_asked_otherwise() {
    let config = with_groups(
        local(&format!(
            r#"{{"id": "{SNAP1}", "type": "immediate", "group": "{GROUP_SNAPSHOT}", "mode": "live"}}"#
        )),
        &format!(r#"[{{"id": "{GROUP}", "members": ["{APP}"]}}]"#),
    );
    let e = err(from_local_json(&config));
    assert_eq!(e.path, "apps[0].snapshot.snapshots[0].mode", "{e}");
    assert!(e.message.contains("taken stopped"), "{e}");
}

/// Issue 17: serde reads a JSON array as a struct with every field defaulted, so `[]` was a
/// config of 0 apps and 0 volumes that deleted the device's volumes. Every top level that is
/// not an object naming `apps` or `volumes` is refused, saying what it is.
#[test]
fn a_top_level_that_is_not_a_device_config_is_refused_by_name() {
    for (text, kind) in [
        ("[]", "a JSON array"),
        ("[{\"apps\": []}]", "a JSON array"),
        ("{}", "an empty object"),
        ("null", "null"),
        ("0", "a number"),
        ("true", "a boolean"),
        ("\"apps\"", "a string"),
        (
            r#"{"config_items": {"timer.config.interval": "60"}}"#,
            "an object naming neither `apps` nor `volumes`",
        ),
    ] {
        let e = err(from_local_json(text));
        assert_eq!(e.path, "", "{text}: the whole file is at fault");
        assert_eq!(
            e.to_string(),
            format!(
                "the top level is {kind}; a device config is an object with `apps` and `volumes` (`{{\"apps\": [], \"volumes\": []}}` for a device that runs nothing)"
            ),
            "{text}"
        );
    }
    // An unknown key is still named with its place.
    let e = err(from_local_json(r#"{"app": []}"#));
    assert!(e.to_string().contains("unknown field `app`"), "{e}");
}

/// A device that runs nothing, said on purpose, is a config.
#[test]
fn an_explicitly_empty_device_is_a_config() {
    for text in [
        r#"{"apps": [], "volumes": []}"#,
        r#"{"apps": []}"#,
        r#"{"volumes": []}"#,
    ] {
        let config = from_local_json(text).unwrap();
        assert!(
            config.apps.is_empty() && config.volumes.is_empty(),
            "{text}"
        );
    }
}

#[test]
fn the_volume_deletion_grace_is_a_number_of_seconds() {
    let with = |value: &str| {
        format!(
            r#"{{"apps": [], "volumes": [], "config_items": {{"cairn.volume.delete.grace.seconds": "{value}"}}}}"#
        )
    };
    let config = from_local_json(&with("0")).unwrap();
    assert_eq!(
        config.config_items["cairn.volume.delete.grace.seconds"],
        "0"
    );
    let e = err(from_local_json(&with("1d")));
    assert_eq!(
        e.path,
        "config_items[\"cairn.volume.delete.grace.seconds\"]"
    );
    assert!(e.message.contains("whole number of seconds"), "{e}");
    // The controller's configItems are checked alike.
    let mut proto = proto_config(&[]);
    proto.config_items.push(proto::ConfigItem {
        key: "cairn.volume.delete.grace.seconds".into(),
        value: "-5".into(),
    });
    let e = err(from_proto(&proto));
    assert!(e.message.contains("whole number of seconds"), "{e}");
}

// ---- content trees (EVE `datastores`, `contentInfo`, `VCOT_DOWNLOAD`) ----

const TREE: &str = "c0c0c0c0-1111-4222-8333-444444444444";
const STORE: &str = "d5d5d5d5-1111-4222-8333-444444444444";
const SHA: &str = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

fn eve_content_config(tree_ds: &str, origin_tree: &str) -> proto::EdgeDevConfig {
    proto::EdgeDevConfig {
        datastores: vec![proto::DatastoreConfig {
            id: STORE.into(),
            d_type: proto::DsType::DsHttps as i32,
            fqdn: "https://images.example:8443".into(),
            dpath: "eve".into(),
            ds_cert_pem: vec![b"-----BEGIN CERTIFICATE-----".to_vec()],
            ..Default::default()
        }],
        content_info: vec![proto::ContentTree {
            uuid: TREE.into(),
            ds_id: tree_ds.into(),
            url: "disk.qcow2".into(),
            iformat: proto::Format::Qcow2 as i32,
            sha256: SHA.into(),
            max_size_bytes: 1 << 30,
            display_name: "guest disk".into(),
            generation_count: 2,
            ..Default::default()
        }],
        volumes: vec![proto::Volume {
            uuid: VOLUME.into(),
            origin: Some(proto::VolumeContentOrigin {
                r#type: proto::VolumeContentOriginType::VcotDownload as i32,
                download_content_tree_id: origin_tree.into(),
            }),
            maxsizebytes: 1 << 30,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn eve_content_trees_become_content_tree_configs_with_their_datastore() {
    let config = from_proto(&eve_content_config(STORE, TREE)).unwrap();
    let tree = &config.content_trees[0];
    assert_eq!(tree.content_id.to_string(), TREE);
    assert_eq!(tree.relative_url, "disk.qcow2");
    assert_eq!(tree.format, cairn_types::ContentFormat::Qcow2);
    assert_eq!(
        tree.content_sha256,
        SHA.to_ascii_lowercase(),
        "EVE lower-cases it"
    );
    assert_eq!(tree.max_download_size, 1 << 30);
    assert_eq!(tree.generation_counter, 2);
    let store = &tree.datastores[0];
    assert_eq!(
        (
            store.ds_type.as_str(),
            store.fqdn.as_str(),
            store.dpath.as_str()
        ),
        ("DsHttps", "https://images.example:8443", "eve")
    );
    assert_eq!(store.ds_cert_pem.len(), 1);
    assert_eq!(
        config.volumes[0].origin,
        VolumeOrigin::ContentTree {
            id: TREE.parse().unwrap()
        },
        "VCOT_DOWNLOAD names the content tree (it used to become a blank volume)"
    );
}

#[test]
fn a_content_tree_on_an_unknown_datastore_is_accepted_without_it() {
    // Reported on the content tree by the downloader, as EVE's downloader does.
    let other = "99999999-1111-4222-8333-444444444444";
    let config = from_proto(&eve_content_config(other, TREE)).unwrap();
    assert!(config.content_trees[0].datastores.is_empty());
    assert_eq!(
        config.content_trees[0].datastore_id_list[0].to_string(),
        other
    );
}

#[test]
fn a_volume_from_a_content_tree_not_in_the_config_is_accepted_and_marked_unusable() {
    // One faulty object does not refuse the whole config: the volume is reported Failed with
    // the reason (the controller reads it in ZInfoVolume / the app's appErr).
    let missing = "99999999-1111-4222-8333-444444444444";
    let config = from_proto(&eve_content_config(STORE, missing)).unwrap();
    let why = config.volumes[0]
        .unusable
        .as_deref()
        .expect("the volume says why it cannot be made");
    assert!(
        why.contains(missing) && why.contains("not in the config"),
        "{why}"
    );
    let fine = from_proto(&eve_content_config(STORE, TREE)).unwrap();
    assert_eq!(fine.volumes[0].unusable, None);
}

#[test]
fn a_local_config_names_datastores_and_content_trees_in_its_own_style() {
    let config = from_local_json(&format!(
        r#"{{
  "datastores": [{{"id": "{STORE}", "ds_type": "http", "fqdn": "http://10.0.0.1:8080"}}],
  "content_trees": [{{"uuid": "{TREE}", "ds_id": "{STORE}", "url": "disk.raw", "format": "raw",
                      "sha256": "{SHA}", "max_size_bytes": 4096}}],
  "volumes": [{{"uuid": "{VOLUME}", "format": "qcow2", "max_size_bytes": 1048576,
                "content_tree": "{TREE}"}}]
}}"#
    ))
    .unwrap();
    let tree = &config.content_trees[0];
    assert_eq!(tree.format, cairn_types::ContentFormat::Raw);
    assert_eq!(tree.datastores[0].ds_type, "DsHttp");
    assert!(matches!(
        config.volumes[0].origin,
        VolumeOrigin::ContentTree { .. }
    ));
}

fn with_remotes(config: String, remotes: &str) -> String {
    config.replacen(
        r#""config_items""#,
        &format!(r#""remotes": {remotes}, "config_items""#),
        1,
    )
}

#[test]
fn remotes_come_alike_from_either_source_and_bad_ones_are_refused_by_place() {
    let remote = r#"{"id": "backups", "endpoint": "https://s3.example:9000", "region": "eu-1",
        "bucket": "fleet", "prefix": "site-a", "credentials_file": "s3.json",
        "ca_cert_file": "/persist/config/s3-ca.pem", "bandwidth_limit": 1048576}"#;
    let file = from_local_json(&with_remotes(local(""), &format!("[{remote}]"))).unwrap();
    assert_eq!(file.remotes.len(), 1);
    let r = &file.remotes[0];
    assert_eq!(
        (r.id.as_str(), r.bucket.as_str(), r.prefix.as_str()),
        ("backups", "fleet", "site-a")
    );
    assert_eq!(r.credentials_file, std::path::Path::new("s3.json"));
    assert_eq!(r.bandwidth_limit, 1 << 20);

    let mut edge = proto_config(&[]);
    edge.cairn_remotes.push(proto::CairnRemote {
        id: "backups".into(),
        endpoint: "https://s3.example:9000".into(),
        region: "eu-1".into(),
        bucket: "fleet".into(),
        prefix: "site-a".into(),
        credentials_file: "s3.json".into(),
        ca_cert_file: "/persist/config/s3-ca.pem".into(),
        bandwidth_limit: 1 << 20,
        encryption_key_file: String::new(),
    });
    let bytes = edge.encode_to_vec();
    let decoded = proto::EdgeDevConfig::decode(bytes.as_slice()).unwrap();
    assert_eq!(from_proto(&decoded).unwrap().remotes, file.remotes);

    let twice = format!("[{remote}, {remote}]");
    let e = err(from_local_json(&with_remotes(local(""), &twice)));
    assert_eq!(e.path, "remotes[1].id", "{e}");
    let no_bucket = remote.replace(r#""bucket": "fleet","#, r#""bucket": "","#);
    let e = err(from_local_json(&with_remotes(
        local(""),
        &format!("[{no_bucket}]"),
    )));
    assert_eq!(e.path, "remotes[0].bucket", "{e}");
    edge.cairn_remotes[0].endpoint = "s3.example".into();
    let e = err(from_proto(&edge));
    assert_eq!(e.path, "cairn_remotes[0].endpoint", "{e}");
}

#[test]
fn edgeview_from_eves_field_and_from_the_local_file_are_the_same_message() {
    // EVE's fields only (EdgeDevConfig.edgeview = 32), through the wire.
    let mut config = proto_config(&[]);
    config.edgeview = Some(proto::EdgeViewConfig {
        token: "h.p.s".into(),
        disp_cert_pem: vec![
            b"-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n".to_vec(),
        ],
        dev_policy: Some(proto::DevDebugAccessPolicy { allow_dev: true }),
        app_policy: None,
        ext_policy: Some(proto::ExternalEndPointPolicy { allow_ext: false }),
        generation_id: 4,
    });
    let decoded = proto::EdgeDevConfig::decode(config.encode_to_vec().as_slice()).unwrap();
    let edgeview = from_proto(&decoded).unwrap().edgeview.unwrap();
    assert_eq!(edgeview.jw_token, "h.p.s");
    assert!(edgeview.dev_policy.enabled);
    assert!(
        !edgeview.app_policy.enabled,
        "an absent policy allows nothing"
    );
    assert_eq!(edgeview.gen_id, 4);
    assert_eq!(edgeview.disp_cert_pem.len(), 1);
    // The signer and device come from the link when the config is put in force.
    assert!(edgeview.signing_cert_pem.is_empty() && edgeview.device_uuid.is_empty());

    let text = local("").replace(
        r#""config_items""#,
        r#""edgeview": {"token": "h.p.s", "dev_policy": {"allow_dev": true},
             "disp_cert_pem": ["-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n"],
             "ext_policy": {"allow_ext": false}, "generation_id": 4,
             "signing_cert_pem": "PEM"},
           "config_items""#,
    );
    let local_edgeview = from_local_json(&text).unwrap().edgeview.unwrap();
    assert_eq!(
        local_edgeview,
        cairn_types::EdgeviewConfig {
            signing_cert_pem: "PEM".into(),
            ..edgeview
        }
    );
    // No edgeview: EdgeView is off.
    assert_eq!(from_proto(&proto_config(&[])).unwrap().edgeview, None);
    // A misspelt policy field is named.
    let bad = text.replace("allow_dev", "allowDev");
    let e = err(from_local_json(&bad));
    assert!(e.path.starts_with("edgeview.dev_policy"), "{e}");
}

#[test]
fn a_volume_from_an_export_at_a_remote_names_a_configured_remote_and_a_key() {
    let remote = r#"{"id": "backups", "endpoint": "https://s3.example:9000", "bucket": "fleet",
        "credentials_file": "s3.json"}"#;
    let from = |export: &str| {
        with_remotes(local(""), &format!("[{remote}]")).replacen(
            r#""max_size_bytes": 1048576}"#,
            &format!(r#""max_size_bytes": 1048576, "from_export": {export}}}"#),
            1,
        )
    };
    let key = "site-a/app-snap-time";
    let config = from_local_json(&from(&format!(
        r#"{{"remote": "backups", "key": "{key}", "volume_uuid": "{VOLUME}"}}"#
    )))
    .unwrap();
    assert_eq!(
        config.volumes[0].origin,
        VolumeOrigin::RemoteExport {
            remote: "backups".into(),
            key: key.into(),
            volume: VOLUME.parse().unwrap(),
        }
    );
    let e = err(from_local_json(&from(&format!(
        r#"{{"remote": "elsewhere", "key": "{key}", "volume_uuid": "{VOLUME}"}}"#
    ))));
    assert_eq!(e.path, "volumes[0].from_export.remote", "{e}");
    assert!(e.to_string().contains("elsewhere"), "{e}");
    let e = err(from_local_json(&from(&format!(
        r#"{{"dir": "/x", "remote": "backups", "key": "{key}", "volume_uuid": "{VOLUME}"}}"#
    ))));
    assert_eq!(e.path, "volumes[0].from_export", "{e}");
}

#[test]
fn export_requests_and_scheduled_exports_come_alike_from_either_source_and_name_a_configured_remote()
 {
    let remote = r#"{"id": "backups", "endpoint": "https://s3.example:9000", "bucket": "fleet",
        "credentials_file": "s3.json"}"#;
    let job = "77777777-8888-4777-8666-555555555555";
    let text = |request_remote: &str, policy_remote: &str| {
        with_remotes(local(""), &format!("[{remote}]"))
            .replacen(
                r#""snapshot": {"max_snapshots": 2, "snapshots": []}"#,
                &format!(
                    r#""snapshot": {{"max_snapshots": 2, "snapshots": [], "schedule": "@daily",
                        "export": {{"remote": "{policy_remote}", "prefix": "site-a",
                                    "full_every": 7, "keep_exports": 14}}}},
                       "export_requests": [{{"id": "{job}", "snapshot": "{SNAP1}",
                           "remote": "{request_remote}", "prefix": "/by-hand/", "incremental": true}}]"#
                ),
                1,
            )
    };
    let file = from_local_json(&text("backups", "backups")).unwrap();
    let export = file.apps[0]
        .snapshot
        .policy
        .as_ref()
        .and_then(|p| p.export.clone())
        .unwrap();
    assert_eq!(
        export,
        cairn_types::ScheduledExport {
            remote: "backups".into(),
            prefix: "site-a".into(),
            full_every: 7,
            keep_exports: 14,
        }
    );
    assert_eq!(file.exports.len(), 1);
    let request = &file.exports[0];
    assert_eq!(request.job_id.to_string(), job);
    assert_eq!(request.snapshot_id.to_string(), SNAP1);
    assert_eq!(request.app_uuid.to_string(), APP);
    assert_eq!(
        (request.remote.as_str(), request.remote_prefix.as_str()),
        ("backups", "by-hand")
    );
    assert!(request.incremental && request.once);

    // The controller's extension fields give the same, through the wire.
    let mut edge = proto_config(&[]);
    edge.cairn_remotes.push(proto::CairnRemote {
        id: "backups".into(),
        endpoint: "https://s3.example:9000".into(),
        bucket: "fleet".into(),
        credentials_file: "s3.json".into(),
        ..Default::default()
    });
    let app = &mut edge.apps[0];
    if let Some(s) = app.snapshot.as_mut() {
        s.cairn_schedule = "@daily".into();
        s.cairn_export = Some(proto::CairnScheduledExport {
            remote: "backups".into(),
            prefix: "site-a".into(),
            full_every: 7,
            keep_exports: 14,
        });
    }
    app.cairn_export_requests.push(proto::CairnExportRequest {
        id: job.into(),
        snapshot: SNAP1.into(),
        remote: "backups".into(),
        prefix: "/by-hand/".into(),
        incremental: true,
    });
    let decoded = proto::EdgeDevConfig::decode(edge.encode_to_vec().as_slice()).unwrap();
    let controller = from_proto(&decoded).unwrap();
    assert_eq!(controller.exports, file.exports);
    assert_eq!(
        controller.apps[0].snapshot.policy,
        file.apps[0].snapshot.policy
    );

    // A remote not in the config is refused, named, in either place and either source.
    let e = err(from_local_json(&text("elsewhere", "backups")));
    assert_eq!(e.path, "apps[0].export_requests[0].remote", "{e}");
    assert!(e.to_string().contains("remote elsewhere"), "{e}");
    let e = err(from_local_json(&text("backups", "nowhere")));
    assert_eq!(e.path, "apps[0].snapshot.export.remote", "{e}");
    assert!(e.to_string().contains("remote nowhere"), "{e}");
    edge.apps[0].cairn_export_requests[0].remote = "elsewhere".into();
    let e = err(from_proto(&edge));
    assert_eq!(e.path, "apps[0].cairn_export_requests[0].remote", "{e}");
    assert!(e.to_string().contains("remote elsewhere"), "{e}");
    // A key prefix that climbs out is refused too.
    let e = err(from_local_json(
        &text("backups", "backups").replace("/by-hand/", "a/../b"),
    ));
    assert_eq!(e.path, "apps[0].export_requests[0].prefix", "{e}");
}
