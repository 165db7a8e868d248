//! Every Prometheus metric keygate exports, registered once in the default
//! registry, beside the prometheus crate's own `process_*` metrics. Label
//! values come from the policy's names (route patterns, tier names,
//! certificate subjects) or from fixed sets, never from raw paths, token
//! subjects or keys.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec,
};

pub struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub added_latency: Histogram,
    pub access_log_dropped: IntCounter,
    pub tls_handshakes: IntCounterVec,
    pub tls_cert_expiry: IntGaugeVec,
    pub tls_redirects: IntCounter,
    pub http2_connections: IntCounter,
    pub http2_streams: IntCounter,
    pub http2_resets: IntCounter,
    pub http2_goaways: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub gate_duration: Histogram,
    pub auth_denials: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub webhook_verifications: IntCounterVec,
    pub relay_deliveries: IntCounterVec,
    pub tokens_issued: IntCounterVec,
    pub refresh_reuse: IntCounter,
    pub login_failures: IntCounter,
    pub login_throttled: IntCounter,
    pub login_verifications: IntCounter,
    pub login_overloaded: IntCounter,
    pub login_busy: IntCounter,
    pub login_admitted: IntGauge,
    pub connections_refused: IntCounterVec,
    pub connections_open: IntGauge,
    pub limiter_accounts: IntGauge,
    pub state_errors: IntCounterVec,
    /// Self-service keys: changes by action, cache results, store lookups
    /// by outcome.
    pub key_changes: IntCounterVec,
    pub key_cache: IntCounterVec,
    pub key_lookups: IntCounterVec,
    pub redis_calls: IntCounterVec,
    pub redis_call_duration: Histogram,
    /// `keygate_limit_decisions_total`, one series per source, resolved
    /// once: a limited request does no label lookup.
    pub limit_decisions: LimitDecisions,
    pub state_up: IntGauge,
    pub redis_breaker_open: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: IntGauge,
    pub config_last_reload_success_timestamp: IntGauge,
    pub policy_objects: IntGaugeVec,
    pub build_info: IntGaugeVec,
}

/// Where rate-limit decisions came from (see `proxy::exchange`).
pub struct LimitDecisions {
    pub local: IntCounter,
    pub redis: IntCounter,
    pub deny_cache: IntCounter,
    pub fallback_local: IntCounter,
    pub fallback_open: IntCounter,
    pub fallback_closed: IntCounter,
}

impl LimitDecisions {
    fn new(vec: IntCounterVec) -> LimitDecisions {
        let source = |s: &str| vec.with_label_values(&[s]);
        LimitDecisions {
            local: source("local"),
            redis: source("redis"),
            deny_cache: source("deny_cache"),
            fallback_local: source("fallback_local"),
            fallback_open: source("fallback_open"),
            fallback_closed: source("fallback_closed"),
        }
    }
}

/// Latency buckets from 25 µs to 10 s: a sidecar's own overhead sits at the
/// bottom, slow upstreams at the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What keygate adds to a forwarded request: tens of µs when all is well.
const ADDED_BUCKETS: &[f64] = &[
    0.000_01, 0.000_02, 0.000_03, 0.000_05, 0.000_075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005,
    0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The gate decides in micro- to milliseconds (argon2 never runs here).
const GATE_BUCKETS: &[f64] = &[
    0.000_000_5,
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // Registering a fixed set of names into a fresh registry cannot fail;
    // a clash would be a programming error caught by the first test run.
    let m = Metrics {
        requests: register_int_counter_vec!(
            "keygate_requests_total",
            "Requests answered, by route pattern, method, status class (status=\"2xx\") and status code (code=\"200\").",
            &["route", "method", "status", "code"]
        )
        .expect("register keygate_requests_total"),
        added_latency: register_histogram!(
            "keygate_added_latency_seconds",
            "Time keygate itself adds to a forwarded request: its total time minus the upstream's (request sent to answer head received).",
            ADDED_BUCKETS.to_vec()
        )
        .expect("register keygate_added_latency_seconds"),
        access_log_dropped: register_int_counter!(
            "keygate_access_log_dropped_total",
            "Access log lines dropped because the writer's queue was full (a request never waits for the log)."
        )
        .expect("register keygate_access_log_dropped_total"),
        tls_handshakes: register_int_counter_vec!(
            "keygate_tls_handshakes_total",
            "TLS handshakes on the public listener by result (ok, resumed, failed, timeout) and protocol version.",
            &["result", "version"]
        )
        .expect("register keygate_tls_handshakes_total"),
        tls_cert_expiry: register_int_gauge_vec!(
            "keygate_tls_certificate_expiry_timestamp_seconds",
            "When each certificate being served expires (Unix seconds), by its name (default, or its first SNI name) and subject.",
            &["cert", "subject"]
        )
        .expect("register keygate_tls_certificate_expiry_timestamp_seconds"),
        tls_redirects: register_int_counter!(
            "keygate_tls_redirects_total",
            "Plain-HTTP requests answered 308 to https:// (server.tls.redirect_listen)."
        )
        .expect("register keygate_tls_redirects_total"),
        http2_connections: register_int_counter!(
            "keygate_http2_connections_total",
            "HTTP/2 connections (TLS with ALPN h2)."
        )
        .expect("register keygate_http2_connections_total"),
        http2_streams: register_int_counter!(
            "keygate_http2_streams_total",
            "HTTP/2 streams (requests) accepted."
        )
        .expect("register keygate_http2_streams_total"),
        http2_resets: register_int_counter!(
            "keygate_http2_client_resets_total",
            "HTTP/2 streams the client reset before their answer was complete."
        )
        .expect("register keygate_http2_client_resets_total"),
        http2_goaways: register_int_counter_vec!(
            "keygate_http2_protections_total",
            "HTTP/2 protections applied: connections ended for rapid reset (enhance_your_calm), idleness (idle) or a client certificate whose CAs are no longer trusted (client_ca_changed), answers given up on a client that does not read (send_timeout).",
            &["reason"]
        )
        .expect("register keygate_http2_protections_total"),
        request_duration: register_histogram_vec!(
            "keygate_request_duration_seconds",
            "Time from request headers received to response finished, by route pattern.",
            &["route"],
            LATENCY_BUCKETS.to_vec()
        )
        .expect("register keygate_request_duration_seconds"),
        upstream_duration: register_histogram_vec!(
            "keygate_upstream_duration_seconds",
            "Time from sending the request upstream to the upstream's response header, by route pattern.",
            &["route"],
            LATENCY_BUCKETS.to_vec()
        )
        .expect("register keygate_upstream_duration_seconds"),
        gate_duration: register_histogram!(
            "keygate_gate_duration_seconds",
            "Time the gate takes to decide one request (keygate's own added latency).",
            GATE_BUCKETS.to_vec()
        )
        .expect("register keygate_gate_duration_seconds"),
        auth_denials: register_int_counter_vec!(
            "keygate_auth_denials_total",
            "Requests refused by the gate, by error code.",
            &["code"]
        )
        .expect("register keygate_auth_denials_total"),
        redis_calls: register_int_counter_vec!(
            "keygate_redis_calls_total",
            "Calls to the shared state store (Redis), by operation and outcome (ok, error, timeout, skipped while the breaker is open, busy: the token endpoints' connections all stayed in use).",
            &["op", "outcome"]
        )
        .expect("register keygate_redis_calls_total"),
        redis_call_duration: register_histogram!(
            "keygate_redis_call_duration_seconds",
            "Time of calls to Redis that got an answer.",
            GATE_BUCKETS.iter().map(|b| b * 100.0).collect::<Vec<_>>()
        )
        .expect("register keygate_redis_call_duration_seconds"),
        limit_decisions: LimitDecisions::new(
            register_int_counter_vec!(
                "keygate_limit_decisions_total",
                "Rate-limit decisions by source: local, redis, deny_cache (a refusal cached until its retry time), fallback_local, fallback_open, fallback_closed.",
                &["source"]
            )
            .expect("register keygate_limit_decisions_total"),
        ),
        state_up: register_int_gauge!(
            "keygate_state_up",
            "1 while the state store answers (always 1 for the embedded store), 0 while Redis does not."
        )
        .expect("register keygate_state_up"),
        redis_breaker_open: register_int_gauge!(
            "keygate_redis_breaker_open",
            "1 after a failed Redis call: limit decisions skip Redis for 250 ms at a time until a call succeeds."
        )
        .expect("register keygate_redis_breaker_open"),
        upstream_errors: register_int_counter_vec!(
            "keygate_upstream_errors_total",
            "Requests that failed at the upstream, by kind (connect, timeout, other).",
            &["kind"]
        )
        .expect("register keygate_upstream_errors_total"),
        rate_limited: register_int_counter_vec!(
            "keygate_rate_limited_total",
            "Requests refused with 429 by the tier limiter, by tier.",
            &["tier"]
        )
        .expect("register keygate_rate_limited_total"),
        webhook_verifications: register_int_counter_vec!(
            "keygate_webhook_verifications_total",
            "Inbound webhook signature checks, by configured path and result (valid, mismatch, malformed, missing, stale, too_large).",
            &["path", "result"]
        )
        .expect("register keygate_webhook_verifications_total"),
        relay_deliveries: register_int_counter_vec!(
            "keygate_webhook_relay_deliveries_total",
            "Relayed webhooks, by result: the destination's status class, or refused, unreachable, timeout, too_large.",
            &["result"]
        )
        .expect("register keygate_webhook_relay_deliveries_total"),
        tokens_issued: register_int_counter_vec!(
            "keygate_tokens_issued_total",
            "Access tokens issued, by grant (password, refresh_token).",
            &["grant"]
        )
        .expect("register keygate_tokens_issued_total"),
        refresh_reuse: register_int_counter!(
            "keygate_refresh_reuse_detected_total",
            "Spent refresh tokens presented again (each revokes its family)."
        )
        .expect("register keygate_refresh_reuse_detected_total"),
        login_failures: register_int_counter!(
            "keygate_login_failures_total",
            "Logins refused with invalid_credentials."
        )
        .expect("register keygate_login_failures_total"),
        login_throttled: register_int_counter!(
            "keygate_login_throttled_total",
            "Logins refused with 429 login_throttled."
        )
        .expect("register keygate_login_throttled_total"),
        login_verifications: register_int_counter!(
            "keygate_login_verifications_total",
            "Password hashes verified (argon2id runs), whatever the outcome."
        )
        .expect("register keygate_login_verifications_total"),
        login_overloaded: register_int_counter!(
            "keygate_login_overloaded_total",
            "Logins refused with 503 overloaded: the verification queue was full."
        )
        .expect("register keygate_login_overloaded_total"),
        login_busy: register_int_counter!(
            "keygate_login_busy_total",
            "Logins refused with 429 login_throttled because another login for the same email or from the same address was being checked."
        )
        .expect("register keygate_login_busy_total"),
        login_admitted: register_int_gauge!(
            "keygate_login_admitted",
            "Logins admitted now: verifying, or waiting for a verification permit."
        )
        .expect("register keygate_login_admitted"),
        connections_refused: register_int_counter_vec!(
            "keygate_connections_refused_total",
            "Connections closed at accept, by reason (max_connections, max_connections_per_client).",
            &["reason"]
        )
        .expect("register keygate_connections_refused_total"),
        connections_open: register_int_gauge!(
            "keygate_connections_open",
            "Client connections open on the public listener."
        )
        .expect("register keygate_connections_open"),
        limiter_accounts: register_int_gauge!(
            "keygate_limiter_accounts",
            "Accounts whose bucket is not whole, held in memory by the limiter."
        )
        .expect("register keygate_limiter_accounts"),
        state_errors: register_int_counter_vec!(
            "keygate_state_errors_total",
            "Failed writes to the durable state store, by operation; unauthenticated_record: a refresh family in Redis whose HMAC did not match, refused.",
            &["op"]
        )
        .expect("register keygate_state_errors_total"),
        key_changes: register_int_counter_vec!(
            "keygate_self_service_key_changes_total",
            "Changes to self-service keys and account allowlists, by action (create, update, revoke, roll, ip_allow).",
            &["action"]
        )
        .expect("register keygate_self_service_key_changes_total"),
        key_cache: register_int_counter_vec!(
            "keygate_self_service_key_cache_total",
            "Lookups of self-service keys in this sidecar's cache, by result (hit, negative_hit, miss).",
            &["result"]
        )
        .expect("register keygate_self_service_key_cache_total"),
        key_lookups: register_int_counter_vec!(
            "keygate_self_service_key_store_lookups_total",
            "Lookups of self-service keys in the state store, by outcome (found, unknown, error, refused: from an address with too many unknown keys, without a lookup).",
            &["outcome"]
        )
        .expect("register keygate_self_service_key_store_lookups_total"),
        config_reloads: register_int_counter_vec!(
            "keygate_config_reloads_total",
            "Configuration reloads, by result (success, failure).",
            &["result"]
        )
        .expect("register keygate_config_reloads_total"),
        config_last_reload_success: register_int_gauge!(
            "keygate_config_last_reload_success",
            "1 if the last reload attempt succeeded, 0 if it failed."
        )
        .expect("register keygate_config_last_reload_success"),
        config_last_reload_success_timestamp: register_int_gauge!(
            "keygate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful load of the configuration."
        )
        .expect("register keygate_config_last_reload_success_timestamp_seconds"),
        policy_objects: register_int_gauge_vec!(
            "keygate_policy_objects",
            "Objects in the running policy, by kind.",
            &["kind"]
        )
        .expect("register keygate_policy_objects"),
        build_info: register_int_gauge_vec!(
            "keygate_build_info",
            "Always 1; the labels name the running build.",
            &["version", "commit", "rustc"]
        )
        .expect("register keygate_build_info"),
    };
    m.build_info
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            env!("KEYGATE_GIT_COMMIT"),
            env!("KEYGATE_RUSTC_VERSION"),
        ])
        .set(1);
    zero_known_series(&m);
    // process_cpu_seconds_total, process_resident_memory_bytes,
    // process_open_fds, process_start_time_seconds, …
    let _ = prometheus::register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    m
});

/// Create every series whose labels are known in advance, at 0, so that
/// `rate()` and `increase()` work before the first event.
fn zero_known_series(m: &Metrics) {
    for kind in ["connect", "timeout", "other"] {
        m.upstream_errors.with_label_values(&[kind]);
    }
    for result in ["success", "failure"] {
        m.config_reloads.with_label_values(&[result]);
    }
    for grant in ["password", "refresh_token"] {
        m.tokens_issued.with_label_values(&[grant]);
    }
    for action in ["create", "update", "revoke", "roll", "ip_allow"] {
        m.key_changes.with_label_values(&[action]);
    }
    for result in ["hit", "negative_hit", "miss"] {
        m.key_cache.with_label_values(&[result]);
    }
    for outcome in ["found", "unknown", "error", "refused"] {
        m.key_lookups.with_label_values(&[outcome]);
    }
    for op in ["write", "evict", "purge", "unauthenticated_record"] {
        m.state_errors.with_label_values(&[op]);
    }
    for outcome in ["ok", "error", "timeout", "skipped"] {
        m.redis_calls.with_label_values(&["gcra", outcome]);
    }
    for reason in ["max_connections", "max_connections_per_client"] {
        m.connections_refused.with_label_values(&[reason]);
    }
}

/// `200`, `404`, … as a static label (status codes are 100–599).
pub fn status_code(status: u16) -> &'static str {
    static CODES: LazyLock<Vec<String>> =
        LazyLock::new(|| (0..600).map(|c| c.to_string()).collect());
    CODES
        .get(usize::from(status))
        .map_or("other", String::as_str)
}

/// A bounded label for an HTTP method.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// `2xx`, `4xx`, …
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The series one answered request touches: its count, its duration and
/// (once it had one) its upstream's duration.
pub struct RequestSeries {
    pub count: IntCounter,
    pub duration: Histogram,
    pub upstream: Option<Histogram>,
}

/// How many (route, method, status) series each thread keeps at hand.
const SERIES_KEPT: usize = 64;

type Kept = Vec<(Box<str>, &'static str, u16, RequestSeries)>;

thread_local! {
    static SERIES: std::cell::RefCell<Kept> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on the series of a request on `route` with `method` answered
/// `status` (with its upstream histogram when `upstream`), looked up in the
/// registry once per thread: `with_label_values` hashes every label value
/// under a lock, three times per request otherwise.
pub fn with_request_series(
    route: &str,
    method: &'static str,
    status: u16,
    upstream: bool,
    f: impl FnOnce(&RequestSeries),
) {
    SERIES.with(|kept| {
        let mut kept = kept.borrow_mut();
        let found = kept
            .iter()
            .position(|(r, m, c, _)| *c == status && *m == method && &**r == route);
        let at = match found {
            Some(at) => at,
            None => {
                if kept.len() >= SERIES_KEPT {
                    // Routes changed with a reload, or many statuses: afresh.
                    kept.clear();
                }
                let m = &*METRICS;
                let series = RequestSeries {
                    count: m.requests.with_label_values(&[
                        route,
                        method,
                        status_class(status),
                        status_code(status),
                    ]),
                    duration: m.request_duration.with_label_values(&[route]),
                    upstream: None,
                };
                kept.push((route.into(), method, status, series));
                kept.len() - 1
            }
        };
        let series = &mut kept[at].3;
        if upstream && series.upstream.is_none() {
            series.upstream = Some(METRICS.upstream_duration.with_label_values(&[route]));
        }
        f(series);
    })
}
