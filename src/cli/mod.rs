//! What each CLI command does. `main.rs` only parses the command line.

pub mod demo;
pub mod explain;
pub mod state;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::policy::{compile_file, Compiled, Policy};

/// `-c FILE`, else `$KEYGATE_CONFIG`, else `./keygate.toml`.
pub fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("KEYGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("keygate.toml"))
}

/// Compile or print every problem and fail.
pub fn load(path: &Path) -> anyhow::Result<Compiled> {
    match compile_file(path) {
        Ok(compiled) => Ok(compiled),
        Err(errors) => {
            print_diagnostics(&errors);
            let n = errors
                .iter()
                .filter(|e| e.severity == crate::config::Severity::Error)
                .count();
            bail!("{}: {n} error(s); nothing was started", path.display())
        }
    }
}

fn print_diagnostics(items: &[ConfigError]) {
    for e in items {
        eprintln!("{e}");
    }
}

/// `keygate check`: exit 0 with a summary, or 1 with every error.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let compiled = load(path)?;
    print_diagnostics(&compiled.warnings);
    for id in demo::demo_keys_in(&compiled.policy) {
        eprintln!(
            "{}: warning: API key {id:?} is the public demo key from config.example.toml; anyone can use it",
            path.display()
        );
    }
    println!("{}: OK: {}", path.display(), compiled.policy.counts());
    Ok(())
}

/// `keygate run`.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let compiled = load(path)?;
    init_tracing(&compiled.policy);
    for w in &compiled.warnings {
        tracing::warn!("{w}");
    }
    warn_about_demo_keys(&compiled.policy);
    crate::proxy::serve(path, compiled.policy, None)
}

pub(crate) fn warn_about_demo_keys(policy: &Policy) {
    for id in demo::demo_keys_in(policy) {
        tracing::warn!(key = %id, "this API key is the public demo key from config.example.toml");
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the configured level.
pub fn init_tracing(policy: &Policy) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&policy.log.level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A fresh API key: the prefix and 256 random bits in base62.
pub fn generate_api_key(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    // 43 base62 digits carry 256.1 bits.
    let body: String = (0..43)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `keygate new-api-key`.
pub fn new_api_key(prefix: &str, id: Option<&str>) -> anyhow::Result<()> {
    if prefix.contains(['.', ' ', '"']) {
        bail!("the prefix may not contain dots, spaces or quotes");
    }
    let key = generate_api_key(prefix);
    let id = id.map_or_else(|| format!("key-{}", &sha256_hex(&key)[..8]), str::to_string);
    eprintln!("New API key (shown once; give it to its owner now, keygate keeps only its hash):");
    println!("{key}");
    eprintln!();
    eprintln!("Add this to the configuration file:");
    println!();
    println!("[[api_keys]]");
    println!("id = {id:?}");
    println!("sha256 = {:?}", sha256_hex(&key));
    println!("# user = \"alice@example.com\"   # the owner: shares its tier and quota");
    println!("# tier = \"free\"                # required when there is no user");
    println!("# permissions = [\"vms:read\"]");
    Ok(())
}

/// The secret named by `--secret-env`.
fn webhook_secret(var: &str) -> anyhow::Result<Vec<u8>> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v.into_bytes()),
        _ => bail!("environment variable {var} is not set (or empty)"),
    }
}

fn stdin_bytes() -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .context("reading the payload from stdin")?;
    Ok(body)
}

/// `keygate webhook sign`: the header value for the payload on stdin,
/// byte for byte (a trailing newline is part of the payload).
pub fn webhook_sign(secret_env: &str, timestamp: Option<&str>) -> anyhow::Result<()> {
    let secret = webhook_secret(secret_env)?;
    let body = stdin_bytes()?;
    println!("{}", crate::webhook::sign(&secret, timestamp, &body));
    Ok(())
}

/// `keygate webhook verify`: `Ok(true)` when `signature` matches the payload on stdin.
pub fn webhook_verify(
    secret_env: &str,
    signature: &str,
    timestamp: Option<&str>,
) -> anyhow::Result<bool> {
    let secret = webhook_secret(secret_env)?;
    let body = stdin_bytes()?;
    match crate::webhook::verify(&[secret], Some(signature), timestamp, &body) {
        Ok(()) => {
            println!("valid");
            Ok(true)
        }
        Err(refusal) => {
            println!("invalid: {}", refusal.message());
            Ok(false)
        }
    }
}

/// `keygate hash-password`: a password on stdin, an argon2id PHC string out.
pub fn hash_password() -> anyhow::Result<()> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the password from stdin")?;
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("no password on stdin");
    }
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("{hash}");
    Ok(())
}
