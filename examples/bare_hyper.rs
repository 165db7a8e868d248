//! The hyper baseline of `benches/load.sh`: hyper 1.x proxying every
//! request to one upstream with no logic at all, on one thread, with
//! hyper-util's pooled client. Beside `bare_pingora`, it keeps the choice
//! of keygate's own HTTP/1.1 engine justified by a number.
//! Usage: `bare_hyper LISTEN UPSTREAM` (both `host:port`).
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("LISTEN");
    let upstream = args.next().expect("UPSTREAM");
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    let listener = TcpListener::bind(&listen).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let proxy = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let uri = format!("http://{upstream}{path}");
                *req.uri_mut() = uri.parse().expect("a valid URI");
                async move { client.request(req).await }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), proxy)
                .await;
        });
    }
}
