//! What each CLI command does. `main.rs` only parses the command line.

pub mod demo;
pub mod dump;
pub mod explain;
pub mod keys;
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

/// How `keygate check` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// `keygate check`: exit 0 with a summary, or 1 with every error (and,
/// with `strict`, every warning).
pub fn check(path: &Path, format: Format, strict: bool, no_secrets: bool) -> anyhow::Result<()> {
    let placeholders = crate::config::Placeholders {
        real: crate::config::EnvAndFiles {
            base: path.parent().map_or_else(PathBuf::new, Path::to_path_buf),
        },
        unset: Default::default(),
    };
    let compiled = if no_secrets {
        crate::policy::compile_file_with(path, &placeholders)
    } else {
        compile_file(path)
    };
    let unset_note = |items: &mut Vec<ConfigError>| {
        let unset = placeholders.unset.borrow();
        if !unset.is_empty() {
            items.push(ConfigError {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                severity: crate::config::Severity::Warning,
                message: format!(
                    "checked without these environment variables (they must be set where keygate runs): {}",
                    unset.join(", ")
                ),
            });
        }
    };
    let (mut items, summary) = match compiled {
        Ok(compiled) => {
            let mut items = compiled.warnings;
            for id in demo::demo_keys_in(&compiled.policy) {
                items.push(ConfigError {
                    file: path.display().to_string(),
                    line: 0,
                    column: 0,
                    severity: crate::config::Severity::Warning,
                    message: format!(
                        "API key {id:?} is the public demo key from config.example.toml; anyone can use it"
                    ),
                });
            }
            let counts = compiled.policy.counts();
            // The process ends after the report: freeing a policy of a
            // million keys piece by piece would only add to `check`'s time.
            std::mem::forget(compiled.policy);
            (items, Some(counts))
        }
        Err(errors) => (errors, None),
    };
    unset_note(&mut items);
    items.sort_by_key(|e| (e.line, e.column));
    let errors = items
        .iter()
        .filter(|e| e.severity == crate::config::Severity::Error)
        .count();
    let warnings = items.len() - errors;
    let ok = errors == 0 && !(strict && warnings > 0);
    match format {
        Format::Text => {
            print_diagnostics(&items);
            if let Some(counts) = &summary {
                if ok {
                    println!("{}: OK: {counts}", path.display());
                }
            }
        }
        Format::Json => {
            let diagnostics: Vec<_> = items
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "file": e.file,
                        "line": e.line,
                        "column": e.column,
                        "severity": match e.severity {
                            crate::config::Severity::Error => "error",
                            crate::config::Severity::Warning => "warning",
                        },
                        "message": e.message,
                    })
                })
                .collect();
            let report = serde_json::json!({
                "file": path.display().to_string(),
                "ok": ok,
                "errors": errors,
                "warnings": warnings,
                "strict": strict,
                "diagnostics": diagnostics,
                "policy": summary.map(|c| serde_json::json!({
                    "users": c.users,
                    "api_keys": c.api_keys,
                    "routes": c.routes,
                    "tiers": c.tiers,
                    "jwt_keys": c.jwt_keys,
                })),
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    if ok {
        Ok(())
    } else if errors > 0 {
        bail!("{}: {errors} error(s)", path.display())
    } else {
        bail!("{}: {warnings} warning(s), and --strict", path.display())
    }
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
    // Colour only for a person at a terminal: journald and log files
    // would store the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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

/// What `keygate new-api-key` is asked for.
pub struct NewKey<'a> {
    pub prefix: &'a str,
    pub id: Option<&'a str>,
    /// The owner's email or id; the key shares its tier and quota.
    pub user: Option<&'a str>,
    /// For an owner-less key.
    pub tier: Option<&'a str>,
    pub permissions: &'a [String],
    pub ip_allow: &'a [String],
    /// Write the key here (created, mode 0600) instead of to stderr.
    pub key_file: Option<&'a Path>,
}

/// `keygate new-api-key`: the `[[api_keys]]` block on stdout, so that
/// `keygate new-api-key … >> keygate.toml` appends exactly that; the key
/// itself on stderr (or in `--key-file`), shown once.
pub fn new_api_key(req: &NewKey<'_>, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    if req.prefix.contains(['.', ' ', '"']) {
        bail!("the prefix may not contain dots, spaces or quotes");
    }
    if req.user.is_none() == req.tier.is_none() {
        bail!("name the key's owner (--user EMAIL_OR_ID, sharing its tier) or, for an owner-less key, its --tier");
    }
    for cidr in req.ip_allow {
        if cidr.parse::<ipnet::IpNet>().is_err() && cidr.parse::<std::net::IpAddr>().is_err() {
            bail!("--ip-allow {cidr:?} is not an address or CIDR");
        }
    }
    let key = generate_api_key(req.prefix);
    let id = req
        .id
        .map_or_else(|| format!("key-{}", &sha256_hex(&key)[..8]), str::to_string);
    let quote = |v: &str| toml::Value::String(v.to_string()).to_string();
    let list = |vs: &[String]| {
        let items: Vec<String> = vs.iter().map(|v| quote(v)).collect();
        format!("[{}]", items.join(", "))
    };
    let mut block = format!(
        "\n[[api_keys]]\nid = {}\nsha256 = {}\n",
        quote(&id),
        quote(&sha256_hex(&key))
    );
    if let Some(u) = req.user {
        block.push_str(&format!("user = {}\n", quote(u)));
    }
    if let Some(t) = req.tier {
        block.push_str(&format!("tier = {}\n", quote(t)));
    }
    if !req.permissions.is_empty() {
        block.push_str(&format!("permissions = {}\n", list(req.permissions)));
    }
    if !req.ip_allow.is_empty() {
        block.push_str(&format!("ip_allow = {}\n", list(req.ip_allow)));
    }
    match req.key_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::Write::write_all(&mut f, format!("{key}\n").as_bytes())?;
            eprintln!(
                "the new API key is in {} (keygate keeps only its hash)",
                path.display()
            );
        }
        None => {
            eprintln!("New API key {id:?} (shown once; give it to its owner now, keygate keeps only its hash):");
            eprintln!("{key}");
        }
    }
    out.write_all(block.as_bytes())?;
    Ok(())
}

/// The secret in `var`, read as the configuration's `secret_env` is.
fn webhook_secret(var: &str) -> anyhow::Result<Vec<u8>> {
    use crate::config::SecretSource;
    let source = crate::config::EnvAndFiles {
        base: PathBuf::new(),
    };
    match source.env(var) {
        Ok(v) if !v.is_empty() => Ok(v.into_bytes()),
        Ok(_) => bail!("environment variable {var} is empty"),
        Err(e) => bail!("{e}"),
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
    if let Some(ts) = timestamp {
        unix_seconds(ts)?;
    }
    let secret = webhook_secret(secret_env)?;
    let body = stdin_bytes()?;
    println!("{}", crate::webhook::sign(&secret, timestamp, &body));
    Ok(())
}

/// `--timestamp`: Unix seconds, digits only.
fn unix_seconds(ts: &str) -> anyhow::Result<u64> {
    match ts.parse::<u64>() {
        Ok(v) if ts.bytes().all(|b| b.is_ascii_digit()) => Ok(v),
        _ => bail!("--timestamp must be Unix seconds (digits only), not {ts:?}"),
    }
}

/// `keygate webhook verify`: `Ok(true)` when `signature` matches the payload
/// on stdin and, with `--timestamp`, the timestamp is within `tolerance` of
/// now (as the proxy checks it).
pub fn webhook_verify(
    secret_env: &str,
    signature: &str,
    timestamp: Option<&str>,
    tolerance: std::time::Duration,
) -> anyhow::Result<bool> {
    if let Some(ts) = timestamp {
        unix_seconds(ts)?;
        let now = crate::clock::unix_now();
        if let Err(refusal) = crate::webhook::check_timestamp(Some(ts), now, tolerance.as_secs()) {
            println!("invalid: {}", refusal.message());
            return Ok(false);
        }
    }
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
