//! A raw HTTP/2 client over TLS (ALPN h2) that writes whatever frames a
//! test asks for, well-formed or hostile, and reads back the server's
//! frames: for the protection tests (rapid reset, CONTINUATION flood,
//! HPACK bombs, flow-control abuse), which no real client would send.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            GOAWAY => 4,
            RST_STREAM => 0,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

pub struct Raw {
    pub tls: StreamOwned<ClientConnection, TcpStream>,
}

/// An HPACK integer with an `n`-bit prefix, first byte's high bits `high`.
fn int(out: &mut Vec<u8>, high: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name (RFC 7541 §6.2.2).
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// A literal header field with incremental indexing, new name (§6.2.1):
/// it enters the dynamic table.
pub fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// An indexed header field (§6.1): entry `index` of the tables (the
/// dynamic table starts at 62).
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    int(out, 0x80, 7, index);
}

/// The header block of `GET path` with `extra` headers.
pub fn request(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", b"GET");
    literal(&mut b, ":scheme", b"https");
    literal(&mut b, ":path", path.as_bytes());
    literal(&mut b, ":authority", b"localhost");
    for (n, v) in extra {
        literal(&mut b, n, v.as_bytes());
    }
    b
}

impl Raw {
    /// Connect, agree on h2, send the preface and `settings` (id, value).
    pub fn open(port: u16, config: Arc<ClientConfig>, settings: &[(u16, u32)]) -> Raw {
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let conn = ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("localhost".to_string()).unwrap(),
        )
        .expect("client connection");
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("handshake");
        }
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]), "h2 not agreed");
        let mut raw = Raw { tls };
        raw.write_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        raw.frame(SETTINGS, 0, 0, &payload).unwrap();
        raw
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    pub fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        self.write_raw(&f)
    }

    /// HEADERS for `stream` with the whole block, ending the stream.
    pub fn get(&mut self, stream: u32, block: &[u8]) -> std::io::Result<()> {
        self.frame(HEADERS, END_HEADERS | END_STREAM, stream, block)
    }

    /// Frames the server sent within `wait`, until it closes; a SETTINGS
    /// without ACK is acknowledged on the way.
    pub fn read_frames(&mut self, wait: Duration) -> (Vec<Frame>, bool) {
        let deadline = Instant::now() + wait;
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        let mut closed = false;
        let mut chunk = [0u8; 16 * 1024];
        while Instant::now() < deadline {
            match self.tls.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let f = Frame {
                    kind: buf[3],
                    flags: buf[4],
                    stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    payload: buf[9..9 + len].to_vec(),
                };
                buf.drain(..9 + len);
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    let _ = self.frame(SETTINGS, ACK, 0, &[]);
                }
                frames.push(f);
            }
            if frames.iter().any(|f| f.kind == GOAWAY) {
                break;
            }
        }
        (frames, closed)
    }
}

/// The value of `id` in a SETTINGS frame.
pub fn setting(frame: &Frame, id: u16) -> Option<u32> {
    frame.payload.chunks(6).find_map(|s| {
        (s.len() == 6 && u16::from_be_bytes([s[0], s[1]]) == id)
            .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    })
}
