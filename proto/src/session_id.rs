//! Session ids, computed the same way by every edge, node and client with no lookup: for 1:1
//! chats from the sorted pair of participant addresses, for channels from the channel id.
//! The result is the 16 bytes carried in [`Envelope::session_id`](crate::Envelope).

use sha2::{Digest, Sha256};

use crate::Address;

/// The session of a 1:1 chat between `a` and `b` (order does not matter).
pub fn one_to_one(a: &Address, b: &Address) -> [u8; 16] {
    let ka = canonical(a);
    let kb = canonical(b);
    let (lo, hi) = if ka <= kb { (ka, kb) } else { (kb, ka) };
    digest(&[b"1:1", lo.as_bytes(), hi.as_bytes()])
}

/// The session of a channel, from the platform that owns it and its id there.
pub fn channel(platform: &str, channel_id: &str) -> [u8; 16] {
    digest(&[b"channel", platform.as_bytes(), channel_id.as_bytes()])
}

/// An address in the form sessions compare: platform and domain case-insensitively, the user
/// part as given, because some platforms (Slack ids, Teams AAD ids) are case-sensitive.
pub fn canonical(a: &Address) -> String {
    format!(
        "{}\u{1f}{}\u{1f}{}",
        a.platform.to_ascii_lowercase(),
        a.domain.to_ascii_lowercase(),
        a.user
    )
}

fn digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefix every part so no two different part lists hash alike.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let out = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&out[..16]);
    id
}
