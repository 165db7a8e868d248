//! `config::File` → [`Policy`], the one conversion. Every check runs and every
//! problem is collected, so an operator sees all of them in one `check`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use super::router::{RouteError, RouteSpec, Router};
use crate::limit::{AccountId, Quota};
use crate::state::topology::Topology;

use super::{
    Access, AccessLog, Allowlist, ApiKey, Auth, IpSet, JwtKey, JwtKeys, Log, Mac, OnError,
    Permissions, Policy, Rate, RedisSettings, Route, SentinelAccess, Server, StateBackend, Tier,
    TierIdx, Underscores, Upstream, User, UserIdx,
};
use crate::config::{self, ConfigError, Diagnostics, EnvAndFiles, SecretSource, Severity, Str};

/// `server.max_connections` unless set: what the systemd unit's file
/// limit leaves room for, with the upstream connections beside them.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16_384;

/// A policy and the warnings its file produced (inline secrets, say).
#[derive(Debug)]
pub struct Compiled {
    pub policy: Policy,
    pub warnings: Vec<ConfigError>,
}

/// Read `path`, resolve its secrets from the environment and from files next
/// to it, and compile it.
pub fn compile_file(path: &Path) -> Result<Compiled, Vec<ConfigError>> {
    let base = path.parent().map_or_else(PathBuf::new, Path::to_path_buf);
    compile_file_with(path, &EnvAndFiles { base })
}

/// [`compile_file`] with another source of secrets.
pub fn compile_file_with(
    path: &Path,
    secrets: &dyn SecretSource,
) -> Result<Compiled, Vec<ConfigError>> {
    let name = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: name.clone(),
            line: 1,
            column: 1,
            severity: Severity::Error,
            message: format!("cannot read the configuration file: {e}"),
        }]
    })?;
    let sources = config::include::assemble(path, &src)?;
    compile_sources(&sources, secrets)
}

/// Compile the text of a configuration file. Pure but for `secrets` and the
/// name resolution of a non-literal upstream host.
pub fn compile(
    file: &str,
    src: &str,
    secrets: &dyn SecretSource,
) -> Result<Compiled, Vec<ConfigError>> {
    compile_sources(&config::Sources::single(file, src), secrets)
}

/// [`compile`] of a main file joined with its includes.
pub fn compile_sources(
    sources: &config::Sources,
    secrets: &dyn SecretSource,
) -> Result<Compiled, Vec<ConfigError>> {
    let file = sources.main();
    let src = sources.text.as_str();
    let mut cx = Cx {
        d: Diagnostics::default(),
        secrets,
    };
    let parsed = match config::parse(src) {
        Ok(parsed) => parsed,
        Err(located) => {
            cx.d.push_located(Severity::Error, located);
            return Err(cx.d.resolve_sources(sources));
        }
    };
    let policy = cx.policy(file, parsed);
    let has_errors = cx.d.has_errors();
    let diagnostics = cx.d.resolve_sources(sources);
    match policy {
        Some(policy) if !has_errors => Ok(Compiled {
            policy,
            warnings: diagnostics,
        }),
        _ => Err(diagnostics),
    }
}

struct Cx<'a> {
    d: Diagnostics,
    secrets: &'a dyn SecretSource,
}

const DEFAULT_TOKEN_PATH: &str = "/api/v1/auth/token";
const DEFAULT_REFRESH_PATH: &str = "/api/v1/auth/refresh";
const DEFAULT_REVOKE_PATH: &str = "/api/v1/auth/revoke";

impl Cx<'_> {
    fn policy(&mut self, file: &str, f: config::File) -> Option<Policy> {
        let server = self.server(&f.server);
        let log = self.log(&f.log);
        let upstream = self.upstream(&f.upstream);
        let auth = self.auth(&f.auth);
        let jwt_keys = self.jwt_keys(&f.auth.keys);
        let (tiers, tier_index) = self.tiers(&f.tiers);
        let (users, users_by_id, users_by_email) = self.users(&f.users, &tier_index);
        // Client certificates are API keys found another way: one list, so
        // ids are unique across both and the same rules apply.
        let mut entries = f.api_keys.clone();
        entries.extend(f.client_certs.iter().map(as_api_key));
        let (api_keys, api_keys_by_hash_prefix) =
            self.api_keys(&entries, &users, &users_by_id, &users_by_email, &tier_index);
        let client_certs = self.client_certs(&f.client_certs, f.api_keys.len());
        let asks_for_certs = f
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.get_ref().client_ca_file.is_some());
        if let (Some(first), false) = (f.client_certs.first(), asks_for_certs) {
            self.d.warn(
                first.span(),
                "[[client_certs]] need [server.tls] client_ca_file: without it no client certificate is asked for, so none of these entries can match",
            );
        }
        let (routes, router) = self.routes(&f.routes, &tier_index, &tiers);
        let webhooks = self.webhooks(&f.webhooks);
        let relay = f.webhook_relay.as_ref().map(|r| self.relay(r));
        let state = self.state(&f.state);

        let jwks = jwt_keys.as_ref().map(jwks_document).unwrap_or_default();
        // Only needed when some user can log in; then shaped like their hashes.
        let dummy_password_hash = users
            .iter()
            .find_map(|u| u.password_hash.as_deref())
            .map(|like| crate::issue::dummy_hash_like(Some(like)))
            .unwrap_or_default();
        Some(Policy {
            verified_tokens: super::TokenCache::new(super::TokenCache::CAPACITY),
            relay: relay.flatten(),
            state: state?,
            webhooks,
            dummy_password_hash,
            jwks,
            source: file.to_string(),
            server: server?,
            log,
            upstream: upstream?,
            auth,
            jwt_keys: jwt_keys?,
            tiers,
            users,
            api_keys,
            routes,
            router: router?,
            users_by_id,
            users_by_email,
            api_keys_by_hash_prefix,
            client_certs,
        })
    }

    /// The index of `[[client_certs]]`, whose entries follow the API keys
    /// from `first` on.
    fn client_certs(
        &mut self,
        certs: &[config::Spanned<config::ClientCert>],
        first: usize,
    ) -> super::ClientCertIndex {
        let mut index = super::ClientCertIndex::default();
        for (i, entry) in certs.iter().enumerate() {
            let c = entry.get_ref();
            let idx = (first + i) as super::KeyIdx;
            let given: Vec<&Str> = [&c.sha256, &c.subject, &c.san]
                .into_iter()
                .flatten()
                .collect();
            let Some(&how) = given.first() else {
                self.d.error(
                    entry.span(),
                    format!(
                        "client certificate {:?} needs one of sha256, subject or san",
                        c.id.get_ref()
                    ),
                );
                continue;
            };
            if given.len() > 1 {
                self.d.error(
                    given[1].span(),
                    "give one of sha256, subject or san, not several",
                );
                continue;
            }
            let text = how.get_ref();
            let taken = if c.sha256.is_some() {
                let hex: String = text.chars().filter(|&ch| ch != ':').collect();
                match decode_sha256(&hex) {
                    Some(h) => index.by_sha256.insert(h, idx).is_some(),
                    None => {
                        self.d.error(
                            how.span(),
                            "sha256 must be the certificate's SHA-256 fingerprint: 64 hex digits, colons allowed (openssl x509 -noout -fingerprint -sha256)",
                        );
                        continue;
                    }
                }
            } else if c.subject.is_some() {
                match crate::gate::normalize_subject(text) {
                    Some(n) => index.by_subject.insert(n, idx).is_some(),
                    None => {
                        self.d.error(
                            how.span(),
                            "subject must be a distinguished name like \"CN=billing,O=Example\"",
                        );
                        continue;
                    }
                }
            } else {
                // A URI (a SPIFFE id) or a DNS name, matched against the
                // certificate's names of that kind only.
                let san = if text.contains("://") {
                    format!("uri:{text}")
                } else {
                    format!("dns:{}", text.to_ascii_lowercase())
                };
                index.by_san.insert(san, idx).is_some()
            };
            if taken {
                self.d.error(
                    how.span(),
                    "another client certificate entry matches the same certificate",
                );
            }
        }
        index
    }

    // ----- sections -------------------------------------------------------

    fn server(&mut self, s: &config::Server) -> Option<Server> {
        let listen = self.socket_addr(s.listen.as_ref(), "0.0.0.0:8080");
        let admin_listen = self.socket_addr(s.admin_listen.as_ref(), "127.0.0.1:9090");
        let threads = match &s.threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(t) if (1..=1024).contains(t.get_ref()) => *t.get_ref() as usize,
            Some(t) => {
                self.d.error(t.span(), "threads must be between 1 and 1024");
                1
            }
        };
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if l.port() == a.port() && (l.ip() == a.ip() || l.ip().is_unspecified()) {
                let span = s.admin_listen.as_ref().map_or(0..0, |a| a.span());
                self.d.error(span, "admin_listen must differ from listen");
            }
        }
        let admin_token = if s.admin_token_env.is_some() || s.admin_token_file.is_some() {
            let owner = s
                .admin_token_env
                .as_ref()
                .or(s.admin_token_file.as_ref())
                .map_or(0..0, |t| t.span());
            self.secret(
                owner,
                &s.admin_token_env,
                &s.admin_token_file,
                &None,
                "the admin token",
            )
        } else {
            None
        };
        if let Some(a) = admin_listen {
            if !a.ip().is_loopback() && admin_token.is_none() {
                let span = s.admin_listen.as_ref().map_or(0..0, |a| a.span());
                self.d.warn(
                    span,
                    "admin_listen is reachable from other hosts and no admin_token_env or admin_token_file is set: anyone who reaches it can POST /reload",
                );
            }
        }
        let tls = s.tls.as_ref().map(|t| self.tls(t, listen));
        if matches!(tls, Some(None)) {
            return None;
        }
        let ipv6_prefix = self.within(s.ipv6_prefix.as_ref(), 1, 128, 64, "ipv6_prefix") as u8;
        let max_connections = self.within(
            s.max_connections.as_ref(),
            1,
            10_000_000,
            DEFAULT_MAX_CONNECTIONS,
            "max_connections",
        ) as usize;
        let max_connections_per_client = self.within(
            s.max_connections_per_client.as_ref(),
            0,
            10_000_000,
            0,
            "max_connections_per_client",
        ) as usize;
        Some(Server {
            tls: tls.flatten(),
            admin_token,
            ipv6_prefix,
            max_connections,
            max_connections_per_client,
            listen: listen?,
            admin_listen: admin_listen?,
            threads,
            trusted_proxies: self.ip_set(&s.trusted_proxies),
            ip_allow: Allowlist(self.ip_set(&s.ip_allow)),
            state_dir: PathBuf::from(
                s.state_dir
                    .as_ref()
                    .map_or("./keygate-state", |d| d.get_ref().as_str()),
            ),
            grace_period: self.duration_or(s.grace_period.as_ref(), Duration::from_secs(10)),
            upgrades: self.upgrades(s.upgrades.as_deref()),
            underscore_headers: match s.underscore_headers.as_ref() {
                None => Underscores::Drop,
                Some(u) => {
                    match u.get_ref().as_str() {
                        "drop" => Underscores::Drop,
                        "refuse" => Underscores::Refuse,
                        other => {
                            self.d.error(
                            u.span(),
                            format!("unknown underscore_headers {other:?} (expected drop or refuse)"),
                        );
                            Underscores::Drop
                        }
                    }
                }
            },
        })
    }

    fn state(&mut self, s: &config::State) -> Option<StateBackend> {
        let redis = match s.backend.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
            None | Some(("embedded", _)) => false,
            Some(("redis", _)) => true,
            Some((other, span)) => {
                self.d.error(
                    span,
                    format!("unknown state backend {other:?} (expected embedded or redis)"),
                );
                return None;
            }
        };
        if !redis {
            let redis_only = [&s.url, &s.password_env, &s.password_file, &s.password]
                .into_iter()
                .chain([
                    &s.key_prefix,
                    &s.timeout,
                    &s.connect_timeout,
                    &s.on_error_limits,
                    &s.tls_ca_file,
                    &s.token_timeout,
                    &s.record_key_env,
                    &s.record_key_file,
                    &s.record_key,
                    &s.previous_record_key_env,
                    &s.previous_record_key_file,
                    &s.sentinel_username,
                    &s.sentinel_password_env,
                    &s.sentinel_password_file,
                    &s.sentinel_password,
                ])
                .flatten()
                .map(|f| f.span())
                .chain(s.fleet_size.as_ref().map(|f| f.span()))
                .chain(s.sentinel_tls.as_ref().map(|f| f.span()))
                .chain(s.accept_unsigned_records.as_ref().map(|f| f.span()))
                .next();
            if let Some(span) = redis_only {
                self.d
                    .error(span, "this setting is for backend = \"redis\"");
            }
            return Some(StateBackend::Embedded);
        }
        let Some(url) = &s.url else {
            self.d.error(
                s.backend.as_ref().map_or(0..0, |b| b.span()),
                "backend = \"redis\" needs a url (redis://host:port/db)",
            );
            return None;
        };
        let text = url.get_ref();
        // redis-rs reads a `#insecure` fragment as "accept any certificate".
        if text.contains('#') {
            self.d.error(
                url.span(),
                "a Redis url takes no #fragment (#insecure would turn certificate checks off; \
                 give tls_ca_file for a private CA instead)",
            );
            return None;
        }
        // Parsed once here without the password for the warning, and again
        // below with it.
        match Topology::parse(text, None) {
            Ok(t) if t.holds_password() => {
                self.d.warn(
                    url.span(),
                    "the url holds a password (shown as *** in logs and config dump): \
                     prefer password_env or password_file",
                );
            }
            Ok(_) => {}
            Err(why) => {
                self.d
                    .error(url.span(), format!("invalid Redis url: {why}"));
                return None;
            }
        }
        let password = if [&s.password_env, &s.password_file, &s.password]
            .iter()
            .any(|p| p.is_some())
        {
            let owner = url.span();
            let bytes = self.secret(
                owner,
                &s.password_env,
                &s.password_file,
                &s.password,
                "the Redis password",
            )?;
            match String::from_utf8(bytes) {
                Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_string()),
                Err(_) => {
                    self.d.error(url.span(), "the Redis password is not UTF-8");
                    return None;
                }
            }
        } else {
            None
        };
        let key_prefix: Box<str> = match &s.key_prefix {
            None => "keygate".into(),
            Some(p)
                if !p.get_ref().is_empty() && p.get_ref().bytes().all(|b| b.is_ascii_graphic()) =>
            {
                p.get_ref().as_str().into()
            }
            Some(p) => {
                self.d.error(
                    p.span(),
                    "key_prefix must be printable ASCII without spaces",
                );
                "keygate".into()
            }
        };
        let on_error_limits = match s.on_error_limits.as_ref() {
            None => OnError::Local,
            Some(o) => {
                match o.get_ref().as_str() {
                    "local" => OnError::Local,
                    "open" => OnError::Open,
                    "closed" => OnError::Closed,
                    other => {
                        self.d.error(
                        o.span(),
                        format!("unknown on_error_limits {other:?} (expected local, open or closed)"),
                    );
                        OnError::Local
                    }
                }
            }
        };
        let topology = match Topology::parse(text, password.as_deref()) {
            Ok(t) => t,
            Err(why) => {
                self.d
                    .error(url.span(), format!("invalid Redis url: {why}"));
                return None;
            }
        };
        let tls_to_sentinels = s.sentinel_tls.as_ref().is_some_and(|t| *t.get_ref());
        let tls_ca = match &s.tls_ca_file {
            None => None,
            Some(_) if !topology.uses_tls() && !tls_to_sentinels => {
                let span = s.tls_ca_file.as_ref().map_or(0..0, |f| f.span());
                self.d.error(
                    span,
                    "tls_ca_file is for a TLS url (rediss://, rediss+cluster://, rediss+sentinel://) \
                     or sentinel_tls = true",
                );
                None
            }
            Some(f) => match self.read_file(f) {
                Some(pem) if pem.windows(11).any(|w| w == b"-----BEGIN ") => Some(pem),
                Some(_) => {
                    self.d
                        .error(f.span(), "tls_ca_file holds no PEM certificate");
                    None
                }
                None => None,
            },
        };
        let record_key = self.secret(
            s.backend.as_ref().map_or(0..0, |b| b.span()),
            &s.record_key_env,
            &s.record_key_file,
            &s.record_key,
            "[state] record_key (the HMAC key of refresh families in Redis, \
             at least 32 bytes: `openssl rand -hex 32`; record_key_env, record_key_file or record_key)",
        )?;
        if record_key.len() < 32 {
            let span = [&s.record_key_env, &s.record_key_file, &s.record_key]
                .into_iter()
                .flatten()
                .map(|f| f.span())
                .next()
                .unwrap_or(0..0);
            self.d.error(
                span,
                format!(
                    "record_key is {} bytes; it must be at least 32 (`openssl rand -hex 32`)",
                    record_key.len()
                ),
            );
            return None;
        }
        let previous_record_key =
            if s.previous_record_key_env.is_some() || s.previous_record_key_file.is_some() {
                let key = self.secret(
                url.span(),
                &s.previous_record_key_env,
                &s.previous_record_key_file,
                &None,
                "[state] previous_record_key (previous_record_key_env or previous_record_key_file)",
            )?;
                Some(key.into_boxed_slice())
            } else {
                None
            };
        let is_sentinel = matches!(topology, Topology::Sentinel { .. });
        let sentinel_fields = [
            &s.sentinel_username,
            &s.sentinel_password_env,
            &s.sentinel_password_file,
            &s.sentinel_password,
        ];
        if !is_sentinel {
            let span = sentinel_fields
                .iter()
                .copied()
                .flatten()
                .map(|f| f.span())
                .chain(s.sentinel_tls.as_ref().map(|f| f.span()))
                .next();
            if let Some(span) = span {
                self.d
                    .error(span, "this setting is for a redis+sentinel:// url");
            }
        }
        let sentinel_password = if is_sentinel
            && [
                &s.sentinel_password_env,
                &s.sentinel_password_file,
                &s.sentinel_password,
            ]
            .iter()
            .any(|p| p.is_some())
        {
            let bytes = self.secret(
                url.span(),
                &s.sentinel_password_env,
                &s.sentinel_password_file,
                &s.sentinel_password,
                "the Sentinels' password",
            )?;
            match String::from_utf8(bytes) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.d
                        .error(url.span(), "the Sentinels' password is not UTF-8");
                    return None;
                }
            }
        } else {
            None
        };
        let sentinel = SentinelAccess {
            username: s.sentinel_username.as_ref().map(|u| u.get_ref().clone()),
            password: sentinel_password,
            tls: s
                .sentinel_tls
                .as_ref()
                .map_or(is_sentinel && topology.uses_tls(), |t| *t.get_ref()),
        };
        Some(StateBackend::Redis(Box::new(RedisSettings {
            display_url: super::redact_url(text),
            url: text.clone(),
            password,
            topology,
            tls_ca,
            key_prefix,
            record_key: record_key.into(),
            previous_record_key,
            accept_unsigned_records: s
                .accept_unsigned_records
                .as_ref()
                .is_some_and(|a| *a.get_ref()),
            sentinel,
            timeout: self.duration_or(s.timeout.as_ref(), Duration::from_millis(25)),
            connect_timeout: self.duration_or(s.connect_timeout.as_ref(), Duration::from_secs(1)),
            token_timeout: self.duration_or(s.token_timeout.as_ref(), Duration::from_secs(1)),
            on_error_limits,
            fleet_size: s
                .fleet_size
                .as_ref()
                .map_or(NonZeroU32::MIN, |n| self.count(n, "fleet_size")),
        })))
    }

    fn upgrades(&mut self, list: Option<&[config::Str]>) -> Vec<Box<str>> {
        let Some(list) = list else {
            return vec!["websocket".into()];
        };
        let mut out = Vec::new();
        for p in list {
            let name = p.get_ref().to_ascii_lowercase();
            if name == "h2c" {
                self.d.error(
                    p.span(),
                    "h2c is never forwarded: the requests inside it would not pass the gate",
                );
            } else if !crate::http1::parse::is_token(name.as_bytes()) {
                self.d.error(p.span(), "not a protocol name");
            } else {
                out.push(name.into());
            }
        }
        out
    }

    fn log(&mut self, l: &config::Log) -> Log {
        let access = match l.access.as_ref().map(|a| (a.get_ref().as_str(), a.span())) {
            None | Some(("json", _)) => AccessLog::Json,
            Some(("text", _)) => AccessLog::Text,
            Some(("off", _)) => AccessLog::Off,
            Some((other, span)) => {
                self.d.error(
                    span,
                    format!("unknown access log format {other:?} (expected json, text or off)"),
                );
                AccessLog::Json
            }
        };
        let level = l.level.as_ref().map_or("info", |l| l.get_ref().as_str());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            let span = l.level.as_ref().map_or(0..0, |l| l.span());
            self.d.error(span, format!("invalid log level: {e}"));
        }
        Log {
            access,
            level: level.to_string(),
        }
    }

    fn upstream(&mut self, u: &config::Upstream) -> Option<Upstream> {
        let span = u.url.span();
        let uri: http::Uri = match u.url.get_ref().parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.d.error(span, format!("invalid upstream url: {e}"));
                return None;
            }
        };
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                self.d
                    .error(span, "the upstream url must start with http:// or https://");
                return None;
            }
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.d.error(
                span.clone(),
                "the upstream url must not have a path: requests are forwarded with their own path",
            );
        }
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => Some(SocketAddr::new(ip, port)),
            Err(_) => match (host, port).to_socket_addrs() {
                Ok(mut addrs) => addrs.next(),
                Err(e) => {
                    self.d.error(
                        span.clone(),
                        format!("cannot resolve upstream host {host:?}: {e}"),
                    );
                    return None;
                }
            },
        };
        let Some(addr) = addr else {
            self.d
                .error(span, format!("upstream host {host:?} has no address"));
            return None;
        };
        let authority = uri.authority().map_or(host, |a| a.as_str()).into();
        Some(Upstream {
            url: u.url.get_ref().as_str().into(),
            addr,
            authority,
            tls,
            sni: if tls { host.to_string() } else { String::new() },
            connect_timeout: self.duration_or(u.connect_timeout.as_ref(), Duration::from_secs(2)),
            read_timeout: self.duration_or(u.read_timeout.as_ref(), Duration::from_secs(60)),
            forward_credentials: u.forward_credentials,
        })
    }

    fn auth(&mut self, a: &config::Auth) -> Auth {
        let text = |s: &Option<Str>, default: &str| {
            s.as_ref()
                .map_or_else(|| default.to_string(), |s| s.get_ref().clone())
        };
        let default_access = match &a.default_access {
            None => Access::Authenticated,
            Some(s) => self.access(s).unwrap_or(Access::Authenticated),
        };
        let api_key_header = match &a.api_key_header {
            None => HeaderName::from_static("x-api-key"),
            Some(h) => match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(name) if name == http::header::AUTHORIZATION => {
                    self.d.error(
                        h.span(),
                        "api_key_header cannot be Authorization (API keys are accepted there as Bearer credentials already)",
                    );
                    name
                }
                Ok(name) => name,
                Err(_) => {
                    self.d.error(h.span(), "not a valid header name");
                    HeaderName::from_static("x-api-key")
                }
            },
        };
        let paths = [
            (&a.token_path, DEFAULT_TOKEN_PATH),
            (&a.refresh_path, DEFAULT_REFRESH_PATH),
            (&a.revoke_path, DEFAULT_REVOKE_PATH),
        ];
        for (path, _) in paths {
            if let Some(p) = path.as_ref().filter(|p| !p.get_ref().starts_with('/')) {
                self.d.error(p.span(), "a path must start with /");
            }
        }
        let period = self.duration_or(
            a.login_throttle_period.as_ref(),
            Duration::from_secs(15 * 60),
        );
        let attempts = |cx: &mut Self, n: &Option<config::Spanned<i64>>, default: u32| {
            let n = n
                .as_ref()
                .map_or(NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN), |n| {
                    cx.count(n, "login attempts")
                });
            Quota::new(n, period, n)
        };
        let login_per_ip = attempts(self, &a.login_attempts_per_ip, 30);
        let login_per_email = attempts(self, &a.login_attempts_per_email, 10);
        Auth {
            login_per_ip,
            login_per_email,
            issuer: text(&a.issuer, "keygate"),
            audience: text(&a.audience, "api"),
            token_ttl: self.duration_or(a.token_ttl.as_ref(), Duration::from_secs(24 * 3600)),
            refresh_ttl: self.duration_or(a.refresh_ttl.as_ref(), Duration::from_secs(30 * 86400)),
            leeway: self.duration_or(a.leeway.as_ref(), Duration::from_secs(60)),
            token_path: text(&a.token_path, DEFAULT_TOKEN_PATH),
            refresh_path: text(&a.refresh_path, DEFAULT_REFRESH_PATH),
            revoke_path: text(&a.revoke_path, DEFAULT_REVOKE_PATH),
            default_access,
            api_key_header,
        }
    }

    fn jwt_keys(&mut self, keys: &[config::Spanned<config::JwtKey>]) -> Option<JwtKeys> {
        let mut out = Vec::new();
        let mut signer = None;
        let mut kids = HashSet::new();
        for key in keys {
            let k = key.get_ref();
            if k.kid.get_ref().is_empty() {
                self.d.error(k.kid.span(), "kid must not be empty");
            } else if !kids.insert(k.kid.get_ref().as_str()) {
                self.d
                    .error(k.kid.span(), format!("duplicate kid {:?}", k.kid.get_ref()));
            }
            if k.sign {
                if signer.is_some() {
                    self.d.error(
                        key.span(),
                        "only one [[auth.keys]] entry may have sign = true",
                    );
                }
                signer = Some(out.len());
            }
            if let Some(compiled) = self.jwt_key(k) {
                out.push(compiled);
            } else if k.sign {
                signer = None;
            }
        }
        if keys.is_empty() {
            self.d.error_at_start(
                "no [[auth.keys]]: at least one JWT key with sign = true is required",
            );
            return None;
        }
        if signer.is_none() && !keys.iter().any(|k| k.get_ref().sign) {
            self.d.error(
                keys[0].span(),
                "no signing key: mark one [[auth.keys]] entry with sign = true",
            );
        }
        Some(JwtKeys {
            keys: out,
            signer: signer?,
        })
    }

    fn jwt_key(&mut self, k: &config::JwtKey) -> Option<JwtKey> {
        let algorithm = match k.algorithm.get_ref().as_str() {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            "EdDSA" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            "RS256" => Algorithm::RS256,
            other => {
                self.d.error(
                    k.algorithm.span(),
                    format!("unsupported algorithm {other:?} (expected HS256, HS384, HS512, EdDSA, ES256 or RS256)"),
                );
                return None;
            }
        };
        let mut mac = None;
        let (decoding, encoding) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                for pem in [&k.private_key_file, &k.public_key_file]
                    .into_iter()
                    .flatten()
                {
                    self.d.error(
                        pem.span(),
                        "PEM key files are for EdDSA, ES256 and RS256; HMAC keys take secret_env, secret_file or secret",
                    );
                }
                let secret = self.secret(
                    k.kid.span(),
                    &k.secret_env,
                    &k.secret_file,
                    &k.secret,
                    "an HMAC key",
                )?;
                // RFC 7518 §3.2: a key at least as long as the hash output.
                let min = match algorithm {
                    Algorithm::HS256 => 32,
                    Algorithm::HS384 => 48,
                    _ => 64,
                };
                if secret.len() < min {
                    self.d.error(
                        k.kid.span(),
                        format!(
                            "the {:?} secret is {} bytes; {:?} needs at least {min} (RFC 7518 §3.2)",
                            k.kid.get_ref(),
                            secret.len(),
                            algorithm
                        ),
                    );
                    return None;
                }
                mac = Mac::new(algorithm, &secret);
                let keys = DecodingKey::from_secret(&secret).and_then(|d| {
                    let e = if k.sign {
                        Some(EncodingKey::from_secret(&secret)?)
                    } else {
                        None
                    };
                    Ok((d, e))
                });
                match keys {
                    Ok(keys) => keys,
                    Err(e) => {
                        self.d
                            .error(k.kid.span(), format!("unusable HMAC secret: {e}"));
                        return None;
                    }
                }
            }
            _ => {
                for s in [&k.secret_env, &k.secret_file, &k.secret]
                    .into_iter()
                    .flatten()
                {
                    self.d.error(
                        s.span(),
                        "asymmetric keys take public_key_file (and private_key_file to sign), not a secret",
                    );
                }
                let Some(public) = &k.public_key_file else {
                    self.d.error(
                        k.kid.span(),
                        "an asymmetric key needs public_key_file (PEM)",
                    );
                    return None;
                };
                let pem = self.read_file(public)?;
                let decoding = match algorithm {
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                };
                let decoding = match decoding {
                    Ok(d) => d,
                    Err(e) => {
                        self.d.error(
                            public.span(),
                            format!("not a {algorithm:?} public key in PEM form: {e}"),
                        );
                        return None;
                    }
                };
                let encoding = match (&k.private_key_file, k.sign) {
                    (None, true) => {
                        self.d.error(
                            k.kid.span(),
                            "a signing asymmetric key needs private_key_file (PEM)",
                        );
                        return None;
                    }
                    (None, false) => None,
                    (Some(private), _) => {
                        let pem = self.read_file(private)?;
                        let encoding = match algorithm {
                            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                            _ => EncodingKey::from_rsa_pem(&pem),
                        };
                        match encoding {
                            Ok(e) => Some(e),
                            Err(e) => {
                                self.d.error(
                                    private.span(),
                                    format!("not a {algorithm:?} private key in PEM form: {e}"),
                                );
                                return None;
                            }
                        }
                    }
                };
                (decoding, encoding.filter(|_| k.sign))
            }
        };
        Some(JwtKey {
            kid: k.kid.get_ref().as_str().into(),
            algorithm,
            decoding,
            encoding,
            mac,
        })
    }

    fn tiers(
        &mut self,
        tiers: &std::collections::BTreeMap<String, config::Spanned<config::Tier>>,
    ) -> (Vec<Tier>, HashMap<String, TierIdx>) {
        let mut out = Vec::new();
        let mut index = HashMap::new();
        for (name, t) in tiers {
            let span = t.span();
            let t = t.get_ref();
            if !is_token(name) {
                self.d.error(
                    span.clone(),
                    format!("tier name {name:?} may only use letters, digits, '-' and '_'"),
                );
            }
            let rate = if t.unlimited {
                for (field, present) in [
                    ("limit", t.limit.is_some()),
                    ("period", t.period.is_some()),
                    ("burst", t.burst.is_some()),
                ] {
                    if present {
                        self.d.error(
                            span.clone(),
                            format!("tier {name:?} is unlimited; remove {field}"),
                        );
                    }
                }
                Rate::Unlimited
            } else {
                let limit = match &t.limit {
                    None => {
                        self.d.error(
                            span.clone(),
                            format!("tier {name:?} needs limit (or unlimited = true)"),
                        );
                        NonZeroU32::MIN
                    }
                    Some(l) => self.count(l, "limit"),
                };
                let period = self.duration_or(t.period.as_ref(), Duration::from_secs(3600));
                let burst = t.burst.as_ref().map_or(limit, |b| self.count(b, "burst"));
                Rate::Limited(Quota::new(limit, period, burst))
            };
            let policy_header = match rate {
                Rate::Limited(q) => HeaderValue::from_str(&format!(
                    "\"{name}\";q={};w={}",
                    q.limit,
                    q.period.as_secs().max(1)
                ))
                .ok(),
                Rate::Unlimited => None,
            };
            index.insert(name.clone(), out.len() as TierIdx);
            out.push(Tier {
                name: name.as_str().into(),
                rate,
                header: HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("invalid")),
                policy_header,
            });
        }
        (out, index)
    }

    #[allow(clippy::type_complexity)]
    fn users(
        &mut self,
        users: &[config::Spanned<config::User>],
        tiers: &HashMap<String, TierIdx>,
    ) -> (
        Vec<User>,
        HashMap<Box<str>, UserIdx>,
        HashMap<Box<str>, UserIdx>,
    ) {
        let mut out = Vec::new();
        let mut by_id = HashMap::new();
        let mut by_email = HashMap::new();
        for u in users {
            let u = u.get_ref();
            let email = u.email.get_ref().trim().to_ascii_lowercase();
            if !email.contains('@') || HeaderValue::from_str(&email).is_err() {
                self.d
                    .error(u.email.span(), format!("{email:?} is not an email address"));
            }
            let (id, id_span) = match &u.id {
                Some(id) => (id.get_ref().clone(), id.span()),
                None => (email.clone(), u.email.span()),
            };
            if id.is_empty() || HeaderValue::from_str(&id).is_err() || id.contains(',') {
                self.d.error(
                    id_span.clone(),
                    "a user id must be printable ASCII without commas",
                );
            }
            let idx = out.len() as UserIdx;
            if by_email
                .insert(email.clone().into_boxed_str(), idx)
                .is_some()
            {
                self.d
                    .error(u.email.span(), format!("duplicate user email {email:?}"));
            }
            if by_id.insert(id.clone().into_boxed_str(), idx).is_some() {
                self.d.error(id_span, format!("duplicate user id {id:?}"));
            }
            if let Some(hash) = &u.password_hash {
                self.password_hash(hash);
            }
            let tier = self.tier_ref(&u.tier, tiers);
            out.push(User {
                account: account_id("user", &id),
                id_header: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("")),
                email_header: HeaderValue::from_str(&email).unwrap_or(HeaderValue::from_static("")),
                id: id.into(),
                email: email.into(),
                password_hash: u
                    .password_hash
                    .as_ref()
                    .map(|h| h.get_ref().as_str().into()),
                tier,
                permissions: self.permissions(&u.permissions),
                ip_allow: Allowlist(self.ip_set(&u.ip_allow)),
                disabled: u.disabled,
                tokens_valid_after: u
                    .tokens_valid_after
                    .as_ref()
                    .and_then(|t| self.timestamp(t)),
            });
        }
        (out, by_id, by_email)
    }

    fn api_keys(
        &mut self,
        keys: &[config::Spanned<config::ApiKey>],
        users: &[User],
        users_by_id: &HashMap<Box<str>, UserIdx>,
        users_by_email: &HashMap<Box<str>, UserIdx>,
        tiers: &HashMap<String, TierIdx>,
    ) -> (Vec<ApiKey>, HashMap<u64, super::KeyIdx>) {
        let mut out = Vec::new();
        let mut by_prefix: HashMap<u64, super::KeyIdx> = HashMap::new();
        let mut ids = HashSet::new();
        for entry in keys {
            let span = entry.span();
            let k = entry.get_ref();
            let id = k.id.get_ref();
            if id.is_empty() || HeaderValue::from_str(id).is_err() {
                self.d
                    .error(k.id.span(), "an API key id must be printable ASCII");
            } else if !ids.insert(id.as_str()) {
                self.d
                    .error(k.id.span(), format!("duplicate API key id {id:?}"));
            }
            let sha256 = match decode_sha256(k.sha256.get_ref()) {
                Some(h) => h,
                None => {
                    self.d.error(
                        k.sha256.span(),
                        "sha256 must be 64 hex digits (the SHA-256 of the whole key; `keygate new-api-key` prints it)",
                    );
                    [0; 32]
                }
            };
            let owner = k.user.as_ref().and_then(|u| {
                let name = u.get_ref().as_str();
                let found = users_by_id
                    .get(name)
                    .or_else(|| users_by_email.get(name.to_ascii_lowercase().as_str()))
                    .copied();
                if found.is_none() {
                    self.d.error(
                        u.span(),
                        format!("API key {id:?} names unknown user {name:?}"),
                    );
                }
                found
            });
            let tier = match (owner, &k.tier, &k.user) {
                (Some(o), None, _) => users[o as usize].tier,
                (_, Some(t), Some(_)) => {
                    self.d.error(
                        t.span(),
                        "a key owned by a user shares the user's tier and quota; remove tier",
                    );
                    0
                }
                (_, Some(t), None) => self.tier_ref(t, tiers),
                (None, None, Some(_)) => 0,
                (None, None, None) => {
                    self.d.error(
                        span.clone(),
                        format!("API key {id:?} has no user, so it needs a tier"),
                    );
                    0
                }
            };
            let permissions = match (&k.permissions, owner) {
                (None, Some(o)) => users[o as usize].permissions.clone(),
                (None, None) => Permissions::default(),
                (Some(listed), None) => self.permissions(listed),
                (Some(listed), Some(o)) => {
                    let owner = &users[o as usize];
                    for p in listed {
                        if !owner.permissions.contains(p.get_ref()) {
                            self.d.warn(
                                p.span(),
                                format!(
                                    "user {:?} does not hold {:?}; the key will not have it either",
                                    owner.id,
                                    p.get_ref()
                                ),
                            );
                        }
                    }
                    self.permissions(listed).intersect(&owner.permissions)
                }
            };
            let idx = out.len() as super::KeyIdx;
            let prefix = hash_prefix(&sha256);
            if sha256 != [0; 32] {
                if let Some(other) = by_prefix.insert(prefix, idx) {
                    let other: &ApiKey = &out[other as usize];
                    let message = if other.sha256 == sha256 {
                        format!("API key {id:?} has the same sha256 as {:?}", other.id)
                    } else {
                        format!(
                            "API keys {id:?} and {:?} share the first 8 bytes of their hash; regenerate one",
                            other.id
                        )
                    };
                    self.d.error(k.sha256.span(), message);
                }
            }
            out.push(ApiKey {
                account: owner.map_or_else(|| account_id("key", id), |o| users[o as usize].account),
                id_header: HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("")),
                id: id.as_str().into(),
                sha256,
                owner,
                tier,
                permissions,
                ip_allow: Allowlist(self.ip_set(&k.ip_allow)),
                expires_at: k.expires_at.as_ref().and_then(|t| self.timestamp(t)),
                disabled: k.disabled,
            });
        }
        (out, by_prefix)
    }

    fn routes(
        &mut self,
        routes: &[config::Spanned<config::Route>],
        tiers: &HashMap<String, TierIdx>,
        tier_list: &[Tier],
    ) -> (Vec<Route>, Option<Router>) {
        let mut out = Vec::new();
        for entry in routes {
            let r = entry.get_ref();
            if !r.path.get_ref().starts_with('/') {
                self.d
                    .error(r.path.span(), "a route path must start with /");
            }
            let methods = r.methods.as_ref().map(|ms| {
                if ms.is_empty() {
                    self.d.error(
                        entry.span(),
                        "methods = [] matches nothing; leave it out to match every method",
                    );
                }
                ms.iter()
                    .filter_map(|m| {
                        let upper = m.get_ref().to_ascii_uppercase();
                        match Method::from_bytes(upper.as_bytes()) {
                            Ok(method) => Some(method),
                            Err(_) => {
                                self.d
                                    .error(m.span(), format!("invalid method {:?}", m.get_ref()));
                                None
                            }
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let access = r
                .access
                .as_ref()
                .map_or(Some(Access::Authenticated), |a| self.access(a))
                .unwrap_or(Access::Authenticated);
            if access != Access::Authenticated && !r.permissions.is_empty() {
                self.d.error(
                    r.permissions[0].span(),
                    format!(
                        "permissions only apply to authenticated routes; this route is {}",
                        access.as_str()
                    ),
                );
            }
            for p in &r.permissions {
                self.permission_name(p);
            }
            let rate_tier = r.rate_tier.as_ref().map(|t| {
                if access != Access::Public {
                    self.d.error(
                        t.span(),
                        "rate_tier is for public routes; authenticated requests use their account's tier",
                    );
                }
                let idx = self.tier_ref(t, tiers);
                if tier_list.get(idx as usize).is_some_and(|t| t.rate == Rate::Unlimited) {
                    self.d.warn(t.span(), format!("tier {:?} is unlimited, so this limits nothing", t.get_ref()));
                }
                idx
            });
            out.push(Route {
                rate_tier,
                pattern: r.path.get_ref().as_str().into(),
                methods,
                access,
                permissions: r
                    .permissions
                    .iter()
                    .map(|p| p.get_ref().as_str().into())
                    .collect(),
            });
        }
        let specs: Vec<RouteSpec<'_>> = out
            .iter()
            .map(|r| RouteSpec {
                pattern: &r.pattern,
                methods: r.methods.as_deref(),
            })
            .collect();
        match Router::build(&specs) {
            Ok(router) => (out, Some(router)),
            Err(errors) => {
                for e in errors {
                    let (RouteError::Invalid { route, message }
                    | RouteError::Conflict { route, message }) = e;
                    self.d.error(routes[route].get_ref().path.span(), message);
                }
                (out, None)
            }
        }
    }

    fn webhooks(&mut self, hooks: &[config::Spanned<config::Webhook>]) -> Vec<super::Webhook> {
        let mut out: Vec<super::Webhook> = Vec::new();
        for entry in hooks {
            let w = entry.get_ref();
            let path = w.path.get_ref();
            if !path.starts_with('/') {
                self.d
                    .error(w.path.span(), "a webhook path must start with /");
            }
            if out.iter().any(|o| &*o.path == path.as_str()) {
                self.d
                    .error(w.path.span(), format!("duplicate webhook path {path:?}"));
            }
            let mut secrets = Vec::new();
            let envs = w
                .secret_env
                .iter()
                .flat_map(|e| e.names())
                .map(|n| (n, entry.span()))
                .chain(
                    w.secrets_env
                        .iter()
                        .map(|n| (n.get_ref().as_str(), n.span())),
                );
            for (name, span) in envs {
                match self.secrets.env(name) {
                    Ok(v) if !v.is_empty() => secrets.push(v.into_bytes()),
                    Ok(_) => self
                        .d
                        .error(span, format!("environment variable {name} is empty")),
                    Err(e) => self.d.error(span, e),
                }
            }
            for file in w.secret_file.iter().flat_map(|f| f.names()) {
                match self.secrets.file(Path::new(file)) {
                    Ok(v) => secrets.push(without_line_end(v)),
                    Err(e) => self.d.error(entry.span(), e),
                }
            }
            if let Some(inline) = &w.secret {
                self.d.warn(
                    inline.span(),
                    "inline webhook secret: prefer secret_env or secret_file",
                );
                secrets.push(inline.get_ref().as_bytes().to_vec());
            }
            if secrets.is_empty()
                && w.secret_env.is_none()
                && w.secrets_env.is_empty()
                && w.secret_file.is_none()
            {
                self.d.error(
                    entry.span(),
                    "a webhook needs secret_env, secrets_env, secret_file or secret",
                );
            }
            let header = self.header_name(w.header.as_ref(), "x-webhook-signature");
            let max_body = self.max_body(&w.max_body);
            let timestamp = match (&w.timestamp_header, &w.tolerance) {
                (Some(h), tolerance) => Some((
                    self.header_name(Some(h), "x-webhook-timestamp"),
                    self.duration_or(tolerance.as_ref(), Duration::from_secs(300)),
                )),
                (None, Some(t)) => {
                    self.d.error(t.span(), "tolerance needs timestamp_header");
                    None
                }
                (None, None) => None,
            };
            out.push(super::Webhook {
                path: path.as_str().into(),
                secrets,
                header,
                max_body,
                timestamp,
            });
        }
        out
    }

    fn relay(&mut self, r: &config::WebhookRelay) -> Option<super::Relay> {
        let listen = self.socket_addr(Some(&r.listen), "127.0.0.1:8091");
        let max_body = self.max_body(&r.max_body);
        let mut subscribers: Vec<super::Subscriber> = Vec::new();
        for entry in &r.subscribers {
            let s = entry.get_ref();
            let id = s.id.get_ref();
            if id.is_empty() || subscribers.iter().any(|o| &*o.id == id.as_str()) {
                self.d.error(
                    s.id.span(),
                    format!("subscriber id {id:?} is empty or used twice"),
                );
            }
            let prefix = match super::Destination::parse(s.url_prefix.get_ref()) {
                // A prefix without a path ("https://a.example") would let
                // "https://a.example.evil" through a plain string comparison;
                // comparing parsed parts needs the path to end in '/'.
                Some(p) if p.path.ends_with('/') => p,
                _ => {
                    self.d.error(
                        s.url_prefix.span(),
                        "url_prefix must be an http(s) URL whose path ends with /, like https://hooks.example.com/keygate/",
                    );
                    continue;
                }
            };
            let Some(secret) = self.secret(
                entry.span(),
                &s.secret_env,
                &s.secret_file,
                &s.secret,
                "a subscriber",
            ) else {
                continue;
            };
            subscribers.push(super::Subscriber {
                id: id.as_str().into(),
                prefix,
                secret,
                header: self.header_name(s.header.as_ref(), "x-webhook-signature"),
                timestamp_header: s
                    .timestamp_header
                    .as_ref()
                    .map(|h| self.header_name(Some(h), "x-webhook-timestamp")),
            });
        }
        Some(super::Relay {
            listen: listen?,
            max_body,
            timeout: self.duration_or(r.timeout.as_ref(), Duration::from_secs(10)),
            subscribers,
        })
    }

    /// A body limit in bytes: default 1 MiB, at most 64 MiB.
    fn max_body(&mut self, n: &Option<config::Spanned<i64>>) -> usize {
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

    fn header_name(&mut self, s: Option<&Str>, default: &'static str) -> HeaderName {
        match s {
            None => HeaderName::from_static(default),
            Some(s) => HeaderName::from_bytes(s.get_ref().as_bytes()).unwrap_or_else(|_| {
                self.d.error(s.span(), "not a valid header name");
                HeaderName::from_static(default)
            }),
        }
    }

    // ----- values ---------------------------------------------------------

    fn access(&mut self, s: &Str) -> Option<Access> {
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

    fn tier_ref(&mut self, name: &Str, tiers: &HashMap<String, TierIdx>) -> TierIdx {
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

    fn permissions(&mut self, names: &[Str]) -> Permissions {
        for p in names {
            self.permission_name(p);
        }
        Permissions::new(names.iter().map(|p| p.get_ref().as_str().into()).collect())
    }

    fn permission_name(&mut self, p: &Str) {
        let name = p.get_ref();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            self.d.error(
                p.span(),
                format!("permission {name:?} must be printable ASCII without spaces or commas"),
            );
        }
    }

    fn password_hash(&mut self, hash: &Str) {
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
    fn within(
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

    fn count(&mut self, n: &config::Spanned<i64>, what: &str) -> NonZeroU32 {
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

    fn socket_addr(&mut self, s: Option<&Str>, default: &str) -> Option<SocketAddr> {
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

    fn duration_or(&mut self, s: Option<&Str>, default: Duration) -> Duration {
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

    fn timestamp(&mut self, s: &Str) -> Option<u64> {
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

    fn ip_set(&mut self, list: &[Str]) -> IpSet {
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
    fn secret(
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

    fn read_file(&mut self, path: &Str) -> Option<Vec<u8>> {
        match self.secrets.file(Path::new(path.get_ref())) {
            Ok(v) => Some(v),
            Err(e) => {
                self.d.error(path.span(), e);
                None
            }
        }
    }
}

/// The JWK set of every asymmetric key (HMAC secrets are never published).
fn jwks_document(keys: &JwtKeys) -> String {
    use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
    let keys = keys
        .keys
        .iter()
        .filter(|k| {
            !matches!(
                k.algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            )
        })
        .filter_map(|k| {
            let mut jwk = Jwk::from_decoding_key(&k.decoding, Some(k.algorithm)).ok()?;
            jwk.common.key_id = Some(k.kid.to_string());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            Some(jwk)
        })
        .collect();
    serde_json::to_string(&JwkSet { keys }).unwrap_or_else(|_| r#"{"keys":[]}"#.to_string())
}

/// A trailing newline from `echo secret > file` is not part of the secret.
fn without_line_end(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        v.pop();
    }
    v
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn decode_sha256(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out).ok()?;
    Some(out)
}

pub fn hash_prefix(hash: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

/// The limiter account of a user (`kind = "user"`), an owner-less key
/// (`"key"`) or an address under a tier (`"ip"`): the first 128 bits of a
/// SHA-256, so it is fixed-size, stable across restarts and never collides
/// in practice.
pub fn account_id(kind: &str, id: &str) -> AccountId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    AccountId::from_le_bytes(first)
}

/// Microseconds since the Unix epoch.
pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Seconds since the Unix epoch, for callers that have no clock of their own.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

mod tls;

#[cfg(test)]
mod tests;

/// A `[[client_certs]]` entry as the API key it is compiled like; its hash
/// is all zeros, which no key has and the key index skips.
fn as_api_key(c: &config::Spanned<config::ClientCert>) -> config::Spanned<config::ApiKey> {
    let span = c.span();
    let c = c.get_ref();
    config::Spanned::new(
        span.clone(),
        config::ApiKey {
            id: c.id.clone(),
            sha256: config::Spanned::new(span, "0".repeat(64)),
            user: c.user.clone(),
            tier: c.tier.clone(),
            permissions: c.permissions.clone(),
            ip_allow: c.ip_allow.clone(),
            expires_at: c.expires_at.clone(),
            disabled: c.disabled,
        },
    )
}
