//! Buffers of finished exchanges, kept per thread for the next ones: a
//! connection or an HTTP/2 stream (one request each) starts without fresh
//! allocations of up to 16 KiB.

use std::cell::RefCell;

/// At most this many buffers wait, none larger than [`MAX`].
const KEEP: usize = 256;
const MAX: usize = 64 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `cap` bytes.
pub fn take(cap: usize) -> Vec<u8> {
    let reused = SPARE.with(|s| {
        let mut s = s.borrow_mut();
        let i = s.iter().rposition(|b| b.capacity() >= cap)?;
        Some(s.swap_remove(i))
    });
    reused.unwrap_or_else(|| Vec::with_capacity(cap))
}

pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > MAX {
        return;
    }
    buf.clear();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(buf);
        }
    });
}
