//! Helpers for black-box tests: a real HTTP upstream on a loopback port it
//! picks itself, the real `keygate` binary in front of it, and an HTTP client.
#![allow(dead_code, unused_imports)]

pub mod delay;
pub mod h2raw;
pub mod redis;
pub mod seed;
pub mod strict;
pub mod tls;
pub mod upstream;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use upstream::Upstream;

/// The test policy's secrets and keys, shared with the unit tests.
pub use keygate::policy::testing::{
    HS_SECRET, KEY_CI, KEY_DANA, KEY_DEPLOY, KEY_DISABLED, KEY_EXPIRED, KEY_OFFICE,
    KEY_OF_DISABLED_USER,
};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A loopback port that was free a moment ago, and never handed out before
/// in this test process (the kernel may give a just-closed port again, so
/// `listen` and `admin_listen` could otherwise get the same one).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running keygate. Killed on drop; its stderr is kept for failure messages.
pub struct Keygate {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    /// For `{relay}` in the config.
    pub relay_port: u16,
}

impl Keygate {
    /// Start keygate on `config`, in which `{listen}`, `{admin}`, `{upstream}`,
    /// `{keys}` and `{state}` are filled in. Waits until `/healthz` answers.
    pub fn start(config: &str, upstream_port: u16) -> Keygate {
        Self::start_with_env(config, upstream_port, &[])
    }

    pub fn start_with_env(config: &str, upstream_port: u16, env: &[(&str, &str)]) -> Keygate {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let admin_port = free_port();
        let mut kg = Keygate {
            child: Command::new("true").spawn().expect("placeholder process"),
            dir,
            port,
            admin_port,
            relay_port: free_port(),
        };
        // A port picked free can be taken by another test before keygate
        // binds it: pick again then.
        for _ in 0..3 {
            kg.write_config(config, upstream_port);
            match kg.try_spawn(env) {
                Ok(()) => return kg,
                Err(log) if log.contains("Address already in use") => {
                    kg.port = free_port();
                    kg.admin_port = free_port();
                    kg.relay_port = free_port();
                    let _ = std::fs::remove_file(kg.dir.path().join("stderr.log"));
                }
                Err(log) => panic!("{log}"),
            }
        }
        panic!("no free ports for keygate after three tries");
    }

    /// Write `config` (placeholders filled) as this keygate's file.
    pub fn write_config(&self, config: &str, upstream_port: u16) {
        let (dir, port, admin_port) = (&self.dir, self.port, self.admin_port);
        let text = config
            .replace("{listen}", &format!("127.0.0.1:{port}"))
            .replace("{relay}", &format!("127.0.0.1:{}", self.relay_port))
            .replace("{admin}", &format!("127.0.0.1:{admin_port}"))
            .replace("{upstream}", &format!("http://127.0.0.1:{upstream_port}"))
            .replace("{keys}", &fixture("keys").display().to_string())
            .replace("{state}", &dir.path().join("state").display().to_string());
        std::fs::write(dir.path().join("keygate.toml"), text).expect("write config");
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        if let Err(log) = self.try_spawn(env) {
            panic!("{log}");
        }
    }

    fn try_spawn(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        let dir = &self.dir;
        let path = dir.path().join("keygate.toml");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("stderr.log"))
            .expect("log file");
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("stdout.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        cmd.arg("run")
            .arg("-c")
            .arg(&path)
            .env("KEYGATE_TEST_HS", HS_SECRET)
            .env("RUST_LOG", "info")
            .stdout(stdout)
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = cmd.spawn().expect("start keygate");
        self.wait_healthy()
    }

    /// SIGTERM, and wait until it has exited.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let _ = self.child.wait();
    }

    /// Start again (after [`Keygate::stop`]) on the same file, ports and
    /// state directory.
    pub fn start_again(&mut self) {
        self.spawn(&[]);
    }

    /// `kill -9`, then start again on the same file, ports and state directory.
    pub fn kill9_and_restart(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
        self.spawn(&[]);
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = client();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("keygate exited with {status}:\n{}", self.stderr()));
            }
            let admin = client.get(self.admin("/healthz")).send();
            let public = std::net::TcpStream::connect(("127.0.0.1", self.port));
            if admin.is_ok_and(|r| r.status() == 200) && public.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "keygate did not become healthy:\n{}",
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("keygate.toml")
    }

    pub fn stderr(&self) -> String {
        self.read_log("stderr.log")
    }

    /// The access log so far.
    pub fn stdout(&self) -> String {
        self.read_log("stdout.log")
    }

    fn read_log(&self, name: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join(name)) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// The value of one sample line of `/metrics`, e.g.
    /// `keygate_auth_denials_total{code="invalid_token"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let text = client()
            .get(self.admin("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("scrape metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client whose connections come from `local` (any 127.0.0.0/8 address):
/// from 127.0.0.2, the test config's trusted proxy, it speaks for whoever
/// its `X-Forwarded-For` names.
pub fn client_at(local: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .local_address(local.parse::<std::net::IpAddr>().expect("an address"))
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client")
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client")
}

/// The one test policy (`tests/fixtures/policy.toml`, shared with the
/// unit tests and benches); [`Keygate`] fills in its addresses and paths.
pub fn config() -> String {
    keygate::policy::testing::fixture_toml()
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// The password of every user in [`config_with_passwords`].
pub const PASSWORD: &str = "correct horse battery staple";

/// [`config`] with `PASSWORD` set for every user.
pub fn config_with_passwords() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let phc = argon2::Argon2::default()
        .hash_password(PASSWORD.as_bytes(), &salt)
        .expect("hash")
        .to_string();
    let mut out = String::new();
    for line in config().lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("id = \"u_") {
            out.push_str(&format!("password_hash = \"{phc}\"\n"));
        }
    }
    out
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Claims valid now for `sub`, with the configured issuer and audience.
pub fn claims(sub: &str) -> serde_json::Value {
    keygate::policy::testing::claims(sub, now())
}

/// Sign with the test key `kid` (hs, hs384, ed, es, rs).
pub fn sign(kid: &str, claims: &serde_json::Value) -> String {
    keygate::policy::testing::sign(kid, claims)
}

pub fn token(sub: &str) -> String {
    sign("hs", &claims(sub))
}

/// Run a one-shot `keygate` command (`state export`, `check`, …) with the
/// test policy's secrets in its environment.
pub fn keygate_command(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .expect("run keygate")
}

/// `keygate state import -c config file`.
pub fn state_import(config: &str, file: &Path) -> std::process::Output {
    keygate_command(&["state", "import", "-c", config, &file.display().to_string()])
}

/// POST a JSON body; the status and the JSON answer (`null` when not JSON).
pub fn post_json(kg: &Keygate, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = client().post(kg.url(path)).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(serde_json::Value::Null))
}

/// Log alice in with [`PASSWORD`]; her refresh token.
pub fn login_alice(kg: &Keygate) -> String {
    let body = serde_json::json!({"email": "alice@example.com", "password": PASSWORD});
    let (status, t) = post_json(kg, "/api/v1/auth/token", &body);
    assert_eq!(status, 200, "{t}");
    t["refresh_token"].as_str().unwrap().to_string()
}

/// Present a refresh token: the status, and the new refresh token (200) or
/// the error code.
pub fn refresh_with(kg: &Keygate, token: &str) -> (u16, String) {
    let body = serde_json::json!({"refresh_token": token});
    let (status, body) = post_json(kg, "/api/v1/auth/refresh", &body);
    let said = if status == 200 {
        body["refresh_token"].as_str().unwrap_or("").to_string()
    } else {
        body["error"]["code"].as_str().unwrap_or("").to_string()
    };
    (status, said)
}
