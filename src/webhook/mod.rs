//! Webhook signatures, exactly as the public document's `verify_webhook`
//! computes them: `sha256=` + hex(HMAC-SHA256(secret, payload)), where the
//! payload is the raw body, or `timestamp + "." + body` when a timestamp
//! header is configured (replay protection). Comparison is constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

const SCHEME: &str = "sha256=";

/// Why a signature was refused (all answer `401 invalid_signature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingSignature,
    /// Not `sha256=` + 64 hex digits.
    Malformed,
    Mismatch,
    MissingTimestamp,
    /// The timestamp is not a number, or too far from now.
    StaleTimestamp,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MissingSignature => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Mismatch => "mismatch",
            Refusal::MissingTimestamp | Refusal::StaleTimestamp => "stale",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::MissingSignature => "the signature header is missing",
            Refusal::Malformed => "the signature is not sha256= followed by 64 hex digits",
            Refusal::Mismatch => "the signature does not match the body",
            Refusal::MissingTimestamp => "the timestamp header is missing",
            Refusal::StaleTimestamp => "the timestamp is outside the allowed tolerance",
        }
    }
}

fn mac(secret: &[u8], timestamp: Option<&str>, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256>>::new_from_slice(secret).expect("HMAC takes any key length");
    if let Some(ts) = timestamp {
        m.update(ts.as_bytes());
        m.update(b".");
    }
    m.update(body);
    m.finalize().into_bytes().into()
}

/// The header value for `body`: `sha256=<hex>`.
pub fn sign(secret: &[u8], timestamp: Option<&str>, body: &[u8]) -> String {
    format!("{SCHEME}{}", hex::encode(mac(secret, timestamp, body)))
}

/// Check `signature` (the header's value) against every secret; any match
/// passes. Every secret is tried, so the time taken does not say which matched.
pub fn verify(
    secrets: &[Vec<u8>],
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
) -> Result<(), Refusal> {
    let signature = signature.ok_or(Refusal::MissingSignature)?.trim();
    let hex_part = signature
        .get(..SCHEME.len())
        .filter(|s| s.eq_ignore_ascii_case(SCHEME))
        .map(|_| &signature[SCHEME.len()..])
        .ok_or(Refusal::Malformed)?;
    let mut given = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut given).map_err(|_| Refusal::Malformed)?;
    let mut matched = subtle::Choice::from(0);
    for secret in secrets {
        matched |= mac(secret, timestamp, body).ct_eq(&given);
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(Refusal::Mismatch)
    }
}

/// The timestamp header's value, if it is within `tolerance_secs` of `now`.
pub fn check_timestamp(
    value: Option<&str>,
    now: u64,
    tolerance_secs: u64,
) -> Result<&str, Refusal> {
    let value = value.ok_or(Refusal::MissingTimestamp)?.trim();
    let ts: u64 = value.parse().map_err(|_| Refusal::StaleTimestamp)?;
    if ts.abs_diff(now) > tolerance_secs {
        return Err(Refusal::StaleTimestamp);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";

    #[test]
    fn matches_an_independent_hmac_sha256() {
        // echo -n 'hello' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            sign(SECRET, None, b"hello"),
            "sha256=fa1f2843ca221403e67c335d22ed782f1f2b5a33261fbee70bd5ae4cbff02490"
        );
        let sig = sign(SECRET, None, b"hello");
        assert_eq!(
            verify(&[SECRET.to_vec()], Some(&sig), None, b"hello"),
            Ok(())
        );
    }

    #[test]
    fn tampering_and_wrong_secrets_fail() {
        let sig = sign(SECRET, None, b"{\"amount\":100}");
        assert_eq!(
            verify(&[SECRET.to_vec()], Some(&sig), None, b"{\"amount\":900}"),
            Err(Refusal::Mismatch)
        );
        assert_eq!(
            verify(&[b"other".to_vec()], Some(&sig), None, b"{\"amount\":100}"),
            Err(Refusal::Mismatch)
        );
    }

    #[test]
    fn malformed_signatures_are_told_apart_from_mismatches() {
        let s = [SECRET.to_vec()];
        assert_eq!(verify(&s, None, None, b"x"), Err(Refusal::MissingSignature));
        for bad in [
            "sha256=zz",
            "sha256=abcd",
            "sha1=0000",
            "",
            &format!("sha512={}", "0".repeat(64)),
        ] {
            assert_eq!(
                verify(&s, Some(bad), None, b"x"),
                Err(Refusal::Malformed),
                "{bad:?}"
            );
        }
        let upper = sign(SECRET, None, b"x")
            .to_uppercase()
            .replacen("SHA256=", "sha256=", 1);
        assert_eq!(
            verify(&s, Some(&upper), None, b"x"),
            Ok(()),
            "hex digits in either case"
        );
    }

    #[test]
    fn any_of_several_secrets_passes() {
        let secrets = [b"old".to_vec(), b"new".to_vec()];
        for secret in [b"old".as_slice(), b"new"] {
            assert_eq!(
                verify(&secrets, Some(&sign(secret, None, b"b")), None, b"b"),
                Ok(())
            );
        }
    }

    #[test]
    fn timestamp_is_part_of_the_signed_content_and_bounded() {
        let sig = sign(SECRET, Some("1780000000"), b"body");
        assert_eq!(
            verify(&[SECRET.to_vec()], Some(&sig), Some("1780000000"), b"body"),
            Ok(())
        );
        assert_eq!(
            verify(&[SECRET.to_vec()], Some(&sig), Some("1780000001"), b"body"),
            Err(Refusal::Mismatch)
        );
        assert_eq!(
            check_timestamp(Some("1780000000"), 1_780_000_299, 300),
            Ok("1780000000")
        );
        assert_eq!(
            check_timestamp(Some("1780000000"), 1_780_000_301, 300),
            Err(Refusal::StaleTimestamp)
        );
        assert_eq!(
            check_timestamp(Some("1780000400"), 1_780_000_000, 300),
            Err(Refusal::StaleTimestamp)
        );
        assert_eq!(
            check_timestamp(Some("soon"), 1_780_000_000, 300),
            Err(Refusal::StaleTimestamp)
        );
        assert_eq!(
            check_timestamp(None, 1_780_000_000, 300),
            Err(Refusal::MissingTimestamp)
        );
    }
}
