//! The `keygate` command line. Parsing only; each command lives in `keygate::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
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
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print a summary; exit 1 on any error
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The file, as an alternative to -c
        #[arg(value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
    },
    /// Print a fresh API key once, and the [[api_keys]] lines (with its hash) to paste
    NewApiKey {
        #[arg(long, default_value = "vmc_")]
        prefix: String,
        /// The id to put in the TOML lines
        #[arg(long)]
        id: Option<String>,
    },
    /// Read a password from stdin and print an argon2id PHC string
    HashPassword,
    /// Show how the proxy would decide one request, step by step; exit 0 allow, 1 deny
    Explain {
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
    },
    /// Sign or verify a webhook payload read from stdin
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
    /// Move live state (refresh tokens, spent quotas) between stores, e.g. embedded to Redis
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Serve the example configuration with a built-in sample VM API, printing curl lines to try
    Demo {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Print the store's live records as JSON lines (embedded store; stop keygate first)
    Export {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write an export into the store this configuration names (embedded or Redis)
    Import {
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
    /// Check a signature against the payload on stdin; exit 0 valid, 1 invalid
    Verify {
        #[arg(long)]
        secret_env: String,
        #[arg(long)]
        signature: String,
        #[arg(long)]
        timestamp: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => keygate::cli::run(&keygate::cli::config_path(config)),
        Command::Check { config, file } => {
            keygate::cli::check(&keygate::cli::config_path(config.or(file)))
        }
        Command::NewApiKey { prefix, id } => keygate::cli::new_api_key(&prefix, id.as_deref()),
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
                },
        } => {
            return match keygate::cli::webhook_verify(&secret_env, &signature, timestamp.as_deref())
            {
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
        } => {
            let req = keygate::cli::explain::Request {
                method: &method,
                path: &path,
                ip,
                token: token.as_deref(),
                api_key: api_key.as_deref(),
                headers: &headers,
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
        Command::State {
            action: StateAction::Export { config },
        } => keygate::cli::state::export(
            &keygate::cli::config_path(config),
            &mut std::io::stdout().lock(),
        ),
        Command::State {
            action: StateAction::Import { config, input },
        } => keygate::cli::state::import(&keygate::cli::config_path(config), input.as_deref()),
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
