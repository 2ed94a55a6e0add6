//! EdgeView's message envelope (EVE `envelopeMsg`, `crypto.go`): every command and every reply
//! travels as the JSON Go's encoding/json makes of
//! `{Message []byte "message"; Sha256Hash [32]byte "sha256Hash"; Signature []byte; IV, Cipher}`:
//! `message` is standard base64, `sha256Hash` a JSON array of 32 numbers (Go encodes a fixed-size
//! byte array so), `Signature` base64 or `null`; `iv` and `cipher` only with encryption (which
//! Cairn refuses in the token). `sha256Hash` is HMAC-SHA256 of the message under the token's
//! `key`. With `aut` 1 the client's commands carry instead an ECDSA P-256 signature (r‖s) of
//! the message by the controller's signing key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    #[serde(with = "b64", default)]
    message: Vec<u8>,
    #[serde(rename = "sha256Hash", default)]
    sha256_hash: Vec<u8>,
    #[serde(rename = "Signature", with = "b64_opt", default)]
    signature: Option<Vec<u8>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    iv: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    cipher: Option<String>,
}

/// Why a text frame was not an accepted envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not an envelope at all: the dispatcher's own plain-text notes.
    #[error("not an envelope")]
    NotJson,
    #[error("the message's HMAC does not verify with the token's key")]
    BadHmac,
    #[error("the command carries no signature, and the token requires the controller's")]
    Unsigned,
    #[error("the command's signature does not verify against the controller signing certificate")]
    BadSignature,
    #[error("the message is encrypted, and the token asked for none")]
    Encrypted,
}

/// The envelope of a reply (`signAuthenData`): the message with its HMAC under `key`.
pub fn seal(key: &str, message: &[u8]) -> String {
    let wire = Wire {
        message: message.to_vec(),
        sha256_hash: hmac(key, message),
        signature: None,
        iv: None,
        cipher: None,
    };
    serde_json::to_string(&wire).expect("an envelope always serializes")
}

/// The payload of a received envelope (`verifyEnvelopeData`). `signer`: the controller's key
/// when the token asks commands to be signed by it (`aut` 1) and this is a text frame.
pub fn open(key: &str, data: &[u8], signer: Option<&VerifyingKey>) -> Result<Vec<u8>, Refusal> {
    let wire: Wire = serde_json::from_slice(data).map_err(|_| Refusal::NotJson)?;
    if wire.iv.is_some() || wire.cipher.is_some() {
        return Err(Refusal::Encrypted);
    }
    if let Some(signer) = signer {
        let raw = wire
            .signature
            .filter(|s| !s.is_empty())
            .ok_or(Refusal::Unsigned)?;
        let signature = Signature::from_slice(&raw).map_err(|_| Refusal::BadSignature)?;
        signer
            .verify(&wire.message, &signature)
            .map_err(|_| Refusal::BadSignature)?;
        return Ok(wire.message);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(&wire.message);
    mac.verify_slice(&wire.sha256_hash)
        .map_err(|_| Refusal::BadHmac)?;
    Ok(wire.message)
}

fn hmac(key: &str, message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

mod b64 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        // Go writes `null` for a nil slice.
        let text: Option<String> = Option::deserialize(d)?;
        text.map_or(Ok(Vec::new()), |t| {
            STANDARD.decode(t).map_err(serde::de::Error::custom)
        })
    }
}

mod b64_opt {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_str(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_what_go_encodes() {
        let sealed = seal("nonce", b"hi");
        let value: serde_json::Value = serde_json::from_str(&sealed).unwrap();
        assert_eq!(value["message"], "aGk=");
        assert_eq!(value["sha256Hash"].as_array().unwrap().len(), 32);
        assert!(value["sha256Hash"][0].is_u64());
        assert!(value["Signature"].is_null());
        assert!(value.get("iv").is_none() && value.get("cipher").is_none());
        assert_eq!(open("nonce", sealed.as_bytes(), None).unwrap(), b"hi");
    }

    #[test]
    fn a_wrong_key_or_a_changed_message_is_refused() {
        let sealed = seal("nonce", b"hi");
        assert_eq!(
            open("other", sealed.as_bytes(), None),
            Err(Refusal::BadHmac)
        );
        let changed = sealed.replace("aGk=", "aGo=");
        assert_eq!(
            open("nonce", changed.as_bytes(), None),
            Err(Refusal::BadHmac)
        );
        assert_eq!(
            open("nonce", b"no device online\n+++Done+++", None),
            Err(Refusal::NotJson)
        );
    }

    #[test]
    fn a_signed_command_needs_the_controllers_signature() {
        use p256::ecdsa::signature::Signer;
        let (key, pem) = crate::token::tests::keypair(3);
        let signer = crate::token::signing_key(&pem).unwrap();
        let signature: Signature = key.sign(b"cmd");
        let signed = serde_json::json!({
            "message": STANDARD.encode(b"cmd"),
            "sha256Hash": vec![0u8; 32],
            "Signature": STANDARD.encode(signature.to_bytes()),
        })
        .to_string();
        assert_eq!(open("k", signed.as_bytes(), Some(&signer)).unwrap(), b"cmd");
        let unsigned = seal("k", b"cmd");
        assert_eq!(
            open("k", unsigned.as_bytes(), Some(&signer)),
            Err(Refusal::Unsigned)
        );
        let (_, stranger) = crate::token::tests::keypair(4);
        let stranger = crate::token::signing_key(&stranger).unwrap();
        assert_eq!(
            open("k", signed.as_bytes(), Some(&stranger)),
            Err(Refusal::BadSignature)
        );
    }
}
