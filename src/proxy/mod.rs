//! The application on keygate's HTTP/1.1 engine ([`crate::http1`]):
//! [`dispatch`] (auth endpoint, webhook or gate), the [`forward`] plan of
//! headers, one [`refusal`] type for every refusal it writes on the public
//! listener, the limiter service (`limiter`), and `exchange`, which serves
//! one request through any `http1::Downstream`: an HTTP/1.1 connection of
//! the engine's, or an HTTP/2 stream of [`h2`]'s. Also the process: one
//! pingora `Server` (signals, graceful shutdown) running the public
//! listener (`front`), the admin listener, the webhook relay and the reload
//! triggers.

mod access_log;
mod admin;
mod admin_keys;
pub mod dispatch;
mod exchange;
pub mod forward;
mod front;
pub mod h2;
mod limiter;
pub mod notify;
pub mod refusal;
mod relay;
mod reload;
pub mod sample_upstream;
pub mod tls;

use std::path::Path;
use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;

pub use reload::{reload_now, Status};

use crate::issue::Issuer;
use crate::limit::Limiter;
use crate::metrics::METRICS;
use crate::policy::{Policy, PolicyStore, RedisSettings, StateBackend};
use crate::state::families::RedisStore;
use crate::state::fleet::RedisLimits;
use crate::state::keys::KeyStore;
use crate::state::{spawn_flusher, RedbStore, StateStore};

/// A service started beside the proxy (the demo's sample upstream).
pub type Extra = Box<dyn FnOnce(&mut Server)>;

/// Serve `policy` (compiled from `path`) until SIGTERM or SIGINT.
pub fn serve(path: &Path, policy: Policy, extra: Option<Extra>) -> anyhow::Result<()> {
    // SIGHUP's default action is to exit; take it over before anything can send one.
    claim_sighup();

    let server_settings = policy.server.clone();
    let relay_listen = policy.relay.as_ref().map(|r| r.listen);
    reload::policy_metrics(&policy);
    METRICS.config_last_reload_success.set(1);
    let limiter = Arc::new(Limiter::new());
    let (issuer, fleet, shared_store, key_store) = match &policy.state {
        StateBackend::Embedded => {
            let (state, keys) = open_state(&server_settings.state_dir, &limiter)?;
            // The embedded store is in this process: up while it runs.
            METRICS.state_up.set(1);
            let issuer = Issuer::new(state, limiter.clone());
            (issuer, None, None, keys)
        }
        StateBackend::Redis(settings) => {
            let settings: Arc<RedisSettings> = Arc::new((**settings).clone());
            let store = Arc::new(
                RedisStore::new(settings.clone())
                    .map_err(|e| anyhow::anyhow!("{e} ([state] url)"))?,
            );
            // The local limiter is only the fallback: not persisted, but
            // its idle accounts are still evicted.
            spawn_flusher(limiter.clone(), store.clone());
            tracing::info!(
                url = %settings.display_url,
                on_error_limits = ?settings.on_error_limits,
                "limits, login throttles and refresh tokens are shared through Redis"
            );
            let issuer = Issuer::new(store.clone(), store.clone());
            let fleet = Arc::new(RedisLimits::new(settings));
            let sweeper = fleet.clone();
            let spawned = std::thread::Builder::new()
                .name("keygate deny cache".into())
                .spawn(move || loop {
                    std::thread::sleep(crate::state::fleet::SWEEP_EVERY);
                    sweeper.sweep();
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the deny-cache sweeper");
            }
            let keys: Arc<dyn KeyStore> = store.clone();
            (issuer, Some(fleet), Some(store), keys)
        }
    };
    let keys = Arc::new(crate::keys::SelfKeys::new(key_store));
    keys.spawn_writer();
    let issuer = Arc::new(issuer);
    let store = Arc::new(PolicyStore::new(path, policy));
    if let StateBackend::Redis(settings) = &store.load().state {
        // Its own connections: a follower read that times out must not
        // take the token endpoints' warm connections with it.
        match RedisStore::new(Arc::new((**settings).clone())) {
            Ok(follower) => {
                let policies = store.clone();
                keys.follow(
                    Box::new(move |after: &str| follower.changes_after(after)),
                    Box::new(move || policies.load().auth.self_service.is_some()),
                );
            }
            Err(e) => tracing::error!(error = %e, "cannot follow key changes through Redis"),
        }
    }
    // Made before serving, so no login pays for it (or shows by its time
    // that its email is unknown).
    crate::issue::dummy_hash_for(&store.load());
    let status = Arc::new(Status::default());

    let conf = ServerConf {
        // For pingora's own services (admin, relay, the demo's upstream),
        // all light; the proxy path runs `server.threads` threads of its own.
        threads: 1,
        // pingora waits this long after SIGTERM before stopping its runtimes;
        // its own default (300 s) is far too long for a sidecar.
        grace_period_seconds: Some(server_settings.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        work_stealing: false,
        ..ServerConf::default()
    };
    // No pingora `Opt`: keygate's own CLI owns the command line.
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let listener = std::net::TcpListener::bind(server_settings.listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (server.listen): {e}",
            server_settings.listen
        )
    })?;
    let redirect = match server_settings.tls.as_ref().and_then(|t| t.redirect_listen) {
        None => None,
        Some(addr) => Some(std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr} (server.tls.redirect_listen): {e}")
        })?),
    };
    server.add_service(front::Front {
        shared: Arc::new(exchange::Shared {
            store: store.clone(),
            limiter,
            issuer,
            fleet,
            connections: Arc::default(),
            keys: keys.clone(),
        }),
        listener: Some(listener),
        redirect,
        threads: server_settings.threads,
        grace: server_settings.grace_period,
    });

    let mut admin = Service::new(
        "keygate admin".to_string(),
        admin::Admin {
            store: store.clone(),
            status: status.clone(),
            state: shared_store,
            keys: keys.clone(),
        },
    );
    admin.add_tcp(&server_settings.admin_listen.to_string());
    admin.threads = Some(1);
    server.add_service(admin);

    if let Some(listen) = relay_listen {
        let mut relay = Service::new(
            "keygate webhook relay".to_string(),
            relay::Relay {
                store: store.clone(),
                connector: pingora::connectors::http::v1::Connector::new(None),
            },
        );
        relay.add_tcp(&listen.to_string());
        relay.threads = Some(1);
        server.add_service(relay);
    }
    server.add_service(background_service(
        "sighup reloader",
        reload::SighupReloader {
            store: store.clone(),
            status: status.clone(),
        },
    ));
    server.add_service(background_service(
        "config file watcher",
        reload::FileWatcher { store, status },
    ));
    if let Some(extra) = extra {
        extra(&mut server);
    }

    tracing::info!(
        listen = %server_settings.listen,
        admin = %server_settings.admin_listen,
        threads = server_settings.threads,
        "keygate serving"
    );
    server.run(RunArgs::default());
    Ok(())
}

/// Open the durable store, put the limiter's saved state back, and start
/// writing it behind. A store that cannot be opened stops the start: serving
/// without it would hand every account a fresh quota after each restart.
fn open_state(
    dir: &Path,
    limiter: &Arc<Limiter>,
) -> anyhow::Result<(Arc<dyn StateStore>, Arc<dyn KeyStore>)> {
    let store = RedbStore::open(dir)
        .map_err(|e| anyhow::anyhow!("{e} (server.state_dir = {})", dir.display()))?;
    let saved = store
        .load_limits()
        .map_err(|e| anyhow::anyhow!("reading limiter state from {}: {e}", dir.display()))?;
    let restored = limiter.restore(saved, crate::clock::unix_now_us());
    tracing::info!(accounts = restored, state_dir = %dir.display(), "limiter state restored");
    let store = Arc::new(store);
    let state: Arc<dyn StateStore> = store.clone();
    spawn_flusher(limiter.clone(), state.clone());
    Ok((state, store))
}

fn claim_sighup() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(rt) = runtime {
        rt.block_on(async {
            // The handler stays registered for the life of the process.
            let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        });
    }
}
