//! cairn-bundle: makes and checks signed update bundles and boot disks (on the build machine),
//! and installs a bundle into the inactive slot or shows the boot state (on the device).

#![allow(clippy::disallowed_methods)] // a one-shot tool: no runtime to block

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cairn_baseos_manager::bootstate::{BootState, Slot};
use cairn_baseos_manager::bundle::{self, PublicKey, Reading, SigningKey};
use cairn_baseos_manager::disk::{self, BootDisk};
use cairn_baseos_manager::install;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cairn-bundle",
    about = "Signed update bundles and A/B boot disks"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes a new ed25519 signing key (PKCS#8 PEM, mode 0600); keep it out of the repository.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints the public key of a signing key (the line for /etc/cairn/update-key.pub).
    Pubkey {
        #[arg(long)]
        key: PathBuf,
    },
    /// Makes a bundle of a root image and its manifest, signed with KEY.
    Create {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long, default_value_t = 0)]
        source_date_epoch: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Checks a bundle's signature and hashes against a public key file.
    Verify {
        #[arg(long, default_value = cairn_baseos_manager::UPDATE_KEY)]
        pubkey: PathBuf,
        #[arg(long)]
        bundle: PathBuf,
        /// The bundle is on a block device (zeros may follow it).
        #[arg(long)]
        device: bool,
    },
    /// Makes a boot disk image: boot state, slot A holding ROOT, slot B empty.
    Mkdisk {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 160)]
        slot_mib: u64,
    },
    /// Shows the boot state of a boot disk (its first partition).
    State {
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
    },
    /// Verifies a bundle, writes it into the slot that is not running and marks it for trial.
    Install {
        #[arg(long, default_value = cairn_baseos_manager::UPDATE_KEY)]
        pubkey: PathBuf,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        device: bool,
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        /// The running slot (A or B); default: CAIRN_BOOT_SLOT from the initramfs.
        #[arg(long, env = "CAIRN_BOOT_SLOT")]
        running: String,
        /// Where the update's outcome is recorded for the baseos-manager (it reports the
        /// version on trial, and the one that failed).
        #[arg(long, env = "CAIRN_PERSIST_DIR")]
        persist_dir: Option<PathBuf>,
    },
    /// Commits the running slot (after its trial boot).
    Commit {
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        #[arg(long, env = "CAIRN_BOOT_SLOT")]
        running: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Keygen { out } => {
            let pem = SigningKey::generate_pem()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_private()
                .open(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            file.write_all(pem.as_bytes())?;
            println!("{}", SigningKey::load(&out)?.public_key().to_hex());
        }
        Command::Pubkey { key } => println!("{}", SigningKey::load(&key)?.public_key().to_hex()),
        Command::Create {
            key,
            root,
            manifest,
            version,
            source_date_epoch,
            out,
        } => {
            let key = SigningKey::load(&key)?;
            let header = bundle::create(&key, &version, source_date_epoch, &manifest, &root, &out)?;
            println!("{}", serde_json::to_string(&header)?);
        }
        Command::Verify {
            pubkey,
            bundle: path,
            device,
        } => {
            let key = PublicKey::load(&pubkey)?;
            let verified = bundle::verify(&path, &key, reading(device))?;
            println!("{}", serde_json::to_string(&verified.header)?);
        }
        Command::Mkdisk {
            root,
            out,
            slot_mib,
        } => disk::make_image(&out, &root, slot_mib)
            .with_context(|| format!("cannot make the boot disk {}", out.display()))?,
        Command::State { disk } => {
            let state = BootState::read(&BootDisk::partitions_of(&disk).state)?;
            print!("{}", state_text(&state));
        }
        Command::Install {
            pubkey,
            bundle: path,
            device,
            disk,
            running,
            persist_dir,
        } => {
            let key = PublicKey::load(&pubkey)?;
            let running = slot(&running)?;
            let done = install::install(
                &path,
                reading(device),
                &key,
                &BootDisk::partitions_of(&disk),
                running,
                None,
                &mut |step| eprintln!("cairn-bundle: {step}"),
            )?;
            if let Some(persist) = persist_dir {
                let outcome = cairn_types::UpdateOutcome {
                    version: done.verified.header.version.clone(),
                    partition_label: done.slot.label().into(),
                    result: "installed".into(),
                    reason: "marked for one trial boot".into(),
                    time: Some(chrono::Utc::now()),
                };
                let path = cairn_baseos_manager::agent::outcome_path(&persist);
                cairn_persist::create_dir_durable(&persist.join("baseos"))?;
                cairn_persist::store(&path, &outcome)
                    .with_context(|| format!("cannot record the install in {}", path.display()))?;
            }
            println!(
                "installed {} into slot {}: verify {} ms, write {} ms",
                done.verified.header.version,
                done.slot.label(),
                done.verify_time.as_millis(),
                done.write_time.as_millis()
            );
        }
        Command::Commit { disk, running } => {
            let running = slot(&running)?;
            let disk = BootDisk::partitions_of(&disk);
            let state = BootState::read(&disk.state)?;
            let state = state.commit(running).write_next(&disk.state, state.seq)?;
            print!("{}", state_text(&state));
        }
    }
    Ok(())
}

fn reading(device: bool) -> Reading {
    if device {
        Reading::Device
    } else {
        Reading::File
    }
}

fn slot(text: &str) -> anyhow::Result<Slot> {
    match Slot::parse(text) {
        Some(slot) => Ok(slot),
        None => bail!("'{text}' is not a slot: A, B, IMGA or IMGB"),
    }
}

fn state_text(state: &BootState) -> String {
    let slot = |s: Option<Slot>| s.map_or("-", Slot::letter);
    format!(
        "seq {}\ncommitted {}\ntrial {}\ntries {}\nfailed {}\n",
        state.seq,
        state.committed.letter(),
        slot(state.trial),
        state.tries,
        slot(state.failed)
    )
}

trait Private {
    fn mode_private(&mut self) -> &mut Self;
}

impl Private for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}
