//! `[server.tls]`: certificates read and checked (key matches, not expired,
//! a warning two weeks before), the rest of the settings validated, all
//! blamed at `file:line:col`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Cx;
use crate::config::{self, SniNames, Spanned, Str};
use crate::tls::{
    self, CertInfo, ClientAuth, Http2Limits, Loaded, PairError, Resolver, Settings, TlsPolicy,
};

impl Cx<'_> {
    pub(super) fn tls(
        &mut self,
        t: &Spanned<config::Tls>,
        listen: Option<SocketAddr>,
    ) -> Option<Arc<TlsPolicy>> {
        let span = t.span();
        let t = t.get_ref();
        let mut files = Vec::new();
        let mut resolver = Resolver::default();
        let mut certs: Vec<CertInfo> = Vec::new();
        let mut failed = false;
        match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => match self.pair("default", c, k, &mut files) {
                Some(l) => {
                    resolver.default = Some(l.key);
                    certs.push(l.info);
                }
                None => failed = true,
            },
            (Some(c), None) => {
                self.d.error(c.span(), "cert_file needs its key_file");
                failed = true;
            }
            (None, Some(k)) => {
                self.d.error(k.span(), "key_file needs its cert_file");
                failed = true;
            }
            (None, None) if t.certs.is_empty() => {
                self.d.error(
                    span.clone(),
                    "[server.tls] needs a certificate: cert_file and key_file, or [[server.tls.certs]]",
                );
                failed = true;
            }
            (None, None) => {}
        }
        for c in &t.certs {
            let Some(mut l) = self.pair("", &c.cert_file, &c.key_file, &mut files) else {
                failed = true;
                continue;
            };
            let names: Vec<String> = match c.sni.as_ref().map(Spanned::get_ref) {
                Some(SniNames::One(n)) => vec![n.clone()],
                Some(SniNames::Many(v)) => v.clone(),
                None => l.info.dns_names.clone(),
            };
            let blame = c
                .sni
                .as_ref()
                .map_or_else(|| c.cert_file.span(), Spanned::span);
            if names.is_empty() {
                self.d.error(
                    blame,
                    "no sni names given and the certificate has no DNS names to take them from",
                );
                failed = true;
                continue;
            }
            for n in &names {
                if !valid_sni(n) {
                    self.d.error(
                        blame.clone(),
                        format!("{n:?} is not a DNS name (or *.name)"),
                    );
                    failed = true;
                }
                resolver.add(n, l.key.clone());
            }
            l.info.name = names[0].to_ascii_lowercase();
            certs.push(l.info);
        }
        let tls13_only = match t.min_version.as_ref().map(|v| (v.get_ref().as_str(), v)) {
            None | Some(("1.2", _)) => false,
            Some(("1.3", _)) => true,
            Some((other, v)) => {
                self.d.error(
                    v.span(),
                    format!("unknown min_version {other:?} (expected \"1.2\" or \"1.3\")"),
                );
                false
            }
        };
        let alpn = match &t.alpn {
            None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Some(list) => {
                let mut out = Vec::new();
                for p in list {
                    match p.get_ref().as_str() {
                        "http/1.1" => out.push(b"http/1.1".to_vec()),
                        "h2" => out.push(b"h2".to_vec()),
                        other => self.d.error(
                            p.span(),
                            format!(
                                "unknown ALPN protocol {other:?} (expected \"h2\" or \"http/1.1\")"
                            ),
                        ),
                    }
                }
                if out.is_empty() && !list.is_empty() {
                    failed = true;
                }
                out
            }
        };
        let client_ca = match &t.client_ca_file {
            None => {
                if let Some(a) = &t.client_auth {
                    self.d.error(a.span(), "client_auth needs client_ca_file");
                }
                None
            }
            Some(file) => {
                files.push(self.secrets.locate(Path::new(file.get_ref())));
                let auth = match t.client_auth.as_ref().map(|a| (a.get_ref().as_str(), a)) {
                    None | Some(("optional", _)) => ClientAuth::Optional,
                    Some(("required", _)) => ClientAuth::Required,
                    Some((other, a)) => {
                        self.d.error(
                            a.span(),
                            format!(
                                "unknown client_auth {other:?} (expected optional or required)"
                            ),
                        );
                        ClientAuth::Optional
                    }
                };
                match self.read_file(file).map(|pem| tls::certificates(&pem)) {
                    Some(Ok(cas)) => Some((cas, auth)),
                    Some(Err(e)) => {
                        self.d.error(file.span(), e);
                        failed = true;
                        None
                    }
                    None => {
                        failed = true;
                        None
                    }
                }
            }
        };
        let client_auth = client_ca.as_ref().map_or(ClientAuth::Off, |c| c.1);
        let redirect_listen = t
            .redirect_listen
            .as_ref()
            .and_then(|r| self.socket_addr(Some(r), ""));
        if let (Some(r), Some(l), Some(s)) = (redirect_listen, listen, &t.redirect_listen) {
            if r.port() == l.port() && (r.ip() == l.ip() || r.ip().is_unspecified()) {
                self.d
                    .error(s.span(), "redirect_listen must differ from listen");
            }
        }
        let hsts = match &t.hsts_max_age {
            None => None,
            Some(d) => match humantime::parse_duration(d.get_ref()) {
                Ok(d) if d.is_zero() => None,
                Ok(d) => Some(
                    format!(
                        "max-age={}{}",
                        d.as_secs(),
                        if t.hsts_include_subdomains {
                            "; includeSubDomains"
                        } else {
                            ""
                        }
                    )
                    .into_boxed_str(),
                ),
                Err(e) => {
                    self.d.error(
                        d.span(),
                        format!("{:?} is not a duration like 365d: {e}", d.get_ref()),
                    );
                    None
                }
            },
        };
        let handshake_timeout =
            self.duration_or(t.handshake_timeout.as_ref(), Duration::from_secs(10));
        let resumption = t.session_resumption.as_ref().is_none_or(|r| *r.get_ref());
        if let Some(h) = &t.http2 {
            if !alpn.iter().any(|p| p.as_slice() == b"h2") {
                self.d.warn(
                    h.span(),
                    "[server.tls.http2] has no effect: alpn does not offer \"h2\"",
                );
            }
        }
        let http2 = self.http2(t.http2.as_ref().map(|h| h.get_ref()));
        if failed {
            return None;
        }
        let summary = format!(
            "tls: {} certificate(s) [{}], min {}, alpn {:?}, resumption {}, client_auth {:?}, {:?}",
            certs.len(),
            certs
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if tls13_only { "1.3" } else { "1.2" },
            alpn.iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>(),
            resumption,
            client_auth,
            http2,
        );
        let config = tls::server_config(Settings {
            resolver,
            tls13_only,
            alpn,
            resumption,
            client_ca,
        });
        let (config, client_trust) = match config {
            Ok(c) => c,
            Err(e) => {
                self.d.error(span, e);
                return None;
            }
        };
        Some(Arc::new(TlsPolicy {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certs,
            files,
            hsts,
            redirect_listen,
            handshake_timeout,
            client_auth,
            http2,
            client_trust,
            summary,
        }))
    }

    /// `[server.tls.http2]`, each limit within what keygate can serve.
    fn http2(&mut self, h: Option<&config::Http2>) -> Http2Limits {
        let default = Http2Limits::default();
        let Some(h) = h else { return default };
        // Each stream holds a task, its head and answer buffers (a few KiB
        // to 64 KiB) and an upstream connection: 1000 bounds what one
        // connection can hold.
        let max_concurrent_streams = self.within(
            h.max_concurrent_streams.as_ref(),
            1,
            1000,
            default.max_concurrent_streams,
            "max_concurrent_streams",
        );
        // A stream becomes an HTTP/1.1 head, which has this limit anyway.
        let max_header_list_size = self.within(
            h.max_header_list_size.as_ref(),
            1024,
            default.max_header_list_size,
            default.max_header_list_size,
            "max_header_list_size (bytes)",
        );
        let max_client_resets = self.within(
            h.max_client_resets.as_ref(),
            1,
            10_000,
            default.max_client_resets,
            "max_client_resets",
        );
        // Looked at once a second; an idle connection holds a descriptor.
        let mut idle_timeout = self.duration_or(h.idle_timeout.as_ref(), default.idle_timeout);
        if let Some(t) = &h.idle_timeout {
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&idle_timeout) {
                self.d
                    .error(t.span(), "idle_timeout must be between 1s and 1h");
                idle_timeout = default.idle_timeout;
            }
        }
        Http2Limits {
            max_concurrent_streams,
            max_header_list_size,
            idle_timeout,
            max_client_resets,
        }
    }

    /// A certificate file and its key, loaded and checked.
    fn pair(
        &mut self,
        name: &str,
        cert: &Str,
        key: &Str,
        files: &mut Vec<std::path::PathBuf>,
    ) -> Option<Loaded> {
        files.push(self.secrets.locate(Path::new(cert.get_ref())));
        files.push(self.secrets.locate(Path::new(key.get_ref())));
        let cert_pem = self.read_file(cert);
        let key_pem = self.read_file(key);
        let loaded = match tls::load_pair(name, &cert_pem?, &key_pem?) {
            Ok(l) => l,
            Err(PairError::Cert(m)) => {
                self.d
                    .error(cert.span(), format!("{}: {m}", cert.get_ref()));
                return None;
            }
            Err(PairError::Key(m)) => {
                self.d.error(key.span(), format!("{}: {m}", key.get_ref()));
                return None;
            }
        };
        let now = crate::clock::unix_now() as i64;
        let at = |t: i64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64),
            )
        };
        let info = &loaded.info;
        if info.not_after <= now {
            self.d.error(
                cert.span(),
                format!(
                    "{}: the certificate ({}) expired at {}",
                    cert.get_ref(),
                    info.subject,
                    at(info.not_after)
                ),
            );
            return None;
        }
        if info.not_before > now {
            self.d.warn(
                cert.span(),
                format!(
                    "{}: the certificate ({}) is not valid before {}",
                    cert.get_ref(),
                    info.subject,
                    at(info.not_before)
                ),
            );
        }
        let left = (info.not_after - now) as u64;
        if left < tls::EXPIRY_WARNING.as_secs() {
            self.d.warn(
                cert.span(),
                format!(
                    "{}: the certificate ({}) expires in {} days, at {}",
                    cert.get_ref(),
                    info.subject,
                    left / 86_400,
                    at(info.not_after)
                ),
            );
        }
        Some(loaded)
    }
}

/// `api.example.com` or `*.example.com`: letters, digits, `-` and dots.
fn valid_sni(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}
