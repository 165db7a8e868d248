//! The TLS side of the public listener: the handshake in front of
//! `exchange::serve`, and the plain-HTTP listener that only redirects.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::exchange::{self, TlsInfo, Worker};
use crate::gate::PeerCert;
use crate::http1::encode::header;
use crate::http1::parse::parse_request;
use crate::metrics::METRICS;
use crate::policy::normalize_subject;
use crate::policy::Policy;
use crate::tls::{version_label, TlsPolicy};

/// Handshake under `handshake_timeout`, then serve the connection as any
/// other. A failed handshake is counted and logged at debug level only
/// (scanners make many).
pub async fn serve(worker: Rc<Worker>, stream: TcpStream, peer: IpAddr, tls: Arc<TlsPolicy>) {
    let accepted = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            METRICS
                .tls_handshakes
                .with_label_values(&["failed", "none"])
                .inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            METRICS
                .tls_handshakes
                .with_label_values(&["timeout", "none"])
                .inc();
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let conn = stream.get_ref().1;
    let result = match conn.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "ok",
    };
    METRICS
        .tls_handshakes
        .with_label_values(&[result, version_label(conn.protocol_version())])
        .inc();
    let info = TlsInfo {
        hsts: tls.hsts.clone(),
        client_cert: conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| peer_cert(leaf, tls.client_trust))
            .map(Rc::new),
    };
    if conn.alpn_protocol() == Some(b"h2") {
        super::h2::serve(worker, stream, peer, info, tls.http2).await;
    } else {
        exchange::serve(worker, stream, peer, Some(info)).await;
    }
}

/// What the policy can match in a client certificate the handshake
/// verified under the client CA set `trust`.
pub fn peer_cert(der: &[u8], trust: [u8; 32]) -> Option<PeerCert> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                // Kept by kind: a DNS name spelled like a URI must not pass
                // for a URI binding, nor the other way round.
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    sans.push(format!("dns:{}", d.to_ascii_lowercase()))
                }
                x509_parser::extensions::GeneralName::URI(u) => sans.push(format!("uri:{u}")),
                _ => {}
            }
        }
    }
    Some(PeerCert {
        sha256: sha2::Sha256::digest(der).into(),
        subject: subject_key(cert.subject()).unwrap_or_default(),
        sans,
        not_after: cert.validity().not_after.timestamp(),
        trust,
    })
}

/// A certificate's subject in [`normalize_subject`]'s form, built from its
/// attributes (not from a printed string, which does not escape): `None`,
/// so no `subject` binding can match, when a value holds a character that
/// could make it read as more than one attribute (`CN=billing,O=Example`
/// as a single common name must not pass for two attributes), is padded,
/// empty or not a string.
fn subject_key(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    for attr in name.iter_attributes() {
        let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry).ok()?;
        let value = attr.as_str().ok()?;
        if value.is_empty()
            || value.trim() != value
            || value.contains([',', '+', '=', '\\', '"', ';', '<', '>', '#'])
        {
            return None;
        }
        parts.push(format!("{key}={value}"));
    }
    if parts.is_empty() {
        return None;
    }
    normalize_subject(&parts.join(","))
}

/// The longest request head the redirect listener reads.
const REDIRECT_HEAD: usize = 8 * 1024;
const REDIRECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One plain-HTTP connection: read one request head and answer `308` to
/// the same host and target over `https://` (nginx's `return 308
/// https://$host$request_uri`), then close. Nothing is forwarded.
pub async fn redirect(mut stream: TcpStream, policy: Arc<Policy>) {
    let mut buf = Vec::with_capacity(1024);
    let answer = tokio::time::timeout(REDIRECT_TIMEOUT, async {
        loop {
            if buf.len() >= REDIRECT_HEAD {
                return Some(bad_request());
            }
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_request(&buf, Vec::new()) {
                Ok(None) => continue,
                Ok(Some(head)) => return Some(location(&policy, &head, &buf)),
                Err(_) => return Some(bad_request()),
            }
        }
    })
    .await;
    if let Ok(Some(answer)) = answer {
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    }
}

fn bad_request() -> Vec<u8> {
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
}

/// The `308` for a parsed head, or a `400` when it names no usable host.
fn location(policy: &Policy, head: &crate::http1::parse::RequestHead, buf: &[u8]) -> Vec<u8> {
    let host = match (head.authority, head.host) {
        (Some(a), _) | (None, Some(a)) => a.get(buf),
        (None, None) => return bad_request(),
    };
    let Some(host) = host_only(host) else {
        return bad_request();
    };
    let target = head.target.get(buf);
    // An absolute-form target: keep its path and query only.
    let path = if target.starts_with(b"/") {
        target
    } else {
        let after_scheme = target
            .windows(3)
            .position(|w| w == b"://")
            .map_or(target, |i| &target[i + 3..]);
        after_scheme
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .map_or(&b"/"[..], |i| &after_scheme[i..])
    };
    let port = policy.server.listen.port();
    let mut url = Vec::with_capacity(host.len() + path.len() + 16);
    url.extend_from_slice(b"https://");
    url.extend_from_slice(host);
    if port != 443 {
        url.extend_from_slice(format!(":{port}").as_bytes());
    }
    if !path.starts_with(b"/") {
        url.push(b'/');
    }
    url.extend_from_slice(path);
    let mut out = Vec::with_capacity(url.len() + 128);
    out.extend_from_slice(b"HTTP/1.1 308 Permanent Redirect\r\n");
    header(&mut out, b"location", &url);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n\r\n");
    METRICS.tls_redirects.inc();
    out
}

/// The host of a `Host` value without its port, when it is a DNS name, an
/// IPv4 address or a bracketed IPv6 address (nothing that could change the
/// meaning of the URL it is put in).
pub fn host_only(value: &[u8]) -> Option<&[u8]> {
    if value.first() == Some(&b'[') {
        let end = value.iter().position(|&b| b == b']')?;
        let inner = &value[1..end];
        let ok = !inner.is_empty()
            && inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return ok.then_some(&value[..=end]);
    }
    let host = match value.iter().position(|&b| b == b':') {
        Some(i) => &value[..i],
        None => value,
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(host)
}

#[cfg(test)]
mod tests {
    use super::host_only;

    #[test]
    fn only_plain_hosts_are_put_in_a_location() {
        assert_eq!(
            host_only(b"api.example.com:80"),
            Some(&b"api.example.com"[..])
        );
        assert_eq!(host_only(b"10.0.0.1"), Some(&b"10.0.0.1"[..]));
        assert_eq!(
            host_only(b"[2001:db8::1]:8080"),
            Some(&b"[2001:db8::1]"[..])
        );
        for bad in [
            &b""[..],
            b"evil.com/x",
            b"a@evil.com",
            b"a b",
            b"[zz]",
            b"x\\y",
            b":80",
        ] {
            assert_eq!(host_only(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
