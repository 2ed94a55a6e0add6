//! Container apps (EVE's NOHYPER): an OCI runtime (Debian's `crun`; `CAIRN_OCI_RUNTIME` names
//! another, such as `runc`) runs the image's root from its volume with a runtime spec made here
//! from the image's config and the app's limits.
//!
//! ```text
//! <first volume>/rootfs/, image-config.json   (made by the volume-manager from the image)
//! <run>/domain-manager/apps/<app>/bundle/config.json   the runtime spec, written at each start
//! <run>/domain-manager/oci/                            the runtime's state (--root)
//! ```
//!
//! The runtime runs in the foreground as the app's process (its own group, the domain
//! marker in its environment), so the process app's start, stop, exit watch and re-adoption
//! apply as they are; its output is the app's log. The container's processes carry the marker
//! too (the spec's env), so a container left behind by a killed runtime is found and stopped.
//! Namespaces: PID, mount, UTS, IPC of its own; the host's network (no network namespace yet:
//! the container sees the host's interfaces, as `--net=host`). Limits: `MemoryMiB` as the
//! memory cgroup limit, `Cpus` as a CPU quota of that many CPUs per 100 ms period.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_types::ContainerSpec;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::launch::Disk;

/// The image's config inside a root filesystem volume.
pub const IMAGE_CONFIG: &str = "image-config.json";
pub const ROOTFS: &str = "rootfs";
/// The CPU quota period (µs): `Cpus` CPUs get `Cpus` periods of CPU time per period.
const CPU_PERIOD: u64 = 100_000;

/// The OCI runtime: `CAIRN_OCI_RUNTIME` (a path or a name on `PATH`), else Debian's `crun`.
pub fn runtime() -> PathBuf {
    std::env::var_os("CAIRN_OCI_RUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("crun"))
}

/// The runtime's state directory for this domain-manager's containers.
pub fn state_root(run_dir: &Path) -> PathBuf {
    run_dir.join("domain-manager").join("oci")
}

/// The container's name (see [`cairn_types::domain::container_id`]).
pub fn container_id(run_dir: &Path, app: uuid::Uuid) -> String {
    cairn_types::domain::container_id(run_dir, app)
}

/// A user of the image's config (`uid`, `uid:gid`, `name`, `name:group`) as numbers, names
/// looked up in the root's `/etc/passwd` and `/etc/group`.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(rootfs.join("etc").join(file)).ok()?;
        text.lines().find_map(|line| {
            let parts: Vec<&str> = line.split(':').collect();
            (parts.first() == Some(&name)).then(|| {
                let id = parts.get(field)?.parse().ok()?;
                let group = parts.get(3).and_then(|g| g.parse().ok());
                Some((id, group))
            })?
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => lookup("passwd", u, 2)
            .ok_or_else(|| format!("the image's user {u:?} is not in its /etc/passwd"))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("group", g, 2)
                    .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?
                    .0
            }
        },
        None => primary.unwrap_or(0),
    };
    Ok((uid, gid))
}

/// The runtime spec of a container app: its root is `disks[0]`'s `rootfs/`, the other disks are
/// bind-mounted at their mount dirs (`/mnt/volume<i>` when none is given); `marker` is added
/// to the environment last, so the app cannot take it away.
pub fn runtime_spec(
    spec: &ContainerSpec,
    disks: &[Disk],
    hostname: &str,
    cgroup: &str,
    marker: &[(&str, String)],
) -> Result<Spec, String> {
    let Some(root_disk) = disks.first() else {
        return Err(
            "a container needs its image's volume as its first volume (volumeRefList)".into(),
        );
    };
    let rootfs = root_disk.path.join(ROOTFS);
    let config_path = root_disk.path.join(IMAGE_CONFIG);
    let image = ImageConfiguration::from_file(&config_path).map_err(|e| {
        format!(
            "volume {} is not a container image's root ({} unreadable: {e}); make it from a CONTAINER content tree",
            root_disk.volume_key,
            config_path.display()
        )
    })?;
    let config = image.config().clone().unwrap_or_default();
    let mut args: Vec<String> = config.entrypoint().clone().unwrap_or_default();
    args.extend(config.cmd().clone().unwrap_or_default());
    if args.is_empty() {
        return Err(format!(
            "the image of volume {} has neither Entrypoint nor Cmd: nothing to run",
            root_disk.volume_key
        ));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    for entry in config.env().clone().unwrap_or_default() {
        if let Some((k, v)) = entry.split_once('=') {
            env.insert(k.into(), v.into());
        }
    }
    env.extend(spec.env.clone());
    for (k, v) in marker {
        env.insert((*k).to_string(), v.clone());
    }
    let (uid, gid) = resolve_user(config.user().as_deref().unwrap_or(""), &rootfs)?;
    let cwd = config
        .working_dir()
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let err = |e: oci_spec::OciSpecError| format!("runtime spec: {e}");
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(args)
        .env(
            env.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(err)?,
        )
        .build()
        .map_err(err)?;
    let mut mounts = oci_spec::runtime::get_default_mounts();
    for (i, disk) in disks.iter().enumerate().skip(1) {
        let target = if disk.mount_dir.is_empty() {
            format!("/mnt/volume{i}")
        } else {
            disk.mount_dir.clone()
        };
        let mut options = vec!["rbind".to_string()];
        options.push(if disk.read_only { "ro" } else { "rw" }.into());
        mounts.push(
            MountBuilder::default()
                .destination(target)
                .typ("bind")
                .source(disk.path.clone())
                .options(options)
                .build()
                .map_err(err)?,
        );
    }
    let mut resources = LinuxResourcesBuilder::default();
    if spec.memory_mib > 0 {
        let bytes = i64::from(spec.memory_mib) * 1024 * 1024;
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                // No swap beyond the limit: the limit is the app's memory.
                .swap(bytes)
                .build()
                .map_err(err)?,
        );
    }
    if spec.cpus > 0 {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(spec.cpus) * CPU_PERIOD as i64)
                .period(CPU_PERIOD)
                .build()
                .map_err(err)?,
        );
    }
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(err)?;
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(err)?)
        .cgroups_path(PathBuf::from(format!("/cairn/{cgroup}")));
    if let Some(masked) = defaults.masked_paths() {
        linux = linux.masked_paths(masked.clone());
    }
    if let Some(readonly) = defaults.readonly_paths() {
        linux = linux.readonly_paths(readonly.clone());
    }
    let mut out = Spec::default();
    out.set_process(Some(process));
    out.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(false)
            .build()
            .map_err(err)?,
    ));
    out.set_hostname(Some(hostname.to_string()));
    out.set_mounts(Some(mounts));
    out.set_linux(Some(linux.build().map_err(err)?));
    Ok(out)
}

/// What the kernel's OOM killer did to container `id` since `since` (kernel log records
/// `oom-kill:...,oom_memcg=/cairn/<id>,...,task=<name>,pid=<pid>,...` in `/dev/kmsg`, the
/// only account left once the runtime removed the container's cgroup): one line per kill.
/// Empty when there was none or the kernel log cannot be read (blocking).
pub fn oom_kills(id: &str, since: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Kernel log times are microseconds since boot; the boot's wall time from /proc/uptime.
    let Some(uptime) = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
    else {
        return Vec::new();
    };
    let boot = chrono::Utc::now() - chrono::Duration::microseconds((uptime * 1e6) as i64);
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let needle = format!("oom_memcg=/cairn/{id},");
    let mut kills = Vec::new();
    let mut record = vec![0u8; 8192];
    loop {
        // One record per read; EPIPE: records were overwritten meanwhile (read on).
        let n = match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(_) => break,
        };
        let text = String::from_utf8_lossy(&record[..n]);
        let Some((head, message)) = text.split_once(';') else {
            continue;
        };
        if !message.contains(&needle) {
            continue;
        }
        let at = head
            .split(',')
            .nth(2)
            .and_then(|us| us.parse::<i64>().ok())
            .map(|us| boot + chrono::Duration::microseconds(us));
        if at.is_some_and(|at| at + chrono::Duration::milliseconds(100) < since) {
            continue;
        }
        let field = |name: &str| {
            message
                .split(',')
                .find_map(|f| f.trim().strip_prefix(name))
                .unwrap_or("?")
                .to_string()
        };
        kills.push(format!("task {} (pid {})", field("task="), field("pid=")));
    }
    kills
}

/// Thaws the container's cgroup (`cgroup` as [`cairn_types::domain::container_cgroup`] names
/// it) if a live snapshot cut short left it frozen: a frozen container would not see the
/// SIGTERM of a stop, nor die of a SIGKILL (cgroup v1). A cgroup that is not there, or not
/// frozen, is left as it is.
pub async fn thaw(cgroup: &str) {
    let relative = cgroup.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let v1 = tokio::fs::try_exists(root.join("freezer/cgroup.procs"))
        .await
        .unwrap_or(false);
    let (file, value) = if v1 {
        (
            root.join("freezer").join(relative).join("freezer.state"),
            "THAWED",
        )
    } else {
        (root.join(relative).join("cgroup.freeze"), "0")
    };
    let frozen = match tokio::fs::read_to_string(&file).await {
        Ok(state) => matches!(state.trim(), "FROZEN" | "FREEZING" | "1"),
        Err(_) => false,
    };
    if frozen {
        match tokio::fs::write(&file, value).await {
            Ok(()) => tracing::warn!(cgroup, "container found frozen: thawed"),
            Err(e) => {
                tracing::error!(cgroup, error = %e, "container found frozen and cannot be thawed")
            }
        }
    }
}

/// Runs the runtime once (`delete`, `kill`), returning its error output on failure.
pub async fn runtime_command(runtime: &Path, state: &Path, args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new(runtime)
        .arg("--root")
        .arg(state)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(30), out).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "{} {}: {}",
            runtime.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", runtime.display())),
        Err(_) => Err(format!(
            "{} {} did not finish in 30 s",
            runtime.display(),
            args.join(" ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_number_and_by_name_from_the_images_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(etc.join("group"), "root:x:0:\nstaff:x:50:\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resolve_user("", dir.path()), Ok((0, 0)));
        assert_eq!(resolve_user("7:8", dir.path()), Ok((7, 8)));
        assert_eq!(resolve_user("app", dir.path()), Ok((1000, 1001)));
        assert_eq!(resolve_user("app:staff", dir.path()), Ok((1000, 50)));
        let missing = resolve_user("nobody", dir.path()).unwrap_err();
        assert!(missing.contains("nobody"), "{missing}");
    }
}
