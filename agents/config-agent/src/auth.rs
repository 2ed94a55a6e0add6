//! EVE's object signing (eve-api OBJECT-SIGNING.md): every POST body and every controller
//! response is an `AuthContainer` whose `signatureHash` is the raw r‖s (64 bytes) ECDSA P-256
//! signature over SHA-256 of the payload, and whose `senderCertHash` is the SHA-256 of the
//! sender's PEM certificate (algorithm `SHA256_32BYTES`).

use cairn_persist::digest::hex;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey};
use sha2::{Digest, Sha256};

use crate::proto::{AuthBody, AuthContainer, HashAlgorithm};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{what} is not a usable PEM certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("{what} is not a P-256 private key in PKCS#8 PEM: {reason}")]
    BadKey { what: String, reason: String },
    #[error("the response carries no payload")]
    NoPayload,
    #[error("the response uses hash algorithm {0}, expected SHA256_32BYTES")]
    WrongAlgorithm(i32),
    #[error(
        "the response was signed by another certificate (sender hash {found}, pinned {expected})"
    )]
    UnknownSender { found: String, expected: String },
    #[error("the response's signature does not verify: {0}")]
    BadSignature(String),
    #[error("certificate {what} was not issued by the trusted root: {reason}")]
    Untrusted { what: String, reason: String },
}

/// A certificate and the key that signs with it.
pub struct Signer256 {
    key: SigningKey,
    cert_pem: Vec<u8>,
    cert_hash: Vec<u8>,
}

impl Signer256 {
    pub fn from_pem(cert_pem: &[u8], key_pem: &str, what: &str) -> Result<Self, AuthError> {
        let key = SigningKey::from_pkcs8_pem(key_pem).map_err(|e| AuthError::BadKey {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        // The certificate must hold this key's public half.
        let public = public_key_of(cert_pem, what)?;
        if public != *key.verifying_key() {
            return Err(AuthError::BadKey {
                what: what.to_string(),
                reason: "it does not match the certificate's public key".into(),
            });
        }
        Ok(Self {
            key,
            cert_hash: Sha256::digest(cert_pem).to_vec(),
            cert_pem: cert_pem.to_vec(),
        })
    }

    /// Wraps `payload` in a signed container. `with_cert` also carries the whole certificate
    /// (base64 of the PEM), as registration requires.
    pub fn seal(&self, payload: Vec<u8>, with_cert: bool) -> AuthContainer {
        let signature: Signature = self.key.sign(&payload);
        AuthContainer {
            algo: HashAlgorithm::Sha25632bytes as i32,
            sender_cert_hash: self.cert_hash.clone(),
            signature_hash: signature.to_bytes().to_vec(),
            sender_cert: if with_cert {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .encode(&self.cert_pem)
                    .into_bytes()
            } else {
                Vec::new()
            },
            protected_payload: Some(AuthBody { payload }),
            // Not encrypted: no cipher context or data.
            ..Default::default()
        }
    }

    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }
}

/// Checks a container against the pinned signing certificate and returns its payload.
pub fn open(container: &AuthContainer, signer_cert_pem: &[u8]) -> Result<Vec<u8>, AuthError> {
    if container.algo != HashAlgorithm::Sha25632bytes as i32 {
        return Err(AuthError::WrongAlgorithm(container.algo));
    }
    let expected = Sha256::digest(signer_cert_pem);
    if container.sender_cert_hash != expected.as_slice() {
        return Err(AuthError::UnknownSender {
            found: hex(&container.sender_cert_hash),
            expected: hex(&expected),
        });
    }
    let payload = container
        .protected_payload
        .as_ref()
        .map(|b| b.payload.clone())
        .ok_or(AuthError::NoPayload)?;
    let signature = Signature::from_slice(&container.signature_hash)
        .map_err(|e| AuthError::BadSignature(format!("not a 64-byte r‖s signature: {e}")))?;
    public_key_of(signer_cert_pem, "the controller signing certificate")?
        .verify(&payload, &signature)
        .map_err(|e| AuthError::BadSignature(e.to_string()))?;
    Ok(payload)
}

/// Checks that `cert_pem` was signed by `root_pem` (the device's trusted root).
pub fn check_issued_by(cert_pem: &[u8], root_pem: &[u8], what: &str) -> Result<(), AuthError> {
    let bad = |reason: String| AuthError::BadCertificate {
        what: what.to_string(),
        reason,
    };
    let (_, cert) = x509_parser::pem::parse_x509_pem(cert_pem).map_err(|e| bad(e.to_string()))?;
    let (_, root) =
        x509_parser::pem::parse_x509_pem(root_pem).map_err(|e| AuthError::BadCertificate {
            what: "the root certificate".into(),
            reason: e.to_string(),
        })?;
    let cert = cert.parse_x509().map_err(|e| bad(e.to_string()))?;
    let root = root.parse_x509().map_err(|e| AuthError::BadCertificate {
        what: "the root certificate".into(),
        reason: e.to_string(),
    })?;
    let root_key = VerifyingKey::from_public_key_der(root.public_key().raw).map_err(|e| {
        AuthError::BadCertificate {
            what: "the root certificate".into(),
            reason: format!("its key is not P-256: {e}"),
        }
    })?;
    let signature =
        p256::ecdsa::DerSignature::from_bytes(&cert.signature_value.data).map_err(|e| {
            AuthError::Untrusted {
                what: what.to_string(),
                reason: format!("unreadable signature: {e}"),
            }
        })?;
    root_key
        .verify(cert.tbs_certificate.as_ref(), &signature)
        .map_err(|e| AuthError::Untrusted {
            what: what.to_string(),
            reason: e.to_string(),
        })
}

fn public_key_of(cert_pem: &[u8], what: &str) -> Result<VerifyingKey, AuthError> {
    let bad = |reason: String| AuthError::BadCertificate {
        what: what.to_string(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    VerifyingKey::from_public_key_der(cert.public_key().raw)
        .map_err(|e| bad(format!("its key is not P-256: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Identity {
        cert: String,
        key: String,
    }

    fn root() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        (rcgen::Issuer::new(params, key), pem)
    }

    fn leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> Identity {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["controller".into()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    #[test]
    fn a_sealed_payload_opens_with_the_signer_certificate_only() {
        let (issuer, _) = root();
        let signer_id = leaf(&issuer);
        let other_id = leaf(&issuer);
        let signer =
            Signer256::from_pem(signer_id.cert.as_bytes(), &signer_id.key, "test").unwrap();
        let sealed = signer.seal(b"config bytes".to_vec(), false);
        assert_eq!(sealed.signature_hash.len(), 64);
        assert_eq!(
            open(&sealed, signer_id.cert.as_bytes()).unwrap(),
            b"config bytes"
        );
        assert!(matches!(
            open(&sealed, other_id.cert.as_bytes()),
            Err(AuthError::UnknownSender { .. })
        ));

        let mut tampered = sealed.clone();
        tampered.protected_payload = Some(AuthBody {
            payload: b"config bytez".to_vec(),
        });
        assert!(matches!(
            open(&tampered, signer_id.cert.as_bytes()),
            Err(AuthError::BadSignature(_))
        ));
        let mut unsigned = sealed;
        unsigned.signature_hash.clear();
        assert!(matches!(
            open(&unsigned, signer_id.cert.as_bytes()),
            Err(AuthError::BadSignature(_))
        ));
    }

    #[test]
    fn registration_carries_the_certificate_in_base64() {
        use base64::Engine;
        let (issuer, _) = root();
        let id = leaf(&issuer);
        let signer = Signer256::from_pem(id.cert.as_bytes(), &id.key, "onboarding").unwrap();
        let sealed = signer.seal(vec![1], true);
        let pem = base64::engine::general_purpose::STANDARD
            .decode(&sealed.sender_cert)
            .unwrap();
        assert_eq!(pem, id.cert.as_bytes());
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let (issuer, _) = root();
        let a = leaf(&issuer);
        let b = leaf(&issuer);
        assert!(matches!(
            Signer256::from_pem(a.cert.as_bytes(), &b.key, "device"),
            Err(AuthError::BadKey { .. })
        ));
    }

    #[test]
    fn the_signing_certificate_must_come_from_the_trusted_root() {
        let (issuer, root_pem) = root();
        let (stranger, stranger_pem) = root();
        let good = leaf(&issuer);
        let forged = leaf(&stranger);
        check_issued_by(good.cert.as_bytes(), root_pem.as_bytes(), "signing").unwrap();
        assert!(matches!(
            check_issued_by(forged.cert.as_bytes(), root_pem.as_bytes(), "signing"),
            Err(AuthError::Untrusted { .. })
        ));
        check_issued_by(forged.cert.as_bytes(), stranger_pem.as_bytes(), "signing").unwrap();
    }
}
