//! A throwaway PKI made inside a test (rcgen: a CA, leaf certificates for
//! any names and validity window, client certificates), and a small HTTPS
//! client on rustls that keeps its connection open and reports what the
//! handshake agreed (certificate, version, resumption).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
    pub pem: String,
}

/// A certificate and its key, as PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Leaf {
    /// Write `name.crt` and `name.key` into `dir`, each by rename, as
    /// certbot and Kubernetes do (the key first).
    pub fn install(&self, dir: &Path, name: &str) {
        for (ext, text) in [("key", &self.key), ("crt", &self.cert)] {
            let tmp = dir.join(format!(".{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).expect("write pem");
            std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).expect("rename pem");
        }
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("ca cert");
        let pem = cert.pem();
        Ca { cert, key, pem }
    }

    /// A server certificate for `names`, valid from a day ago for `days`.
    pub fn server(&self, cn: &str, names: &[&str]) -> Leaf {
        self.leaf(cn, names, -1, 90, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A certificate valid from `from_days` (relative to now) for `days`.
    pub fn leaf(
        &self,
        cn: &str,
        names: &[&str],
        from_days: i64,
        days: i64,
        usage: ExtendedKeyUsagePurpose,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from_days);
        params.not_after = now + time::Duration::days(from_days + days);
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate (for mTLS) with `cn` and the DNS SAN `san`.
    pub fn client(&self, cn: &str, san: &str) -> Leaf {
        self.leaf(cn, &[san], -1, 30, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The SHA-256 fingerprint of a PEM certificate, lower-case hex.
pub fn fingerprint(pem: &str) -> String {
    use sha2::Digest;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

/// A client configuration trusting `ca_pem`, with a client certificate when given.
pub fn client_config(ca_pem: &str, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("add root");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client chain"),
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("client key"),
            )
            .expect("client auth"),
    };
    Arc::new(config)
}

pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// One HTTPS connection, kept open across requests.
pub struct Conn {
    pub tls: StreamOwned<ClientConnection, TcpStream>,
}

impl Conn {
    /// Connect to 127.0.0.1:`port` with SNI `name` and finish the handshake.
    pub fn open(port: u16, name: &str, config: Arc<ClientConfig>) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let conn = ClientConnection::new(config, server_name)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Conn { tls })
    }

    /// The server's leaf certificate's common name.
    pub fn peer_cn(&self) -> String {
        let der = &self.tls.conn.peer_certificates().expect("peer certificate")[0];
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse peer cert");
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or("")
            .to_string();
        cn
    }

    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.tls.conn.protocol_version()
    }

    /// `GET path` with `headers`; reads one answer with a `content-length`.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Response> {
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.tls.write_all(req.as_bytes())?;
        self.tls.flush()?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if self.tls.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the answer's head",
                ));
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let resp = Response {
            status,
            head,
            body: String::new(),
        };
        let len: usize = resp
            .header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.tls.read_exact(&mut body)?;
        Ok(Response {
            body: String::from_utf8_lossy(&body).into_owned(),
            ..resp
        })
    }
}
