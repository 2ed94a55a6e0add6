//! `cairn record check FILE`: is a persisted record usable, and if not, why.

use std::path::Path;

use cairn_persist::{DecodeError, Format, Record, decode, inspect};
use cairn_types::export::ExportJobRecord;
use cairn_types::layout::{
    APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE, VOLUMES_SNAPSHOT_STATUS_FILE,
};
use cairn_types::{
    AppInstanceConfig, AppInstanceStatus, AppVolumeRefs, ConfigItemValueMap, ContentTreeConfig,
    ContentTreeStatus, DeviceStatus, DomainConfig, DomainLiveOpConfig, DomainLiveOpStatus,
    DomainMetric, DomainStatus, ExportConfig, ExportStatus, LastBoot, LogManagerStatus,
    RemoteConfig, SnapshotInstanceStatus, StopReason, VolumeConfig, VolumeStatus,
    VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use serde::Serialize;

/// The verdict on one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordCheck {
    pub file: String,
    pub schema: Option<String>,
    pub version: Option<u32>,
    /// `envelope` (Cairn, checksummed) or `plain` (EVE's bare JSON, no checksum).
    pub format: Option<String>,
    pub ok: bool,
    /// What is wrong, naming the field or the damage; empty when `ok`.
    pub problem: String,
}

/// Checks `file`: envelope and checksum, then, for a schema this build knows, the migration
/// path, every mandatory field at any depth and every field's type.
pub fn check(file: &Path) -> RecordCheck {
    let mut verdict = RecordCheck {
        file: file.display().to_string(),
        schema: None,
        version: None,
        format: None,
        ok: false,
        problem: String::new(),
    };
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            verdict.problem = format!("cannot read it: {e}");
            return verdict;
        }
    };
    let inspected = match inspect(&bytes) {
        Ok(inspected) => inspected,
        Err(e) => {
            verdict.problem = e.to_string();
            return verdict;
        }
    };
    verdict.version = Some(inspected.version);
    verdict.format = Some(
        match inspected.format {
            Format::Envelope => "envelope",
            Format::Plain => "plain",
        }
        .to_string(),
    );
    // A plain record names no schema: EVE's files are known by their names.
    let schema = inspected.schema.clone().or_else(|| {
        let name = file.file_name()?.to_str()?;
        Some(
            match name {
                SNAPSHOT_INSTANCE_STATUS_FILE => "SnapshotInstanceStatus",
                VOLUMES_SNAPSHOT_STATUS_FILE => "VolumesSnapshotStatus",
                APP_INSTANCE_CONFIG_FILE => "AppInstanceConfig",
                _ => return None,
            }
            .to_string(),
        )
    });
    verdict.schema = schema.clone();
    let result = match schema.as_deref() {
        Some("SnapshotInstanceStatus") => typed::<SnapshotInstanceStatus>(&bytes),
        Some("VolumesSnapshotStatus") => typed::<VolumesSnapshotStatus>(&bytes),
        Some("VolumesSnapshotConfig") => typed::<VolumesSnapshotConfig>(&bytes),
        Some("AppInstanceConfig") => typed::<AppInstanceConfig>(&bytes),
        Some("AppInstanceStatus") => typed::<AppInstanceStatus>(&bytes),
        Some("VolumeConfig") => typed::<VolumeConfig>(&bytes),
        Some("VolumeStatus") => typed::<VolumeStatus>(&bytes),
        Some("DomainConfig") => typed::<DomainConfig>(&bytes),
        Some("DomainStatus") => typed::<DomainStatus>(&bytes),
        Some("DeviceStatus") => typed::<DeviceStatus>(&bytes),
        Some("ContentTreeConfig") => typed::<ContentTreeConfig>(&bytes),
        Some("RemoteConfig") => typed::<RemoteConfig>(&bytes),
        Some("ContentTreeStatus") => typed::<ContentTreeStatus>(&bytes),
        Some("DomainLiveOpConfig") => typed::<DomainLiveOpConfig>(&bytes),
        Some("DomainLiveOpStatus") => typed::<DomainLiveOpStatus>(&bytes),
        Some("DomainMetric") => typed::<DomainMetric>(&bytes),
        Some("AppVolumeRefs") => typed::<AppVolumeRefs>(&bytes),
        Some("ExportConfig") => typed::<ExportConfig>(&bytes),
        Some("ExportStatus") => typed::<ExportStatus>(&bytes),
        Some("ExportJobRecord") => typed::<ExportJobRecord>(&bytes),
        Some("LogManagerStatus") => typed::<LogManagerStatus>(&bytes),
        Some("ConfigItemValueMap") => typed::<ConfigItemValueMap>(&bytes),
        Some("LastBoot") => typed::<LastBoot>(&bytes),
        Some("StopReason") => typed::<StopReason>(&bytes),
        Some("UpdateOutcome") => typed::<cairn_types::UpdateOutcome>(&bytes),
        Some("BaseOsStatus") => typed::<cairn_types::BaseOsStatus>(&bytes),
        Some(other) if let Some(agent) = owner(other) => ask_agent(agent, file),
        Some(other) => Err(format!(
            "envelope and checksum are intact, but this build does not know schema {other}, so its fields were not checked"
        )),
        None => Err("a plain JSON file that is not one of EVE's snapshot records: no schema to check it against".into()),
    };
    match result {
        Ok(()) => verdict.ok = true,
        Err(problem) => verdict.problem = problem,
    }
    verdict
}

/// Records private to one agent (its own state, its checkpoint): only its build knows their
/// fields, so that agent's binary checks them.
const AGENT_RECORDS: [(&str, &str); 4] = [
    ("AppManagerState", "cairn-app-manager"),
    ("LastConfig", "cairn-config-agent"),
    ("ContentRefs", "cairn-downloader"),
    ("LogCursors", "cairn-log-manager"),
];

fn owner(schema: &str) -> Option<&'static str> {
    AGENT_RECORDS
        .iter()
        .find(|(name, _)| *name == schema)
        .map(|(_, agent)| *agent)
}

/// Runs `AGENT --check-record FILE` from beside this binary, where `cairn up` finds the agents.
fn ask_agent(agent: &str, file: &Path) -> Result<(), String> {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(agent)))
        .filter(|bin| bin.exists())
        .ok_or_else(|| {
            format!("its fields are checked by {agent}, which is not installed beside cairn")
        })?;
    let output = std::process::Command::new(&bin)
        .arg(cairn_startup::CHECK_RECORD_ARG)
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run {} to check it: {e}", bin.display()))?;
    let said = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match output.status.code() {
        Some(0) => Ok(()),
        Some(1) if !said.is_empty() => Err(said),
        _ => Err(format!(
            "{agent} could not check it ({}): {said}",
            output.status
        )),
    }
}

fn typed<T: Record>(bytes: &[u8]) -> Result<(), String> {
    decode::<T>(bytes)
        .map(|_| ())
        .map_err(|e: DecodeError| e.to_string())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
mod tests {
    use super::*;
    use cairn_types::{SnapshotDesc, UUIDandVersion};
    use uuid::Uuid;

    fn record() -> SnapshotInstanceStatus {
        SnapshotInstanceStatus {
            snapshot: SnapshotDesc {
                snapshot_id: Uuid::from_u128(1),
                ..Default::default()
            },
            app_instance_id: Uuid::from_u128(2),
            config_version: UUIDandVersion {
                uuid: Uuid::from_u128(2),
                version: "1".into(),
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_sound_record_passes_and_says_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SNAPSHOT_INSTANCE_STATUS_FILE);
        cairn_persist::store(&file, &record()).unwrap();
        let verdict = check(&file);
        assert!(verdict.ok, "{verdict:?}");
        assert_eq!(verdict.schema.as_deref(), Some("SnapshotInstanceStatus"));
        assert_eq!(verdict.format.as_deref(), Some("envelope"));
    }

    /// `record` as a newer build writes it: `version`, `readable_from` (1: left out, as every
    /// build before it wrote) and one field this build does not know.
    fn newer_envelope(version: u32, readable_from: u32) -> String {
        use sha2::Digest;
        let mut value = serde_json::to_value(record()).unwrap();
        value["SnapshotPolicyV9"] = serde_json::json!({"Tier": "gold"});
        let body = serde_json::to_string(&value).unwrap();
        let stamp = if readable_from > 1 {
            format!("{version}:{readable_from}")
        } else {
            version.to_string()
        };
        let mut h = sha2::Sha256::new();
        h.update(b"SnapshotInstanceStatus\0");
        h.update(stamp.as_bytes());
        h.update(b"\0");
        h.update(body.as_bytes());
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let from = if readable_from > 1 {
            format!(", \"readable_from\": {readable_from}")
        } else {
            String::new()
        };
        format!(
            "{{\"schema\": \"SnapshotInstanceStatus\", \"version\": {version}{from}, \"sha256\": \"{digest}\", \"record\": {body}}}"
        )
    }

    #[test]
    fn a_newer_builds_record_is_read_or_refused_by_what_it_declares() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SNAPSHOT_INSTANCE_STATUS_FILE);
        // Only fields added: read, the unknown one ignored.
        std::fs::write(&file, newer_envelope(2, 1)).unwrap();
        let verdict = check(&file);
        assert!(verdict.ok, "{verdict:?}");
        assert_eq!(verdict.version, Some(2));
        // A field's meaning changed: refused, saying which version.
        std::fs::write(&file, newer_envelope(2, 2)).unwrap();
        let verdict = check(&file);
        assert!(!verdict.ok, "{verdict:?}");
        assert_eq!(verdict.schema.as_deref(), Some("SnapshotInstanceStatus"));
        assert!(
            verdict.problem.contains("version 2") && verdict.problem.contains("refused"),
            "{verdict:?}"
        );
    }

    #[test]
    fn damage_and_missing_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SNAPSHOT_INSTANCE_STATUS_FILE);
        cairn_persist::store(&file, &record()).unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let verdict = check(&file);
        assert!(!verdict.ok);
        assert!(
            verdict.problem.contains("checksum") || verdict.problem.contains("JSON"),
            "{verdict:?}"
        );

        // An EVE-style record missing a nested mandatory field.
        std::fs::write(
            &file,
            r#"{"Snapshot": {}, "AppInstanceID": "00000000-0000-0000-0000-000000000002",
                "ConfigVersion": {"UUID": "00000000-0000-0000-0000-000000000002"}}"#,
        )
        .unwrap();
        let verdict = check(&file);
        assert_eq!(verdict.format.as_deref(), Some("plain"));
        assert!(
            verdict.problem.contains("Snapshot.SnapshotID"),
            "{verdict:?}"
        );
    }
}
