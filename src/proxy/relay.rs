//! The outbound signing relay: the upstream API posts each webhook here with
//! `X-Webhook-Subscriber` and `X-Webhook-Destination`; keygate checks the
//! destination against that subscriber's `url_prefix`, signs the body with
//! the subscriber's secret, delivers it, and returns the destination's
//! answer. This is an SSRF surface, so: only configured subscribers, only
//! URLs under their prefix (scheme, host and port compared parsed, no dot
//! segments), no redirects followed, body and time bounded.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderName, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorType};

use crate::http1::encode::HopByHop;
use crate::metrics::METRICS;
use crate::policy::{Destination, PolicyStore, Relay as RelayPolicy};

const SUBSCRIBER: HeaderName = HeaderName::from_static("x-webhook-subscriber");
const DESTINATION: HeaderName = HeaderName::from_static("x-webhook-destination");

pub struct Relay {
    pub store: Arc<PolicyStore>,
    pub connector: Connector,
}

/// A refusal or failure, answered as the usual JSON error.
struct RelayError {
    status: u16,
    code: &'static str,
    message: String,
    /// The metric label.
    result: &'static str,
}

fn fail(
    status: u16,
    code: &'static str,
    message: impl Into<String>,
    result: &'static str,
) -> RelayError {
    RelayError {
        status,
        code,
        message: message.into(),
        result,
    }
}

#[async_trait]
impl ServeHttp for Relay {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let policy = self.store.load();
        let outcome = match &policy.relay {
            Some(relay) => {
                let deliver = self.deliver(session, relay);
                match tokio::time::timeout(relay.timeout, deliver).await {
                    Ok(result) => result,
                    Err(_) => Err(fail(
                        504,
                        "upstream_timeout",
                        "the destination did not answer in time",
                        "timeout",
                    )),
                }
            }
            None => Err(fail(
                404,
                "forbidden",
                "no [webhook_relay] is configured",
                "refused",
            )),
        };
        match outcome {
            Ok((status, content_type, body)) => {
                METRICS
                    .relay_deliveries
                    .with_label_values(&[crate::metrics::status_class(status)])
                    .inc();
                let mut resp = Response::builder().status(status);
                if let Some(ct) = content_type {
                    resp = resp.header(http::header::CONTENT_TYPE, ct);
                }
                resp.header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            Err(f) => {
                METRICS
                    .relay_deliveries
                    .with_label_values(&[f.result])
                    .inc();
                let body = crate::gate::error_body(f.status, f.code, &f.message, "-");
                Response::builder()
                    .status(StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_GATEWAY))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
        }
    }
}

type Answer = (u16, Option<http::HeaderValue>, Vec<u8>);

impl Relay {
    async fn deliver(
        &self,
        session: &mut ServerSession,
        relay: &RelayPolicy,
    ) -> Result<Answer, RelayError> {
        let headers = &session.req_header().headers;
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let id = text(&SUBSCRIBER).ok_or_else(|| {
            fail(
                400,
                "invalid_request",
                "X-Webhook-Subscriber is required",
                "refused",
            )
        })?;
        let subscriber = relay
            .subscriber(id)
            .ok_or_else(|| fail(403, "forbidden", "unknown subscriber", "refused"))?;
        let dest = text(&DESTINATION)
            .and_then(Destination::parse)
            .ok_or_else(|| {
                fail(
                    400,
                    "invalid_request",
                    "X-Webhook-Destination must be an absolute http(s) URL",
                    "refused",
                )
            })?;
        if !subscriber.prefix.allows(&dest) {
            return Err(fail(
                403,
                "forbidden",
                "the destination is outside the subscriber's url_prefix",
                "refused",
            ));
        }

        let mut request = RequestHeader::build(
            session.req_header().method.clone(),
            dest.path.as_bytes(),
            None,
        )
        .map_err(|_| {
            fail(
                400,
                "invalid_request",
                "unusable destination path",
                "refused",
            )
        })?;
        let host = if dest.port == if dest.tls { 443 } else { 80 } {
            dest.host.clone()
        } else {
            format!("{}:{}", dest.host, dest.port)
        };
        let mut passed = Vec::new();
        let hop = HopByHop::of_map(headers);
        for (name, value) in headers.iter() {
            let skip = hop.drops(name.as_str().as_bytes())
                || matches!(
                    name.as_str(),
                    "x-webhook-subscriber" | "x-webhook-destination"
                )
                || *name == subscriber.header
                || subscriber.timestamp_header.as_ref() == Some(name);
            if !skip {
                passed.push((name.clone(), value.clone()));
            }
        }
        let body = read_bounded(session, relay.max_body).await?;
        let timestamp = crate::clock::unix_now().to_string();
        let signed_ts = subscriber
            .timestamp_header
            .as_ref()
            .map(|_| timestamp.as_str());
        let signature = crate::webhook::sign(&subscriber.secret, signed_ts, &body);
        let build = |r: &mut RequestHeader| -> pingora::Result<()> {
            r.insert_header(http::header::HOST, &host)?;
            for (n, v) in &passed {
                r.append_header(n.clone(), v.clone())?;
            }
            r.insert_header(subscriber.header.clone(), &signature)?;
            if let Some(h) = &subscriber.timestamp_header {
                r.insert_header(h.clone(), &timestamp)?;
            }
            r.insert_header(http::header::CONTENT_LENGTH, body.len())?;
            Ok(())
        };
        build(&mut request).map_err(|_| {
            fail(
                400,
                "invalid_request",
                "unusable request headers",
                "refused",
            )
        })?;

        let addr = tokio::net::lookup_host((dest.host.as_str(), dest.port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                fail(
                    502,
                    "upstream_unavailable",
                    "the destination's host does not resolve",
                    "unreachable",
                )
            })?;
        let mut peer = HttpPeer::new(addr, dest.tls, dest.host.clone());
        peer.options.connection_timeout = Some(relay.timeout.min(Duration::from_secs(5)));
        peer.options.read_timeout = Some(relay.timeout);
        peer.options.write_timeout = Some(relay.timeout);
        let exchange = async {
            let (mut http, _) = self.connector.get_http_session(&peer).await?;
            http.write_request_header(Box::new(request)).await?;
            http.write_body(&body).await?;
            http.finish_body().await?;
            http.read_response().await?;
            Ok::<_, Box<Error>>(http)
        };
        let mut http = exchange.await.map_err(|e| match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                fail(
                    504,
                    "upstream_timeout",
                    "the destination did not answer in time",
                    "timeout",
                )
            }
            _ => fail(
                502,
                "upstream_unavailable",
                "the destination could not be reached",
                "unreachable",
            ),
        })?;
        let (status, content_type) = match http.resp_header() {
            Some(h) => (
                h.status.as_u16(),
                h.headers.get(http::header::CONTENT_TYPE).cloned(),
            ),
            None => {
                return Err(fail(
                    502,
                    "upstream_unavailable",
                    "the destination sent no answer",
                    "unreachable",
                ))
            }
        };
        // Redirects are returned as they are, never followed.
        let mut answer = Vec::new();
        while let Ok(Some(chunk)) = http.read_body_bytes().await {
            if answer.len() + chunk.len() > relay.max_body {
                return Err(fail(
                    502,
                    "upstream_unavailable",
                    "the destination's answer is too large",
                    "unreachable",
                ));
            }
            answer.extend_from_slice(&chunk);
        }
        self.connector.release_http_session(http, &peer, None).await;
        Ok((status, content_type, answer))
    }
}

async fn read_bounded(session: &mut ServerSession, limit: usize) -> Result<Vec<u8>, RelayError> {
    let too_large = || {
        fail(
            413,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
            "too_large",
        )
    };
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(fail(
                    400,
                    "invalid_request",
                    "the body could not be read",
                    "refused",
                ))
            }
        }
    }
}
