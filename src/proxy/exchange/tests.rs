//! The connection loop with an in-memory client (`tokio::io::duplex`) and a
//! raw loopback upstream: what reaches each side, byte for byte.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::limit::Limiter;
use crate::policy::testing::{base_toml, compile_str};
use crate::state::RedbStore;

/// A worker whose policy forwards to `upstream_port`.
fn worker(upstream_port: u16, state: &std::path::Path) -> Rc<Worker> {
    let toml = base_toml().replace(
        "http://127.0.0.1:9000",
        &format!("http://127.0.0.1:{upstream_port}"),
    );
    let policy = compile_str(&toml).expect("test policy").policy;
    let limiter = Arc::new(Limiter::new());
    let redb = Arc::new(RedbStore::open(state).expect("state store"));
    let store: Arc<dyn crate::state::StateStore> = redb.clone();
    Rc::new(Worker::new(Arc::new(Shared {
        keys: Arc::new(crate::keys::SelfKeys::new(redb)),
        store: Arc::new(PolicyStore::new(std::path::Path::new("test.toml"), policy)),
        limiter: limiter.clone(),
        issuer: Arc::new(Issuer::new(store, limiter)),
        fleet: None,
        connections: Arc::default(),
    })))
}

/// A raw upstream answering each request head it reads with `answer`;
/// records every byte it received.
fn upstream(answer: &'static [u8]) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let _ = conn.write_all(answer);
                    }
                }
            });
        }
    });
    (port, seen)
}

/// Serve one in-memory connection: write `request`, half-close, and
/// return everything keygate answered.
fn run(worker: Rc<Worker>, request: &'static [u8]) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let served = tokio::task::spawn_local(serve(worker, server, peer, None));
        client.write_all(request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        served.await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    })
}

#[test]
fn pipelined_requests_are_answered_in_order_and_none_is_lost() {
    let (port, seen) = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    let answer = run(
        worker(port, dir.path()),
        b"GET /v1/status HTTP/1.1\r\nHost: a\r\nX-Request-Id: one\r\n\r\n\
          POST /v1/status HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Request-Id: two\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /v1/status HTTP/1.1\r\nHost: a\r\nX-Request-Id: three\r\n\r\n",
    );
    let ids: Vec<_> = answer
        .lines()
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .collect();
    assert_eq!(ids, ["one", "two", "three"], "{answer}");
    let seen = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
    // The chunked body was decoded and re-sent whole, with a length.
    assert!(
        seen.contains("x-request-id: two\r\nx-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: http\r\ncontent-length: 3\r\n\r\nabc"),
        "{seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("transfer-encoding"),
        "{seen}"
    );
}

#[test]
fn an_early_answer_closes_after_draining_the_unread_body() {
    let (port, seen) = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    // No credential on an authenticated route: refused before the body is read.
    let answer = run(
        worker(port, dir.path()),
        b"POST /v1/vms HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789\
          GET /v1/status HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn an_answer_with_both_framings_is_relayed_chunked_without_its_length() {
    let (port, _) = upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let answer = run(
        worker(port, dir.path()),
        b"GET /v1/status HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert!(!answer.contains("content-length"), "{answer}");
    assert!(
        answer.contains("transfer-encoding: chunked\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\n2\r\nok\r\n0\r\n\r\n"), "{answer}");
}

#[test]
fn retries_are_for_idempotent_methods_only() {
    assert!(crate::http1::client::may_retry(&http::Method::GET));
    assert!(crate::http1::client::may_retry(&http::Method::PUT));
    assert!(!crate::http1::client::may_retry(&http::Method::POST));
    assert!(!crate::http1::client::may_retry(&http::Method::PATCH));
}

/// A connection's future is moved whole into its task at every spawn (every
/// connection, every HTTP/2 stream): a buffer kept inside it (a 16 KiB
/// array once made it 17 KB) costs a large copy per request.
#[test]
fn a_connection_future_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let w = worker(1, dir.path());
    let (_c, server) = tokio::io::duplex(16);
    let f = serve(w, server, IpAddr::V4(Ipv4Addr::LOCALHOST), None);
    let size = std::mem::size_of_val(&f);
    assert!(size < 8 * 1024, "the connection future is {size} bytes");
}
