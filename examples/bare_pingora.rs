//! The pingora baseline of `benches/load.sh`: pingora 0.9 proxying every
//! request to one upstream with no logic at all, one worker thread, no work
//! stealing (as keygate ran it). Usage: `bare_pingora LISTEN UPSTREAM`.
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare(String);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut a = std::env::args().skip(1);
    let listen = a.next().unwrap();
    let up = a.next().unwrap();
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut p = pingora::proxy::http_proxy_service(&server.configuration, Bare(up));
    p.add_tcp(&listen);
    server.add_service(p);
    server.run_forever();
}
