//! From a `DomainConfig` to the exact command that runs it: validation (nothing starts on a bad
//! config), disk resolution against `VolumeStatus`, and the qemu / process command lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cairn_types::{
    DomainConfig, DomainSpec, ProcessSpec, VmSpec, VolumeFormat, VolumeState, VolumeStatus,
};

/// Files of one app under `<run>/domain-manager/apps/<app-uuid>/`.
#[derive(Debug, Clone)]
pub struct AppDir(pub PathBuf);

impl AppDir {
    pub fn new(run_dir: &Path, app: uuid::Uuid) -> Self {
        Self(apps_dir(run_dir).join(app.to_string()))
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
    /// The guest agent's virtio-serial port, when the VM has one (`VmSpec::guest_agent`).
    pub fn guest_agent_socket(&self) -> PathBuf {
        self.0.join("qga.sock")
    }
    /// Written by qemu itself (`-pidfile`), so it exists as soon as qemu runs.
    pub fn qemu_pidfile(&self) -> PathBuf {
        self.0.join("qemu.pid")
    }
    /// `<pid> <start time>` of a process app, written right after spawn.
    pub fn process_pidfile(&self) -> PathBuf {
        self.0.join("process.pid")
    }
    /// The VM's serial console.
    pub fn console_log(&self) -> PathBuf {
        self.0.join("console.log")
    }
    /// qemu's own stdout and stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.0.join("qemu.log")
    }
    /// A process app's stdout and stderr.
    pub fn process_log(&self) -> PathBuf {
        self.0.join("app.log")
    }
}

/// `<run>/domain-manager/apps`.
pub fn apps_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("domain-manager").join("apps")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("kernel file {0} does not exist: fix VmSpec.Kernel")]
    MissingKernel(PathBuf),
    #[error("initrd file {0} does not exist: fix VmSpec.Initrd or leave it empty")]
    MissingInitrd(PathBuf),
    #[error(
        "VmSpec.Kernel is empty, so the VM boots its first disk through the BIOS, but it has no disk: give it a bootable volume or a kernel"
    )]
    NoBootDisk,
    #[error(
        "VmSpec.Initrd or VmSpec.Append without VmSpec.Kernel: a disk boot takes both from the disk's boot loader"
    )]
    BootArgsWithoutKernel,
    #[error("VmSpec.MemoryMiB is 0: give the VM memory")]
    ZeroMemory,
    #[error(
        "volume {0} is unknown: no VolumeStatus has this key and DiskConfig.FileLocation is empty"
    )]
    UnknownVolume(String),
    #[error("volume {key} is not ready (state {state:?}): wait for the volume-manager")]
    VolumeNotReady { key: String, state: VolumeState },
    #[error("volume {key}: file {path} does not exist")]
    DiskMissing { key: String, path: PathBuf },
    #[error("volume {key}: format {format:?} cannot be a VM disk (qcow2 or raw)")]
    NotABlockDisk { key: String, format: VolumeFormat },
    #[error("volume {key}: a process or container app needs directory volumes, not {format:?}")]
    NotADirectory { key: String, format: VolumeFormat },
    #[error("ProcessSpec.Command is empty")]
    NoCommand,
    #[error("command {0} does not exist")]
    MissingCommand(PathBuf),
    #[error("working directory {0} does not exist")]
    MissingWorkingDir(PathBuf),
}

/// A disk resolved to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub volume_key: String,
    pub path: PathBuf,
    pub format: VolumeFormat,
    pub read_only: bool,
    pub mount_dir: String,
}

/// Resolves each `DiskConfig`: the volume-manager's `VolumeStatus` for its key wins (and must be
/// ready); otherwise the config's own `FileLocation`; otherwise the volume is unknown.
pub fn resolve_disks(
    config: &DomainConfig,
    volumes: &HashMap<String, VolumeStatus>,
) -> Result<Vec<Disk>, ConfigError> {
    config
        .disk_config_list
        .iter()
        .map(|d| {
            let (path, format) = match volumes.get(&d.volume_key) {
                Some(v) if v.state != VolumeState::Ready => {
                    return Err(ConfigError::VolumeNotReady {
                        key: d.volume_key.clone(),
                        state: v.state,
                    });
                }
                Some(v) => (v.file_location.clone(), v.format),
                None if d.file_location.as_os_str().is_empty() => {
                    return Err(ConfigError::UnknownVolume(d.volume_key.clone()));
                }
                None => (d.file_location.clone(), d.format),
            };
            if !path.exists() {
                return Err(ConfigError::DiskMissing {
                    key: d.volume_key.clone(),
                    path,
                });
            }
            Ok(Disk {
                volume_key: d.volume_key.clone(),
                path,
                format,
                read_only: d.read_only,
                mount_dir: d.mount_dir.clone(),
            })
        })
        .collect()
}

/// What to run, fully checked.
#[derive(Debug, Clone)]
pub enum Launch {
    Vm {
        args: Vec<String>,
        /// The qcow2 disks to clear of dirty bitmaps before qemu starts: a start that loads a
        /// memory state (`-loadvm`) is refused by qemu while a disk has one ("Device has
        /// active dirty bitmaps"), and exports leave Cairn's on the volumes.
        clear_bitmaps: Vec<PathBuf>,
    },
    Process {
        spec: ProcessSpec,
        disks: Vec<Disk>,
        working_dir: Option<PathBuf>,
    },
    /// An OCI container (`crate::container`): the first disk is the image's root volume.
    Container {
        spec: cairn_types::ContainerSpec,
        disks: Vec<Disk>,
    },
}

/// Checks `config` and builds its launch; `accel` is the accelerator detected at start.
pub fn plan(
    config: &DomainConfig,
    volumes: &HashMap<String, VolumeStatus>,
    dir: &AppDir,
    accel: &str,
) -> Result<Launch, ConfigError> {
    let disks = resolve_disks(config, volumes)?;
    match &config.spec {
        DomainSpec::Vm(vm) => {
            check_vm(vm, &disks)?;
            for d in &disks {
                if !matches!(d.format, VolumeFormat::Qcow2 | VolumeFormat::Raw) {
                    return Err(ConfigError::NotABlockDisk {
                        key: d.volume_key.clone(),
                        format: d.format,
                    });
                }
            }
            let clear_bitmaps = if config.load_state_tag.is_empty() {
                Vec::new()
            } else {
                disks
                    .iter()
                    .filter(|d| d.format == VolumeFormat::Qcow2 && !d.read_only)
                    .map(|d| d.path.clone())
                    .collect()
            };
            Ok(Launch::Vm {
                args: qemu_args(config, vm, &disks, dir, accel),
                clear_bitmaps,
            })
        }
        DomainSpec::Process(p) => {
            if p.command.as_os_str().is_empty() {
                return Err(ConfigError::NoCommand);
            }
            if p.command.components().count() > 1 && !p.command.exists() {
                return Err(ConfigError::MissingCommand(p.command.clone()));
            }
            for d in &disks {
                if d.format != VolumeFormat::Dir {
                    return Err(ConfigError::NotADirectory {
                        key: d.volume_key.clone(),
                        format: d.format,
                    });
                }
            }
            let working_dir = p
                .working_dir
                .clone()
                .or_else(|| disks.first().map(|d| d.path.clone()));
            if let Some(wd) = &working_dir
                && !wd.is_dir()
            {
                return Err(ConfigError::MissingWorkingDir(wd.clone()));
            }
            Ok(Launch::Process {
                spec: p.clone(),
                disks,
                working_dir,
            })
        }
        DomainSpec::Container(c) => {
            for d in &disks {
                if d.format != VolumeFormat::Dir {
                    return Err(ConfigError::NotADirectory {
                        key: d.volume_key.clone(),
                        format: d.format,
                    });
                }
            }
            Ok(Launch::Container {
                spec: c.clone(),
                disks,
            })
        }
    }
}

fn check_vm(vm: &VmSpec, disks: &[Disk]) -> Result<(), ConfigError> {
    if vm.kernel.as_os_str().is_empty() {
        if disks.is_empty() {
            return Err(ConfigError::NoBootDisk);
        }
        if !vm.initrd.as_os_str().is_empty() || !vm.append.is_empty() {
            return Err(ConfigError::BootArgsWithoutKernel);
        }
    } else if !vm.kernel.is_file() {
        return Err(ConfigError::MissingKernel(vm.kernel.clone()));
    }
    if !vm.initrd.as_os_str().is_empty() && !vm.initrd.is_file() {
        return Err(ConfigError::MissingInitrd(vm.initrd.clone()));
    }
    if vm.memory_mib == 0 {
        return Err(ConfigError::ZeroMemory);
    }
    Ok(())
}

/// qemu option values separate keys with commas; a comma inside a value is doubled.
fn opt_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Block node name of disk `i`: its format node; the file node is `<name>-file`.
pub fn disk_node(i: usize) -> String {
    format!("disk{i}")
}

/// Removes the dirty bitmaps Cairn's exports keep on `disks` (`cairn-*`), so that qemu can
/// load a memory state from them; the next incremental export of such a disk falls back to a
/// full one and says the bitmap is missing. A bitmap Cairn did not make stops the start with
/// an error that names it: removing it would lose someone else's change tracking.
pub async fn clear_export_bitmaps(disks: &[PathBuf]) -> Result<(), String> {
    for disk in disks {
        let info = tokio::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(disk)
            .output()
            .await
            .map_err(|e| format!("cannot run qemu-img info on {}: {e}", disk.display()))?;
        if !info.status.success() {
            return Err(format!(
                "qemu-img info {}: {}",
                disk.display(),
                String::from_utf8_lossy(&info.stderr).trim()
            ));
        }
        let json: serde_json::Value = serde_json::from_slice(&info.stdout)
            .map_err(|e| format!("qemu-img info {}: {e}", disk.display()))?;
        let names: Vec<String> = json
            .pointer("/format-specific/data/bitmaps")
            .and_then(serde_json::Value::as_array)
            .map(|all| {
                all.iter()
                    .filter_map(|b| b.get("name").and_then(serde_json::Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            if !name.starts_with("cairn-") {
                return Err(format!(
                    "{} has dirty bitmap {name:?}, which Cairn did not make: qemu cannot load the memory state while it is there",
                    disk.display()
                ));
            }
            let out = tokio::process::Command::new("qemu-img")
                .args(["bitmap", "--remove"])
                .arg(disk)
                .arg(&name)
                .output()
                .await
                .map_err(|e| format!("cannot run qemu-img bitmap on {}: {e}", disk.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "removing bitmap {name} from {}: {}",
                    disk.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            tracing::info!(disk = %disk.display(), bitmap = %name, "dirty bitmap removed to load a memory state");
        }
    }
    Ok(())
}

/// The qemu command line (without the binary). Disks are `-blockdev`s with explicit node names
/// so that QMP snapshot commands can name them; the console goes to a file so that it survives
/// a domain-manager restart; `-no-reboot` turns a guest reboot or panic into a qemu exit.
/// Without a kernel the machine's firmware (SeaBIOS, qemu's default on a pc machine) boots the
/// first disk, which alone gets a `bootindex`.
pub fn qemu_args(
    config: &DomainConfig,
    vm: &VmSpec,
    disks: &[Disk],
    dir: &AppDir,
    accel: &str,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let name = format!("guest={}", config.app_uuid());
    push(&["-name", &name, "-accel", accel]);
    let mem = vm.memory_mib.to_string();
    let cpus = vm.cpus.max(1).to_string();
    push(&["-m", &mem, "-smp", &cpus]);
    push(&["-display", "none", "-vga", "none", "-monitor", "none"]);
    push(&["-nic", "none", "-no-reboot"]);
    let console = format!("file,id=console,path={}", opt_escape(&dir.console_log()));
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    let qmp = format!("unix:{},server=on,wait=off", opt_escape(&dir.qmp_socket()));
    push(&["-qmp", &qmp]);
    if vm.guest_agent {
        // qemu-guest-agent's port; the app-manager talks to it for fsfreeze/thaw.
        let qga = format!(
            "socket,id=qga0,path={},server=on,wait=off",
            opt_escape(&dir.guest_agent_socket())
        );
        push(&["-chardev", &qga, "-device", "virtio-serial-pci,id=vser0"]);
        push(&[
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }
    let pidfile = dir.qemu_pidfile().to_string_lossy().into_owned();
    push(&["-pidfile", &pidfile]);
    let disk_boot = vm.kernel.as_os_str().is_empty();
    if !disk_boot {
        let kernel = vm.kernel.to_string_lossy().into_owned();
        push(&["-kernel", &kernel]);
        if !vm.initrd.as_os_str().is_empty() {
            let initrd = vm.initrd.to_string_lossy().into_owned();
            push(&["-initrd", &initrd]);
        }
        if !vm.append.is_empty() {
            push(&["-append", &vm.append]);
        }
    }
    // A rollback to a stateful snapshot: resume from its memory and device state.
    if !config.load_state_tag.is_empty() {
        push(&["-loadvm", &config.load_state_tag]);
    }
    for (i, d) in disks.iter().enumerate() {
        let node = disk_node(i);
        let ro = if d.read_only { "on" } else { "off" };
        let file = format!(
            "driver=file,node-name={node}-file,filename={},read-only={ro}",
            opt_escape(&d.path)
        );
        let driver = match d.format {
            VolumeFormat::Raw => "raw",
            _ => "qcow2",
        };
        let format = format!("driver={driver},node-name={node},file={node}-file,read-only={ro}");
        let mut device = format!("virtio-blk-pci,drive={node},id=vd{i}");
        if disk_boot && i == 0 {
            device.push_str(",bootindex=0");
        }
        push(&["-blockdev", &file, "-blockdev", &format, "-device", &device]);
    }
    a
}

/// The accelerator: `kvm` when `/dev/kvm` opens and, three times in a row, the firmware of a
/// diskless `-accel kvm` machine runs to its end ("No bootable device.") within `limit`; else
/// `tcg`. On some hosts `/dev/kvm` opens and qemu starts, yet the vCPU stalls now and then:
/// only running guest code, more than once, tells. The probe's files go to `work_dir`.
pub async fn detect_accel(qemu: &Path, limit: Duration, work_dir: &Path) -> String {
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_opens || std::fs::create_dir_all(work_dir).is_err() {
        return "tcg".into();
    }
    for _ in 0..3 {
        if !kvm_firmware_completes(qemu, limit, work_dir).await {
            return "tcg".into();
        }
    }
    "kvm".into()
}

async fn kvm_firmware_completes(qemu: &Path, limit: Duration, work_dir: &Path) -> bool {
    let debugcon = work_dir.join("kvm-probe.log");
    let _ = tokio::fs::remove_file(&debugcon).await;
    // A KVM that cannot give the default CPU model its baseline features (seen: SSE3 missing
    // under nested virtualization) still runs the firmware, but a Linux guest hangs at once.
    let warnings = work_dir.join("kvm-probe.stderr");
    let Ok(stderr) = std::fs::File::create(&warnings) else {
        return false;
    };
    let chardev = format!("file,id=dbg,path={}", opt_escape(&debugcon));
    let probe = tokio::process::Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-M",
            "pc",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-chardev", &chardev])
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = probe else {
        return false;
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut works = false;
    while tokio::time::Instant::now() < deadline {
        let text = tokio::fs::read(&debugcon).await.unwrap_or_default();
        if text.windows(18).any(|w| w == b"No bootable device") {
            works = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill().await;
    let _ = tokio::fs::remove_file(&debugcon).await;
    let said = tokio::fs::read_to_string(&warnings)
        .await
        .unwrap_or_default();
    let _ = tokio::fs::remove_file(&warnings).await;
    if said.contains("host doesn't support requested feature") {
        tracing::warn!(warning = %said.trim(), "KVM lacks CPU features the guest needs: using TCG");
        return false;
    }
    works
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::{DiskConfig, UUIDandVersion};

    fn vm_config(kernel: &Path, memory: u32, disks: Vec<DiskConfig>) -> DomainConfig {
        DomainConfig {
            uuid_and_version: UUIDandVersion {
                uuid: uuid::Uuid::new_v4(),
                version: "1".into(),
            },
            display_name: "t".into(),
            activate: true,
            spec: DomainSpec::Vm(VmSpec {
                kernel: kernel.to_path_buf(),
                initrd: PathBuf::new(),
                append: String::new(),
                memory_mib: memory,
                cpus: 1,
                guest_agent: false,
            }),
            disk_config_list: disks,
            restart_counter: 0,
            purge_counter: 0,
            load_state_tag: String::new(),
        }
    }

    #[tokio::test]
    async fn accel_falls_back_to_tcg_when_kvm_cannot_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let qemu = Path::new("/nonexistent/qemu-system-x86_64");
        assert_eq!(
            detect_accel(qemu, Duration::from_millis(200), tmp.path()).await,
            "tcg"
        );
    }

    #[test]
    fn a_vm_with_a_guest_agent_gets_its_port() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let kernel = tmp.path().join("vmlinuz");
        let dir = AppDir(tmp.path().join("app"));
        let cfg = vm_config(&kernel, 64, vec![]);
        let DomainSpec::Vm(mut vm) = cfg.spec.clone() else {
            panic!("a vm");
        };
        let port = "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0";
        assert!(!qemu_args(&cfg, &vm, &[], &dir, "tcg").contains(&port.to_string()));
        vm.guest_agent = true;
        let args = qemu_args(&cfg, &vm, &[], &dir, "tcg");
        assert!(args.contains(&port.to_string()), "{args:?}");
        let socket = format!("path={}", dir.guest_agent_socket().display());
        assert!(
            args.iter()
                .any(|a| a.starts_with("socket,id=qga0,") && a.contains(&socket))
        );
    }

    #[test]
    fn a_load_state_tag_starts_qemu_from_that_snapshot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let kernel = tmp.path().join("vmlinuz");
        let dir = AppDir(tmp.path().join("app"));
        let DomainSpec::Vm(vm) = vm_config(&kernel, 64, vec![]).spec else {
            panic!("a vm");
        };
        let mut cfg = vm_config(&kernel, 64, vec![]);
        assert!(!qemu_args(&cfg, &vm, &[], &dir, "tcg").contains(&"-loadvm".to_string()));
        cfg.load_state_tag = "snap-1".into();
        let args = qemu_args(&cfg, &vm, &[], &dir, "tcg");
        let at = args.iter().position(|a| a == "-loadvm").expect("-loadvm");
        assert_eq!(args[at + 1], "snap-1");
    }

    #[test]
    fn a_vm_without_a_kernel_boots_its_first_disk_through_the_bios() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = AppDir(tmp.path().join("app"));
        let mut volumes = HashMap::new();
        let mut disks = Vec::new();
        for key in ["boot#0", "data#0"] {
            let file = tmp.path().join(format!("{key}.qcow2"));
            std::fs::write(&file, b"").expect("write");
            volumes.insert(
                key.to_string(),
                VolumeStatus {
                    state: VolumeState::Ready,
                    file_location: file,
                    format: VolumeFormat::Qcow2,
                    ..VolumeStatus::default()
                },
            );
            disks.push(DiskConfig {
                volume_key: key.into(),
                ..DiskConfig::default()
            });
        }
        let cfg = vm_config(Path::new(""), 64, disks);
        let Ok(Launch::Vm { args, .. }) = plan(&cfg, &volumes, &dir, "tcg") else {
            panic!("a disk boot is planned");
        };
        for option in ["-kernel", "-initrd", "-append"] {
            assert!(!args.contains(&option.to_string()), "{option}: {args:?}");
        }
        let devices: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("virtio-blk-pci"))
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-blk-pci,drive=disk0,id=vd0,bootindex=0",
                "virtio-blk-pci,drive=disk1,id=vd1"
            ]
        );

        let diskless = vm_config(Path::new(""), 64, vec![]);
        assert_eq!(
            plan(&diskless, &volumes, &dir, "tcg").err(),
            Some(ConfigError::NoBootDisk)
        );
        let mut with_append = cfg.clone();
        if let DomainSpec::Vm(vm) = &mut with_append.spec {
            vm.append = "console=ttyS0".into();
        }
        assert_eq!(
            plan(&with_append, &volumes, &dir, "tcg").err(),
            Some(ConfigError::BootArgsWithoutKernel)
        );
    }

    #[test]
    fn bad_vm_configs_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let kernel = tmp.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("write");
        let dir = AppDir(tmp.path().join("app"));
        let none = HashMap::new();
        let missing = vm_config(&tmp.path().join("nope"), 64, vec![]);
        assert!(matches!(
            plan(&missing, &none, &dir, "tcg"),
            Err(ConfigError::MissingKernel(_))
        ));
        let zero = vm_config(&kernel, 0, vec![]);
        assert_eq!(
            plan(&zero, &none, &dir, "tcg").err(),
            Some(ConfigError::ZeroMemory)
        );
        let unknown = vm_config(
            &kernel,
            64,
            vec![DiskConfig {
                volume_key: "v#0".into(),
                ..DiskConfig::default()
            }],
        );
        assert_eq!(
            plan(&unknown, &none, &dir, "tcg").err(),
            Some(ConfigError::UnknownVolume("v#0".into()))
        );
    }

    #[test]
    fn volume_status_location_wins_and_commas_are_escaped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let kernel = tmp.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("write");
        let disk = tmp.path().join("a,b.qcow2");
        std::fs::write(&disk, b"").expect("write");
        let mut volumes = HashMap::new();
        volumes.insert(
            "v#0".to_string(),
            VolumeStatus {
                state: VolumeState::Ready,
                file_location: disk.clone(),
                format: VolumeFormat::Qcow2,
                ..VolumeStatus::default()
            },
        );
        let cfg = vm_config(
            &kernel,
            64,
            vec![DiskConfig {
                volume_key: "v#0".into(),
                ..DiskConfig::default()
            }],
        );
        let Ok(Launch::Vm { args, .. }) = plan(&cfg, &volumes, &AppDir(tmp.path().into()), "tcg")
        else {
            panic!("plan failed");
        };
        assert!(
            args.iter()
                .any(|a| a.contains("a,,b.qcow2") && a.contains("node-name=disk0-file"))
        );
    }

    fn bitmaps(disk: &Path) -> Vec<String> {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(disk)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json.pointer("/format-specific/data/bitmaps")
            .and_then(serde_json::Value::as_array)
            .map(|all| {
                all.iter()
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn export_bitmaps_are_cleared_before_a_memory_state_is_loaded_and_foreign_ones_stop_it() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("16M")
            .status()
            .unwrap();
        assert!(status.success());
        for name in ["cairn-a", "cairn-b"] {
            let status = std::process::Command::new("qemu-img")
                .args(["bitmap", "--add", "--enable"])
                .arg(&disk)
                .arg(name)
                .status()
                .unwrap();
            assert!(status.success());
        }
        clear_export_bitmaps(std::slice::from_ref(&disk))
            .await
            .unwrap();
        assert!(bitmaps(&disk).is_empty(), "Cairn's bitmaps are gone");

        let status = std::process::Command::new("qemu-img")
            .args(["bitmap", "--add", "--enable"])
            .arg(&disk)
            .arg("backup-tool")
            .status()
            .unwrap();
        assert!(status.success());
        let e = clear_export_bitmaps(std::slice::from_ref(&disk))
            .await
            .unwrap_err();
        assert!(
            e.contains("backup-tool") && e.contains("did not make"),
            "{e}"
        );
        assert_eq!(bitmaps(&disk), ["backup-tool"], "someone else's is kept");
    }
}
