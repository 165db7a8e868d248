//! The compiled policy: everything a request needs, validated and indexed
//! once, with no serde types and nothing left to parse on the hot path.
//! [`compile()`] is the one conversion from `config::File`; [`PolicyStore`] is
//! the one `ArcSwap` through which requests see the current policy.

mod client_cert;
mod compile;
mod ip;
pub mod router;
mod state_backend;
mod store;
/// The shared test policy; compiled in so the integration tests and the
/// benches use the unit tests' fixture.
#[doc(hidden)]
pub mod testing;
mod token_cache;
pub mod topology;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use crate::limit::{AccountId, Quota};

pub use client_cert::{normalize_subject, ClientCertIndex};
pub use compile::{
    compile, compile_file, compile_file_with, hash_prefix, Compiled, DEFAULT_MAX_CONNECTIONS,
};
pub use ip::{Allowlist, IpSet};
pub use router::{RouteIdx, Router};
pub use state_backend::{redact_url, OnError, RedisSettings, SentinelAccess, StateBackend};
pub use store::{PolicyStore, ReloadOutcome};
pub use token_cache::{TokenCache, VerifiedToken};

pub type UserIdx = u32;
pub type KeyIdx = u32;
pub type TierIdx = u32;

#[derive(Debug)]
pub struct Policy {
    /// The file it came from, for messages.
    pub source: String,
    pub server: Server,
    pub log: Log,
    pub upstream: Upstream,
    pub auth: Auth,
    pub jwt_keys: JwtKeys,
    pub tiers: Vec<Tier>,
    pub users: Vec<User>,
    pub api_keys: Vec<ApiKey>,
    pub routes: Vec<Route>,
    pub router: Router,
    /// `GET /.well-known/jwks.json`: the public keys of asymmetric keys.
    pub jwks: String,
    /// Paths authenticated by signature instead of a credential.
    pub webhooks: Vec<Webhook>,
    /// The outbound signing relay, when configured.
    pub relay: Option<Relay>,
    /// Where limiter state lives: this process, or Redis for a fleet.
    pub state: StateBackend,
    /// JWTs this policy has already verified (see `gate::jwt`). It belongs
    /// to the policy, so a reload starts with an empty one.
    pub verified_tokens: TokenCache,
    users_by_id: HashMap<Box<str>, UserIdx>,
    users_by_email: HashMap<Box<str>, UserIdx>,
    /// First eight bytes of each key's SHA-256; the whole hash is then
    /// compared in constant time (see `gate::credential`).
    api_keys_by_hash_prefix: HashMap<u64, KeyIdx>,
    /// `[[client_certs]]`, which live in `api_keys` (same tier, permissions,
    /// `ip_allow` and account rules) but are found by certificate.
    client_certs: ClientCertIndex,
}

impl Policy {
    pub fn user_by_id(&self, id: &str) -> Option<(UserIdx, &User)> {
        let idx = *self.users_by_id.get(id)?;
        Some((idx, &self.users[idx as usize]))
    }

    /// Emails are matched without regard to ASCII case.
    pub fn user_by_email(&self, email: &str) -> Option<(UserIdx, &User)> {
        let idx = match self.users_by_email.get(email) {
            Some(idx) => *idx,
            None => *self
                .users_by_email
                .get(email.to_ascii_lowercase().as_str())?,
        };
        Some((idx, &self.users[idx as usize]))
    }

    /// The key whose SHA-256 starts with `prefix` (the caller checks the rest).
    pub fn api_key_by_hash_prefix(&self, prefix: u64) -> Option<(KeyIdx, &ApiKey)> {
        let idx = *self.api_keys_by_hash_prefix.get(&prefix)?;
        Some((idx, &self.api_keys[idx as usize]))
    }

    /// The `[[webhooks]]` entry for exactly this path.
    pub fn webhook(&self, path: &str) -> Option<&Webhook> {
        self.webhooks.iter().find(|w| &*w.path == path)
    }

    pub fn user(&self, idx: UserIdx) -> &User {
        &self.users[idx as usize]
    }

    pub fn api_key(&self, idx: KeyIdx) -> &ApiKey {
        &self.api_keys[idx as usize]
    }

    pub fn tier(&self, idx: TierIdx) -> &Tier {
        &self.tiers[idx as usize]
    }

    pub fn route(&self, idx: RouteIdx) -> &Route {
        &self.routes[idx as usize]
    }

    pub fn counts(&self) -> Counts {
        let certs = self.client_certs.by_sha256.len()
            + self.client_certs.by_subject.len()
            + self.client_certs.by_san.len();
        Counts {
            users: self.users.len(),
            api_keys: self.api_keys.len() - certs,
            client_certs: certs,
            routes: self.routes.len(),
            tiers: self.tiers.len(),
            jwt_keys: self.jwt_keys.keys.len(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub users: usize,
    pub api_keys: usize,
    pub client_certs: usize,
    pub routes: usize,
    pub tiers: usize,
    pub jwt_keys: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} users, {} api keys, {} routes, {} tiers, {} jwt keys",
            self.users, self.api_keys, self.routes, self.tiers, self.jwt_keys
        )?;
        if self.client_certs > 0 {
            write!(f, ", {} client certs", self.client_certs)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub trusted_proxies: IpSet,
    pub ip_allow: Allowlist,
    pub state_dir: PathBuf,
    pub grace_period: Duration,
    /// `Upgrade` protocols forwarded, lower case; never `h2c`.
    pub upgrades: Vec<Box<str>>,
    pub underscore_headers: Underscores,
    /// The bearer token `POST /reload` needs, when one is configured.
    pub admin_token: Option<Vec<u8>>,
    /// `[server.tls]`: TLS on `listen`.
    pub tls: Option<std::sync::Arc<crate::tls::TlsPolicy>>,
    /// Per-address limits (login throttles, public-route tiers, the
    /// connection cap) key an IPv6 client by this many leading bits: one
    /// host usually holds a whole /64.
    pub ipv6_prefix: u8,
    /// Client connections open at once, all proxy threads together.
    pub max_connections: usize,
    /// Client connections open at once from one address (by
    /// [`address_bucket`]); 0 = no cap.
    pub max_connections_per_client: usize,
}

/// The address a per-address limit keys `ip` by: IPv4 as it is, IPv6 cut
/// to its first `v6_prefix` bits (an IPv4-mapped IPv6 address counts as
/// the IPv4 address).
pub fn address_bucket(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if v6_prefix < 128 => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6_prefix))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        other => other,
    }
}

/// What happens to a request with `_` in a header name: CGI-style stacks
/// (PHP, Python WSGI, many Ruby and Perl servers) read `X_Auth_Subject` as
/// `X-Auth-Subject`, so such a header could pose as one keygate sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underscores {
    /// Forward the request without those headers (nginx's default).
    Drop,
    /// Answer 400.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Json,
    Text,
    Off,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub access: AccessLog,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// Where it is: the URL, its address, TLS and SNI, the connect timeout.
    pub endpoint: crate::http1::Endpoint,
    /// `host[:port]` of the URL: the `Host` of requests that came without one.
    pub authority: Box<str>,
    pub read_timeout: Duration,
    pub forward_credentials: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Authenticated,
    Deny,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Authenticated => "authenticated",
            Access::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub issuer: String,
    pub audience: String,
    pub token_ttl: Duration,
    pub refresh_ttl: Duration,
    pub leeway: Duration,
    pub token_path: String,
    pub refresh_path: String,
    pub revoke_path: String,
    pub default_access: Access,
    pub api_key_header: HeaderName,
    /// Failed logins allowed per client address, and per email.
    pub login_per_ip: Quota,
    pub login_per_email: Quota,
    /// `[auth.self_service]` when enabled.
    pub self_service: Option<SelfService>,
}

/// Customers' own API keys and account allowlist (`[auth.self_service]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfService {
    /// The key collection: `{path}`, `{path}/{id}`, `{path}/{id}/roll`.
    pub path: Box<str>,
    pub account_path: Box<str>,
    /// Every self-service key starts with it.
    pub key_prefix: Box<str>,
    pub max_keys_per_user: u32,
    pub default_grace: Duration,
    pub max_grace: Duration,
}

pub struct JwtKey {
    pub kid: Box<str>,
    pub algorithm: Algorithm,
    pub decoding: DecodingKey,
    /// Present on the signing key.
    pub encoding: Option<EncodingKey>,
    /// For HMAC keys, the MAC state with the key already absorbed.
    pub mac: Option<Mac>,
}

/// An HMAC whose key has been absorbed (RFC 2104's inner and outer pads):
/// each token clones it instead of hashing the key twice again.
#[derive(Clone)]
pub enum Mac {
    Hs256(hmac::Hmac<sha2::Sha256>),
    Hs384(hmac::Hmac<sha2::Sha384>),
    Hs512(hmac::Hmac<sha2::Sha512>),
}

impl Mac {
    pub fn new(algorithm: Algorithm, secret: &[u8]) -> Option<Mac> {
        use hmac::Mac as _;
        Some(match algorithm {
            Algorithm::HS256 => Mac::Hs256(hmac::Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS384 => Mac::Hs384(hmac::Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS512 => Mac::Hs512(hmac::Hmac::new_from_slice(secret).ok()?),
            _ => return None,
        })
    }

    /// Whether `signature` is this key's MAC of `message`, compared in
    /// constant time.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        use hmac::Mac as _;
        match self.clone() {
            Mac::Hs256(mut m) => {
                m.update(message);
                m.verify_slice(signature).is_ok()
            }
            Mac::Hs384(mut m) => {
                m.update(message);
                m.verify_slice(signature).is_ok()
            }
            Mac::Hs512(mut m) => {
                m.update(message);
                m.verify_slice(signature).is_ok()
            }
        }
    }
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("signs", &self.encoding.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct JwtKeys {
    pub keys: Vec<JwtKey>,
    /// Index of the key with `sign = true`.
    pub signer: usize,
}

impl JwtKeys {
    /// The key a token names by `kid`; a token without `kid` is accepted only
    /// when there is exactly one key.
    pub fn for_kid(&self, kid: Option<&str>) -> Option<&JwtKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| &*k.kid == kid),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }

    pub fn signer(&self) -> &JwtKey {
        &self.keys[self.signer]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Limited(Quota),
    Unlimited,
}

#[derive(Debug, Clone)]
pub struct Tier {
    pub name: Box<str>,
    pub rate: Rate,
    /// `X-Auth-Tier`.
    pub header: HeaderValue,
    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers), for limited tiers.
    pub policy_header: Option<HeaderValue>,
}

/// A sorted set of permission names, with its header form rendered once.
/// Cloning shares it: a million keys of one owner hold one set.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    names: std::sync::Arc<[Box<str>]>,
    header: Option<HeaderValue>,
}

impl Permissions {
    pub fn new(mut names: Vec<Box<str>>) -> Permissions {
        names.sort();
        names.dedup();
        let joined = names.join(",");
        Permissions {
            header: HeaderValue::from_str(&joined).ok(),
            names: names.into(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names
            .binary_search_by(|n| n.as_ref().cmp(name))
            .is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| n.as_ref())
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The comma-separated form sent upstream as `X-Auth-Permissions`.
    pub fn header(&self) -> &HeaderValue {
        static EMPTY: HeaderValue = HeaderValue::from_static("");
        self.header.as_ref().unwrap_or(&EMPTY)
    }

    pub fn intersect(&self, other: &Permissions) -> Permissions {
        Permissions::new(
            self.iter()
                .filter(|p| other.contains(p))
                .map(Into::into)
                .collect(),
        )
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: Box<str>,
    pub email: Box<str>,
    pub password_hash: Option<Box<str>>,
    pub tier: TierIdx,
    pub permissions: Permissions,
    pub ip_allow: Allowlist,
    pub disabled: bool,
    /// Unix seconds; tokens with an earlier `iat` are refused.
    pub tokens_valid_after: Option<u64>,
    /// The limiter account of the user and every key it owns.
    pub account: AccountId,
    pub id_header: HeaderValue,
    pub email_header: HeaderValue,
}

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Box<str>,
    pub sha256: [u8; 32],
    pub owner: Option<UserIdx>,
    /// The owner's tier for an owned key.
    pub tier: TierIdx,
    /// Effective: for an owned key, never more than the owner's.
    pub permissions: Permissions,
    pub ip_allow: Allowlist,
    /// Unix seconds.
    pub expires_at: Option<u64>,
    pub disabled: bool,
    /// The owner's account for an owned key, else the key's own.
    pub account: AccountId,
    pub id_header: HeaderValue,
}

/// An inbound webhook path: the body must carry a valid signature.
pub struct Webhook {
    pub path: Box<str>,
    /// Every secret that may have signed (several during rotation).
    pub secrets: Vec<Vec<u8>>,
    pub header: HeaderName,
    pub max_body: usize,
    /// `timestamp_header` and its tolerance, when replay protection is on.
    pub timestamp: Option<(HeaderName, Duration)>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("path", &self.path)
            .field("secrets", &self.secrets.len())
            .field("header", &self.header)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

/// The signing relay for webhooks the upstream sends to its customers.
#[derive(Debug)]
pub struct Relay {
    pub listen: SocketAddr,
    pub max_body: usize,
    pub timeout: Duration,
    pub subscribers: Vec<Subscriber>,
}

impl Relay {
    pub fn subscriber(&self, id: &str) -> Option<&Subscriber> {
        self.subscribers.iter().find(|s| &*s.id == id)
    }
}

pub struct Subscriber {
    pub id: Box<str>,
    /// Destinations must have this scheme, host and port, and a path under it.
    pub prefix: Destination,
    pub secret: Vec<u8>,
    pub header: HeaderName,
    pub timestamp_header: Option<HeaderName>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// An absolute http(s) URL, taken apart for comparison and connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub tls: bool,
    /// Lower-cased.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Destination {
    /// Parse an absolute URL; user info, fragments and other schemes are refused.
    pub fn parse(url: &str) -> Option<Destination> {
        let uri: http::Uri = url.parse().ok()?;
        let tls = match uri.scheme_str()? {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let authority = uri.authority()?;
        if authority.as_str().contains('@') || url.contains('#') {
            return None;
        }
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let path = if path.is_empty() { "/" } else { path };
        Some(Destination {
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }

    /// Same scheme, host and port, and a path under this prefix's path.
    /// Dot segments are refused so `/hooks/../admin` cannot climb out.
    pub fn allows(&self, dest: &Destination) -> bool {
        self.tls == dest.tls
            && self.host == dest.host
            && self.port == dest.port
            && dest.path.starts_with(&self.path)
            && !dest
                .path
                .split(['/', '?'])
                .any(|seg| seg == ".." || seg == ".")
            && !dest.path.to_ascii_lowercase().contains("%2e")
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: Box<str>,
    pub methods: Option<Vec<Method>>,
    pub access: Access,
    pub permissions: Box<[Box<str>]>,
    /// On a public route: a tier applied per client address.
    pub rate_tier: Option<TierIdx>,
}
