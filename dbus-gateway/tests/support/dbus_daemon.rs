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
        // A session bus that lets anyone own any name and send anything, and nothing else.
        Self::start_with(
            "session",
            r#"  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
"#,
        )
    }

    /// A bus with the system bus's default policy (any uid may connect; method calls, owning
    /// names and eavesdropping denied unless allowed), then `policy` (a `<busconfig>` document
    /// such as a file of `/etc/dbus-1/system.d/`), included as the system bus includes those.
    /// Its socket is reachable by every uid.
    ///
    /// dbus-daemon admits a uid and finds its groups through the user and group databases, so
    /// test users must exist there: `passwd` and `group` lines are appended to copies of
    /// `/etc/passwd` and `/etc/group`, which are bind-mounted over the originals in a mount
    /// namespace of the daemon's own (`unshare --mount`; needs root). The host's files are
    /// untouched.
    pub fn start_system_like(policy: &str, passwd: &[String], group: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the policy");
        let included = dir.path().join("policy.conf");
        std::fs::write(&included, policy).expect("write the policy");
        let mut users = Vec::new();
        for (file, extra) in [("passwd", passwd), ("group", group)] {
            let mut text = std::fs::read_to_string(format!("/etc/{file}")).unwrap_or_default();
            for line in extra {
                text.push_str(line);
                text.push('\n');
            }
            let copy = dir.path().join(file);
            std::fs::write(&copy, text).expect("write the user database");
            users.push((format!("/etc/{file}"), copy));
        }
        let mut mounts = String::new();
        for (target, copy) in &users {
            mounts.push_str(&format!(
                "mount --bind '{}' '{}' && ",
                copy.display(),
                target
            ));
        }
        let mut command = Command::new("unshare");
        command.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!("{mounts}exec dbus-daemon \"$@\""),
            "sh",
        ]);
        let daemon = Self::start_command(
            command,
            "system",
            &format!(
                r#"  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <include>{}</include>
"#,
                included.display()
            ),
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the daemon's dir");
        std::fs::set_permissions(
            daemon.dir.path().join("bus"),
            std::fs::Permissions::from_mode(0o777),
        )
        .expect("chmod the bus socket");
        // The included file is read at start; its dir can go.
        drop(dir);
        daemon
    }

    fn start_with(kind: &str, policy: &str) -> Self {
        Self::start_command(Command::new("dbus-daemon"), kind, policy)
    }

    /// `command` runs dbus-daemon (it is given the daemon's arguments) as this child's PID.
    fn start_command(command: Command, kind: &str, policy: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for dbus-daemon");
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
{policy}</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write dbus-daemon config");
        let (child, address) = launch(command, dir.path());
        Self {
            child,
            address,
            dir,
        }
    }

    /// Stops the daemon and starts a new one on the same socket and config, with a new GUID:
    /// what a client sees when the system bus restarts. For daemons made by [`Self::start`].
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().join("bus"));
        let (child, address) = launch(Command::new("dbus-daemon"), self.dir.path());
        self.child = child;
        self.address = address;
    }

    /// The socket's address without the GUID: it still holds after [`Self::restart`].
    pub fn path_address(&self) -> String {
        format!("unix:path={}", self.dir.path().join("bus").display())
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

/// Runs `command` (dbus-daemon, or a wrapper given its arguments) on the config in `dir`, and
/// waits until it prints its address.
fn launch(mut command: Command, dir: &std::path::Path) -> (Child, String) {
    let config = dir.join("bus.conf");
    let log = std::fs::File::create(dir.join("daemon.log")).expect("daemon log file");
    let mut child = command
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
            let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
            panic!("dbus-daemon printed no address ({outcome:?}); its log:\n{log}");
        }
    };
    (child, address)
}
