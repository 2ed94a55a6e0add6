//! The device's last errors as a technician needs them: what each is about, when it happened,
//! the error itself, and what to do about it. Built from the same status values every read-out
//! shows (no agent is asked anything more), so the page, the JSON API and `cairn status` agree.

use cairn_types::device::ConfigSource;
use cairn_types::{AppInstanceStatus, ErrorDescription};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::readout::DeviceView;

/// What a problem is about: where the technician looks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum About {
    /// The controller link or the config in force.
    Device,
    /// The persist file system every record goes to.
    Persist,
    App,
    Snapshot,
    Volume,
    /// A content tree (image) being downloaded.
    Download,
    Export,
}

/// One error to act on.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub about: About,
    /// The object, by name where it has one: `app demo-logger`, `volume data`, `persist /persist`.
    pub object: String,
    /// The UUID of the app it belongs to (its card shows it); empty: the device's.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub app: String,
    /// When it happened (UTC), if the error says.
    pub time: Option<DateTime<Utc>>,
    pub error: String,
    /// What a technician on site can do about it.
    pub what_to_do: String,
}

/// An error time EVE leaves at Go's zero time or the epoch is no time.
fn time_of(error: &ErrorDescription) -> Option<DateTime<Utc>> {
    error.error_time.filter(|t| t.timestamp() > 0)
}

/// The persist file system is full: the advice names where space goes.
fn free_space(persist: &str) -> String {
    format!(
        "Free space under {persist}: delete snapshots no longer needed (`cairn snapshots` lists \
         them; the controller's config removes them), exports kept on the device, or volumes \
         pending deletion. The agents carry on by themselves once a record fits again."
    )
}

fn read_only(persist: &str) -> String {
    format!(
        "{persist} is read-only: the kernel does this after disk errors. Check the disk \
         (`dmesg`, `smartctl -a`), then remount it read-write (`mount -o remount,rw {persist}`) \
         or reboot; replace the disk if errors come back. The agents hold every action they \
         cannot record until then."
    )
}

const CONTROLLER: &str = "Check the device's network to the controller (cable or link, DNS, \
    route, proxy, firewall), its clock (TLS fails on a wrong date), and its certificates under \
    <persist>/config (root-certificate.pem must be the controller's root; device.cert.pem is \
    the one the controller knows). The device runs on the last config it had meanwhile.";

const DOWNLOAD: &str = "Check the datastore's URL and credentials in the config, and the \
    device's network to it (DNS, proxy, firewall); a checksum mismatch means the image changed \
    at the source. The download is tried again by itself.";

const DELETION: &str = "The snapshot is deleted when the app next stops (its volumes are in use \
    while it runs): restart the app from the controller to delete it now. If a deletion failed, \
    remove the cause the error names first (a file held open or made immutable, a full or \
    read-only disk).";

const CONFIG: &str = "Fix the config at the place the error names and send it again; the \
    previous config stays in force until then.";

/// What to do about `error`, from what it says, else what its kind of object suggests.
pub fn what_to_do(about: About, error: &str, persist: &str) -> String {
    let lower = error.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if has(&["no space left", "os error 28", "enospc", "full ("]) {
        return free_space(persist);
    }
    if has(&["read-only file system", "os error 30", "erofs"]) {
        return if about == About::Export {
            "The export's target is read-only: choose a writable target, or remount it \
             read-write, and export again."
                .into()
        } else {
            read_only(persist)
        };
    }
    if lower.starts_with("read-only") {
        return read_only(persist);
    }
    if has(&[
        "deleting snapshot",
        "next deactivation",
        "waits for the app to stop",
    ]) {
        return DELETION.into();
    }
    // A config's refusal names the config; a connection's refusal does not.
    if about == About::Device && lower.contains("config") && has(&["refused", "could not be put"]) {
        return CONFIG.into();
    }
    if has(&["does not exist", "no such file", "os error 2)"]) && about != About::Download {
        return "A file or directory the error names is missing on the device: put it there, or \
                correct the path in the config; the device tries again by itself."
            .into();
    }
    if has(&[
        "permission denied",
        "os error 13",
        "operation not permitted",
    ]) {
        return "The agent may not use the file the error names: check its owner and mode, and \
                that nothing (chattr +i, a read-only bind mount, SELinux or AppArmor) locks it."
            .into();
    }
    match about {
        About::Device => CONTROLLER.into(),
        About::Persist => free_space(persist),
        About::Download => DOWNLOAD.into(),
        About::Snapshot => {
            "The snapshot was not taken: remove the cause the error names (free space, a volume \
             the backend cannot snapshot, a guest agent that does not answer) and request it \
             again with a new id; the app runs on meanwhile."
                .into()
        }
        About::Volume => {
            "The volume is not usable: remove the cause the error names (its image or \
             content tree, space, the backend); the volume-manager tries again when the config \
             changes or the agent restarts."
                .into()
        }
        About::Export => {
            "Remove the cause the error names (target directory, remote credentials or \
             network, space) and start the export again; the snapshot itself is unharmed."
                .into()
        }
        About::App => {
            "Read the app's console or output log (the domain's log under <run>/domain-manager) \
             for why it ended; the device starts it again by its restart policy, and the \
             controller can restart or purge it."
                .into()
        }
    }
}

/// Every error the view holds, the device's first, then per app (its own, its snapshots', its
/// volumes' and exports'), then downloads and volumes of no app.
pub fn problems(view: &DeviceView, now: DateTime<Utc>) -> Vec<Problem> {
    let persist = view.persist_dir.as_str();
    let mut found = Vec::new();
    let mut push = |about, object: String, app: String, time, error: &str| {
        found.push(Problem {
            about,
            object,
            app,
            time,
            error: error.to_string(),
            what_to_do: what_to_do(about, error, persist),
        })
    };
    if let Some(fault) = &view.persist_fault {
        push(
            About::Persist,
            format!("persist {persist}"),
            String::new(),
            Some(now),
            fault,
        );
    }
    if let Some(d) = &view.device
        && d.last_error.is_error()
    {
        let about = match d.config_source {
            // A local file's error is the file's.
            ConfigSource::LocalFile { .. } => "config file",
            _ => "controller link",
        };
        push(
            About::Device,
            about.into(),
            String::new(),
            time_of(&d.last_error),
            &d.last_error.error,
        );
    }
    let uses = |app: &AppInstanceStatus, key: &str| {
        app.volume_refs.iter().any(|r| {
            cairn_types::volume::volume_key_local(
                r.volume_id,
                r.generation_counter,
                r.local_generation_counter,
            ) == key
        })
    };
    for app in &view.apps {
        let uuid = app.uuid_and_version.uuid.to_string();
        let name = format!("app {}", app.display_name);
        if app.error.is_error() {
            push(
                About::App,
                name.clone(),
                uuid.clone(),
                time_of(&app.error),
                &app.error.error,
            );
        }
        if app.last_failure.is_error() && app.last_failure.error != app.error.error {
            push(
                About::App,
                format!("{name} (last failure)"),
                uuid.clone(),
                time_of(&app.last_failure),
                &app.last_failure.error,
            );
        }
        for warning in &app.warnings {
            let about = if warning.contains("snapshot") {
                About::Snapshot
            } else {
                About::App
            };
            push(about, name.clone(), uuid.clone(), None, warning);
        }
        for s in &app.snap_status.requested_snapshots {
            if s.error.is_error() {
                let id = s.snapshot.snapshot_id.to_string();
                let label = if s.snapshot.name.is_empty() {
                    id
                } else {
                    format!("{} ({id})", s.snapshot.name)
                };
                push(
                    About::Snapshot,
                    format!("snapshot {label} of {}", app.display_name),
                    uuid.clone(),
                    time_of(&s.error),
                    &s.error.error,
                );
            }
        }
        for v in view.volumes.iter().filter(|v| uses(app, &v.key())) {
            if v.error.is_error() {
                push(
                    About::Volume,
                    format!("volume {} of {}", v.display_name, app.display_name),
                    uuid.clone(),
                    time_of(&v.error),
                    &v.error.error,
                );
            }
        }
        for job in view
            .exports
            .iter()
            .filter(|j| j.app_uuid == app.uuid_and_version.uuid && !j.error.is_empty())
        {
            push(
                About::Export,
                format!("export {} of {}", job.job_id, app.display_name),
                uuid.clone(),
                None,
                &job.error,
            );
        }
    }
    for v in &view.volumes {
        if v.error.is_error() && !view.apps.iter().any(|a| uses(a, &v.key())) {
            push(
                About::Volume,
                format!("volume {}", v.display_name),
                String::new(),
                time_of(&v.error),
                &v.error.error,
            );
        }
    }
    for tree in &view.content_trees {
        if tree.error.is_error() {
            push(
                About::Download,
                format!("download {}", tree.display_name),
                String::new(),
                time_of(&tree.error),
                &tree.error.error,
            );
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_says_to_free_space_under_persist() {
        let advice = what_to_do(
            About::Snapshot,
            "writing /p/snapshots/x/record: No space left on device (os error 28)",
            "/p",
        );
        assert!(advice.starts_with("Free space under /p"), "{advice}");
    }

    #[test]
    fn a_read_only_persist_says_to_check_the_disk_and_remount() {
        let advice = what_to_do(
            About::Persist,
            "read-only: the agents take no action they cannot record until it can",
            "/p",
        );
        assert!(advice.contains("mount -o remount,rw /p"), "{advice}");
        // An export target that is read-only is the target's fault, not persist's.
        let advice = what_to_do(About::Export, "Read-only file system (os error 30)", "/p");
        assert!(advice.contains("target is read-only"), "{advice}");
    }

    #[test]
    fn a_failed_deletion_says_it_happens_when_the_app_stops() {
        let advice = what_to_do(
            About::Snapshot,
            "deleting snapshot 1 failed: busy; it is tried again at the next deactivation of the app",
            "/p",
        );
        assert!(advice.contains("when the app next stops"), "{advice}");
    }

    #[test]
    fn an_unreachable_controller_says_network_clock_and_certificates() {
        let advice = what_to_do(
            About::Device,
            "contacting https://ctl:443: connection refused",
            "/p",
        );
        // "refused" here is the connection's, not a config's.
        assert!(advice.contains("network"), "{advice}");
        let advice = what_to_do(
            About::Device,
            "config abc from the controller refused at apps[0].uuid: not a UUID; the config in force stays",
            "/p",
        );
        assert!(advice.contains("Fix the config"), "{advice}");
        let advice = what_to_do(About::Device, "tls handshake: certificate expired", "/p");
        assert!(
            advice.contains("certificates") && advice.contains("clock"),
            "{advice}"
        );
    }

    fn view() -> DeviceView {
        DeviceView {
            run_dir: "/r".into(),
            persist_dir: "/p".into(),
            persist_fault: None,
            agents: Vec::new(),
            device: None,
            apps: Vec::new(),
            domains: Vec::new(),
            volumes: Vec::new(),
            content_trees: Vec::new(),
            logs: None,
            exports: Vec::new(),
            baseos: None,
            problems: Vec::new(),
        }
    }

    #[test]
    fn each_error_is_listed_under_its_app_with_its_time_and_a_volume_of_the_app_goes_with_it() {
        use cairn_types::{ErrorSeverity, VolumeRefConfig, VolumeStatus};
        let at = DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let volume = uuid::Uuid::from_u128(0xb1);
        let mut app = AppInstanceStatus {
            display_name: "pump".into(),
            error: ErrorDescription::new("domain ended: exit status 1", ErrorSeverity::Error, at),
            volume_refs: vec![VolumeRefConfig {
                volume_id: volume,
                generation_counter: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        app.uuid_and_version.uuid = uuid::Uuid::from_u128(0xa1);
        let mut view = view();
        view.persist_fault = Some("full (10 bytes free): hold; free space on it".into());
        view.volumes.push(VolumeStatus {
            volume_id: volume,
            generation_counter: 1,
            display_name: "data".into(),
            error: ErrorDescription::new(
                "writing /p/volumes/x: No space left on device (os error 28)",
                ErrorSeverity::Error,
                at,
            ),
            ..Default::default()
        });
        view.apps.push(app);
        let found = problems(&view, at);
        let summary: Vec<(About, &str, &str)> = found
            .iter()
            .map(|p| (p.about, p.object.as_str(), p.app.as_str()))
            .collect();
        let app = "00000000-0000-0000-0000-0000000000a1";
        assert_eq!(
            summary,
            [
                (About::Persist, "persist /p", ""),
                (About::App, "app pump", app),
                (About::Volume, "volume data of pump", app),
            ]
        );
        assert_eq!(found[1].time, Some(at));
        assert!(found[2].what_to_do.starts_with("Free space under /p"));
    }

    #[test]
    fn a_failed_download_says_datastore_and_network() {
        let advice = what_to_do(About::Download, "GET https://ds/img: 404 Not Found", "/p");
        assert!(advice.contains("datastore"), "{advice}");
    }
}
