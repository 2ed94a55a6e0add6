//! EdgeView's JWT (EVE `EvjwtInfo`), checked as EVE checks it on the device: zedagent's
//! `verifyJWT`/`addEvFiles` (three parts, header `{"alg":"ES256","typ":"JWT"}`, ES256 signature
//! by the controller's signing certificate, `sub` the device's UUID, not expired, at most five
//! instances) and edge-view's `getAddrFromJWT` (`exp` and `dep` present). Cairn refuses besides
//! what it cannot honour: payload encryption (`enc`, broken in EVE itself: both ends draw their
//! own random session secret) and client authentication by SSH keys (`aut` 2).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// EVE's `EdgeviewMaxInstNum`.
pub const MAX_INSTANCES: u8 = 5;

/// EVE's `EvAuthType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// Commands carry the HMAC of the token's `key` only.
    Unspecified,
    /// Commands are signed by the controller's signing key (EVE `EvAuthTypeControllerCert`).
    ControllerCert,
}

/// The token's claims (EVE `EvjwtInfo`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    #[serde(default)]
    pub dep: String,
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub exp: u64,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub num: u8,
    #[serde(default)]
    pub enc: bool,
    #[serde(default)]
    pub aut: i32,
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct Token {
    /// The JWT as given: the dispatcher pairs device and client by its hash.
    pub jwt: String,
    pub claims: Claims,
    pub auth: AuthType,
    /// The dispatcher's `host:port` and path (EVE strips `https://`/`http://` and keeps the path).
    pub host_port: String,
    pub path: String,
    /// The controller's signing key: it verified the token and verifies signed commands.
    pub signer: VerifyingKey,
}

impl Token {
    /// The instances to run: `num` (0 and 1 are one unnumbered instance, as in EVE).
    pub fn instances(&self) -> Vec<u8> {
        if self.claims.num > 1 {
            (1..=self.claims.num).collect()
        } else {
            vec![0]
        }
    }

    /// `X-Session-Token`: base64url (no padding) of SHA-256 over the JWT, with `.N` appended for
    /// instance N of a multi-instance token (EVE `getTokenHashStringFull`).
    pub fn session_hash(&self, instance: u8) -> String {
        session_hash(&self.jwt, instance)
    }
}

pub fn session_hash(jwt: &str, instance: u8) -> String {
    let mut text = jwt.to_string();
    if instance > 0 {
        text.push_str(&format!(".{instance}"));
    }
    URL_SAFE_NO_PAD.encode(Sha256::digest(text.as_bytes()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the edgeview token is not a JWT: {0}")]
    Format(String),
    #[error("the edgeview token's header {0} is not {{\"alg\":\"ES256\",\"typ\":\"JWT\"}}")]
    Algorithm(String),
    #[error("no controller signing certificate to verify the edgeview token against: {0}")]
    NoSigner(String),
    #[error(
        "the edgeview token's signature does not verify against the controller signing certificate: {0}"
    )]
    Signature(String),
    #[error("the edgeview token is for device {found:?}, not this device {device}")]
    WrongDevice { found: String, device: String },
    #[error("the edgeview token expired at {exp} (Unix seconds), {ago} s ago")]
    Expired { exp: u64, ago: u64 },
    #[error("the edgeview token names no {0}")]
    Missing(&'static str),
    #[error("the edgeview token asks for {0} instances; at most 5 are allowed")]
    TooManyInstances(u8),
    #[error("the edgeview token asks for payload encryption (enc), which Cairn does not offer")]
    Encryption,
    #[error(
        "the edgeview token asks for client authentication type {0} (aut), which Cairn does not offer"
    )]
    AuthType(i32),
    #[error("the edgeview token's dispatcher address {0:?} is not host:port[/path]")]
    Dispatcher(String),
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    alg: String,
    #[serde(default)]
    typ: String,
}

/// Checks `jwt` against the controller's signing certificate (`signing_cert_pem`), the device
/// (`device`: its UUID, or empty when it has none) and the clock (`now`, Unix seconds).
pub fn check(
    jwt: &str,
    signing_cert_pem: &str,
    device: &str,
    now: u64,
) -> Result<Token, TokenError> {
    let parts: Vec<&str> = jwt.trim().split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(TokenError::Format(format!(
            "{} dot-separated parts, not 3",
            parts.len()
        )));
    };
    let decode = |what: &str, part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| TokenError::Format(format!("the {what} is not base64url: {e}")))
    };
    let header_bytes = decode("header", header)?;
    let parsed: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| TokenError::Format(format!("the header is not JSON: {e}")))?;
    if parsed.alg != "ES256" || parsed.typ != "JWT" {
        return Err(TokenError::Algorithm(
            String::from_utf8_lossy(&header_bytes).into_owned(),
        ));
    }
    let signer = signing_key(signing_cert_pem)?;
    let signature = Signature::from_slice(&decode("signature", signature)?)
        .map_err(|e| TokenError::Signature(format!("not a 64-byte r‖s signature: {e}")))?;
    signer
        .verify(format!("{header}.{payload}").as_bytes(), &signature)
        .map_err(|e| TokenError::Signature(e.to_string()))?;
    let claims: Claims = serde_json::from_slice(&decode("payload", payload)?)
        .map_err(|e| TokenError::Format(format!("the payload is not EVE's claims: {e}")))?;
    if !device.is_empty() && claims.sub != device {
        return Err(TokenError::WrongDevice {
            found: claims.sub,
            device: device.to_string(),
        });
    }
    if claims.exp == 0 {
        return Err(TokenError::Missing("expiry (exp)"));
    }
    if now > claims.exp {
        return Err(TokenError::Expired {
            exp: claims.exp,
            ago: now - claims.exp,
        });
    }
    if claims.dep.is_empty() {
        return Err(TokenError::Missing("dispatcher (dep)"));
    }
    if claims.num > MAX_INSTANCES {
        return Err(TokenError::TooManyInstances(claims.num));
    }
    if claims.enc {
        return Err(TokenError::Encryption);
    }
    let auth = match claims.aut {
        0 => AuthType::Unspecified,
        1 => AuthType::ControllerCert,
        other => return Err(TokenError::AuthType(other)),
    };
    let dep = claims
        .dep
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (host_port, path) = match dep.split_once('/') {
        Some((host, path)) => (host.to_string(), format!("/{path}")),
        None => (dep.to_string(), String::new()),
    };
    if host_port.is_empty() || host_port.rsplit_once(':').is_none() {
        return Err(TokenError::Dispatcher(claims.dep.clone()));
    }
    Ok(Token {
        jwt: jwt.trim().to_string(),
        claims,
        auth,
        host_port,
        path,
        signer,
    })
}

/// The P-256 key of a PEM certificate (or a bare `PUBLIC KEY`).
pub fn signing_key(pem: &str) -> Result<VerifyingKey, TokenError> {
    if pem.trim().is_empty() {
        return Err(TokenError::NoSigner("none was given".into()));
    }
    if let Ok(key) = VerifyingKey::from_public_key_pem(pem) {
        return Ok(key);
    }
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| TokenError::NoSigner(format!("not a PEM certificate: {e}")))?;
    let cert = block
        .parse_x509()
        .map_err(|e| TokenError::NoSigner(format!("not an X.509 certificate: {e}")))?;
    VerifyingKey::from_public_key_der(cert.public_key().raw)
        .map_err(|e| TokenError::NoSigner(format!("its key is not P-256: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    pub fn keypair(seed: u8) -> (SigningKey, String) {
        let key = SigningKey::from_slice(&[seed; 32]).unwrap();
        let pem = key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        (key, pem)
    }

    pub fn sign(key: &SigningKey, header: &str, claims: &str) -> String {
        let text = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature: Signature = key.sign(text.as_bytes());
        format!("{text}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    const HEADER: &str = r#"{"alg":"ES256","typ":"JWT"}"#;
    const DEVICE: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    fn claims(exp: u64, extra: &str) -> String {
        format!(
            r#"{{"dep":"https://127.0.0.1:4000/edge-view","sub":"{DEVICE}","exp":{exp},"key":"nonce"{extra}}}"#
        )
    }

    #[test]
    fn a_good_token_names_its_dispatcher() {
        let (key, pem) = keypair(7);
        let token = check(&sign(&key, HEADER, &claims(2000, "")), &pem, DEVICE, 1000).unwrap();
        assert_eq!(token.host_port, "127.0.0.1:4000");
        assert_eq!(token.path, "/edge-view");
        assert_eq!(token.instances(), vec![0]);
        assert_eq!(token.auth, AuthType::Unspecified);
    }

    #[test]
    fn each_fault_is_refused_by_name() {
        let (key, pem) = keypair(7);
        let (_, other_pem) = keypair(8);
        let good = sign(&key, HEADER, &claims(2000, ""));
        assert!(matches!(
            check(&good, &other_pem, DEVICE, 1000),
            Err(TokenError::Signature(_))
        ));
        assert!(matches!(
            check(&good, &pem, "00000000-0000-0000-0000-000000000001", 1000),
            Err(TokenError::WrongDevice { .. })
        ));
        assert_eq!(
            check(&good, &pem, DEVICE, 2005).unwrap_err(),
            TokenError::Expired { exp: 2000, ago: 5 }
        );
        let six = sign(&key, HEADER, &claims(2000, r#","num":6"#));
        assert_eq!(
            check(&six, &pem, DEVICE, 1000).unwrap_err(),
            TokenError::TooManyInstances(6)
        );
        let enc = sign(&key, HEADER, &claims(2000, r#","enc":true"#));
        assert_eq!(
            check(&enc, &pem, DEVICE, 1000).unwrap_err(),
            TokenError::Encryption
        );
        let hs = sign(&key, r#"{"alg":"HS256","typ":"JWT"}"#, &claims(2000, ""));
        assert!(matches!(
            check(&hs, &pem, DEVICE, 1000),
            Err(TokenError::Algorithm(_))
        ));
        // A changed claim breaks the signature.
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims(9999, "")),
            parts[2]
        );
        assert!(matches!(
            check(&forged, &pem, DEVICE, 1000),
            Err(TokenError::Signature(_))
        ));
    }

    #[test]
    fn the_session_hash_is_eves() {
        // sha256("a.b.c") and sha256("a.b.c.2"), base64url without padding.
        let one = session_hash("a.b.c", 0);
        assert_eq!(one.len(), 43);
        assert_ne!(one, session_hash("a.b.c", 2));
        assert_eq!(
            session_hash("a.b.c.2", 0),
            session_hash("a.b.c", 2),
            "instance N hashes the token with .N appended"
        );
    }
}
