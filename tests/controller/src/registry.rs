//! A container registry for tests: Debian's `docker-registry` (the distribution registry)
//! started on loopback with TLS from a CA of its own and htpasswd basic auth (or token auth
//! with a [`TokenServer`] of its own, [`TestRegistry::start_token`]), and OCI images
//! built in the test from `busybox-static` with `umoci`, pushed with `skopeo copy`. The
//! registry is stopped by its pid when the value is dropped.
//!
//! Tools: `docker-registry`, `skopeo`, `umoci`, `htpasswd` (apache2-utils), `busybox-static`
//! (`scripts/install-deps`). Everything it writes stays under the directory it is given.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::token::{TokenRequest, TokenServer};

/// How long the registry may take to listen.
const START_WAIT: Duration = Duration::from_secs(30);

pub struct TestRegistry {
    dir: PathBuf,
    addr: SocketAddr,
    ca_pem: String,
    user: String,
    password: String,
    token: Option<TokenServer>,
    child: Child,
}

/// The `service` the registry names in its token challenges, and the tokens' audience.
pub const TOKEN_SERVICE: &str = "cairn-test-registry";
/// The issuer the registry accepts tokens from.
pub const TOKEN_ISSUER: &str = "cairn-test-token-server";

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a tool, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (scripts/install-deps installs it)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl TestRegistry {
    /// Starts a registry under `dir` (created) with user `cairn` and a password of its own,
    /// htpasswd basic auth; returns once it accepts connections.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, false)
    }

    /// [`Self::start`] with the distribution token scheme instead: the registry sends clients
    /// to a [`TokenServer`] (HTTPS, a certificate from the registry's CA) that takes the
    /// user's basic credentials and issues the tokens the registry accepts.
    pub fn start_token(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, true)
    }

    fn start_with(dir: &Path, token: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let (issuer, ca_pem) = crate::ca("registry CA")?;
        let (cert, key) = crate::leaf(
            &issuer,
            "registry",
            vec!["localhost".into(), "127.0.0.1".into()],
        )?;
        std::fs::write(dir.join("cert.pem"), &cert)?;
        std::fs::write(dir.join("key.pem"), &key)?;
        // skopeo reads a directory of `*.crt` CAs.
        std::fs::create_dir_all(dir.join("certs.d"))?;
        std::fs::write(dir.join("certs.d/ca.crt"), &ca_pem)?;
        let (user, password) = ("cairn".to_string(), format!("pw-{}", uuid::Uuid::new_v4()));
        // The registry's htpasswd auth takes bcrypt entries only.
        let entry = run("htpasswd", &["-Bbn", &user, &password])?;
        std::fs::write(dir.join("htpasswd"), entry.trim())?;
        let token = if token {
            Some(TokenServer::start(
                &issuer,
                &user,
                &password,
                TOKEN_SERVICE,
                TOKEN_ISSUER,
            )?)
        } else {
            None
        };
        let auth = match &token {
            Some(server) => {
                std::fs::write(dir.join("token-root.pem"), server.root_pem())?;
                format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    \
                     issuer: {TOKEN_ISSUER}\n    rootcertbundle: {dir}/token-root.pem\n",
                    realm = server.realm(),
                    dir = dir.display(),
                )
            }
            None => format!(
                "auth:\n  htpasswd:\n    realm: cairn-test\n    path: {}/htpasswd\n",
                dir.display()
            ),
        };
        // A port the kernel gave out a moment ago; the registry binds it itself.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  tls:\n    certificate: {dir}/cert.pem\n    key: {dir}/key.pem\n\
             {auth}",
            data = dir.join("data").display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let mut registry = Self {
            dir: dir.to_path_buf(),
            addr,
            ca_pem,
            user,
            password,
            token,
            child: Self::spawn(dir)?,
        };
        registry.wait_listening()?;
        Ok(registry)
    }

    fn spawn(dir: &Path) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))?;
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start docker-registry (Debian package docker-registry)")
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        while TcpStream::connect(self.addr).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "docker-registry ended ({status}): {}",
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
                );
            }
            if start.elapsed() > START_WAIT {
                self.stop();
                bail!(
                    "docker-registry did not listen on {} within {START_WAIT:?}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the registry with SIGKILL (by its pid), as a crash or a power loss of the
    /// server would end it: connections in flight break off.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same address and storage, once it was stopped or
    /// killed; returns once it accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.child = Self::spawn(&self.dir)?;
        self.wait_listening()
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 5 s) by its pid.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:<port>`: the registry's host as a datastore's `fqdn` names it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The CA that issued the registry's certificate (a datastore's `dsCertPEM`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Every request the token server had, in arrival order (empty for a basic-auth registry).
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.token
            .as_ref()
            .map(TokenServer::requests)
            .unwrap_or_default()
    }

    /// Stops the token server (the registry goes on): its port refuses connections.
    pub fn stop_token_server(&mut self) {
        if let Some(token) = &mut self.token {
            token.stop();
        }
    }

    /// Where the registry keeps its blobs (a test may tamper with them).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes `image` (an OCI layout `layout:tag`) as `repo:tag`; returns the manifest digest
    /// (`sha256:...`) the registry stores.
    pub fn push(&self, image: &OciImage, repo_tag: &str) -> anyhow::Result<String> {
        self.push_as(image, repo_tag, "oci")
    }

    /// [`Self::push`] as a Docker v2 schema 2 image (Docker's manifest and layer media types).
    pub fn push_docker(&self, image: &OciImage, repo_tag: &str) -> anyhow::Result<String> {
        self.push_as(image, repo_tag, "v2s2")
    }

    /// [`Self::push`] with every layer compressed with zstd (media type `tar+zstd`).
    pub fn push_zstd(&self, image: &OciImage, repo_tag: &str) -> anyhow::Result<String> {
        self.push_with(image, repo_tag, "oci", &["--dest-compress-format", "zstd"])
    }

    fn push_as(&self, image: &OciImage, repo_tag: &str, format: &str) -> anyhow::Result<String> {
        self.push_with(image, repo_tag, format, &[])
    }

    fn push_with(
        &self,
        image: &OciImage,
        repo_tag: &str,
        format: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let digest_file = self
            .dir
            .join(format!("digest-{}", repo_tag.replace(['/', ':'], "_")));
        let mut args = vec!["--insecure-policy", "copy", "--quiet"];
        args.extend_from_slice(extra);
        run(
            "skopeo",
            &[
                &args[..],
                &[
                    "--format",
                    format,
                    "--dest-cert-dir",
                    &self.dir.join("certs.d").display().to_string(),
                    "--dest-creds",
                    &format!("{}:{}", self.user, self.password),
                    "--digestfile",
                    &digest_file.display().to_string(),
                    &format!("oci:{}:{}", image.layout.display(), image.tag),
                    &format!("docker://{}/{repo_tag}", self.addr),
                ],
            ]
            .concat(),
        )?;
        Ok(std::fs::read_to_string(digest_file)?.trim().to_string())
    }
}

/// An OCI image layout built with umoci, one layer per [`OciImage::layer`] call.
pub struct OciImage {
    pub layout: PathBuf,
    pub tag: String,
    work: PathBuf,
}

impl OciImage {
    /// An empty image `tag` in a new layout at `dir/layout` (umoci works in `dir`).
    pub fn new(dir: &Path, tag: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let layout = dir.join("layout");
        let l = layout.display().to_string();
        run("umoci", &["init", "--layout", &l])?;
        run("umoci", &["new", "--image", &format!("{l}:{tag}")])?;
        Ok(Self {
            layout,
            tag: tag.into(),
            work: dir.to_path_buf(),
        })
    }

    fn image(&self) -> String {
        format!("{}:{}", self.layout.display(), self.tag)
    }

    /// Adds a layer: `change` edits the image's root as it stands (files it deletes become
    /// whiteouts); umoci records the difference.
    pub fn layer(&self, change: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let bundle = self.work.join("bundle");
        let _ = std::fs::remove_dir_all(&bundle);
        let b = bundle.display().to_string();
        run("umoci", &["unpack", "--image", &self.image(), &b])?;
        change(&bundle.join("rootfs"))?;
        run("umoci", &["repack", "--image", &self.image(), &b])?;
        std::fs::remove_dir_all(&bundle)?;
        Ok(())
    }

    /// Adds a layer from a tar file made by the test (for entries umoci never writes, such as
    /// an opaque directory).
    pub fn raw_layer(&self, tar: &Path) -> anyhow::Result<()> {
        run(
            "umoci",
            &[
                "raw",
                "add-layer",
                "--image",
                &self.image(),
                &tar.display().to_string(),
            ],
        )?;
        Ok(())
    }

    /// Sets the image config (`umoci config` arguments, e.g. `--config.cmd=...`).
    pub fn config(&self, args: &[&str]) -> anyhow::Result<()> {
        let image = self.image();
        let mut all = vec!["config", "--image", &image];
        all.extend_from_slice(args);
        run("umoci", &all)?;
        Ok(())
    }

    /// umoci's own unpack of the image's root (the reference a test compares with).
    pub fn umoci_unpack(&self, bundle: &Path) -> anyhow::Result<PathBuf> {
        run(
            "umoci",
            &[
                "unpack",
                "--image",
                &self.image(),
                &bundle.display().to_string(),
            ],
        )?;
        Ok(bundle.join("rootfs"))
    }
}

/// A busybox-static image: `/bin/busybox` with its applets linked in `/bin` (`sh`, `cat`, ...).
pub fn busybox_image(dir: &Path, tag: &str) -> anyhow::Result<OciImage> {
    let image = OciImage::new(dir, tag)?;
    image.layer(|root| {
        for d in ["bin", "tmp", "etc", "proc", "sys", "dev", "data"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .context("busybox-static is needed (/bin/busybox)")?;
        for applet in ["sh", "cat", "echo", "sleep", "ls", "expr", "sync"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
        )?;
        std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n")?;
        Ok(())
    })?;
    Ok(image)
}
