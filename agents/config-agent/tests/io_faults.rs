//! The config-agent's own file calls failing as it puts a new local config on the bus: the
//! real agent runs under libfiu's POSIX preload (`fiu-run -x`, Debian `fiu-utils`), and
//! `fiu-ctrl` makes its next rename (the bus's key file of a changed config) fail once with
//! ENOSPC. The agent stays up, the device status names the config and the fault, and the new
//! config reaches the bus on the next try, the error cleared. Before, the agent exited.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, Subscription, Topic};
use cairn_types::{AppInstanceConfig, DeviceStatus};

const APP: &str = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";

fn config(version: &str) -> String {
    format!(
        r#"{{"apps": [{{"uuid": "{APP}", "version": "{version}", "display_name": "sensor",
            "domain": {{"kind": "process", "command": "/bin/sleep", "args": ["1000"]}}}}]}}"#
    )
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn until<T: Topic + Clone>(sub: &mut Subscription<T>, done: impl Fn(&T) -> bool) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } = sub.recv().await
                && done(&value)
            {
                return value;
            }
        }
    })
    .await
    .expect("within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_whose_bus_files_cannot_be_written_is_reported_and_applied_again() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("config.json");
    std::fs::write(&file, config("1")).unwrap();
    let fiu = cairn_fiu::Fiu::new(root.path());
    let mut agent = Agent(
        cairn_fiu::command_via(&fiu.launcher(), env!("CARGO_BIN_EXE_cairn-config-agent"))
            .args(["--config", file.to_str().unwrap()])
            .env("CAIRN_RUN_DIR", root.path().join("run"))
            .env("CAIRN_PERSIST_DIR", root.path().join("persist"))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("fiu-run is required (Debian fiu-utils): {e}")),
    );
    let reader = Bus::new(
        "app-manager",
        root.path().join("run"),
        root.path().join("persist"),
    );
    let mut apps = reader.subscribe::<AppInstanceConfig>("config-agent");
    let mut device = reader.subscribe::<DeviceStatus>("config-agent");
    until(&mut apps, |a| a.uuid_and_version.version == "1").await;
    until(&mut device, |s| s.apps == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    fiu.fail_once(agent.0.id(), "posix/io/dir/rename", cairn_fiu::ENOSPC);
    std::fs::write(&file, config("2")).unwrap();

    let failed = until(&mut device, |s| s.last_error.is_error()).await;
    let text = &failed.last_error.error;
    assert!(
        text.contains("could not be put on the bus")
            && text.contains("No space left on device")
            && text.contains("config.json"),
        "{text}"
    );
    let applied = until(&mut apps, |a| a.uuid_and_version.version == "2").await;
    assert_eq!(applied.uuid_and_version.version, "2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while device
        .get("global")
        .is_some_and(|s| s.last_error.is_error())
        || device.get("global").is_none()
    {
        assert!(Instant::now() < deadline, "the error was never cleared");
        let _ = tokio::time::timeout(Duration::from_millis(200), device.recv()).await;
    }
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent ended");
}
