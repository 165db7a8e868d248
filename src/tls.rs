//! TLS on the public listener (rustls on ring): the certificates, a default
//! one and more chosen by SNI, read when the policy is compiled, so a
//! changed certificate or key file is a policy reload like any other: a
//! good one serves new handshakes at once, open connections keep the one
//! they agreed on, and a bad one is refused at `file:line:col` while the
//! old policy, certificates included, keeps serving.
//!
//! Only rustls's secure defaults are offered: TLS 1.3, and TLS 1.2 with
//! ECDHE and AEAD suites only (no CBC, RC4, 3DES, RSA key exchange,
//! renegotiation or compression). The session cache and the ticket keys
//! are the process's, not the policy's, so a reload does not cost every
//! client a full handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert,
    ServerSessionMemoryCache, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

/// A certificate expiring within this is a `check` warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// TLS sessions remembered for resumption by session id (TLS 1.2).
const SESSION_CACHE: usize = 16 * 1024;

/// `[server.tls]`, compiled.
pub struct TlsPolicy {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Every certificate served, for the expiry metric and `check`.
    pub certs: Vec<CertInfo>,
    /// Every file the TLS settings were read from (resolved), for the
    /// reloader to watch.
    pub files: Vec<PathBuf>,
    /// The `Strict-Transport-Security` value sent on every answer over TLS.
    pub hsts: Option<Box<str>>,
    /// The plain-HTTP listener that answers `308` to `https://`.
    pub redirect_listen: Option<SocketAddr>,
    pub handshake_timeout: Duration,
    pub client_auth: ClientAuth,
    pub http2: Http2Limits,
    /// The client CA set (and `client_auth`) the acceptor verifies with, as
    /// a digest. A connection keeps the one its certificate was verified
    /// under; when the policy's differs, that certificate is no longer
    /// honoured (see `gate::PeerCert::trust`).
    pub client_trust: [u8; 32],
    /// As configured, for `config dump` and the restart check.
    pub summary: String,
}

impl std::fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary)
    }
}

/// `[server.tls.http2]`: what one HTTP/2 connection may do. Taken when the
/// connection starts, so a reload applies to the connections after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// The decoded header list, in bytes (`SETTINGS_MAX_HEADER_LIST_SIZE`);
    /// it also bounds CONTINUATION frames.
    pub max_header_list_size: u32,
    /// A connection without a stream for this long gets GOAWAY.
    pub idle_timeout: Duration,
    /// Streams a client may reset within 10 s before its connection ends
    /// with GOAWAY `ENHANCE_YOUR_CALM` (rapid reset, CVE-2023-44487).
    pub max_client_resets: u32,
}

impl Default for Http2Limits {
    /// nginx's stream count and idle time; the header list as large as
    /// the HTTP/1.1 head a stream becomes may be.
    fn default() -> Http2Limits {
        Http2Limits {
            max_concurrent_streams: 128,
            max_header_list_size: crate::http1::parse::MAX_HEAD as u32,
            idle_timeout: Duration::from_secs(60),
            max_client_resets: 100,
        }
    }
}

/// `client_auth`: whether a client certificate is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// None is asked for.
    Off,
    /// Asked for; a connection without one is served (other credentials
    /// apply), one with a certificate the CA did not sign is refused.
    Optional,
    /// A connection without a valid client certificate is refused in the
    /// handshake.
    Required,
}

/// One certificate as served.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// `default`, or the first SNI name it is chosen for.
    pub name: String,
    pub subject: String,
    /// The DNS names of its subjectAltName extension.
    pub dns_names: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
    pub not_before: i64,
}

/// A certificate chain and its key, checked to belong together.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Read a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
/// SEC1), and check the key is the certificate's.
pub fn load_pair(name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, PairError> {
    let chain = certificates(chain_pem).map_err(PairError::Cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| PairError::Key(format!("no usable private key in it ({e})")))?;
    let info = describe(name, &chain[0]).map_err(PairError::Cert)?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => PairError::Key(
            "this key does not belong to the certificate (their public keys differ)".into(),
        ),
        other => PairError::Key(format!("cannot use this key: {other}")),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        info,
    })
}

/// Why a certificate and key pair was refused, blamed on the right file.
#[derive(Debug)]
pub enum PairError {
    Cert(String),
    Key(String),
}

/// Every certificate of a PEM file, in order; at least one.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in it".into());
    }
    Ok(certs)
}

/// The subject, names and validity of a DER certificate.
pub fn describe(name: &str, der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(CertInfo {
        name: name.to_string(),
        subject: cert.subject().to_string(),
        dns_names,
        not_after: cert.validity().not_after.timestamp(),
        not_before: cert.validity().not_before.timestamp(),
    })
}

/// The SHA-256 fingerprint of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Picks the certificate for a handshake: an exact SNI name, then a
/// wildcard (`*.example.com` covers one label), then the default.
#[derive(Debug, Default)]
pub struct Resolver {
    pub exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    pub wildcard: HashMap<String, Arc<CertifiedKey>>,
    pub default: Option<Arc<CertifiedKey>>,
}

impl Resolver {
    /// Choose `key` for `name` (`api.example.com` or `*.example.com`).
    pub fn add(&mut self, name: &str, key: Arc<CertifiedKey>) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.to_string(), key),
            None => self.exact.insert(name, key),
        };
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            // rustls hands over a validated DNS name, already lower case.
            let name = name.trim_end_matches('.');
            if let Some(k) = self.exact.get(name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(k) = self.wildcard.get(parent) {
                    return Some(k.clone());
                }
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The TLS settings of a listener, before they become a `ServerConfig`.
pub struct Settings {
    pub resolver: Resolver,
    pub tls13_only: bool,
    pub alpn: Vec<Vec<u8>>,
    pub resumption: bool,
    /// `client_ca_file`'s certificates, with `client_auth`.
    pub client_ca: Option<(Vec<CertificateDer<'static>>, ClientAuth)>,
}

/// The `ServerConfig`, and the digest of its client CA set (see
/// [`TlsPolicy::client_trust`]).
pub fn server_config(s: Settings) -> Result<(ServerConfig, [u8; 32]), String> {
    let versions: &[&rustls::SupportedProtocolVersion] = if s.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    // Sessions resume only under the client CAs they were made with: a
    // resumed session brings its client certificate back unverified, so a
    // CA taken out of client_ca_file must not live on through tickets.
    let mut trust = Sha256::new();
    if let Some((cas, auth)) = &s.client_ca {
        trust.update([*auth as u8]);
        for ca in cas {
            trust.update((ca.len() as u64).to_be_bytes());
            trust.update(ca);
        }
    }
    let trust: [u8; 32] = trust.finalize().into();
    let builder = match s.client_ca {
        Some((cas, auth)) if auth != ClientAuth::Off => {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots
                    .add(ca)
                    .map_err(|e| format!("client_ca_file: not a usable CA certificate ({e})"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(s.resolver));
    config.alpn_protocols = s.alpn;
    if s.resumption {
        let (sessions, ticketer) = resumption(trust)?;
        config.session_storage = sessions;
        config.ticketer = ticketer;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok((config, trust))
}

type Resumption = (Arc<ServerSessionMemoryCache>, Arc<dyn ProducesTickets>);

/// The session cache and ticket keys (random, rotated every 6 hours by
/// rustls, never written anywhere) for one set of client CAs: shared by
/// every policy with that set, so resumption survives a reload, and by no
/// other.
fn resumption(trust: [u8; 32]) -> Result<Resumption, String> {
    static BY_TRUST: OnceLock<std::sync::Mutex<HashMap<[u8; 32], Resumption>>> = OnceLock::new();
    let mut map = BY_TRUST
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "the TLS session state is poisoned".to_string())?;
    if let Some(r) = map.get(&trust) {
        return Ok(r.clone());
    }
    // Old sets (CA rotations) are forgotten past a few.
    if map.len() >= 8 {
        map.clear();
    }
    let r: Resumption = (
        ServerSessionMemoryCache::new(SESSION_CACHE),
        rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?,
    );
    map.insert(trust, r.clone());
    Ok(r)
}

/// A protocol version as the metrics and logs name it.
pub fn version_label(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(_) => "other",
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_pair_loads_and_is_described() {
        let (cert, key) = pair(&["api.example.com", "*.api.example.com"]);
        let loaded = load_pair("default", cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(
            loaded.info.dns_names,
            ["api.example.com", "*.api.example.com"]
        );
        assert!(loaded.info.not_after > loaded.info.not_before);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (cert, _) = pair(&["a.example.com"]);
        let (_, other_key) = pair(&["b.example.com"]);
        match load_pair("default", cert.as_bytes(), other_key.as_bytes()) {
            Err(PairError::Key(m)) => assert!(m.contains("does not belong"), "{m}"),
            Err(e) => panic!("wrong error {e:?}"),
            Ok(_) => panic!("a mismatched key was accepted"),
        }
    }

    #[test]
    fn garbage_is_refused_as_a_certificate_or_a_key() {
        let (cert, key) = pair(&["a.example.com"]);
        assert!(matches!(
            load_pair("d", b"hello", key.as_bytes()),
            Err(PairError::Cert(_))
        ));
        assert!(matches!(
            load_pair(
                "d",
                cert.as_bytes(),
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            ),
            Err(PairError::Key(_))
        ));
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let load = |n: &str| {
            let (c, k) = pair(&[n]);
            load_pair(n, c.as_bytes(), k.as_bytes()).unwrap().key
        };
        let (a, w, d) = (
            load("a.example.com"),
            load("*.example.com"),
            load("default"),
        );
        let mut r = Resolver::default();
        r.add("A.example.com.", a.clone());
        r.add("*.example.com", w.clone());
        r.default = Some(d.clone());
        let is = |x: Option<Arc<CertifiedKey>>, y: &Arc<CertifiedKey>| Arc::ptr_eq(&x.unwrap(), y);
        assert!(is(r.pick(Some("a.example.com")), &a));
        assert!(is(r.pick(Some("b.example.com")), &w));
        // A wildcard covers exactly one label.
        assert!(is(r.pick(Some("x.b.example.com")), &d));
        assert!(is(r.pick(Some("example.com")), &d));
        assert!(is(r.pick(None), &d));
        r.default = None;
        assert!(r.pick(Some("other.org")).is_none());
    }
}
