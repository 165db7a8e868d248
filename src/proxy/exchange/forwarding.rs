//! Forwarding: the forward plan's head, the engine's upstream exchange
//! (`http1::client`), the `101` agreement, the answer's fields, and the
//! engine's failures mapped to refusals.

use super::{Downstream, Gone, Refusal, Req, Step, Target};
use crate::gate::Principal;
use crate::http1::client::{self, Failure, OutBody, RelayStop, Stop};
use crate::http1::parse::{BodyKind, HeadView, ResponseHead};
use crate::http1::upstream::ConnectError;
use crate::http1::{AnswerBody, BodyFailure};
use crate::metrics::METRICS;
use crate::proxy::forward;

impl<D: Downstream> Req<'_, D> {
    /// Send the request upstream (its body re-framed from the client's, or
    /// `buffered`), then relay the answer.
    pub(super) async fn forward(
        &mut self,
        target: Target,
        principal: Option<Principal>,
        buffered: Option<&[u8]>,
    ) -> Step {
        let policy = self.x.policy.clone();
        let up = &policy.upstream;
        let head = self.head;
        let mut out = crate::http1::spare::take(1024);
        let upgrade = {
            let buf = self.down.head_buf();
            let upgrade = forward::allowed_upgrade(&policy, head, buf);
            let plan = forward::Plan {
                policy: &policy,
                peer: self.origin.peer,
                peer_text: &self.origin.peer_text,
                principal,
                request_id: &self.x.request_id,
                upgrade,
                https: self.origin.tls.is_some(),
            };
            let target = match &target {
                Target::Buf(range) => &buf[range.clone()],
                Target::Owned(t) => t,
            };
            forward::request_head(&mut out, &plan, head, buf, target);
            upgrade
        };
        let body = match (buffered, head.body) {
            (Some(bytes), _) => OutBody::Buffered(bytes),
            (None, BodyKind::None) => OutBody::None,
            (None, BodyKind::Length(n)) => OutBody::Client { length: Some(n) },
            (None, _) => OutBody::Client { length: None },
        };
        let sent = client::send(
            self.down,
            &self.worker.pool,
            &up.endpoint,
            up.read_timeout,
            &head.method,
            &mut out,
            body,
            &mut self.x.progress,
        )
        .await;
        crate::http1::spare::give(out);
        let mut answer = match sent {
            Ok(answer) => answer,
            Err(Stop::Client(BodyFailure::Gone)) => return Err(Gone),
            // The upstream connection holds half a request: dropped.
            Err(Stop::Client(BodyFailure::Malformed(why))) => {
                return self.refuse(Refusal::Body(why)).await
            }
            Err(Stop::Upstream(f)) => return self.upstream_failed(f).await,
        };
        self.x.upstream_elapsed = Some(answer.elapsed);
        let resp = &answer.head;
        // A switch of protocols only when one was asked for and allowed,
        // and the upstream switched to that one.
        let switching = resp.status == 101;
        if switching {
            let view = HeadView {
                buf: &answer.buf,
                headers: &resp.headers,
            };
            let agreed = upgrade.is_some_and(|p| {
                view.values(b"upgrade")
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(p.as_bytes()))
            });
            if !agreed {
                return self.upstream_failed(Failure::Protocol).await;
            }
        }
        self.x.status = resp.status;
        self.x.upstream_status = Some(resp.status);
        let close = self.close || self.worker.draining.get();
        let rate = self.x.decision.as_ref().and_then(|d| d.rate);
        let fields = self.down.answer(resp.status, resp.reason.get(&answer.buf));
        forward::response_head(
            fields,
            resp,
            &answer.buf,
            &self.x.request_id,
            rate.as_ref().map(|r| (&*policy, r)),
            self.origin.hsts(),
        );
        self.down
            .end_head(answer_body(resp), close, upgrade.filter(|_| switching));
        if switching {
            let early = answer.buf[resp.len..].to_vec();
            // Whatever happens in the tunnel, the connection ends with it.
            let _ = self
                .down
                .tunnel(&mut answer.conn, &early, up.read_timeout)
                .await;
            return Ok(());
        }
        let keep_alive = resp.keep_alive;
        let relayed = client::relay(
            self.down,
            &mut answer,
            up.read_timeout,
            &mut self.x.progress,
        )
        .await;
        match relayed {
            Ok(clean) => {
                let conn = answer.finish();
                if keep_alive && clean {
                    self.worker.pool.put(&up.endpoint, conn);
                }
                Ok(())
            }
            Err(RelayStop::Gone) => Err(Gone),
            Err(RelayStop::CutOff) => {
                METRICS.upstream_errors.with_label_values(&["other"]).inc();
                Err(Gone)
            }
            // Nothing reached the client yet: it can still be told.
            Err(RelayStop::BrokenBeforeHead) => self.upstream_failed(Failure::Protocol).await,
        }
    }

    /// 502 or 504 when nothing of the answer has reached the client yet.
    async fn upstream_failed(&mut self, f: Failure) -> Step {
        if let Failure::Connect(ConnectError::Refused(e) | ConnectError::Tls(e)) = &f {
            tracing::warn!(upstream = %self.x.policy.upstream.endpoint.url, error = %e, "upstream connection failed");
        }
        // The request may be half sent: never reuse this client connection.
        self.close = true;
        self.refuse(Refusal::Upstream(f)).await
    }
}

/// How the answer's body is framed for the client, from how the upstream
/// framed it.
fn answer_body(resp: &ResponseHead) -> AnswerBody {
    match resp.body {
        BodyKind::Length(n) => AnswerBody::Length(n),
        BodyKind::Chunked | BodyKind::Close => AnswerBody::Streamed,
        // HEAD and 304: the length the upstream declared, as it declared it.
        BodyKind::None if resp.status >= 200 && resp.status != 204 => AnswerBody::Declared {
            length: resp.declared_length,
            chunked: resp.declared_chunked,
        },
        BodyKind::None => AnswerBody::Empty,
    }
}
