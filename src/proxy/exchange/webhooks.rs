//! `[[webhooks]]` paths: the body's signature is the credential.

use super::{Downstream, Refusal, Req, Step, Target};
use crate::gate::{header_text, Denial, HeaderSource};
use crate::http1::parse::HeadView;
use crate::issue::IssueError;
use crate::metrics::METRICS;
use crate::policy::Webhook;

impl<D: Downstream> Req<'_, D> {
    /// A `[[webhooks]]` path: read the whole body (bounded), check its
    /// signature, and only then contact the upstream with that body.
    pub(super) async fn serve_webhook(&mut self, hook: &Webhook, target: Target) -> Step {
        let count = |result: &str| {
            METRICS
                .webhook_verifications
                .with_label_values(&[&hook.path, result])
                .inc();
        };
        let policy = self.x.policy.clone();
        let client_ip = self.x.client_ip;
        if !policy.server.ip_allow.permits(client_ip) {
            return self.refuse(Refusal::Gate(Denial::IpNotAllowed)).await;
        }
        let body = match self.read_body(hook.max_body).await? {
            Ok(body) => body,
            Err(refusal) => {
                if matches!(refusal, Refusal::Issue(IssueError::PayloadTooLarge(_))) {
                    count("too_large");
                }
                return self.refuse(refusal).await;
            }
        };
        let verdict = {
            let view = self.view();
            fn text<'v>(view: &'v HeadView<'_>, name: &'v http::HeaderName) -> Option<&'v str> {
                HeaderSource::values(view, name.as_str())
                    .next()
                    .and_then(header_text)
            }
            let timestamp = match &hook.timestamp {
                Some((ts_header, tolerance)) => crate::webhook::check_timestamp(
                    text(&view, ts_header),
                    crate::clock::unix_now(),
                    tolerance.as_secs(),
                )
                .map(Some),
                None => Ok(None),
            };
            timestamp.and_then(|ts| {
                crate::webhook::verify(&hook.secrets, text(&view, &hook.header), ts, &body)
            })
        };
        if let Err(refusal) = verdict {
            count(refusal.label());
            let refusal = Refusal::Signature {
                refusal,
                header: hook.header.clone(),
            };
            return self.refuse(refusal).await;
        }
        count("valid");
        self.forward(target, None, Some(&body)).await
    }
}
