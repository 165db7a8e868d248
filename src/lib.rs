//! keygate: an authenticating reverse-proxy sidecar.
//!
//! A request flows `http1` (the wire: strict parsing, re-framing) → `proxy`
//! (dispatch and the forward plan) → `gate` (the pure decision over a
//! `policy` snapshot) → upstream. `config` is the file as written; `policy`
//! is what it compiles to, published through one `ArcSwap`. `keys` serves
//! customers' own API keys from the `state` store.

pub mod cli;
pub mod clock;
pub mod config;
pub mod gate;
pub mod http1;
pub mod issue;
pub mod keys;
pub mod limit;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod webhook;
