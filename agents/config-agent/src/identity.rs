//! The device's identity, kept like EVE's `/config` partition under `<persist>/config/`:
//! `server` (host:port), `root-certificate.pem` (what the controller's TLS and signing
//! certificates must chain to), `onboard.cert.pem` / `onboard.key.pem` and `serial` (for
//! registration), and the device's own `device.cert.pem` / `device.key.pem`, generated at the
//! first start and never overwritten: the controller knows the device by that certificate.
//!
//! Set-up (`cairn up --controller … --onboard-cert … --onboard-key … --serial …`) seeds the
//! files once; later starts read them, so a device reboots onto its controller with no flags.

use std::path::{Path, PathBuf};

use crate::auth::{AuthError, Signer256};

pub use cairn_controller_client::link::{ROOT_CERT, SERVER, dir};
pub const ONBOARD_CERT: &str = "onboard.cert.pem";
pub const ONBOARD_KEY: &str = "onboard.key.pem";
pub const SERIAL: &str = "serial";
pub const DEVICE_CERT: &str = "device.cert.pem";
pub const DEVICE_KEY: &str = "device.key.pem";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("device identity {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "device identity: {0} is missing; set the device up with `cairn up --controller URL --onboard-cert CERT --onboard-key KEY --serial S` and put the controller's root certificate at {1}"
    )]
    Missing(&'static str, PathBuf),
    #[error("device identity {}: {source}", path.display())]
    Auth {
        path: PathBuf,
        #[source]
        source: AuthError,
    },
}

/// What set-up gives; each present value replaces the stored one (the device key stays).
#[derive(Debug, Default, Clone)]
pub struct Seed {
    pub server: Option<String>,
    pub root_cert: Option<PathBuf>,
    pub onboard_cert: Option<PathBuf>,
    pub onboard_key: Option<PathBuf>,
    pub serial: Option<String>,
}

/// Everything the link needs, read and checked.
pub struct Identity {
    pub dir: PathBuf,
    pub server: String,
    pub root_pem: Vec<u8>,
    pub serial: String,
    pub onboard: Signer256,
    pub device: Signer256,
}

impl Identity {
    /// Writes the seed's files (durably, keys 0600), then loads the identity, generating the
    /// device key and certificate if this is the first start. Blocking.
    pub fn open(persist: &Path, seed: &Seed) -> Result<Self, IdentityError> {
        let dir = dir(persist);
        store_seed(&dir, seed)?;
        let read = |name: &'static str| -> Result<Vec<u8>, IdentityError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(IdentityError::Missing(name, dir.join(ROOT_CERT)))
                }
                Err(e) => Err(IdentityError::File {
                    path,
                    reason: e.to_string(),
                }),
            }
        };
        let text = |name: &'static str| -> Result<String, IdentityError> {
            let bytes = read(name)?;
            let text = String::from_utf8(bytes).map_err(|_| IdentityError::File {
                path: dir.join(name),
                reason: "not UTF-8 text".into(),
            })?;
            Ok(text.trim().to_string())
        };
        let server = text(SERVER)?;
        let serial = text(SERIAL)?;
        let root_pem = read(ROOT_CERT)?;
        let onboard_key = text(ONBOARD_KEY)?;
        let onboard = Signer256::from_pem(&read(ONBOARD_CERT)?, &onboard_key, "onboarding")
            .map_err(|source| IdentityError::Auth {
                path: dir.join(ONBOARD_CERT),
                source,
            })?;
        let device = device_signer(&dir, &serial)?;
        Ok(Self {
            dir,
            server,
            root_pem,
            serial,
            onboard,
            device,
        })
    }

    pub fn root_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT)
    }
}

fn store_seed(dir: &Path, seed: &Seed) -> Result<(), IdentityError> {
    let copy = |from: &Path| -> Result<Vec<u8>, IdentityError> {
        std::fs::read(from).map_err(|e| IdentityError::File {
            path: from.to_path_buf(),
            reason: format!("cannot read it: {e}"),
        })
    };
    let mut files: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    if let Some(server) = &seed.server {
        files.push((SERVER, format!("{server}\n").into_bytes(), false));
    }
    if let Some(serial) = &seed.serial {
        files.push((SERIAL, format!("{serial}\n").into_bytes(), false));
    }
    if let Some(path) = &seed.root_cert {
        files.push((ROOT_CERT, copy(path)?, false));
    }
    if let Some(path) = &seed.onboard_cert {
        files.push((ONBOARD_CERT, copy(path)?, false));
    }
    if let Some(path) = &seed.onboard_key {
        files.push((ONBOARD_KEY, copy(path)?, true));
    }
    if files.is_empty() {
        return Ok(());
    }
    make_private_dir(dir)?;
    for (name, bytes, secret) in files {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        write(&path, &bytes, secret)?;
    }
    Ok(())
}

/// The device key and certificate: loaded, or made once. The key is written before the
/// certificate, so a crash in between leaves a key from which the certificate is made again.
fn device_signer(dir: &Path, serial: &str) -> Result<Signer256, IdentityError> {
    let key_path = dir.join(DEVICE_KEY);
    let cert_path = dir.join(DEVICE_CERT);
    let file_error = |path: &Path, reason: String| IdentityError::File {
        path: path.to_path_buf(),
        reason,
    };
    let key = match std::fs::read_to_string(&key_path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| file_error(&key_path, format!("not a usable private key: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| file_error(&key_path, format!("generating a key: {e}")))?;
            make_private_dir(dir)?;
            write(&key_path, key.serialize_pem().as_bytes(), true)?;
            tracing::info!(key = %key_path.display(), "generated the device key");
            key
        }
        Err(e) => return Err(file_error(&key_path, e.to_string())),
    };
    let cert_pem = match std::fs::read(&cert_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
                .map_err(|e| file_error(&cert_path, e.to_string()))?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("cairn-device {serial}"));
            // Valid for as long as the device may live; the controller pins it, it is not
            // checked against a clock.
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2120, 1, 1);
            let cert = params
                .self_signed(&key)
                .map_err(|e| file_error(&cert_path, format!("making the certificate: {e}")))?;
            write(&cert_path, cert.pem().as_bytes(), false)?;
            tracing::info!(cert = %cert_path.display(), "generated the device certificate");
            cert.pem().into_bytes()
        }
        Err(e) => return Err(file_error(&cert_path, e.to_string())),
    };
    Signer256::from_pem(&cert_pem, &key.serialize_pem(), "device").map_err(|source| {
        IdentityError::Auth {
            path: cert_path,
            source,
        }
    })
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn make_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    cairn_persist::create_dir_durable(dir).map_err(|e| IdentityError::File {
        path: dir.to_path_buf(),
        reason: format!("creating it: {e}"),
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        IdentityError::File {
            path: dir.to_path_buf(),
            reason: format!("making it private: {e}"),
        }
    })
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    cairn_persist::write_atomic(path, bytes, false).map_err(|(step, e)| IdentityError::File {
        path: path.to_path_buf(),
        reason: format!("{step}: {e}"),
    })?;
    if secret {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            IdentityError::File {
                path: path.to_path_buf(),
                reason: format!("restricting it to its owner: {e}"),
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
mod tests {
    use super::*;

    fn onboarding(dir: &Path) -> Seed {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["onboard".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("ob.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ob.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("root.pem"), cert.pem()).unwrap();
        Seed {
            server: Some("127.0.0.1:1".into()),
            root_cert: Some(dir.join("root.pem")),
            onboard_cert: Some(dir.join("ob.pem")),
            onboard_key: Some(dir.join("ob.key")),
            serial: Some("SN-1".into()),
        }
    }

    #[test]
    fn the_device_key_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let seed = onboarding(tmp.path());
        let persist = tmp.path().join("persist");
        let first = Identity::open(&persist, &seed).unwrap();
        assert_eq!(first.serial, "SN-1");
        let again = Identity::open(&persist, &Seed::default()).unwrap();
        assert_eq!(first.device.cert_pem(), again.device.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir(&persist).join(DEVICE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the device key is private: {mode:o}");

        // A crash between key and certificate: the certificate is made again from the key.
        std::fs::remove_file(dir(&persist).join(DEVICE_CERT)).unwrap();
        let healed = Identity::open(&persist, &Seed::default()).unwrap();
        assert_ne!(healed.device.cert_pem(), first.device.cert_pem());
        let a = healed.device.seal(b"x".to_vec(), false);
        crate::auth::open(&a, healed.device.cert_pem()).unwrap();
    }

    #[test]
    fn a_device_never_set_up_says_how() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Identity::open(tmp.path(), &Seed::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("server is missing"), "{err}");
        assert!(err.contains("cairn up --controller"), "{err}");
    }
}
