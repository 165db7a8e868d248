//! `[server]` (listeners, addresses, connection caps) and `[log]`.

use std::path::PathBuf;
use std::time::Duration;

use super::super::{AccessLog, Allowlist, Log, Server, Underscores};
use super::*;
use crate::config::{self};

impl Cx<'_> {
    pub(super) fn server(&mut self, s: &config::Server) -> Option<Server> {
        let listen = self.socket_addr(s.listen.as_ref(), "0.0.0.0:8080");
        let admin_listen = self.socket_addr(s.admin_listen.as_ref(), "127.0.0.1:9090");
        let threads = match &s.threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(t) if (1..=1024).contains(t.get_ref()) => *t.get_ref() as usize,
            Some(t) => {
                self.d.error(t.span(), "threads must be between 1 and 1024");
                1
            }
        };
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if l.port() == a.port() && (l.ip() == a.ip() || l.ip().is_unspecified()) {
                let span = s.admin_listen.as_ref().map_or(0..0, |a| a.span());
                self.d.error(span, "admin_listen must differ from listen");
            }
        }
        let admin_token = if s.admin_token_env.is_some() || s.admin_token_file.is_some() {
            let owner = s
                .admin_token_env
                .as_ref()
                .or(s.admin_token_file.as_ref())
                .map_or(0..0, |t| t.span());
            self.secret(
                owner,
                &s.admin_token_env,
                &s.admin_token_file,
                &None,
                "the admin token",
            )
        } else {
            None
        };
        if let Some(a) = admin_listen {
            if !a.ip().is_loopback() && admin_token.is_none() {
                let span = s.admin_listen.as_ref().map_or(0..0, |a| a.span());
                self.d.warn(
                    span,
                    "admin_listen is reachable from other hosts and no admin_token_env or admin_token_file is set: anyone who reaches it can POST /reload",
                );
            }
        }
        let tls = s.tls.as_ref().map(|t| self.tls(t, listen));
        if matches!(tls, Some(None)) {
            return None;
        }
        let ipv6_prefix = self.within(s.ipv6_prefix.as_ref(), 1, 128, 64, "ipv6_prefix") as u8;
        let max_connections = self.within(
            s.max_connections.as_ref(),
            1,
            10_000_000,
            DEFAULT_MAX_CONNECTIONS,
            "max_connections",
        ) as usize;
        let max_connections_per_client = self.within(
            s.max_connections_per_client.as_ref(),
            0,
            10_000_000,
            0,
            "max_connections_per_client",
        ) as usize;
        Some(Server {
            tls: tls.flatten(),
            admin_token,
            ipv6_prefix,
            max_connections,
            max_connections_per_client,
            listen: listen?,
            admin_listen: admin_listen?,
            threads,
            trusted_proxies: self.ip_set(&s.trusted_proxies),
            ip_allow: Allowlist(self.ip_set(&s.ip_allow)),
            state_dir: PathBuf::from(
                s.state_dir
                    .as_ref()
                    .map_or("./keygate-state", |d| d.get_ref().as_str()),
            ),
            grace_period: self.duration_or(s.grace_period.as_ref(), Duration::from_secs(10)),
            upgrades: self.upgrades(s.upgrades.as_deref()),
            underscore_headers: match s.underscore_headers.as_ref() {
                None => Underscores::Drop,
                Some(u) => {
                    match u.get_ref().as_str() {
                        "drop" => Underscores::Drop,
                        "refuse" => Underscores::Refuse,
                        other => {
                            self.d.error(
                            u.span(),
                            format!("unknown underscore_headers {other:?} (expected drop or refuse)"),
                        );
                            Underscores::Drop
                        }
                    }
                }
            },
        })
    }

    pub(super) fn upgrades(&mut self, list: Option<&[config::Str]>) -> Vec<Box<str>> {
        let Some(list) = list else {
            return vec!["websocket".into()];
        };
        let mut out = Vec::new();
        for p in list {
            let name = p.get_ref().to_ascii_lowercase();
            if name == "h2c" {
                self.d.error(
                    p.span(),
                    "h2c is never forwarded: the requests inside it would not pass the gate",
                );
            } else if !crate::http1::parse::is_token(name.as_bytes()) {
                self.d.error(p.span(), "not a protocol name");
            } else {
                out.push(name.into());
            }
        }
        out
    }

    pub(super) fn log(&mut self, l: &config::Log) -> Log {
        let access = match l.access.as_ref().map(|a| (a.get_ref().as_str(), a.span())) {
            None | Some(("json", _)) => AccessLog::Json,
            Some(("text", _)) => AccessLog::Text,
            Some(("off", _)) => AccessLog::Off,
            Some((other, span)) => {
                self.d.error(
                    span,
                    format!("unknown access log format {other:?} (expected json, text or off)"),
                );
                AccessLog::Json
            }
        };
        let level = l.level.as_ref().map_or("info", |l| l.get_ref().as_str());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            let span = l.level.as_ref().map_or(0..0, |l| l.span());
            self.d.error(span, format!("invalid log level: {e}"));
        }
        Log {
            access,
            level: level.to_string(),
        }
    }
}
