//! The upstream exchange: the request written with the retry rule, the
//! body streamed, interim answers skipped, the answer re-framed and
//! relayed, the 101 switch, and upstream failures mapped to refusals.

use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream<S> {
    /// Send the request upstream (its body re-framed from the client's, or
    /// `buffered`), then relay the answer.
    pub(super) async fn forward(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        target: Target,
        principal: Option<Principal>,
        buffered: Option<&[u8]>,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        let up = &policy.upstream;
        let upgrade = forward::allowed_upgrade(&policy, head, &self.buf);
        {
            let plan = Plan {
                policy: &policy,
                peer: self.peer,
                peer_text: &self.peer_text,
                principal,
                request_id: &x.request_id,
                upgrade,
                https: self.tls.is_some(),
            };
            let target = match &target {
                Target::Buf(range) => &self.buf[range.clone()],
                Target::Owned(t) => t,
            };
            forward::request_head(&mut self.out, &plan, head, &self.buf, target);
        }
        // The body as far as it is here; wholly here, it goes out with the
        // head under a `content-length`, and can be sent again.
        let chunked_out;
        if let Some(body) = buffered {
            header_u64(&mut self.out, b"content-length", body.len() as u64);
            self.out.extend_from_slice(b"\r\n");
            self.out.extend_from_slice(body);
            chunked_out = false;
        } else if head.body == BodyKind::None {
            if matches!(head.method, Method::POST | Method::PUT | Method::PATCH) {
                header_u64(&mut self.out, b"content-length", 0);
            }
            self.out.extend_from_slice(b"\r\n");
            chunked_out = false;
        } else {
            let mut payload = std::mem::take(&mut self.scratch);
            payload.clear();
            let decoded = x.body.decode(&self.rest[self.rest_pos..], |p| {
                payload.extend_from_slice(p)
            });
            let used = match decoded {
                Ok(n) => n,
                Err(e) => {
                    self.scratch = payload;
                    return self.refuse(x, head, Refusal::Body(body_error(e))).await;
                }
            };
            self.rest_pos += used;
            x.bytes_in += used as u64;
            chunked_out = match head.body {
                _ if x.body.is_done() => {
                    header_u64(&mut self.out, b"content-length", payload.len() as u64);
                    false
                }
                BodyKind::Length(n) => {
                    header_u64(&mut self.out, b"content-length", n);
                    false
                }
                _ => {
                    header(&mut self.out, b"transfer-encoding", b"chunked");
                    true
                }
            };
            self.out.extend_from_slice(b"\r\n");
            if chunked_out {
                encode_chunk(&mut self.out, &payload);
            } else {
                self.out.extend_from_slice(&payload);
            }
            self.scratch = payload;
        }
        let in_hand = x.body.is_done();
        if head.expect_continue && !in_hand && self.continue_100().await.is_err() {
            return Err(Gone);
        }
        let sent = Instant::now();
        let mut retried = false;
        let (mut up_conn, resp) = loop {
            // A retry never goes back to the pool: a fresh connection.
            let pooled = if retried {
                None
            } else {
                worker.pool.take(&up.endpoint)
            };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                None => match upstream::connect(&up.endpoint).await {
                    Ok(conn) => (conn, false),
                    Err(e) => return self.upstream_failed(x, head, Failure::Connect(e)).await,
                },
            };
            // Sent again only if the upstream cannot have acted on it twice.
            let may_retry = reused && in_hand && !retried && upstream::may_retry(&head.method);
            let mut conn = conn;
            let wrote = tokio::time::timeout(up.read_timeout, conn.write_all(&self.out)).await;
            match wrote {
                Ok(Ok(())) => x.forwarded = true,
                Ok(Err(_)) if may_retry => {
                    retried = true;
                    continue;
                }
                Ok(Err(_)) => return self.upstream_failed(x, head, Failure::Broken).await,
                Err(_) => return self.upstream_failed(x, head, Failure::Timeout).await,
            }
            if !in_hand {
                match self
                    .stream_body(x, &mut conn, chunked_out, up.read_timeout)
                    .await
                {
                    Ok(()) => {}
                    Err(Streamed::Client(BodyFailure::Gone)) => return Err(Gone),
                    // The upstream connection holds half a request: dropped.
                    Err(Streamed::Client(BodyFailure::Malformed(why))) => {
                        return self.refuse(x, head, Refusal::Body(why)).await
                    }
                    Err(Streamed::Upstream(f)) => return self.upstream_failed(x, head, f).await,
                }
            }
            self.up_buf.clear();
            match self
                .read_response_head(head, &mut conn, up.read_timeout)
                .await
            {
                Ok(resp) => break (conn, resp),
                Err(Failure::Broken) if may_retry && self.up_buf.is_empty() => {
                    retried = true;
                    continue;
                }
                Err(f) => return self.upstream_failed(x, head, f).await,
            }
        };
        x.upstream_elapsed = Some(sent.elapsed());
        // A switch of protocols only when one was asked for and allowed,
        // and the upstream switched to that one.
        let switching = resp.status == 101;
        if switching {
            let view = HeadView {
                buf: &self.up_buf,
                headers: &resp.headers,
            };
            let agreed = upgrade.is_some_and(|p| {
                view.values(b"upgrade")
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(p.as_bytes()))
            });
            if !agreed {
                self.up_headers = resp.headers;
                return self.upstream_failed(x, head, Failure::Protocol).await;
            }
        }
        x.status = resp.status;
        x.upstream_status = Some(resp.status);
        let http10 = head.minor == 0;
        let reframe = match resp.body {
            BodyKind::Chunked | BodyKind::Close if !http10 => Reframe::Chunks,
            _ => Reframe::Raw,
        };
        let close = !head.keep_alive
            || worker.draining.get()
            || !x.body.is_done()
            || (http10 && matches!(resp.body, BodyKind::Chunked | BodyKind::Close));
        let switched_to = upgrade.filter(|_| switching);
        self.response_head(x, &resp, close, switched_to, reframe, http10);
        let body_start = resp.len;
        let (body, keep_alive) = (resp.body, resp.keep_alive);
        self.up_headers = resp.headers;
        if switching {
            return self.switch(&mut up_conn, body_start, up.read_timeout).await;
        }
        let ended_clean = match self
            .relay_response(
                &mut up_conn,
                body,
                body_start,
                reframe,
                up.read_timeout,
                &mut x.bytes_out,
            )
            .await
        {
            Ok(clean) => clean,
            Err(RelayStop::Gone) => return Err(Gone),
            // Nothing reached the client yet: it can still be told.
            Err(RelayStop::BrokenBeforeHead) => {
                self.out.clear();
                return self.upstream_failed(x, head, Failure::Protocol).await;
            }
        };
        if keep_alive && ended_clean {
            worker.pool.put(&up.endpoint, up_conn);
        }
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    /// After a `101`: the bytes each side sent early, then bytes both ways
    /// until either side ends or both stay quiet for `idle`.
    pub(super) async fn switch(
        &mut self,
        up_conn: &mut Conn,
        body_start: usize,
        idle: Duration,
    ) -> Step<Next> {
        self.out.extend_from_slice(&self.up_buf[body_start..]);
        if send(&mut self.stream, &self.out).await.is_err() {
            return Err(Gone);
        }
        let early = &self.rest[self.rest_pos..];
        if !early.is_empty() && up_conn.write_all(early).await.is_err() {
            return Ok(Next::Close);
        }
        if crate::proxy::tunnel::run(&mut self.stream, up_conn, idle).await
            == crate::proxy::tunnel::Ended::Idle
        {
            tracing::debug!(peer = %self.peer, "upgraded connection idle for {idle:?}; closed");
        }
        Ok(Next::Close)
    }

    /// Decode the rest of the request body and send it on, re-encoded.
    pub(super) async fn stream_body(
        &mut self,
        x: &mut Exchange,
        conn: &mut Conn,
        chunked: bool,
        timeout: Duration,
    ) -> Result<(), Streamed> {
        while !x.body.is_done() {
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            let pulled = self.pull_body(&mut x.body, &mut out, chunked).await;
            if pulled.is_ok() && chunked && x.body.is_done() {
                out.extend_from_slice(LAST_CHUNK);
            }
            let wrote = match pulled {
                Ok(used) if !out.is_empty() => {
                    x.bytes_in += used as u64;
                    tokio::time::timeout(timeout, conn.write_all(&out)).await
                }
                Ok(used) => {
                    x.bytes_in += used as u64;
                    Ok(Ok(()))
                }
                Err(e) => {
                    self.scratch = out;
                    return Err(Streamed::Client(e));
                }
            };
            self.scratch = out;
            match wrote {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Streamed::Upstream(Failure::Broken)),
                Err(_) => return Err(Streamed::Upstream(Failure::Timeout)),
            }
        }
        Ok(())
    }

    pub(super) async fn read_response_head(
        &mut self,
        head: &RequestHead,
        conn: &mut Conn,
        timeout: Duration,
    ) -> Result<ResponseHead, Failure> {
        let mut interim = 0;
        loop {
            if !self.up_buf.is_empty() {
                let headers = std::mem::take(&mut self.up_headers);
                match parse::parse_response(&self.up_buf, &head.method, headers) {
                    Ok(Some(resp)) if resp.status < 200 && resp.status != 101 => {
                        // Interim answers (100, 103) are not relayed; a
                        // stream of them is a broken upstream.
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err(Failure::Protocol);
                        }
                        self.up_buf.drain(..resp.len);
                        self.up_headers = resp.headers;
                        continue;
                    }
                    Ok(Some(resp)) => return Ok(resp),
                    Ok(None) => {}
                    Err(_) => return Err(Failure::Protocol),
                }
            }
            self.up_buf.reserve(READ_CHUNK);
            match tokio::time::timeout(timeout, conn.read_buf(&mut self.up_buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::Broken),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Failure::Timeout),
            }
        }
    }

    /// The answer's head for the client, with keygate's own framing.
    pub(super) fn response_head(
        &mut self,
        x: &Exchange,
        resp: &ResponseHead,
        close: bool,
        switched_to: Option<&str>,
        reframe: Reframe,
        http10: bool,
    ) {
        let rate = x.decision.as_ref().and_then(|d| d.rate);
        let out = &mut self.out;
        forward::response_head(
            out,
            resp,
            &self.up_buf,
            &x.request_id,
            rate.as_ref().map(|r| (&*x.policy, r)),
            self.tls.as_ref().and_then(|t| t.hsts.as_deref()),
        );
        match resp.body {
            BodyKind::Length(n) => header_u64(out, b"content-length", n),
            BodyKind::Chunked | BodyKind::Close if reframe == Reframe::Chunks => {
                header(out, b"transfer-encoding", b"chunked")
            }
            BodyKind::Chunked | BodyKind::Close => {}
            // HEAD and 304: the length the upstream declared, as it declared it.
            BodyKind::None if resp.status >= 200 && resp.status != 204 => {
                if let Some(n) = resp.declared_length {
                    header_u64(out, b"content-length", n);
                } else if resp.declared_chunked && !http10 {
                    header(out, b"transfer-encoding", b"chunked");
                }
            }
            BodyKind::None => {}
        }
        if let Some(protocol) = switched_to {
            header(out, b"connection", b"upgrade");
            header(out, b"upgrade", protocol.as_bytes());
        } else if close {
            header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Relay the upstream's body after the head in `out`, re-framed.
    /// `Ok(true)` when the upstream connection ended exactly at the body's end.
    pub(super) async fn relay_response(
        &mut self,
        conn: &mut Conn,
        kind: BodyKind,
        start: usize,
        reframe: Reframe,
        timeout: Duration,
        bytes_out: &mut u64,
    ) -> Result<bool, RelayStop> {
        let mut decoder = Decoder::new(kind);
        let mut pos = start;
        let mut head_sent = false;
        loop {
            let avail = &self.up_buf[pos..];
            let out = &mut self.out;
            let decoded = decoder.decode(avail, |p| match reframe {
                Reframe::Chunks => encode_chunk(out, p),
                Reframe::Raw => out.extend_from_slice(p),
            });
            let used = match decoded {
                Ok(n) => n,
                Err(_) if !head_sent => return Err(RelayStop::BrokenBeforeHead),
                // Broken framing: the client sees the answer cut off.
                Err(_) => return Err(self.cut_off()),
            };
            let extra = avail.len() > used;
            if decoder.is_done() && reframe == Reframe::Chunks {
                self.out.extend_from_slice(LAST_CHUNK);
            }
            if !self.out.is_empty() {
                if send(&mut self.stream, &self.out).await.is_err() {
                    return Err(RelayStop::Gone);
                }
                *bytes_out += self.out.len() as u64;
                self.out.clear();
                head_sent = true;
            }
            if decoder.is_done() {
                return Ok(!extra);
            }
            pos = 0;
            self.up_buf.clear();
            self.up_buf.reserve(READ_CHUNK);
            match tokio::time::timeout(timeout, conn.read_buf(&mut self.up_buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) if decoder.eof().is_ok() => {
                    // A close-delimited answer ended.
                    if reframe == Reframe::Chunks {
                        if send(&mut self.stream, LAST_CHUNK).await.is_err() {
                            return Err(RelayStop::Gone);
                        }
                        *bytes_out += LAST_CHUNK.len() as u64;
                    }
                    return Ok(false);
                }
                // Cut off mid-body, reset, or too slow: never a complete answer.
                _ => return Err(self.cut_off()),
            }
        }
    }

    /// An answer broke after its head went out: count it and end the
    /// client connection without the body's end.
    pub(super) fn cut_off(&self) -> RelayStop {
        METRICS.upstream_errors.with_label_values(&["other"]).inc();
        RelayStop::Gone
    }

    /// 502 or 504 when nothing of the answer has reached the client yet.
    pub(super) async fn upstream_failed(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        f: Failure,
    ) -> Step<Next> {
        if let Failure::Connect(
            crate::http1::upstream::ConnectError::Refused(e)
            | crate::http1::upstream::ConnectError::Tls(e),
        ) = &f
        {
            tracing::warn!(upstream = %x.policy.upstream.endpoint.url, error = %e, "upstream connection failed");
        }
        let next = self.refuse(x, head, Refusal::Upstream(f)).await?;
        // The request may be half sent: never reuse this client connection.
        Ok(if next == Next::KeepAlive {
            Next::Close
        } else {
            next
        })
    }
}
