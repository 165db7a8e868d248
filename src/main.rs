//! The `keygate` command line. Parsing only; each command but `completions`
//! and `man` (which need the parser itself) lives in `keygate::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// `keygate --version`: the release, the commit and the compiler.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEYGATE_GIT_COMMIT"),
    ", ",
    env!("KEYGATE_RUSTC_VERSION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "keygate",
    version = VERSION,
    about = "Authenticating reverse-proxy sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (config: -c FILE, else $KEYGATE_CONFIG, else ./keygate.toml)
    Run {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print a summary; exit 1 on any error
    Check {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The file, as an alternative to -c
        #[arg(value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// text (file:line:col: message lines) or json (one object on stdout)
        #[arg(long, value_enum, default_value_t = keygate::cli::Format::Text)]
        format: keygate::cli::Format,
        /// Warnings fail the check too (exit 1)
        #[arg(long)]
        strict: bool,
        /// Check without production secrets: unset environment variables get placeholders
        /// and are listed (files named by *_file must still exist)
        #[arg(long)]
        no_secrets: bool,
    },
    /// Print a fresh API key once, and the [[api_keys]] lines (with its hash) to paste
    ///
    /// The [[api_keys]] block goes to stdout (so `>> keygate.toml` appends just that),
    /// the key to stderr or --key-file.
    NewApiKey {
        /// The key's prefix (lets secret scanners recognise it)
        #[arg(long, default_value = "vmc_")]
        prefix: String,
        /// The key's id in the policy and the logs (default: key-<first hash digits>)
        #[arg(long)]
        id: Option<String>,
        /// The owner (email or user id): the key shares the user's tier and quota
        #[arg(long, conflicts_with = "tier", required_unless_present = "tier")]
        user: Option<String>,
        /// The tier of an owner-less key
        #[arg(long)]
        tier: Option<String>,
        /// Permissions of the key (comma-separated; an owned key never holds more than its owner)
        #[arg(long, value_delimiter = ',')]
        permissions: Vec<String>,
        /// Addresses or CIDRs the key may be used from (comma-separated)
        #[arg(long, value_delimiter = ',')]
        ip_allow: Vec<String>,
        /// Write the key to this new file (mode 0600) instead of stderr
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Read a password from stdin and print an argon2id PHC string
    HashPassword,
    /// Show how the proxy would decide one request, step by step; exit 0 allow, 1 deny
    Explain {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        path: String,
        /// The client's address (the socket peer)
        #[arg(long, default_value = "127.0.0.1")]
        ip: std::net::IpAddr,
        /// A Bearer credential (JWT or API key)
        #[arg(long, conflicts_with = "api_key")]
        token: Option<String>,
        /// An API key, sent in the configured API-key header
        #[arg(long)]
        api_key: Option<String>,
        /// An extra request header, 'Name: value' (repeatable)
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// A client certificate (PEM), as if presented in the TLS handshake
        #[arg(long, value_name = "FILE")]
        client_cert: Option<PathBuf>,
    },
    /// Sign or verify a webhook payload read from stdin
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
    /// Show the configuration as keygate reads it
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Manage a user's self-service API keys on the running instance (its admin listener)
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Move live state (refresh tokens, spent quotas) between stores, e.g. embedded to Redis
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `keygate man > /usr/share/man/man1/keygate.1`
    Man,
    /// Serve the example configuration with a built-in sample VM API, printing curl lines to try
    Demo {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print every file of the configuration (includes too) with inline secrets redacted,
    /// then the effective settings with defaults filled in (like `nginx -T`)
    Dump {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make a key for a user and print it (the only time it is shown)
    Create {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The owner (email or user id)
        #[arg(long, value_name = "EMAIL")]
        user: String,
        /// A name for the key
        #[arg(long, default_value = "cli")]
        name: String,
        /// Its permissions (comma-separated; never more than the owner's; default: the owner's but keys:manage)
        #[arg(long, value_delimiter = ',')]
        permissions: Option<Vec<String>>,
        /// Addresses or CIDRs it may be used from (comma-separated)
        #[arg(long, value_delimiter = ',', value_name = "CIDR")]
        ip_allow: Option<Vec<String>>,
        /// When it ends, from now (e.g. 90d)
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// List a user's live keys (never the keys themselves)
    List {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The owner (email or user id)
        #[arg(long, value_name = "EMAIL")]
        user: String,
    },
    /// Revoke a key at once, on every sidecar
    Revoke {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The key's id (key_…)
        id: String,
        /// Refuse unless the key is this user's
        #[arg(long, value_name = "EMAIL")]
        user: Option<String>,
    },
    /// Make a new key in place of one; the old one keeps working for the grace period
    Roll {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The key's id (key_…)
        id: String,
        /// Refuse unless the key is this user's
        #[arg(long, value_name = "EMAIL")]
        user: Option<String>,
        /// How long the old key keeps working (default: [auth.self_service] default_grace)
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Print the store's live records as JSON lines (embedded store; stop keygate first)
    Export {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write an export into the store this configuration names (embedded or Redis)
    Import {
        /// The configuration file (default: $KEYGATE_CONFIG, else ./keygate.toml)
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The export; - or nothing for stdin
        #[arg(value_name = "EXPORT")]
        input: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum WebhookAction {
    /// Print the X-Webhook-Signature value (sha256=<hex>) for the payload on stdin
    Sign {
        /// Environment variable holding the secret
        #[arg(long)]
        secret_env: String,
        /// Sign `timestamp.payload` instead (replay protection)
        #[arg(long)]
        timestamp: Option<String>,
    },
    /// Check a signature against the payload on stdin; exit 0 valid, 1 invalid, 2 bad arguments
    Verify {
        /// Environment variable holding the secret
        #[arg(long)]
        secret_env: String,
        /// The signature header's value (sha256=<hex>)
        #[arg(long)]
        signature: String,
        /// The timestamp header's value (Unix seconds): it was signed too, and must be recent
        #[arg(long)]
        timestamp: Option<String>,
        /// How far --timestamp may be from now (the webhook path's `tolerance`)
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        tolerance: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => keygate::cli::run(&keygate::cli::config_path(config)),
        Command::Check {
            config,
            file,
            format,
            strict,
            no_secrets,
        } => keygate::cli::check(
            &keygate::cli::config_path(config.or(file)),
            format,
            strict,
            no_secrets,
        ),
        Command::NewApiKey {
            prefix,
            id,
            user,
            tier,
            permissions,
            ip_allow,
            key_file,
        } => keygate::cli::new_api_key(
            &keygate::cli::NewKey {
                prefix: &prefix,
                id: id.as_deref(),
                user: user.as_deref(),
                tier: tier.as_deref(),
                permissions: &permissions,
                ip_allow: &ip_allow,
                key_file: key_file.as_deref(),
            },
            &mut std::io::stdout().lock(),
        ),
        Command::HashPassword => keygate::cli::hash_password(),
        Command::Webhook {
            action:
                WebhookAction::Sign {
                    secret_env,
                    timestamp,
                },
        } => keygate::cli::webhook_sign(&secret_env, timestamp.as_deref()),
        Command::Webhook {
            action:
                WebhookAction::Verify {
                    secret_env,
                    signature,
                    timestamp,
                    tolerance,
                },
        } => {
            let verdict = keygate::cli::webhook_verify(
                &secret_env,
                &signature,
                timestamp.as_deref(),
                tolerance,
            );
            return match verdict {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("keygate: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Explain {
            config,
            method,
            path,
            ip,
            token,
            api_key,
            headers,
            client_cert,
        } => {
            let req = keygate::cli::explain::Request {
                method: &method,
                path: &path,
                ip,
                token: token.as_deref(),
                api_key: api_key.as_deref(),
                headers: &headers,
                client_cert: client_cert.as_deref(),
            };
            return match keygate::cli::explain::run(&keygate::cli::config_path(config), &req) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("keygate: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Config {
            action: ConfigAction::Dump { config },
        } => keygate::cli::dump::run(
            &keygate::cli::config_path(config),
            &mut std::io::stdout().lock(),
        ),
        Command::Keys { action } => {
            use keygate::cli::keys::Action;
            let (config, action) = match action {
                KeysAction::Create {
                    config,
                    user,
                    name,
                    permissions,
                    ip_allow,
                    expires_in,
                } => (
                    config,
                    Action::Create {
                        user,
                        name,
                        permissions,
                        ip_allow,
                        expires_in,
                    },
                ),
                KeysAction::List { config, user } => (config, Action::List { user }),
                KeysAction::Revoke { config, id, user } => (config, Action::Revoke { id, user }),
                KeysAction::Roll {
                    config,
                    id,
                    user,
                    grace,
                } => (config, Action::Roll { id, user, grace }),
            };
            keygate::cli::keys::run(
                &keygate::cli::config_path(config),
                action,
                &mut std::io::stdout().lock(),
            )
        }
        Command::State {
            action: StateAction::Export { config },
        } => keygate::cli::state::export(
            &keygate::cli::config_path(config),
            &mut std::io::stdout().lock(),
        ),
        Command::State {
            action: StateAction::Import { config, input },
        } => keygate::cli::state::import(&keygate::cli::config_path(config), input.as_deref()),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "keygate",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
        Command::Demo { config } => keygate::cli::demo::run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
