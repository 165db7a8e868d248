//! SIGTERM: keygate stops accepting at once, lets the request in flight
//! finish, and exits once `server.grace_period` is over.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_in_time() {
    let upstream = Upstream::start();
    let config = config()
        .replace(r#"grace_period = "1s""#, r#"grace_period = "4s""#)
        .replace(r#"read_timeout = "2s""#, r#"read_timeout = "10s""#);
    let mut kg = Keygate::start(&config, upstream.port);
    let url = kg.url("/slow/x");
    let in_flight = std::thread::spawn(move || {
        client()
            .get(url)
            .header("X-API-Key", KEY_DEPLOY)
            .send()
            .map(|r| (r.status().as_u16(), Instant::now()))
    });
    // The upstream holds /slow/ answers for 2.5 s: SIGTERM arrives mid-request.
    while upstream.count() == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let signalled = Instant::now();
    kg.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    let refused = std::net::TcpStream::connect(("127.0.0.1", kg.port));
    assert!(refused.is_err(), "no new connection after SIGTERM");
    let (status, answered) = in_flight.join().unwrap().expect("an answer");
    assert_eq!(status, 200);
    assert!(
        answered - signalled >= Duration::from_millis(1500),
        "the answer came after SIGTERM, when the upstream gave it"
    );

    let status = loop {
        if let Some(status) = kg.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(8),
            "still running 8 s after SIGTERM with a 4 s grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
