//! The TOML file as written by operators: serde structs that mirror it field
//! for field, plus how the file is read (includes, secret sources,
//! diagnostics). Every value that needs checking (durations,
//! CIDRs, names that refer to other entries) is kept as a [`Spanned`] string
//! so that `policy::compile` can report all problems at once, each with its
//! line and column. Nothing outside `policy` ever reads these structs.

mod bulk;
mod diagnostics;
pub mod include;
mod secret;

use std::collections::BTreeMap;

use serde::Deserialize;
pub use toml::Spanned;

pub use diagnostics::{ConfigError, Diagnostics, Severity};
pub use include::Sources;
pub use secret::{EnvAndFiles, Fixed, Placeholders, Recording, SecretSource};

/// A string value together with where it stands in the file.
pub type Str = Spanned<String>;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Files holding more `[[users]]`, `[[api_keys]]`, `[[client_certs]]` and `[[routes]]`
    /// (see [`mod@include`]); already joined in by the time this is parsed.
    pub include: Option<Vec<Str>>,
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub log: Log,
    pub upstream: Upstream,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub tiers: BTreeMap<String, Spanned<Tier>>,
    #[serde(default)]
    pub users: Vec<Spanned<User>>,
    #[serde(default)]
    pub api_keys: Vec<Spanned<ApiKey>>,
    /// Client certificates (mTLS) bound to a principal, like API keys.
    #[serde(default)]
    pub client_certs: Vec<Spanned<ClientCert>>,
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
    #[serde(default)]
    pub webhooks: Vec<Spanned<Webhook>>,
    pub webhook_relay: Option<WebhookRelay>,
    #[serde(default)]
    pub state: State,
}

/// `[state]`: where shared state lives (embedded redb, or Redis for a fleet).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub backend: Option<Str>,
    pub url: Option<Str>,
    pub password_env: Option<Str>,
    pub password_file: Option<Str>,
    pub password: Option<Str>,
    pub key_prefix: Option<Str>,
    pub timeout: Option<Str>,
    pub connect_timeout: Option<Str>,
    pub on_error_limits: Option<Str>,
    pub fleet_size: Option<Spanned<i64>>,
    pub token_timeout: Option<Str>,
    pub tls_ca_file: Option<Str>,
    /// The HMAC key that authenticates refresh-family records in Redis.
    pub record_key_env: Option<Str>,
    pub record_key_file: Option<Str>,
    pub record_key: Option<Str>,
    /// The key before the last rotation: records it signed still verify.
    pub previous_record_key_env: Option<Str>,
    pub previous_record_key_file: Option<Str>,
    /// Accept family records written before keygate signed them (an
    /// upgrade); they are signed at their next rotation.
    pub accept_unsigned_records: Option<Spanned<bool>>,
    /// The Sentinels' own credentials (`redis+sentinel://` urls).
    pub sentinel_username: Option<Str>,
    pub sentinel_password_env: Option<Str>,
    pub sentinel_password_file: Option<Str>,
    pub sentinel_password: Option<Str>,
    /// TLS to the Sentinels (default: as to the master, by the url's scheme).
    pub sentinel_tls: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRelay {
    pub listen: Str,
    pub max_body: Option<Spanned<i64>>,
    pub timeout: Option<Str>,
    #[serde(default)]
    pub subscribers: Vec<Spanned<Subscriber>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscriber {
    pub id: Str,
    pub url_prefix: Str,
    pub secret_env: Option<Str>,
    pub secret_file: Option<Str>,
    pub secret: Option<Str>,
    pub header: Option<Str>,
    pub timestamp_header: Option<Str>,
}

/// One name or several (`secret_env = "A"` or `secret_env = ["A", "B"]`).
/// Untagged enums lose toml's spans, so problems with these names are
/// reported at the entry that holds them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn names(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub path: Str,
    pub secret_env: Option<OneOrMany>,
    #[serde(default)]
    pub secrets_env: Vec<Str>,
    pub secret_file: Option<OneOrMany>,
    pub secret: Option<Str>,
    pub header: Option<Str>,
    pub max_body: Option<Spanned<i64>>,
    pub timestamp_header: Option<Str>,
    pub tolerance: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Option<Str>,
    pub admin_listen: Option<Str>,
    pub threads: Option<Spanned<i64>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Str>,
    #[serde(default)]
    pub ip_allow: Vec<Str>,
    pub state_dir: Option<Str>,
    pub grace_period: Option<Str>,
    /// `Upgrade` protocols forwarded (default `["websocket"]`).
    pub upgrades: Option<Vec<Str>>,
    /// `drop` (default) or `refuse` requests with `_` in a header name.
    pub underscore_headers: Option<Str>,
    /// A bearer token `POST /reload` must carry.
    pub admin_token_env: Option<Str>,
    pub admin_token_file: Option<Str>,
    /// TLS on `listen`; absent = plain TCP.
    pub tls: Option<Spanned<Tls>>,
    /// Per-address limits key an IPv6 client by this prefix (bits).
    pub ipv6_prefix: Option<Spanned<i64>>,
    /// Client connections open at once, all proxy threads together.
    pub max_connections: Option<Spanned<i64>>,
    /// Client connections open at once from one address (0 = no cap).
    pub max_connections_per_client: Option<Spanned<i64>>,
}

/// `[server.tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The default certificate chain (PEM, leaf first) and its key.
    pub cert_file: Option<Str>,
    pub key_file: Option<Str>,
    /// More certificates, chosen by SNI.
    #[serde(default)]
    pub certs: Vec<TlsCert>,
    /// `"1.2"` (default) or `"1.3"`.
    pub min_version: Option<Str>,
    pub alpn: Option<Vec<Str>>,
    pub session_resumption: Option<Spanned<bool>>,
    pub handshake_timeout: Option<Str>,
    /// CA certificates (PEM) that sign client certificates.
    pub client_ca_file: Option<Str>,
    /// `optional` or `required` (default when `client_ca_file` is set: `optional`).
    pub client_auth: Option<Str>,
    /// A plain-HTTP listener answering `308` to the `https://` URL.
    pub redirect_listen: Option<Str>,
    /// `Strict-Transport-Security`: its max-age (`0` or absent = not sent).
    pub hsts_max_age: Option<Str>,
    #[serde(default)]
    pub hsts_include_subdomains: bool,
    /// `[server.tls.http2]`: limits of one HTTP/2 connection.
    pub http2: Option<Spanned<Http2>>,
}

/// `[server.tls.http2]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2 {
    pub max_concurrent_streams: Option<Spanned<i64>>,
    /// Bytes.
    pub max_header_list_size: Option<Spanned<i64>>,
    pub idle_timeout: Option<Str>,
    /// Within 10 s.
    pub max_client_resets: Option<Spanned<i64>>,
}

/// `[[server.tls.certs]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCert {
    /// The names it is chosen for (`*.example.com` allowed); absent = the
    /// DNS names of its subjectAltName.
    pub sni: Option<Spanned<SniNames>>,
    pub cert_file: Str,
    pub key_file: Str,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SniNames {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub access: Option<Str>,
    pub level: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub url: Str,
    pub connect_timeout: Option<Str>,
    pub read_timeout: Option<Str>,
    #[serde(default)]
    pub forward_credentials: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub issuer: Option<Str>,
    pub audience: Option<Str>,
    pub token_ttl: Option<Str>,
    pub refresh_ttl: Option<Str>,
    pub leeway: Option<Str>,
    pub token_path: Option<Str>,
    pub refresh_path: Option<Str>,
    pub revoke_path: Option<Str>,
    pub default_access: Option<Str>,
    pub api_key_header: Option<Str>,
    pub login_attempts_per_ip: Option<Spanned<i64>>,
    pub login_attempts_per_email: Option<Spanned<i64>>,
    pub login_throttle_period: Option<Str>,
    #[serde(default)]
    pub keys: Vec<Spanned<JwtKey>>,
    pub self_service: Option<Spanned<SelfService>>,
}

/// `[auth.self_service]`: customers' own API keys and account allowlist.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfService {
    #[serde(default)]
    pub enabled: bool,
    pub path: Option<Str>,
    pub account_path: Option<Str>,
    pub key_prefix: Option<Str>,
    pub max_keys_per_user: Option<Spanned<i64>>,
    pub default_grace: Option<Str>,
    pub max_grace: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    pub kid: Str,
    pub algorithm: Str,
    pub secret_env: Option<Str>,
    pub secret_file: Option<Str>,
    pub secret: Option<Str>,
    pub private_key_file: Option<Str>,
    pub public_key_file: Option<Str>,
    #[serde(default)]
    pub sign: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub limit: Option<Spanned<i64>>,
    pub period: Option<Str>,
    pub burst: Option<Spanned<i64>>,
    #[serde(default)]
    pub unlimited: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub email: Str,
    pub id: Option<Str>,
    pub password_hash: Option<Str>,
    pub tier: Str,
    #[serde(default)]
    pub permissions: Vec<Str>,
    #[serde(default)]
    pub ip_allow: Vec<Str>,
    #[serde(default)]
    pub disabled: bool,
    pub tokens_valid_after: Option<Str>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub id: Str,
    pub sha256: Str,
    pub user: Option<Str>,
    pub tier: Option<Str>,
    pub permissions: Option<Vec<Str>>,
    #[serde(default)]
    pub ip_allow: Vec<Str>,
    pub expires_at: Option<Str>,
    #[serde(default)]
    pub disabled: bool,
}

/// `[[client_certs]]`: a principal proven by a client certificate (one
/// of `sha256`, `subject`, `san`), with an API key's other fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCert {
    pub id: Str,
    /// The certificate's SHA-256 fingerprint (hex, colons allowed).
    pub sha256: Option<Str>,
    /// Its subject, e.g. `CN=billing,O=Example` (attribute order and
    /// spaces do not matter).
    pub subject: Option<Str>,
    /// One of its subjectAltName DNS names or URIs (e.g. a SPIFFE id).
    pub san: Option<Str>,
    pub user: Option<Str>,
    pub tier: Option<Str>,
    pub permissions: Option<Vec<Str>>,
    #[serde(default)]
    pub ip_allow: Vec<Str>,
    pub expires_at: Option<Str>,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: Str,
    pub methods: Option<Vec<Str>>,
    pub access: Option<Str>,
    #[serde(default)]
    pub permissions: Vec<Str>,
    pub rate_tier: Option<Str>,
}

/// Parse the text of a configuration file into its serde form. Syntax and type
/// errors stop here (TOML has no way to go on after one); everything that is
/// a matter of meaning is checked later, all at once, by `policy::compile`.
pub fn parse(src: &str) -> Result<File, diagnostics::Located> {
    bulk::parse(src)
}

/// One `toml::from_str` of the whole text.
fn parse_whole(src: &str) -> Result<File, diagnostics::Located> {
    toml::from_str(src).map_err(|e| diagnostics::Located {
        span: e.span(),
        message: e.message().to_string(),
    })
}
