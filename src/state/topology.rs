//! Connections to a fleet's Redis, whichever deployment its [`Topology`]
//! (parsed from `[state] url` by the policy) names.
//!
//! The proxy threads use [`AsyncConn`]; the token endpoints, which run on
//! blocking threads, use [`SyncPool`]. Both follow the deployment: the
//! cluster connection follows slot moves, and a Sentinel connection asks
//! the Sentinels for the master again after a connection error or a
//! `READONLY` answer (a failover turned its master into a replica).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, ConnectionInfo, RedisResult, TlsMode};

pub use crate::policy::topology::{Topology, URL_FORMS};
use crate::policy::RedisSettings;

/// After a failed connection attempt, ConnectionManager waits at most this long.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(250);

fn tls_certs(settings: &RedisSettings) -> Option<redis::TlsCertificates> {
    settings.tls_ca.as_ref().map(|pem| redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.clone()),
    })
}

fn client(settings: &RedisSettings, info: ConnectionInfo) -> RedisResult<Client> {
    match tls_certs(settings) {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
}

fn sentinel_client(settings: &RedisSettings) -> RedisResult<SentinelClient> {
    let Topology::Sentinel {
        sentinels,
        master,
        db,
        username,
        password,
        tls,
    } = &settings.topology
    else {
        unreachable!("sentinel_client on a non-Sentinel topology");
    };
    let access = &settings.sentinel;
    let sentinels = sentinels.iter().map(|addr| match addr {
        ConnectionAddr::Tcp(host, port) if access.tls => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        },
        other => other.clone(),
    });
    let mut b = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)?
        .set_client_to_redis_db(*db);
    if let Some(u) = username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = password {
        b = b.set_client_to_redis_password(p);
    }
    if *tls {
        b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(certs) = tls_certs(settings) {
            b = b.set_client_to_redis_certificates(certs);
        }
    }
    // The Sentinels are servers of their own: their own password (their
    // `requirepass`), and TLS when their `tls-port` is what is named.
    if let Some(u) = &access.username {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &access.password {
        b = b.set_client_to_sentinel_password(p);
    }
    if access.tls {
        b = b.set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certs) = tls_certs(settings) {
            b = b.set_client_to_sentinel_certificates(certs);
        }
    }
    b.build()
}

/// Is this error one after which the connection (or the master it points
/// at) should not be used again?
fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("READONLY")
}

/// How a proxy thread talks to Redis. Every variant reconnects by itself.
#[derive(Clone)]
pub enum AsyncConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(SentinelConn),
}

/// The master the Sentinels name, asked again after a failure.
/// Clones share the master connection and forget it together.
#[derive(Clone)]
pub struct SentinelConn {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    current: Arc<Mutex<Option<redis::aio::MultiplexedConnection>>>,
    settings: Arc<RedisSettings>,
}

impl SentinelConn {
    async fn master(&self) -> RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(conn) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(conn);
        }
        let client = self.sentinel.lock().await.async_get_client().await?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(self.settings.timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn settings_db(&self) -> i64 {
        match &self.settings.topology {
            Topology::Sentinel { db, .. } => *db,
            _ => 0,
        }
    }

    fn after<T>(&self, result: &RedisResult<T>) {
        if let Err(e) = result {
            if connection_lost(e) {
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

impl AsyncConn {
    /// Set up a connection for `settings`; it connects on first use.
    pub async fn open(settings: &Arc<RedisSettings>) -> RedisResult<AsyncConn> {
        match &settings.topology {
            Topology::Single(info) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.connect_timeout))
                    .set_response_timeout(Some(settings.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(MAX_RECONNECT_DELAY);
                let client = client(settings, info.clone())?;
                Ok(AsyncConn::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
            Topology::Cluster(nodes) => {
                let mut b = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.timeout)
                    .retries(1);
                if let Some(certs) = tls_certs(settings) {
                    b = b.certs(certs);
                }
                let conn = b.build()?.get_async_connection().await?;
                Ok(AsyncConn::Cluster(conn))
            }
            Topology::Sentinel { .. } => Ok(AsyncConn::Sentinel(SentinelConn {
                sentinel: Arc::new(tokio::sync::Mutex::new(sentinel_client(settings)?)),
                current: Arc::new(Mutex::new(None)),
                settings: settings.clone(),
            })),
        }
    }
}

impl redis::aio::ConnectionLike for AsyncConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AsyncConn::Single(c) => c.req_packed_command(cmd),
            AsyncConn::Cluster(c) => c.req_packed_command(cmd),
            AsyncConn::Sentinel(s) => Box::pin(async move {
                let result = async { s.master().await?.req_packed_command(cmd).await }.await;
                s.after(&result);
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AsyncConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            AsyncConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            AsyncConn::Sentinel(s) => Box::pin(async move {
                let result = async {
                    let mut master = s.master().await?;
                    master.req_packed_commands(pipeline, offset, count).await
                }
                .await;
                s.after(&result);
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AsyncConn::Single(c) => c.get_db(),
            AsyncConn::Cluster(c) => c.get_db(),
            AsyncConn::Sentinel(s) => s.settings_db(),
        }
    }
}

/// Blocking connections for the token endpoints (which run on blocking
/// threads beside argon2): at most [`MAX_SYNC_CONNECTIONS`] open, kept for
/// reuse, one dropped after any connection error. A call that finds them
/// all busy waits for one (up to `token_timeout`) instead of opening
/// another: a flood of logins costs Redis a fixed number of connections.
pub struct SyncPool {
    settings: Arc<RedisSettings>,
    conns: Mutex<Conns>,
    returned: std::sync::Condvar,
    cluster: Option<redis::cluster::ClusterClient>,
    sentinel: Option<Arc<Mutex<SentinelClient>>>,
}

#[derive(Default)]
struct Conns {
    idle: Vec<SyncConn>,
    /// Idle and in use.
    open: usize,
}

/// Why [`SyncPool::with`] did not run a call.
#[derive(Debug)]
pub enum PoolError {
    /// Every connection stayed in use for `token_timeout`.
    Busy,
    Redis(redis::RedisError),
}

/// A place in the pool and, once connected, its connection: given back
/// when dropped (the place alone when the connection failed, or when the
/// call panicked and the connection's state is unknown).
struct Lease<'a> {
    pool: &'a SyncPool,
    conn: Option<SyncConn>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let conn = self.conn.take().filter(|_| !std::thread::panicking());
        let mut conns = self.pool.conns.lock().unwrap_or_else(|e| e.into_inner());
        match conn {
            Some(c) => conns.idle.push(c),
            None => conns.open -= 1,
        }
        drop(conns);
        self.pool.returned.notify_one();
    }
}

pub enum SyncConn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl SyncConn {
    pub fn as_dyn(&mut self) -> &mut dyn redis::ConnectionLike {
        match self {
            SyncConn::Single(c) => c,
            SyncConn::Cluster(c) => c.as_mut(),
        }
    }
}

pub const MAX_SYNC_CONNECTIONS: usize = 8;

impl SyncPool {
    pub fn new(settings: Arc<RedisSettings>) -> RedisResult<SyncPool> {
        let cluster = match &settings.topology {
            Topology::Cluster(nodes) => {
                let mut b = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.token_timeout)
                    .retries(1);
                if let Some(certs) = tls_certs(&settings) {
                    b = b.certs(certs);
                }
                Some(b.build()?)
            }
            _ => None,
        };
        let sentinel = match &settings.topology {
            Topology::Sentinel { .. } => Some(Arc::new(Mutex::new(sentinel_client(&settings)?))),
            _ => None,
        };
        Ok(SyncPool {
            settings,
            conns: Mutex::default(),
            returned: std::sync::Condvar::new(),
            cluster,
            sentinel,
        })
    }

    /// Run `f` on a connection; a connection that failed is not reused.
    /// [`PoolError::Busy`] when all [`MAX_SYNC_CONNECTIONS`] stayed in use
    /// for `token_timeout`: contention, not Redis being down.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn redis::ConnectionLike) -> RedisResult<T>,
    ) -> Result<T, PoolError> {
        let mut lease = Lease {
            pool: self,
            conn: self.take()?,
        };
        if lease.conn.is_none() {
            lease.conn = Some(self.connect().map_err(PoolError::Redis)?);
        }
        let conn = lease.conn.as_mut().expect("a connection was just set");
        let result = f(conn.as_dyn());
        if matches!(&result, Err(e) if connection_lost(e)) {
            lease.conn = None;
        }
        result.map_err(PoolError::Redis)
    }

    /// Run `f` as [`SyncPool::with`] does, but never wait: when all the
    /// pool's connections are in use, on one opened for it alone and
    /// closed after, outside the cap. `/readyz` must tell whether Redis
    /// answers, not wait behind a flood of logins.
    pub fn with_spare<T>(
        &self,
        f: impl FnOnce(&mut dyn redis::ConnectionLike) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let placed = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            match conns.idle.pop() {
                Some(c) => Some(Some(c)),
                None if conns.open < MAX_SYNC_CONNECTIONS => {
                    conns.open += 1;
                    Some(None)
                }
                None => None,
            }
        };
        let Some(conn) = placed else {
            return f(self.connect()?.as_dyn());
        };
        let mut lease = Lease { pool: self, conn };
        if lease.conn.is_none() {
            lease.conn = Some(self.connect()?);
        }
        let conn = lease.conn.as_mut().expect("a connection was just set");
        let result = f(conn.as_dyn());
        if matches!(&result, Err(e) if connection_lost(e)) {
            lease.conn = None;
        }
        result
    }

    /// An idle connection, or `None` with a place to open one; waits while
    /// all [`MAX_SYNC_CONNECTIONS`] are in use.
    fn take(&self) -> Result<Option<SyncConn>, PoolError> {
        let deadline = std::time::Instant::now() + self.settings.token_timeout;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = conns.idle.pop() {
                return Ok(Some(c));
            }
            if conns.open < MAX_SYNC_CONNECTIONS {
                conns.open += 1;
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(PoolError::Busy);
            }
            conns = self
                .returned
                .wait_timeout(conns, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Connections open now (idle and in use).
    pub fn open(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).open
    }

    fn connect(&self) -> RedisResult<SyncConn> {
        let s = &self.settings;
        let single = |client: Client| -> RedisResult<SyncConn> {
            let conn = client.get_connection_with_timeout(s.connect_timeout)?;
            conn.set_read_timeout(Some(s.token_timeout))?;
            conn.set_write_timeout(Some(s.token_timeout))?;
            Ok(SyncConn::Single(conn))
        };
        match &s.topology {
            Topology::Single(info) => single(client(s, info.clone())?),
            Topology::Cluster(_) => {
                let cluster = self.cluster.as_ref().expect("built for a cluster");
                Ok(SyncConn::Cluster(Box::new(cluster.get_connection()?)))
            }
            Topology::Sentinel { .. } => {
                // redis-rs' blocking Sentinel lookup has no deadline of its
                // own: run it on a thread of its own and wait at most
                // connect_timeout. While one lookup hangs, others fail at
                // once instead of queueing behind it.
                let sentinel = self.sentinel.clone().expect("built for Sentinel");
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let Ok(mut guard) = sentinel.try_lock() else {
                        let _ = tx.send(Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "a Sentinel lookup is already hanging",
                        ))));
                        return;
                    };
                    let _ = tx.send(guard.get_client());
                });
                let client = rx.recv_timeout(s.connect_timeout).map_err(|_| {
                    redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the Sentinels did not answer in time",
                    ))
                })??;
                single(client)
            }
        }
    }
}
