//! `[state]` as compiled: the embedded store or a Redis deployment, its
//! secrets, and the redaction that keeps passwords in a url out of logs.

use std::time::Duration;

use super::topology::Topology;

/// `[state] backend`.
#[derive(Clone, PartialEq, Eq)]
pub enum StateBackend {
    /// redb in `server.state_dir`; one instance.
    Embedded,
    Redis(Box<RedisSettings>),
}

/// A Redis deployment shared by every sidecar of a fleet.
#[derive(Clone)]
pub struct RedisSettings {
    /// `url` with any password in it replaced by `***`: for logs and Debug.
    pub display_url: String,
    /// As written (see [`super::topology`] for the forms).
    pub url: String,
    pub password: Option<String>,
    /// `url` and `password`, parsed.
    pub topology: Topology,
    /// `tls_ca_file`: the CA that signs the servers' certificates (PEM),
    /// instead of the system's roots.
    pub tls_ca: Option<Vec<u8>>,
    pub key_prefix: Box<str>,
    /// The whole of one call, reconnection included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// One call of the token endpoints (login, refresh, revoke) and of
    /// `/readyz`: longer than `timeout`, because a rotation that Redis
    /// applied but answered late would, when the client retries, look like
    /// the reuse of a spent token and revoke the family.
    pub token_timeout: Duration,
    pub on_error_limits: OnError,
    /// `record_key`: HMAC-SHA256 key of refresh-family records (see
    /// `state::families`).
    pub record_key: Box<[u8]>,
    /// `previous_record_key`: records it signed still verify (a rotation).
    pub previous_record_key: Option<Box<[u8]>>,
    /// `accept_unsigned_records`: records without a MAC (written before
    /// keygate signed them) are accepted, and signed at their next rotation.
    pub accept_unsigned_records: bool,
    /// How to reach the Sentinels themselves (`redis+sentinel://` urls).
    pub sentinel: SentinelAccess,
    /// With `on_error_limits = "local"`, each sidecar's fallback limiter
    /// grants quota / fleet_size (at least 1), so the fleet as a whole stays
    /// near the tier's limit while Redis is away.
    pub fleet_size: std::num::NonZeroU32,
}

impl PartialEq for RedisSettings {
    /// `topology` is derived from `url` and `password`.
    fn eq(&self, o: &Self) -> bool {
        (&self.url, &self.password, &self.tls_ca, &self.key_prefix)
            == (&o.url, &o.password, &o.tls_ca, &o.key_prefix)
            && self.token_timeout == o.token_timeout
            && self.record_key == o.record_key
            && self.previous_record_key == o.previous_record_key
            && self.accept_unsigned_records == o.accept_unsigned_records
            && self.sentinel == o.sentinel
            && (
                self.timeout,
                self.connect_timeout,
                self.on_error_limits,
                self.fleet_size,
            ) == (
                o.timeout,
                o.connect_timeout,
                o.on_error_limits,
                o.fleet_size,
            )
    }
}

impl Eq for RedisSettings {}

/// The Sentinels' own credentials and TLS (they are servers of their own,
/// with `requirepass`/ACLs and `tls-port` of their own).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SentinelAccess {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
}

impl std::fmt::Debug for StateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateBackend::Embedded => f.write_str("Embedded"),
            StateBackend::Redis(r) => f
                .debug_struct("Redis")
                .field("url", &r.display_url)
                .field("password", &r.password.as_ref().map(|_| "<redacted>"))
                .field("key_prefix", &r.key_prefix)
                .field("timeout", &r.timeout)
                .field("on_error_limits", &r.on_error_limits)
                .finish(),
        }
    }
}

/// `url` without the password it may hold (`redis://user:secret@host`
/// becomes `redis://user:***@host`, `redis+unix:///s?pass=secret` becomes
/// `redis+unix:///s?pass=***`), so that it can be logged.
pub fn redact_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(url);
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _)) if is_password_key(k) => {
                    out.push_str(k);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

/// `pass` or `password`, in any case and however percent-encoded (the
/// url parser decodes query keys before it reads them).
fn is_password_key(key: &str) -> bool {
    let mut decoded = Vec::with_capacity(key.len());
    let bytes = key.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                decoded.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                decoded.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    decoded.eq_ignore_ascii_case(b"pass") || decoded.eq_ignore_ascii_case(b"password")
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    let shown = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        "***".to_string()
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_in_urls_are_never_shown() {
        assert_eq!(
            redact_url("redis://u:s3cret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://:s3cret@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://s3cret@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(
            redact_url("redis+unix:///run/r.sock"),
            "redis+unix:///run/r.sock"
        );
        assert_eq!(
            redact_url("redis+unix:///run/r.sock?db=2&pass=s3cret&user=kg"),
            "redis+unix:///run/r.sock?db=2&pass=***&user=kg"
        );
        assert_eq!(
            redact_url("unix:///r.sock?PASSWORD=s3cret"),
            "unix:///r.sock?PASSWORD=***"
        );
        assert_eq!(
            redact_url("unix:///r.sock?p%61ss=s3cret"),
            "unix:///r.sock?p%61ss=***"
        );
    }
}

/// What a rate-limit decision does when Redis cannot be asked in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// This process's own GCRA (each sidecar then limits on its own).
    Local,
    /// Let the request through.
    Open,
    /// Refuse it: 503 `state_unavailable`.
    Closed,
}
