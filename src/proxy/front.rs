//! The public listener: worker threads accepting connections for
//! [`exchange`](super::exchange), each with its own upstream pool.
//!
//! pingora runs the process (signals, graceful shutdown, the admin and relay
//! listeners), but the proxy path is served here: on this 2-core machine
//! pingora's generic per-request machinery cost ~65 µs a request even with
//! no logic at all (0.47× nginx `proxy_pass`, `benches/load.sh`), while the
//! whole gate decision is under 1 µs. This listener does what nginx does:
//! one single-threaded event loop per worker thread, the request parsed in
//! place, its head rewritten into one write, and a lock-free per-thread
//! pool of upstream keep-alive connections.

use std::net::{IpAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use pingora::server::ListenFds;
use pingora::server::ShutdownWatch;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::exchange::{self, Shared, Worker};
use crate::metrics::METRICS;

/// The proxy listener as a pingora service: started with the server,
/// drained when pingora signals shutdown.
pub struct Front {
    pub shared: Arc<Shared>,
    /// Bound before the server starts, so a taken port fails `keygate run` at once.
    pub listener: Option<StdListener>,
    /// `server.tls.redirect_listen`, bound before the start too.
    pub redirect: Option<StdListener>,
    pub threads: usize,
    pub grace: Duration,
}

#[async_trait]
impl pingora::services::Service for Front {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let redirect = self.redirect.take();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut workers = Vec::new();
        for i in 0..self.threads.max(1) {
            let listener = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "could not share the proxy listener");
                    continue;
                }
            };
            let redirect = redirect.as_ref().and_then(|r| r.try_clone().ok());
            let shared = self.shared.clone();
            let stop = stop_rx.clone();
            let grace = self.grace;
            let spawned = std::thread::Builder::new()
                .name(format!("keygate-proxy-{i}"))
                .spawn(move || run_worker(listener, redirect, shared, stop, grace));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => tracing::error!(error = %e, "could not start a proxy thread"),
            }
        }
        // Only the workers hold the sockets now: when they stop, they close.
        drop(listener);
        drop(redirect);
        super::notify::ready();
        let _ = shutdown.changed().await;
        super::notify::notify("STOPPING=1");
        let _ = stop_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        // Every request in flight is done (or the grace period is over):
        // exit now. pingora would otherwise sleep out the whole grace period
        // even on an idle instance.
        tracing::info!("drained; exiting");
        super::access_log::flush();
        std::process::exit(0);
    }

    fn name(&self) -> &str {
        "keygate proxy"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

/// One worker thread: its own single-threaded runtime, accepting on the
/// shared listener until shutdown, then draining for at most `grace`.
fn run_worker(
    listener: StdListener,
    redirect: Option<StdListener>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "could not start a proxy runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "could not listen");
                return;
            }
        };
        let redirect = match redirect.map(|r| {
            r.set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(r))
        }) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                tracing::error!(error = %e, "could not listen for plain HTTP (server.tls.redirect_listen)");
                None
            }
        };
        // The watchdog's sign that this thread's event loop still turns.
        let beat = super::notify::register_beat();
        tokio::task::spawn_local(async move {
            let mut every = tokio::time::interval(super::notify::BEAT);
            loop {
                every.tick().await;
                beat.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // This thread's access log lines go to the writer at least this often.
        tokio::task::spawn_local(async {
            let mut every = tokio::time::interval(super::access_log::WRITE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                super::access_log::tick();
            }
        });
        let worker = Rc::new(Worker::new(shared));
        let tls_at_start = worker.shared.store.boot_tls();
        let mut tls_now = tls_at_start.clone();
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let peer = addr.ip().to_canonical();
                        // Over a cap: closed before a byte is read.
                        let Some(open) = worker.shared.connections.open(peer, &worker.shared.store.load().server) else {
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        // Whether the port speaks TLS is fixed at start (a
                        // reload that drops [server.tls] must not turn it
                        // into plain HTTP); which certificates and settings,
                        // is the policy's now.
                        if let Some(now) = worker.shared.store.load().server.tls.clone() {
                            tls_now = Some(now);
                        }
                        match (&tls_at_start, &tls_now) {
                            (Some(_), Some(tls)) => {
                                let serve = super::tls::serve(worker.clone(), stream, peer, tls.clone());
                                tokio::task::spawn_local(async move {
                                    serve.await;
                                    drop(open);
                                });
                            }
                            _ => {
                                let serve = exchange::serve(worker.clone(), stream, peer, None);
                                tokio::task::spawn_local(async move {
                                    serve.await;
                                    drop(open);
                                });
                            }
                        }
                    }
                    Err(e) => {
                        // Out of descriptors or memory: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                accepted = accept_opt(redirect.as_ref()) => match accepted {
                    Ok((stream, _)) => {
                        let policy = worker.shared.store.load();
                        tokio::task::spawn_local(super::tls::redirect(stream, policy));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed (server.tls.redirect_listen)");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        drop(redirect);
        worker.draining.set(true);
        worker.drain.notify_waiters();
        let deadline = Instant::now() + grace;
        while worker.active.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Client connections open now, in all and by address: `server.max_connections`
/// and `server.max_connections_per_client` (nginx's `limit_conn`,
/// HAProxy's `maxconn`) are checked at accept, before a byte is read.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    by_client: DashMap<IpAddr, usize>,
}

/// One open connection, counted until dropped.
pub struct Open {
    owner: Arc<Connections>,
    client: Option<IpAddr>,
}

impl Connections {
    /// Count a new connection from `peer`, or `None` (counted in
    /// `keygate_connections_refused_total`) when a cap is reached.
    pub fn open(self: &Arc<Self>, peer: IpAddr, server: &crate::policy::Server) -> Option<Open> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= server.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            refused("max_connections");
            return None;
        }
        let cap = server.max_connections_per_client;
        let client = if cap > 0 {
            let bucket = crate::policy::address_bucket(peer, server.ipv6_prefix);
            let mut n = self.by_client.entry(bucket).or_insert(0);
            if *n >= cap {
                drop(n);
                self.open.fetch_sub(1, Ordering::AcqRel);
                refused("max_connections_per_client");
                return None;
            }
            *n += 1;
            Some(bucket)
        } else {
            None
        };
        METRICS.connections_open.inc();
        Some(Open {
            owner: self.clone(),
            client,
        })
    }
}

fn refused(reason: &str) {
    METRICS
        .connections_refused
        .with_label_values(&[reason])
        .inc();
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            self.owner.by_client.remove_if_mut(&client, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
        self.owner.open.fetch_sub(1, Ordering::AcqRel);
        METRICS.connections_open.dec();
    }
}

/// Accept on `listener`, or never when there is none.
async fn accept_opt(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}
