//! A real `redis-server` for fleet tests: on a free loopback port, no
//! persistence, stopped (and never left frozen) on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub port: u16,
    stopped: bool,
    /// Cluster and Sentinel files live here.
    _dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(super::free_port(), &[], None)
    }

    /// `redis-server` on `port` with `extra` arguments, run in `dir` (a
    /// fresh temporary one when none is given): whatever it writes (a
    /// replica's RDB, cluster files) never lands in the checkout.
    pub fn start_with(port: u16, extra: &[&str], dir: Option<tempfile::TempDir>) -> RedisServer {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("temp dir for redis-server"));
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(dir.path());
        let child = cmd
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let server = RedisServer {
            child,
            port,
            stopped: false,
            _dir: Some(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One inline command; the first line of the reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{}\r\n", args.join(" ")).as_bytes())
            .ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// The whole bulk-string reply of `INFO section`.
    pub fn info(&self, section: &str) -> String {
        self.bulk(&format!("INFO {section}"))
    }

    /// The whole bulk-string reply of an inline command.
    pub fn bulk(&self, command: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut header = String::new();
        r.read_line(&mut header).unwrap();
        let len: usize = header.trim_end().trim_start_matches('$').parse().unwrap();
        let mut body = vec![0u8; len];
        std::io::Read::read_exact(&mut r, &mut body).unwrap();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Calls of the GCRA script so far (`EVALSHA` and `EVAL`).
    pub fn script_calls(&self) -> u64 {
        self.info("commandstats")
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// Freeze the server (it keeps its socket, answers nothing).
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    pub fn kill(&mut self) {
        if self.stopped {
            return;
        }
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped = true;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port `p` with `p + 10000` (the cluster bus) free too.
fn free_cluster_port() -> u16 {
    loop {
        let p = super::free_port();
        if p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

/// A Redis Cluster of `masters` masters (no replicas) on loopback, built
/// with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ];
                RedisServer::start_with(free_cluster_port(), &args, Some(dir))
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|n| n.bulk("CLUSTER INFO").contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    pub fn script_calls(&self) -> u64 {
        self.nodes.iter().map(RedisServer::script_calls).sum()
    }
}

/// A master, one replica and one Sentinel watching them as `kgmaster`.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel: RedisServer,
}

impl RedisSentinel {
    pub const NAME: &'static str = "kgmaster";

    pub fn start() -> RedisSentinel {
        let master = RedisServer::start();
        let replica = RedisServer::start_with(
            super::free_port(),
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !replica
            .info("replication")
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the replica did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let conf = format!(
            "port {port}\nbind 127.0.0.1\nsentinel monitor {n} 127.0.0.1 {m} 1\n\
             sentinel down-after-milliseconds {n} 1000\nsentinel failover-timeout {n} 5000\n",
            n = Self::NAME,
            m = master.port
        );
        std::fs::write(dir.path().join("sentinel.conf"), conf).unwrap();
        let mut cmd = Command::new("redis-server");
        let child = cmd
            .current_dir(dir.path())
            .args(["sentinel.conf", "--sentinel"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let sentinel = RedisServer {
            child,
            port,
            stopped: false,
            _dir: Some(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready once it knows the replica (it may fail over to it).
        while !sentinel
            .command(&["SENTINEL", "replicas", Self::NAME])
            .is_some_and(|l| l.starts_with('*') && l != "*0")
        {
            assert!(
                Instant::now() < deadline,
                "the sentinel did not find the replica"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisSentinel {
            master,
            replica,
            sentinel,
        }
    }

    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://127.0.0.1:{}/{}",
            self.sentinel.port,
            Self::NAME
        )
    }

    /// Promote the replica; returns once the sentinel names it the master.
    pub fn fail_over(&self) {
        let said = self.sentinel.command(&["SENTINEL", "failover", Self::NAME]);
        assert_eq!(said.as_deref(), Some("+OK"), "SENTINEL failover");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.replica.info("replication").contains("role:master")
            && self.master.info("replication").contains("role:slave"))
        {
            assert!(Instant::now() < deadline, "the failover did not complete");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A redis-server that speaks only TLS, with a certificate for 127.0.0.1
/// signed by a CA made for the test (`ca.pem` in `dir`).
pub struct RedisTls {
    pub server: RedisServer,
    pub ca: std::path::PathBuf,
}

impl RedisTls {
    pub fn start() -> RedisTls {
        let dir = tempfile::tempdir().unwrap();
        server_certificate(dir.path());
        let ca = dir.path().join("ca.pem");
        let port = super::free_port().to_string();
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            "srv.pem",
            "--tls-key-file",
            "srv.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
        ];
        // start_with waits for a plain-text PING, which a TLS-only server
        // never answers: start it by hand.
        let child = Command::new("redis-server")
            .current_dir(dir.path())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server with TLS");
        let port: u16 = port.parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server (TLS) did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisTls {
            server: RedisServer {
                child,
                port,
                stopped: false,
                _dir: Some(dir),
            },
            ca,
        }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.server.port)
    }
}

/// One master (plain, no password) and one Sentinel watching it that asks
/// for its own password (`requirepass`) and speaks only TLS, with a
/// certificate for 127.0.0.1 signed by a CA made for the test (`ca`).
pub struct GuardedSentinel {
    pub master: RedisServer,
    pub sentinel: RedisServer,
    pub ca: std::path::PathBuf,
    pub password: &'static str,
}

impl GuardedSentinel {
    pub fn start() -> GuardedSentinel {
        let master = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        server_certificate(dir.path());
        let password = "sentinel-test-password";
        let port = super::free_port();
        let conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file srv.pem\ntls-key-file srv.key\n\
             tls-ca-cert-file ca.pem\ntls-auth-clients no\nrequirepass {password}\n\
             sentinel monitor {n} 127.0.0.1 {m} 1\nsentinel down-after-milliseconds {n} 1000\n",
            n = RedisSentinel::NAME,
            m = master.port
        );
        std::fs::write(dir.path().join("sentinel.conf"), conf).unwrap();
        let child = Command::new("redis-server")
            .current_dir(dir.path())
            .args(["sentinel.conf", "--sentinel"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel with TLS");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the TLS sentinel did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ca = dir.path().join("ca.pem");
        GuardedSentinel {
            master,
            sentinel: RedisServer {
                child,
                port,
                stopped: false,
                _dir: Some(dir),
            },
            ca,
            password,
        }
    }

    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://127.0.0.1:{}/{}",
            self.sentinel.port,
            RedisSentinel::NAME
        )
    }
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it
/// (`srv.pem`, `srv.key`), written into `dir` by openssl.
fn server_certificate(dir: &std::path::Path) {
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args.split_whitespace())
            .output()
            .expect("run openssl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "openssl {args}: {err}");
    };
    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=keygate-test-ca");
    openssl("req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost");
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl("x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext");
}
