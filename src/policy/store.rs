//! The one place the running policy lives. Requests call [`PolicyStore::load`]
//! once and keep that snapshot for their whole life; a reload compiles a new
//! policy off the request path and publishes it with a single store, so no
//! request ever sees half of one and half of another.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::{compile_file_with, Counts, Policy};
use crate::config::{ConfigError, EnvAndFiles, Recording};

pub struct PolicyStore {
    current: ArcSwap<Policy>,
    /// The policy the process started with: restart-only settings keep
    /// its values until a restart, whatever reloads happen meanwhile.
    boot: Arc<Policy>,
    path: PathBuf,
    /// Serialises reloads; requests never take it.
    reloading: std::sync::Mutex<()>,
    /// The files (certificates, keys, CAs, unreadable secret files) the
    /// last reload named, if it was rejected: fixing one of them is worth
    /// another try.
    rejected_files: std::sync::Mutex<Vec<PathBuf>>,
}

#[derive(Debug)]
pub enum ReloadOutcome {
    Applied {
        counts: Counts,
        warnings: Vec<ConfigError>,
        /// Settings that differ from the running process's and only take
        /// effect on restart (compared with the start, not the last reload).
        needs_restart: Vec<&'static str>,
        at: SystemTime,
    },
    Rejected {
        errors: Vec<ConfigError>,
    },
}

impl PolicyStore {
    pub fn new(path: &Path, policy: Policy) -> PolicyStore {
        let policy = Arc::new(policy);
        PolicyStore {
            current: ArcSwap::new(policy.clone()),
            boot: policy,
            path: path.to_path_buf(),
            reloading: std::sync::Mutex::new(()),
            rejected_files: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn load(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// If the last reload was rejected, the TLS files it named and the
    /// files it could not read (none if it was applied): a new certificate
    /// it found broken, say.
    pub fn rejected_files(&self) -> Vec<PathBuf> {
        self.rejected_files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// `[server.tls]` as the process started with it: whether the public
    /// port speaks TLS is fixed until a restart.
    pub fn boot_tls(&self) -> Option<std::sync::Arc<crate::tls::TlsPolicy>> {
        self.boot.server.tls.clone()
    }

    pub fn restart_needed(&self) -> Vec<&'static str> {
        restart_only_changes(&self.boot, &self.current.load())
    }

    /// Read, compile and publish the file again. A file with any error
    /// changes nothing. Call it off the proxy threads: it reads files and
    /// may resolve the upstream's name. `prepare` runs on the new policy
    /// before requests see it (the login's dummy hash is made there).
    pub fn reload(&self, prepare: impl FnOnce(&Policy)) -> ReloadOutcome {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let source = Recording {
            real: EnvAndFiles {
                base: self
                    .path
                    .parent()
                    .map_or_else(PathBuf::new, Path::to_path_buf),
            },
            read: Default::default(),
        };
        let compiled = compile_file_with(&self.path, &source);
        *self
            .rejected_files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = match &compiled {
            Ok(_) => Vec::new(),
            Err(_) => source.read.into_inner(),
        };
        match compiled {
            Ok(compiled) => {
                let needs_restart = restart_only_changes(&self.boot, &compiled.policy);
                let counts = compiled.policy.counts();
                prepare(&compiled.policy);
                retire(self.current.swap(Arc::new(compiled.policy)));
                ReloadOutcome::Applied {
                    counts,
                    warnings: compiled.warnings,
                    needs_restart,
                    at: SystemTime::now(),
                }
            }
            Err(errors) => ReloadOutcome::Rejected { errors },
        }
    }
}

/// Free a replaced policy on a thread of its own once the requests that
/// still hold it are done: freeing a policy of a million keys takes a good
/// fraction of a second, which must never land on a proxy thread (the last
/// holder of an `Arc` frees it).
fn retire(old: Arc<Policy>) {
    let spawned = std::thread::Builder::new()
        .name("keygate policy retire".into())
        .spawn(move || {
            let mut old = old;
            for _ in 0..6_000 {
                match Arc::try_unwrap(old) {
                    Ok(policy) => return drop(policy),
                    Err(held) => old = held,
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to free the old policy");
    }
}

/// Listeners, threads and the state directory are fixed at start.
fn restart_only_changes(old: &Policy, new: &Policy) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("server.listen");
    }
    if old.server.admin_listen != new.server.admin_listen {
        changed.push("server.admin_listen");
    }
    if old.server.threads != new.server.threads {
        changed.push("server.threads");
    }
    if old.server.state_dir != new.server.state_dir {
        changed.push("server.state_dir");
    }
    if old.server.tls.is_some() != new.server.tls.is_some() {
        changed.push("server.tls (turning TLS on or off)");
    }
    let redirect = |p: &Policy| p.server.tls.as_ref().and_then(|t| t.redirect_listen);
    if redirect(old) != redirect(new) {
        changed.push("server.tls.redirect_listen");
    }
    if old.server.grace_period != new.server.grace_period {
        changed.push("server.grace_period");
    }
    // log.access is read per request: it changes live.
    if old.log.level != new.log.level {
        changed.push("log.level");
    }
    if old.state != new.state {
        changed.push("state");
    }
    changed
}
