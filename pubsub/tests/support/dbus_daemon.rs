//! A private D-Bus bus for tests and benchmarks: `dbus-daemon --nofork` on a Unix socket in a
//! temp dir, killed and reaped by its own PID when dropped (PID 1 on the test machine does not
//! reap orphans).

#![allow(dead_code)] // each includer uses its own subset

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PrivateDbusDaemon {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl PrivateDbusDaemon {
    /// Starts the daemon and waits until it prints its address. Panics if it cannot: this is
    /// test support. Blocks for the few milliseconds the daemon takes to start.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for dbus-daemon");
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        // A session bus that lets anyone own any name and send anything, and nothing else.
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write dbus-daemon config");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("daemon log file");
        let mut child = Command::new("dbus-daemon")
            .arg("--nofork")
            .arg("--print-address=1")
            .arg(format!("--config-file={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start dbus-daemon (is it installed?)");

        // Read the address on a thread: a silent daemon fails the test instead of hanging it.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let address = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) if !line.trim().is_empty() => line.trim().to_string(),
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
                panic!("dbus-daemon printed no address ({outcome:?}); its log:\n{log}");
            }
        };
        Self {
            child,
            address,
            dir,
        }
    }

    /// The bus address, e.g. `unix:path=/tmp/.tmpXXXX/bus,guid=...`.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PrivateDbusDaemon {
    fn drop(&mut self) {
        // `Child::kill` signals this child's PID only; `wait` reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
