//! `config::File` → [`Policy`], the one conversion. Every check runs and every
//! problem is collected, so an operator sees all of them in one `check`.

use std::path::{Path, PathBuf};

use super::Policy;
use crate::config::{self, ConfigError, Diagnostics, EnvAndFiles, SecretSource, Severity};
use accounts::as_api_key;
use auth::jwks_document;

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
    let sources = config::include::assemble(path, src)?;
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

impl Cx<'_> {
    pub(super) fn policy(&mut self, file: &str, mut f: config::File) -> Option<Policy> {
        let server = self.server(&f.server);
        let log = self.log(&f.log);
        let upstream = self.upstream(&f.upstream);
        let mut auth = self.auth(&f.auth);
        auth.self_service = self.self_service(f.auth.self_service.as_ref(), &auth);
        let jwt_keys = self.jwt_keys(&f.auth.keys);
        let (tiers, tier_index) = self.tiers(&f.tiers);
        let (users, users_by_id, users_by_email) = self.users(&f.users, &tier_index);
        // Client certificates are API keys found another way: one list, so
        // ids are unique across both and the same rules apply.
        // Taken, not copied: a policy may hold a million keys.
        let toml_keys = f.api_keys.len();
        let mut entries = std::mem::take(&mut f.api_keys);
        entries.extend(f.client_certs.iter().map(as_api_key));
        let (api_keys, api_keys_by_hash_prefix) =
            self.api_keys(entries, &users, &users_by_id, &users_by_email, &tier_index);
        let client_certs = self.client_certs(&f.client_certs, toml_keys);
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
        Some(Policy {
            verified_tokens: super::TokenCache::new(super::TokenCache::CAPACITY),
            relay: relay.flatten(),
            state: state?,
            webhooks,
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
}

pub fn hash_prefix(hash: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

mod accounts;
mod auth;
mod routes;
mod self_service;
mod server;
mod state;
mod tls;
mod upstream;
mod values;

#[cfg(test)]
mod tests;
