//! Applying a reload and remembering how the last one went, and two of its
//! triggers (SIGHUP, the file watcher). Every trigger, `POST /reload` too,
//! goes through [`reload_now`], so the log lines,
//! metrics and `/readyz` detail are the same whatever asked for it.

use std::sync::Mutex;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};

use crate::metrics::METRICS;
use crate::policy::{Policy, PolicyStore, ReloadOutcome};

/// The last reload's outcome, for `/readyz`.
#[derive(Default)]
pub struct Status {
    last: Mutex<Option<Value>>,
}

impl Status {
    pub fn snapshot(&self) -> Value {
        self.last
            .lock()
            .map(|l| l.clone().unwrap_or(Value::Null))
            .unwrap_or(Value::Null)
    }

    fn set(&self, value: Value) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(value);
        }
    }
}

/// Reload the policy file now. Blocking: call it from a blocking thread.
pub fn reload_now(store: &PolicyStore, status: &Status, trigger: &str) -> Result<Value, Value> {
    let file = store.path().display().to_string();
    match store.reload(|policy| {
        crate::issue::dummy_hash_for(policy);
    }) {
        ReloadOutcome::Applied {
            counts,
            warnings,
            needs_restart,
            ..
        } => {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            if !needs_restart.is_empty() {
                tracing::warn!(
                    settings = ?needs_restart,
                    "these settings changed but only take effect on restart"
                );
            }
            tracing::info!(%trigger, %file, %counts, "configuration reloaded");
            METRICS.config_reloads.with_label_values(&["success"]).inc();
            METRICS.config_last_reload_success.set(1);
            policy_metrics(&store.load());
            let summary = json!({
                "result": "success",
                "trigger": trigger,
                "at": crate::clock::unix_now(),
                "warnings": warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "restart_needed_for": needs_restart,
            });
            status.set(summary.clone());
            Ok(summary)
        }
        ReloadOutcome::Rejected { errors } => {
            for e in &errors {
                tracing::error!("{e}");
            }
            tracing::error!(%trigger, %file, "configuration rejected; the running policy is unchanged");
            METRICS.config_reloads.with_label_values(&["failure"]).inc();
            METRICS.config_last_reload_success.set(0);
            let summary = json!({
                "result": "failure",
                "trigger": trigger,
                "at": crate::clock::unix_now(),
                "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            status.set(summary.clone());
            Err(summary)
        }
    }
}

/// Reloads on SIGHUP (what `systemctl reload` sends).
pub struct SighupReloader {
    pub store: std::sync::Arc<PolicyStore>,
    pub status: std::sync::Arc<Status>,
}

#[async_trait]
impl BackgroundService for SighupReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let store = self.store.clone();
                    let status = self.status.clone();
                    let _ = tokio::task::spawn_blocking(move || reload_now(&store, &status, "sighup")).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// How often the configuration file is looked at.
pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads when the configuration file, or a file it includes, changes. It polls rather than
/// subscribing to file events: editors replace files by rename, `cp`
/// rewrites in place, and Kubernetes swaps a symlink two levels up; one
/// check of the resolved file's identity (device, inode, size, mtime) each
/// second catches all three alike, and the content is hashed only when that
/// identity moved, so touching the file does not reload it.
pub struct FileWatcher {
    pub store: std::sync::Arc<PolicyStore>,
    pub status: std::sync::Arc<Status>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    resolved: std::path::PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn fingerprint(path: &std::path::Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let resolved = std::fs::canonicalize(path).ok()?;
    let m = std::fs::metadata(&resolved).ok()?;
    Some(Fingerprint {
        resolved,
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Every file the running policy is made of: the main file, what its
/// `include` patterns match now (a file added to `users.d/` counts as a
/// change too), and the TLS certificates, keys and client CAs it read;
/// after a rejected reload, also the files that reload read (fixing the
/// new certificate it named is acted on without touching the config).
fn watched(store: &PolicyStore) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let config = crate::config::include::files(store.path());
    let mut other = store
        .load()
        .server
        .tls
        .as_ref()
        .map(|t| t.files.clone())
        .unwrap_or_default();
    for file in store.rejected_files() {
        if !other.contains(&file) {
            other.push(file);
        }
    }
    (config, other)
}

/// The identity of each watched file. A configuration file missing for a
/// moment (mid-rename) is `None` overall: look again later. A missing TLS
/// file is a change like any other, so its reload is tried and its error
/// logged.
fn fingerprints(store: &PolicyStore) -> Option<Vec<Option<Fingerprint>>> {
    let (config, tls) = watched(store);
    let mut out: Vec<Option<Fingerprint>> = config
        .iter()
        .map(|p| fingerprint(p).map(Some))
        .collect::<Option<_>>()?;
    out.extend(tls.iter().map(|p| fingerprint(p)));
    Some(out)
}

/// What the last reload read, as far as the watcher can tell: a hash of the
/// configuration files and one of the other files (TLS files, a rejected
/// reload's files), kept apart because the set of other files changes with
/// reloads themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Contents {
    config: [u8; 32],
    other: [u8; 32],
}

fn content_hash(store: &PolicyStore) -> Option<Contents> {
    use sha2::Digest;
    let (config, other) = watched(store);
    let mut h = sha2::Sha256::new();
    for file in config {
        h.update(file.as_os_str().as_encoded_bytes());
        h.update(std::fs::read(&file).ok()?);
    }
    let config = h.finalize().into();
    let mut h = sha2::Sha256::new();
    for file in other {
        h.update(file.as_os_str().as_encoded_bytes());
        match std::fs::read(&file) {
            Ok(bytes) => h.update(bytes),
            Err(_) => h.update(b"\0missing"),
        }
    }
    Some(Contents {
        config,
        other: h.finalize().into(),
    })
}

#[async_trait]
impl BackgroundService for FileWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = &*self.store;
        let mut seen = fingerprints(store);
        let mut loaded = content_hash(store);
        let mut other_paths = watched(store).1;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            let now = fingerprints(store);
            if now == seen || now.is_none() {
                // Missing for a moment (mid-rename): look again next time.
                continue;
            }
            // Let a writer finish: wait until the identity holds still.
            let mut settled = now;
            for _ in 0..10 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let again = fingerprints(store);
                if again == settled {
                    break;
                }
                settled = again;
            }
            seen = settled;
            let Some(now) = content_hash(store) else {
                continue;
            };
            let paths = watched(store).1;
            if paths != other_paths {
                // Only a reload changes the set of other files, so one from
                // elsewhere (SIGHUP, POST /reload) has just read them: their
                // contents are not a change to act on (the configuration
                // files' still are).
                other_paths = paths;
                if let Some(l) = loaded.as_mut() {
                    l.other = now.other;
                }
            }
            if Some(now) == loaded {
                continue;
            }
            let store = self.store.clone();
            let status = self.status.clone();
            let _ = tokio::task::spawn_blocking(move || reload_now(&store, &status, "file")).await;
            // What was read is what the snapshot before the reload saw: a file
            // that changed while the reload ran (certbot swaps a certificate
            // and its key one after the other) is seen next time. Only when
            // the reload changed the set of files (other certificates, those
            // of a rejected reload) is the snapshot taken anew.
            loaded = Some(now);
            let paths = watched(&self.store).1;
            if paths != other_paths {
                other_paths = paths;
                seen = fingerprints(&self.store);
                loaded = content_hash(&self.store);
            }
        }
    }
}

/// The policy's series after a successful (re)load: its object counts, the
/// time, and every series it names (tiers, webhook paths, certificates) at
/// 0 so that `rate()` and `increase()` work before the first event.
pub fn policy_metrics(policy: &Policy) {
    let m = &*METRICS;
    let counts = policy.counts();
    for (kind, n) in [
        ("users", counts.users),
        ("api_keys", counts.api_keys),
        ("client_certs", counts.client_certs),
        ("routes", counts.routes),
        ("tiers", counts.tiers),
        ("jwt_keys", counts.jwt_keys),
    ] {
        m.policy_objects.with_label_values(&[kind]).set(n as i64);
    }
    m.config_last_reload_success_timestamp
        .set(crate::clock::unix_now() as i64);
    for code in crate::gate::Denial::CODES
        .iter()
        .chain(["invalid_signature", "method_not_allowed"].iter())
    {
        m.auth_denials.with_label_values(&[code]);
    }
    // The certificates served now, and only they.
    m.tls_cert_expiry.reset();
    if let Some(tls) = &policy.server.tls {
        for cert in &tls.certs {
            m.tls_cert_expiry
                .with_label_values(&[&cert.name, &cert.subject])
                .set(cert.not_after);
        }
        for result in ["ok", "resumed"] {
            for version in ["TLSv1.2", "TLSv1.3"] {
                m.tls_handshakes.with_label_values(&[result, version]);
            }
        }
        m.tls_handshakes.with_label_values(&["failed", "none"]);
        m.tls_handshakes.with_label_values(&["timeout", "none"]);
    }
    for tier in &policy.tiers {
        m.rate_limited.with_label_values(&[&tier.name]);
    }
    for hook in &policy.webhooks {
        for result in [
            "valid",
            "mismatch",
            "malformed",
            "missing",
            "stale",
            "too_large",
        ] {
            m.webhook_verifications
                .with_label_values(&[&hook.path, result]);
        }
    }
}
