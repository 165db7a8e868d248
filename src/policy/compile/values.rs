//! Values every section uses: counts, durations, addresses, timestamps,
//! address sets, permissions, and secrets read from the environment or
//! from files. Each blames the value's own `file:line:col`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use http::HeaderName;
use ipnet::IpNet;

use super::super::{Access, IpSet, Permissions, TierIdx};
use super::*;
use crate::config::{self, Str};

impl Cx<'_> {
    /// A body limit in bytes: default 1 MiB, at most 64 MiB.
    pub(super) fn max_body(&mut self, n: &Option<config::Spanned<i64>>) -> usize {
        const DEFAULT: usize = 1024 * 1024;
        match n {
            None => DEFAULT,
            Some(n) if (1..=64 * 1024 * 1024).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.d
                    .error(n.span(), "max_body must be between 1 and 67108864 bytes");
                DEFAULT
            }
        }
    }

    pub(super) fn header_name(&mut self, s: Option<&Str>, default: &'static str) -> HeaderName {
        match s {
            None => HeaderName::from_static(default),
            Some(s) => HeaderName::from_bytes(s.get_ref().as_bytes()).unwrap_or_else(|_| {
                self.d.error(s.span(), "not a valid header name");
                HeaderName::from_static(default)
            }),
        }
    }

    pub(super) fn access(&mut self, s: &Str) -> Option<Access> {
        match s.get_ref().as_str() {
            "public" => Some(Access::Public),
            "authenticated" => Some(Access::Authenticated),
            "deny" => Some(Access::Deny),
            other => {
                self.d.error(
                    s.span(),
                    format!("unknown access {other:?} (expected public, authenticated or deny)"),
                );
                None
            }
        }
    }

    pub(super) fn tier_ref(&mut self, name: &Str, tiers: &HashMap<String, TierIdx>) -> TierIdx {
        match tiers.get(name.get_ref()) {
            Some(idx) => *idx,
            None => {
                let mut known: Vec<&str> = tiers.keys().map(String::as_str).collect();
                known.sort_unstable();
                self.d.error(
                    name.span(),
                    format!(
                        "unknown tier {:?} (defined: {})",
                        name.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                0
            }
        }
    }

    pub(super) fn permissions(&mut self, names: &[Str]) -> Permissions {
        for p in names {
            self.permission_name(p);
        }
        Permissions::new(names.iter().map(|p| p.get_ref().as_str().into()).collect())
    }

    pub(super) fn permission_name(&mut self, p: &Str) {
        let name = p.get_ref();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            self.d.error(
                p.span(),
                format!("permission {name:?} must be printable ASCII without spaces or commas"),
            );
        }
    }

    pub(super) fn password_hash(&mut self, hash: &Str) {
        match argon2::PasswordHash::new(hash.get_ref()) {
            Ok(parsed) if parsed.algorithm.as_str() == "argon2id" => {}
            Ok(parsed) => self.d.error(
                hash.span(),
                format!(
                    "password_hash uses {}; keygate accepts argon2id (`keygate hash-password` makes one)",
                    parsed.algorithm
                ),
            ),
            Err(e) => self.d.error(
                hash.span(),
                format!("password_hash is not a PHC string ({e}); `keygate hash-password` makes one"),
            ),
        }
    }

    /// An optional whole number within `lo..=hi`, `default` when absent.
    pub(super) fn within(
        &mut self,
        n: Option<&config::Spanned<i64>>,
        lo: u32,
        hi: u32,
        default: u32,
        what: &str,
    ) -> u32 {
        let Some(n) = n else { return default };
        match u32::try_from(*n.get_ref()) {
            Ok(v) if (lo..=hi).contains(&v) => v,
            _ => {
                self.d
                    .error(n.span(), format!("{what} must be between {lo} and {hi}"));
                default
            }
        }
    }

    pub(super) fn count(&mut self, n: &config::Spanned<i64>, what: &str) -> NonZeroU32 {
        u32::try_from(*n.get_ref())
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or_else(|| {
                self.d.error(
                    n.span(),
                    format!("{what} must be between 1 and {}", u32::MAX),
                );
                NonZeroU32::MIN
            })
    }

    pub(super) fn socket_addr(&mut self, s: Option<&Str>, default: &str) -> Option<SocketAddr> {
        let Some(s) = s else {
            return default.parse().ok();
        };
        match s.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.d.error(
                    s.span(),
                    format!(
                        "{:?} is not an address:port like 127.0.0.1:8080",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn duration_or(&mut self, s: Option<&Str>, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.d
                    .error(s.span(), "a duration must be longer than zero");
                default
            }
            Err(e) => {
                self.d.error(
                    s.span(),
                    format!(
                        "{:?} is not a duration like \"90s\", \"15m\", \"24h\" or \"30d\": {e}",
                        s.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn timestamp(&mut self, s: &Str) -> Option<u64> {
        match humantime::parse_rfc3339_weak(s.get_ref()) {
            Ok(t) => Some(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
            Err(e) => {
                self.d.error(
                    s.span(),
                    format!(
                        "{:?} is not an RFC 3339 time like 2024-06-01T00:00:00Z: {e}",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn ip_set(&mut self, list: &[Str]) -> IpSet {
        let nets = list
            .iter()
            .filter_map(|s| {
                let text = s.get_ref().trim();
                let net = text
                    .parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
                match net {
                    Ok(net) => Some(net),
                    Err(_) => {
                        self.d.error(
                            s.span(),
                            format!("{text:?} is not an address or CIDR like 10.0.0.0/8"),
                        );
                        None
                    }
                }
            })
            .collect();
        IpSet::new(nets)
    }

    /// Exactly one of `*_env`, `*_file` or an inline value; inline warns.
    pub(super) fn secret(
        &mut self,
        owner: std::ops::Range<usize>,
        env: &Option<Str>,
        file: &Option<Str>,
        inline: &Option<Str>,
        what: &str,
    ) -> Option<Vec<u8>> {
        let given: Vec<&Str> = [env, file, inline].into_iter().flatten().collect();
        if given.len() > 1 {
            self.d.error(
                given[1].span(),
                format!("{what} takes one of secret_env, secret_file or secret, not several"),
            );
            return None;
        }
        if let Some(name) = env {
            return match self.secrets.env(name.get_ref()) {
                Ok(v) if !v.is_empty() => Some(v.into_bytes()),
                Ok(_) => {
                    self.d.error(
                        name.span(),
                        format!("environment variable {} is empty", name.get_ref()),
                    );
                    None
                }
                Err(e) => {
                    self.d.error(name.span(), e);
                    None
                }
            };
        }
        if let Some(path) = file {
            return self.read_file(path).map(without_line_end);
        }
        if let Some(value) = inline {
            self.d.warn(
                value.span(),
                "inline secret: anyone who can read this file can forge tokens; prefer secret_env or secret_file",
            );
            return Some(value.get_ref().as_bytes().to_vec());
        }
        self.d.error(
            owner,
            format!("{what} needs secret_env, secret_file or secret"),
        );
        None
    }

    pub(super) fn read_file(&mut self, path: &Str) -> Option<Vec<u8>> {
        match self.secrets.file(Path::new(path.get_ref())) {
            Ok(v) => Some(v),
            Err(e) => {
                self.d.error(path.span(), e);
                None
            }
        }
    }
}

/// A trailing newline from `echo secret > file` is not part of the secret.
pub(super) fn without_line_end(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        v.pop();
    }
    v
}

pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(super) fn decode_sha256(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out).ok()?;
    Some(out)
}
