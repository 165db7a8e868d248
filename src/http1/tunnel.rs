//! After a `101 Switching Protocols` (a WebSocket): bytes both ways until
//! either side ends, or until neither has sent anything for the idle
//! timeout (nginx closes such a tunnel after `proxy_read_timeout`, 60 s by
//! default; keygate uses `upstream.read_timeout`). Without it, a client
//! could hold a tunnel, and an upstream connection, open forever.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// One side closed (or failed) and the other was told.
    Closed,
    /// Nothing crossed in either direction for the idle timeout.
    Idle,
}

/// Copy between `a` and `b` until one ends or `idle` passes without a byte.
pub async fn run<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Rc::new(Cell::new(Instant::now()));
    let mut a = Watched {
        inner: a,
        last: last.clone(),
    };
    let mut b = Watched {
        inner: b,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let deadline = last.get() + idle;
        tokio::select! {
            _ = &mut copy => return Ended::Closed,
            () = tokio::time::sleep_until(deadline) => {
                if last.get() + idle <= Instant::now() {
                    return Ended::Idle;
                }
            }
        }
    }
}

/// A stream that notes when bytes last moved through it.
struct Watched<'a, S> {
    inner: &'a mut S,
    last: Rc<Cell<Instant>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last.set(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.last.set(Instant::now());
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_ends_and_a_busy_one_does_not() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut upstream) = tokio::io::duplex(1024);
        let talk = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(40)).await;
                client.write_all(b"ping").await.unwrap();
                let mut got = [0u8; 4];
                upstream.read_exact(&mut got).await.unwrap();
            }
            // Then silence.
            std::future::pending::<()>().await;
        };
        let started = Instant::now();
        let ended = tokio::select! {
            e = run(&mut a, &mut b, Duration::from_secs(60)) => e,
            () = talk => unreachable!(),
        };
        assert_eq!(ended, Ended::Idle);
        // Five pings 40 s apart kept it open; 60 s of silence ended it.
        assert_eq!(started.elapsed().as_secs(), 260);
    }
}
