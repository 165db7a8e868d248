//! The chunked `http1::body::Decoder`, fed arbitrary bytes in two reads,
//! agrees with a strict RFC 9112 §7.1 reference decoder (same payload,
//! bytes consumed, done flag, or both refuse); and what `encode_chunk` +
//! `LAST_CHUNK` write decodes back to the same payload, read whole or one
//! byte at a time.
#![no_main]

use keygate::http1::body::{chunk_head, encode_chunk, Decoder, LAST_CHUNK};
use keygate::http1::parse::BodyKind;
use libfuzzer_sys::fuzz_target;

#[path = "common/mod.rs"]
mod common;
use common::show;

fuzz_target!(|data: &[u8]| {
    differential(data);
    round_trip(data);
});

/// What decoding a whole input gave: the payload, the bytes consumed and
/// whether the body ended; `Err` if the framing was refused.
type Outcome = Result<(Vec<u8>, usize, bool), ()>;

/// (a) The first byte says where to split the rest into two reads.
fn differential(data: &[u8]) {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(input.len());
    let ours = reference::decode(input);
    let theirs = keygate_decode(input, &[split]);
    assert_eq!(
        theirs,
        ours,
        "keygate (left) and the reference (right) disagree on {} split at {split}",
        show(input)
    );
}


/// Feed `input` to a chunked decoder in reads ending at each of `splits`
/// and then at the end: each read gets the bytes after those consumed so far,
/// while the body is not done and nothing was refused.
fn keygate_decode(input: &[u8], splits: &[usize]) -> Outcome {
    let mut decoder = Decoder::new(BodyKind::Chunked);
    let mut payload = Vec::new();
    let mut consumed = 0;
    for &end in splits.iter().chain([&input.len()]) {
        if decoder.is_done() {
            break;
        }
        let end = end.max(consumed);
        let n = decoder
            .decode(&input[consumed..end], |run| payload.extend_from_slice(run))
            .map_err(drop)?;
        assert!(
            n <= end - consumed,
            "decode consumed more than it was given"
        );
        consumed += n;
    }
    Ok((payload, consumed, decoder.is_done()))
}

/// (b) `data` as runs, each a length byte and that many bytes (a short last
/// run takes what is left).
fn round_trip(data: &[u8]) {
    let mut runs = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (run, tail) = tail.split_at(usize::from(len).min(tail.len()));
        runs.push(run);
        rest = tail;
    }
    let mut wire = Vec::new();
    for run in &runs {
        encode_chunk(&mut wire, run);
    }
    wire.extend_from_slice(LAST_CHUNK);
    let expected = (runs.concat(), wire.len(), true);

    assert_eq!(keygate_decode(&wire, &[]), Ok(expected.clone()), "whole");
    let every_byte: Vec<usize> = (1..wire.len()).collect();
    assert_eq!(
        keygate_decode(&wire, &every_byte),
        Ok(expected.clone()),
        "byte by byte"
    );
    assert_eq!(reference::decode(&wire), Ok(expected), "the reference");

    // The chunk-size line for any length is its lower-case hex and CRLF.
    let mut n = [0u8; 8];
    let k = data.len().min(8);
    n[..k].copy_from_slice(&data[..k]);
    let len = u64::from_le_bytes(n) as usize;
    if len > 0 {
        let mut line = Vec::new();
        chunk_head(&mut line, len);
        assert_eq!(line, format!("{len:x}\r\n").into_bytes());
    }
}

/// A chunked decoder written from RFC 9112 §7.1 over a whole input, sharing
/// no code with keygate. Input that ends early is not an error: it returns
/// the payload so far, everything consumed, not done. Limits (keygate's):
/// 16 hex digits, 4096 extension bytes after the `;`, 16 KiB of trailer
/// field bytes (name, colon and value).
mod reference {
    use super::Outcome;

    const MAX_DIGITS: usize = 16;
    const MAX_EXTENSION: usize = 4096;
    const MAX_TRAILERS: usize = 16 * 1024;

    enum Stop {
        /// The input ended before the body did.
        Short,
        Bad,
    }

    struct Cursor<'a> {
        input: &'a [u8],
        at: usize,
    }

    impl Cursor<'_> {
        fn peek(&self) -> Result<u8, Stop> {
            self.input.get(self.at).copied().ok_or(Stop::Short)
        }

        fn next(&mut self) -> Result<u8, Stop> {
            let b = self.peek()?;
            self.at += 1;
            Ok(b)
        }

        fn expect(&mut self, want: u8) -> Result<(), Stop> {
            if self.next()? == want {
                Ok(())
            } else {
                Err(Stop::Bad)
            }
        }

        fn crlf(&mut self) -> Result<(), Stop> {
            self.expect(b'\r')?;
            self.expect(b'\n')
        }
    }

    fn tchar(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
    }

    pub fn decode(input: &[u8]) -> Outcome {
        let mut c = Cursor { input, at: 0 };
        let mut payload = Vec::new();
        match body(&mut c, &mut payload) {
            Ok(()) => Ok((payload, c.at, true)),
            Err(Stop::Short) => Ok((payload, input.len(), false)),
            Err(Stop::Bad) => Err(()),
        }
    }

    fn body(c: &mut Cursor<'_>, payload: &mut Vec<u8>) -> Result<(), Stop> {
        loop {
            let size = chunk_size_line(c)?;
            if size == 0 {
                return trailers(c);
            }
            let start = c.at;
            let available = (c.input.len() - start) as u64;
            if available < size {
                payload.extend_from_slice(&c.input[start..]);
                return Err(Stop::Short);
            }
            let end = start + size as usize;
            payload.extend_from_slice(&c.input[start..end]);
            c.at = end;
            c.crlf()?;
        }
    }

    /// `1*16HEXDIG [ ";" ext ] CRLF`, the extension's bytes unparsed.
    fn chunk_size_line(c: &mut Cursor<'_>) -> Result<u64, Stop> {
        let mut digits = 0;
        let mut size = 0u64;
        while let Some(d) = (c.peek()? as char).to_digit(16) {
            digits += 1;
            if digits > MAX_DIGITS {
                return Err(Stop::Bad);
            }
            size = size * 16 + u64::from(d);
            c.at += 1;
        }
        if digits == 0 {
            return Err(Stop::Bad);
        }
        if c.peek()? == b';' {
            c.at += 1;
            let mut len = 0;
            loop {
                match c.peek()? {
                    b'\r' => break,
                    b'\t' | 0x20..=0x7e => {
                        len += 1;
                        if len > MAX_EXTENSION {
                            return Err(Stop::Bad);
                        }
                        c.at += 1;
                    }
                    _ => return Err(Stop::Bad),
                }
            }
        }
        c.crlf()?;
        Ok(size)
    }

    /// `*( field-name ":" field-value CRLF ) CRLF`, values unparsed.
    fn trailers(c: &mut Cursor<'_>) -> Result<(), Stop> {
        let mut total = 0;
        let count = |total: &mut usize| {
            *total += 1;
            if *total > MAX_TRAILERS {
                Err(Stop::Bad)
            } else {
                Ok(())
            }
        };
        loop {
            if c.peek()? == b'\r' {
                return c.crlf();
            }
            if !tchar(c.next()?) {
                return Err(Stop::Bad);
            }
            count(&mut total)?;
            loop {
                match c.next()? {
                    b':' => break,
                    b if tchar(b) => count(&mut total)?,
                    _ => return Err(Stop::Bad),
                }
            }
            count(&mut total)?; // the colon
            loop {
                match c.next()? {
                    b'\r' => break,
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => count(&mut total)?,
                    _ => return Err(Stop::Bad),
                }
            }
            c.expect(b'\n')?;
        }
    }
}
