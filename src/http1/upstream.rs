//! Connections to the upstream: plain TCP or TLS, and each worker's pool
//! of idle keep-alive connections. A
//! pool belongs to one worker thread, so taking and returning a connection
//! is a `Vec` push and pop, no lock.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pingora::tls::{ClientConfig, ClientTlsStream, RootCertStore, ServerName, TlsConnector};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Where the upstream is and how to open a connection to it: all the
/// engine needs of the application's upstream settings.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL as written: for messages, and what pooled connections are
    /// filed under (a reload to another upstream never reuses one).
    pub url: Arc<str>,
    pub addr: std::net::SocketAddr,
    pub tls: bool,
    /// Host name for TLS SNI (empty for plain HTTP).
    pub sni: String,
    pub connect_timeout: Duration,
}

/// Idle connections kept per worker thread (nginx's `keepalive` directive;
/// Envoy's default connection limit per cluster is 1024). An HTTP/2 client
/// with hundreds of streams in flight needs as many upstream connections:
/// with fewer kept, every burst would close and reopen the difference.
pub const POOL_SIZE: usize = 1024;
/// An idle connection older than this is closed rather than reused; below
/// the common upstream keep-alive timeouts (nginx 75 s, Node 5 s is the
/// exception and is caught by the retry).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

impl Conn {
    /// An idle connection is usable while it has nothing to read: EOF or
    /// stray bytes both mean the upstream is done with it. Probed through
    /// the stream itself, so bytes a TLS session already decrypted and
    /// buffered count too.
    fn is_idle_and_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why no connection could be had; `Timeout` becomes 504, the rest 502.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Refused(io::Error),
    Tls(io::Error),
}

/// Open a new connection within the upstream's connect timeout.
pub async fn connect(up: &Endpoint) -> Result<Conn, ConnectError> {
    let open = async {
        let tcp = TcpStream::connect(up.addr)
            .await
            .map_err(ConnectError::Refused)?;
        tcp.set_nodelay(true).map_err(ConnectError::Refused)?;
        if !up.tls {
            return Ok(Conn::Plain(tcp));
        }
        let name = ServerName::try_from(up.sni.clone())
            .map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let tls = tls_connector()
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(Conn::Tls(Box::new(tls)))
    };
    tokio::time::timeout(up.connect_timeout, open)
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

/// One TLS client configuration per process: the platform's roots, plus
/// whatever `SSL_CERT_FILE` / `SSL_CERT_DIR` name (as curl and OpenSSL do).
fn tls_connector() -> &'static TlsConnector {
    static CONNECTOR: OnceLock<TlsConnector> = OnceLock::new();
    CONNECTOR.get_or_init(|| {
        pingora::tls::install_default_crypto_provider();
        let mut roots = RootCertStore::empty();
        if let Err(e) = pingora::tls::load_platform_certs_incl_env_into_store(&mut roots) {
            tracing::warn!(error = %e, "could not load the platform's CA certificates");
        }
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    })
}

/// The idle connections of one worker, newest last.
pub struct Pool {
    idle: RefCell<std::collections::VecDeque<Idle>>,
}

struct Idle {
    conn: Conn,
    /// Which upstream it leads to, so a reload to another one never reuses it.
    upstream: Arc<str>,
    since: Instant,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            idle: RefCell::new(std::collections::VecDeque::with_capacity(64)),
        }
    }

    /// The most recently used live connection to `up`, if any.
    pub fn take(&self, up: &Endpoint) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        while let Some(mut entry) = idle.pop_back() {
            if (Arc::ptr_eq(&entry.upstream, &up.url) || entry.upstream == up.url)
                && entry.since.elapsed() < IDLE_TIMEOUT
                && entry.conn.is_idle_and_open()
            {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Keep a connection whose last exchange ended cleanly.
    pub fn put(&self, up: &Endpoint, conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() >= POOL_SIZE {
            // Oldest out: it is the likeliest to be closed by the upstream anyway.
            idle.pop_front();
        }
        idle.push_back(Idle {
            conn,
            upstream: up.url.clone(),
            since: Instant::now(),
        });
    }
}
