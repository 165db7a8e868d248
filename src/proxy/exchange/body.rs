//! Request bodies: read whole (with a size limit and a deadline), pulled
//! piece by piece for streaming, `100 Continue`, and the linger after an
//! early answer.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream<S> {
    /// Decode the next run of request body into `out` (as chunks when
    /// `chunked`): first what is in hand, else one read from the client.
    pub(super) async fn pull_body(
        &mut self,
        body: &mut Decoder,
        out: &mut Vec<u8>,
        chunked: bool,
    ) -> Result<usize, BodyFailure> {
        if self.rest_pos == self.rest.len() {
            self.rest.clear();
            self.rest_pos = 0;
            self.rest.reserve(READ_CHUNK);
            let read =
                tokio::time::timeout(CLIENT_TIMEOUT, self.stream.read_buf(&mut self.rest)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) => {
                    return match body.eof() {
                        Ok(()) => Ok(0),
                        Err(_) => Err(BodyFailure::Gone),
                    }
                }
                _ => return Err(BodyFailure::Gone),
            }
        }
        let input = &self.rest[self.rest_pos..];
        let used = body
            .decode(input, |p| {
                if chunked {
                    encode_chunk(out, p);
                } else {
                    out.extend_from_slice(p);
                }
            })
            .map_err(|e| BodyFailure::Malformed(body_error(e)))?;
        self.rest_pos += used;
        Ok(used)
    }

    /// The whole body, decoded, for keygate's own use; refused past `limit`
    /// (checked against Content-Length first, then as bytes arrive), when
    /// malformed, or when not whole within [`BODY_DEADLINE`].
    pub(super) async fn read_body(
        &mut self,
        head: &RequestHead,
        x: &mut Exchange,
        limit: usize,
    ) -> Step<Result<Vec<u8>, Refusal>> {
        let too_large = Refusal::Issue(IssueError::PayloadTooLarge(limit));
        if let BodyKind::Length(n) = head.body {
            if n > limit as u64 {
                return Ok(Err(too_large));
            }
        }
        if head.expect_continue && self.continue_100().await.is_err() {
            return Err(Gone);
        }
        let mut body = Vec::new();
        let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
        while !x.body.is_done() {
            let pulled =
                tokio::time::timeout_at(deadline, self.pull_body(&mut x.body, &mut body, false));
            match pulled.await {
                Ok(Ok(used)) => x.bytes_in += used as u64,
                Ok(Err(BodyFailure::Gone)) => return Err(Gone),
                Ok(Err(BodyFailure::Malformed(why))) => return Ok(Err(Refusal::Body(why))),
                Err(_) => return Ok(Err(Refusal::Wire(WireError::Timeout))),
            }
            if body.len() > limit {
                return Ok(Err(too_large));
            }
        }
        Ok(Ok(body))
    }

    /// The interim answer to `Expect: 100-continue`, sent just before keygate
    /// reads the body (the upstream never sees the expectation).
    pub(super) async fn continue_100(&mut self) -> std::io::Result<()> {
        send(&mut self.stream, b"HTTP/1.1 100 Continue\r\n\r\n").await
    }

    /// Read and drop what the client still sends, for a bounded time.
    pub(super) async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        // On the heap: an array here would make every connection's future
        // (moved at each spawn) 16 KiB larger.
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
}
