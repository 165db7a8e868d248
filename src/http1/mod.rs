//! keygate's HTTP/1.1 engine: it knows framing, not auth. The connection
//! belongs to it; the application above sees a parsed head and decoded
//! bodies through [`Downstream`], and never a byte of framing.
//!
//! - [`parse`]: request and response heads, held to a strict RFC 9112
//!   grammar (anything peers are known to read differently is refused),
//!   and the one validation of a request head that HTTP/2 streams get too;
//! - [`body`]: one body decoder for both directions and the chunk encoder,
//!   so what is forwarded is always re-framed by keygate;
//! - [`encode`]: heads and the hop-by-hop filter;
//! - [`downstream`]: the seam to the application ([`Downstream`], [`Fields`]);
//! - [`conn`]: a client connection: buffers, deadlines, `100 Continue`,
//!   framing, linger, and what becomes of the connection after an exchange;
//! - [`client`]: the upstream exchange: retry rule, interim answers,
//!   re-framing and relaying; [`upstream`]: connections and their pool;
//! - [`tunnel`]: bytes both ways after a `101`.
//!
//! The application on top of it (dispatch, the gate, the forward plan) is
//! `crate::proxy`, which also serves HTTP/2 streams through [`Downstream`].

pub mod body;
pub mod client;
pub mod conn;
pub mod downstream;
pub mod encode;
pub mod parse;
pub mod spare;
pub mod tunnel;
pub mod upstream;

pub use downstream::{AnswerBody, BodyFailure, Downstream, Fields};
pub use upstream::Endpoint;
