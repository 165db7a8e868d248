//! Helpers shared by the fuzz targets (included with `#[path]`; not a target).

/// At most 300 bytes of `bytes`, for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(300)];
    let more = if cut.len() < bytes.len() {
        format!("... ({} bytes)", bytes.len())
    } else {
        String::new()
    };
    format!("{:?}{more}", String::from_utf8_lossy(cut))
}
