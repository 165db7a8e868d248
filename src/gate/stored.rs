//! Self-service API keys as the gate sees them: the key format (checked
//! before any lookup), a key found in the state store, and the lookup the
//! proxy provides (a cache in front of the store; see `crate::keys`).

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use http::HeaderValue;

use crate::policy::{Allowlist, Permissions};

/// Random part of a key: 32 bytes in base62.
pub const BODY_LEN: usize = 43;
/// Checksum: CRC-32 of prefix and body, in base62.
pub const CHECKSUM_LEN: usize = 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `n` in base62, left-padded with `0` to `width` digits.
pub fn base62(mut n: u64, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits).unwrap_or_default()
}

/// 32 bytes in base62: [`BODY_LEN`] digits (62^43 > 2^256).
pub fn encode_body(bytes: &[u8; 32]) -> String {
    let mut n = *bytes;
    let mut out = vec![b'0'; BODY_LEN];
    for d in out.iter_mut().rev() {
        let mut rem = 0u32;
        for b in n.iter_mut() {
            let cur = rem * 256 + u32::from(*b);
            *b = (cur / 62) as u8;
            rem = cur % 62;
        }
        *d = BASE62[rem as usize];
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The checksum a key with this prefix and body carries.
pub fn checksum(prefix: &str, body: &str) -> String {
    let mut crc = crc32fast::Hasher::new();
    crc.update(prefix.as_bytes());
    crc.update(body.as_bytes());
    base62(u64::from(crc.finalize()), CHECKSUM_LEN)
}

/// Whether `key` has the shape of a key made with `prefix` and a checksum
/// that matches: a mistyped or made-up key fails here, before any lookup.
pub fn well_formed(prefix: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    if rest.len() != BODY_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (body, sum) = rest.split_at(BODY_LEN);
    bool::from(subtle::ConstantTimeEq::ct_eq(
        checksum(prefix, body).as_bytes(),
        sum.as_bytes(),
    ))
}

/// A self-service key as the gate uses it.
#[derive(Debug)]
pub struct StoredKey {
    pub id: Box<str>,
    pub id_header: HeaderValue,
    /// The owner's user id; the owner must still exist and be enabled.
    pub owner: Box<str>,
    /// As granted; the owner's current permissions cap them on every request.
    pub permissions: Permissions,
    pub ip_allow: Allowlist,
    /// Unix seconds (a rolled key's is the end of its grace).
    pub expires_at: Option<u64>,
    /// The minute (Unix seconds) its use was last noted, for `last_used_at`.
    pub used_minute: AtomicU64,
}

/// What the store says of a key's hash, as far as is known without waiting.
pub enum Lookup {
    Found(Arc<StoredKey>),
    /// No such key (or revoked): known, and cached as such.
    Unknown,
    /// Not cached: the caller must ask the store and decide again.
    Miss,
    /// The store cannot be asked (Redis down) and nothing is cached.
    Unavailable,
    /// Not asked: this address presented too many unknown keys lately.
    Refused,
}

/// The proxy's view of the self-service state: key lookups and the
/// accounts' own allowlists. Synchronous: answers only what it holds.
pub trait StoredKeys {
    fn lookup(&self, hash: &[u8; 32], now_us: u64) -> Lookup;
    /// Whether the account allowlist of `user` (an id), if it has one, permits `ip`.
    fn account_permits(&self, user: &str, ip: IpAddr) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let body = "a".repeat(BODY_LEN);
        let key = format!("kg_{body}{}", checksum("kg_", &body));
        assert!(well_formed("kg_", &key));
        let mut typo = key.clone().into_bytes();
        typo[10] = b'b';
        assert!(!well_formed("kg_", std::str::from_utf8(&typo).unwrap()));
        assert!(!well_formed("xx_", &key));
        assert!(!well_formed("kg_", &key[..key.len() - 1]));
        assert!(!well_formed("kg_", &format!("{key}0")));
    }

    #[test]
    fn base62_pads_and_orders() {
        assert_eq!(base62(0, 3), "000");
        assert_eq!(base62(61, 2), "0z");
        assert_eq!(base62(62, 2), "10");
        assert_eq!(
            base62(u64::from(u32::MAX), CHECKSUM_LEN).len(),
            CHECKSUM_LEN
        );
    }
}
