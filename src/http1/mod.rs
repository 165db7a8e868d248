//! keygate's HTTP/1.1 engine: it knows framing, not auth.
//!
//! - [`parse`]: request and response heads, held to a strict RFC 9112
//!   grammar (anything peers are known to read differently is refused);
//! - [`body`]: one body decoder for both directions and the chunk encoder,
//!   so what is forwarded is always re-framed by keygate;
//! - [`encode`]: heads and the hop-by-hop filter;
//! - [`upstream`]: connections to the upstream, its pool and retry rule.
//!
//! The application on top of it (dispatch, the gate, the forward plan) is
//! `crate::proxy`.

pub mod body;
pub mod encode;
pub mod parse;
pub mod upstream;

pub use upstream::Endpoint;
