//! Message bodies, both directions: one decoder for `Content-Length`,
//! `chunked` (RFC 9112 §7.1, strictly) and close-delimited bodies, and the
//! chunk encoder that re-frames what is forwarded. The peer on the other
//! side only ever sees framing bytes keygate wrote: chunk sizes, extensions
//! and trailers are read here and never passed through.

use super::parse::{is_tchar, BodyKind};

/// Hex digits of a chunk size: 16 cover any `u64`; more are refused, not wrapped.
const MAX_SIZE_DIGITS: u8 = 16;
/// Bytes of chunk extensions on one size line (they are dropped anyway).
const MAX_EXTENSION: usize = 4096;
/// The trailer section's names, colons and values (dropped too).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The framing is broken: 400 for a request, a cut-off answer upstream.
    Malformed(&'static str),
    /// The sender closed before the body's end.
    Truncated,
}

/// Decodes one body as its bytes arrive, handing out the payload.
#[derive(Debug)]
pub struct Decoder {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

impl Decoder {
    pub fn new(body: BodyKind) -> Decoder {
        let kind = match body {
            BodyKind::None | BodyKind::Length(0) => Kind::Done,
            BodyKind::Length(n) => Kind::Length(n),
            BodyKind::Chunked => Kind::Chunked(Chunked::default()),
            BodyKind::Close => Kind::Close,
        };
        Decoder { kind }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    /// Consume body bytes from `input` up to the body's end; returns how many
    /// belonged to the body. `payload` receives each run of payload bytes.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut payload: impl FnMut(&[u8]),
    ) -> Result<usize, BodyError> {
        match &mut self.kind {
            Kind::Done => Ok(0),
            Kind::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                if n > 0 {
                    payload(&input[..n]);
                }
                *left -= n as u64;
                if *left == 0 {
                    self.kind = Kind::Done;
                }
                Ok(n)
            }
            Kind::Chunked(c) => {
                let n = c.feed(input, payload)?;
                if c.state == State::Done {
                    self.kind = Kind::Done;
                }
                Ok(n)
            }
            Kind::Close => {
                if !input.is_empty() {
                    payload(input);
                }
                Ok(input.len())
            }
        }
    }

    /// The sender closed its side: the end of a close-delimited body, a
    /// truncation of any other.
    pub fn eof(&mut self) -> Result<(), BodyError> {
        match self.kind {
            Kind::Done => Ok(()),
            Kind::Close => {
                self.kind = Kind::Done;
                Ok(())
            }
            _ => Err(BodyError::Truncated),
        }
    }
}

/// The chunked coding, one byte of framing at a time (payload in runs).
#[derive(Debug, Default)]
struct Chunked {
    state: State,
    remaining: u64,
    digits: u8,
    extension: usize,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    fn feed(&mut self, input: &[u8], mut payload: impl FnMut(&[u8])) -> Result<usize, BodyError> {
        let bad = |why| Err(BodyError::Malformed(why));
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == MAX_SIZE_DIGITS {
                            return bad("chunk size too large");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.remaining = (self.remaining << 4) | u64::from(d);
                        self.digits += 1;
                    }
                    b';' if self.digits > 0 => {
                        self.extension = 0;
                        self.state = State::Extension;
                    }
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return bad("invalid chunk size line"),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\t' | b' '..=b'~' => {
                        self.extension += 1;
                        if self.extension > MAX_EXTENSION {
                            return bad("chunk extension too long");
                        }
                    }
                    _ => return bad("invalid byte in a chunk extension"),
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return bad("chunk size line not ended by CRLF");
                    }
                    self.digits = 0;
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = (self.remaining.min((input.len() - i) as u64)) as usize;
                    payload(&input[i..i + n]);
                    self.remaining -= n as u64;
                    i += n;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr if b == b'\r' => self.state = State::DataLf,
                State::DataLf if b == b'\n' => self.state = State::Size,
                State::DataCr | State::DataLf => return bad("chunk data not followed by CRLF"),
                State::TrailerStart => match b {
                    b'\r' => self.state = State::EndLf,
                    b if is_tchar(b) => {
                        self.trailer(1)?;
                        self.state = State::TrailerName;
                    }
                    _ => return bad("invalid trailer line"),
                },
                State::TrailerName => match b {
                    b':' => {
                        self.trailer(1)?;
                        self.state = State::TrailerValue;
                    }
                    b if is_tchar(b) => self.trailer(1)?,
                    _ => return bad("invalid trailer name"),
                },
                State::TrailerValue => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => self.trailer(1)?,
                    _ => return bad("invalid byte in a trailer"),
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return bad("trailer line not ended by CRLF");
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return bad("chunked body not ended by CRLF");
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn trailer(&mut self, n: usize) -> Result<(), BodyError> {
        self.trailer_bytes += n;
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(BodyError::Malformed("trailers too large"));
        }
        Ok(())
    }
}

/// The line that opens a chunk of `len` payload bytes (`len` > 0).
pub fn chunk_head(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// One chunk holding `payload` (nothing for an empty payload: a zero-size
/// chunk would end the body).
pub fn encode_chunk(out: &mut Vec<u8>, payload: &[u8]) {
    if payload.is_empty() {
        return;
    }
    chunk_head(out, payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body: the last chunk and no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(body: &[u8]) -> Result<(Vec<u8>, usize, bool), BodyError> {
        let mut d = Decoder::new(BodyKind::Chunked);
        let mut data = Vec::new();
        let n = d.decode(body, |p| data.extend_from_slice(p))?;
        Ok((data, n, d.is_done()))
    }

    #[test]
    fn chunked_bodies_end_where_they_end_in_any_split() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut d = Decoder::new(BodyKind::Chunked);
            let mut data = Vec::new();
            let a = d
                .decode(&body[..split], |p| data.extend_from_slice(p))
                .unwrap();
            assert_eq!(a, split.min(body.len() - 4));
            let b = d.decode(&body[a..], |p| data.extend_from_slice(p)).unwrap();
            assert!(d.is_done());
            assert_eq!(a + b, body.len() - 4);
            assert_eq!(data, b"Wikipedia");
        }
    }

    #[test]
    fn framing_other_parsers_read_differently_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiX",
            b"\r\n",
            b"fffffffffffffffff5\r\n",
            b"10000000000000005\r\n",
            b"4\nWiki",
            b"0x5\r\n",
            b"+5\r\n",
            b"-0\r\n",
            b" 5\r\n",
            b"5 \r\n",
            b"5 garbage\r\n",
            b"5\t;a\r\n",
            b"5;a\nhello",
            b"5;a\rb\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"0\r\n\nGET /admin HTTP/1.1\r\n",
            b"0\n\r\n",
            b"0\r\nX: a\nb\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\nX: a\0b\r\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"0\r\n: no-name\r\n\r\n",
            b"0\r\nBad Name: x\r\n\r\n",
            b"GET /admin HTTP/1.1\r\n",
        ] {
            assert!(
                matches!(decode_all(bad), Err(BodyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn long_extensions_and_trailers_are_bounded() {
        let mut ext = b"1;".to_vec();
        ext.extend(std::iter::repeat_n(b'a', MAX_EXTENSION + 1));
        assert!(decode_all(&ext).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-Pad: 0123456789\r\n");
        }
        assert!(decode_all(&trailers).is_err());
    }

    #[test]
    fn leading_zeros_extensions_and_trailers_are_read_and_dropped() {
        let body = b"0005;a=\"b c\"\r\nhello\r\n0\r\nX-Auth-Subject: admin\r\n\r\n";
        let (data, n, done) = decode_all(body).unwrap();
        assert_eq!((data.as_slice(), done), (&b"hello"[..], true));
        assert_eq!(n, body.len());
    }

    #[test]
    fn decode_of_encode_is_identity_for_any_runs() {
        let runs: [&[u8]; 4] = [b"a", b"", b"0123456789abcdef0", &[0u8; 300]];
        let mut wire = Vec::new();
        for r in runs {
            encode_chunk(&mut wire, r);
        }
        wire.extend_from_slice(LAST_CHUNK);
        let (data, n, done) = decode_all(&wire).unwrap();
        assert_eq!(data, runs.concat());
        assert_eq!((n, done), (wire.len(), true));
    }

    #[test]
    fn lengths_and_close_delimited_bodies() {
        let mut d = Decoder::new(BodyKind::Length(3));
        let mut data = Vec::new();
        assert_eq!(d.decode(b"abcdef", |p| data.extend_from_slice(p)), Ok(3));
        assert!(d.is_done());
        assert_eq!(data, b"abc");
        let mut d = Decoder::new(BodyKind::Length(3));
        d.decode(b"ab", |_| {}).unwrap();
        assert_eq!(d.eof(), Err(BodyError::Truncated));
        let mut d = Decoder::new(BodyKind::Close);
        assert_eq!(d.decode(b"abc", |_| {}), Ok(3));
        assert!(!d.is_done());
        assert_eq!(d.eof(), Ok(()));
        assert!(d.is_done());
        let mut d = Decoder::new(BodyKind::Chunked);
        d.decode(b"5\r\nab", |_| {}).unwrap();
        assert_eq!(d.eof(), Err(BodyError::Truncated));
    }

    #[test]
    fn chunk_heads_are_lower_hex() {
        let mut out = Vec::new();
        chunk_head(&mut out, 0x1f0);
        assert_eq!(out, b"1f0\r\n");
    }
}
