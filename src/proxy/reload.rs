//! Applying a reload and remembering how the last one went. Every trigger
//! (SIGHUP, `POST /reload`) goes through [`reload_now`], so the log lines,
//! metrics and `/readyz` detail are the same whatever asked for it.

use std::sync::Mutex;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};

use crate::metrics::{record_policy, METRICS};
use crate::policy::{PolicyStore, ReloadOutcome};

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
    match store.reload() {
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
            record_policy(counts, true);
            let summary = json!({
                "result": "success",
                "trigger": trigger,
                "at": crate::policy::unix_now(),
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
                "at": crate::policy::unix_now(),
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
