//! Session ids and relay message ids.

use fedrelay_proto::Address;
use std::fmt;

/// A session's stable 128-bit id. Any edge on any node computes it with no lookup: for 1:1
/// chats from the sorted pair of participant addresses, for channels from the channel id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// The session of a 1:1 chat between `a` and `b` (order does not matter).
    pub fn one_to_one(a: &Address, b: &Address) -> Self {
        SessionId(fedrelay_proto::session_id::one_to_one(a, b))
    }

    /// The session of a channel, from the platform that owns it and its id there.
    pub fn channel(platform: &str, channel_id: &str) -> Self {
        SessionId(fedrelay_proto::session_id::channel(platform, channel_id))
    }

    /// Parses the 16 raw bytes carried in an envelope.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(b).ok().map(SessionId)
    }

    /// Parses the 32-hex-digit text form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(SessionId(id))
    }

    /// The 32-hex-digit text form, used in store keys, logs and edge payloads.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.to_hex())
    }
}

/// Addresses compare case-insensitively on platform and domain; user parts are kept as given
/// because some platforms (Slack ids, Teams AAD ids) are case-sensitive.
fn canonical(a: &Address) -> String {
    fedrelay_proto::session_id::canonical(a)
}

/// The key that identifies a recipient inside a session (cursors, queues).
pub fn recipient_key(a: &Address) -> String {
    canonical(a)
}

/// The id space of an address's platform instance, `<platform>/<domain>`: native message ids
/// are unique within it (two HTTP-edge domains, or two XMPP servers, may both use `42`).
pub fn id_space(a: &Address) -> String {
    format!(
        "{}/{}",
        a.platform.to_ascii_lowercase(),
        a.domain.to_ascii_lowercase()
    )
}

/// A fresh relay message id: a UUID v7, so ids sort by creation time.
pub fn new_relay_msg_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_to_one_is_symmetric_and_distinct() {
        let a = Address::new("http", "a.example", "alice");
        let b = Address::new("http", "b.example", "bob");
        let c = Address::new("http", "b.example", "carol");
        assert_eq!(SessionId::one_to_one(&a, &b), SessionId::one_to_one(&b, &a));
        assert_ne!(SessionId::one_to_one(&a, &b), SessionId::one_to_one(&a, &c));
        let upper = Address::new("HTTP", "A.Example", "alice");
        assert_eq!(
            SessionId::one_to_one(&upper, &b),
            SessionId::one_to_one(&a, &b)
        );
    }

    #[test]
    fn hex_round_trip() {
        let id = SessionId::channel("teams", "19:abc@thread.tacv2");
        assert_eq!(SessionId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(SessionId::from_bytes(&id.0), Some(id));
        assert_eq!(SessionId::from_hex("zz"), None);
    }

    #[test]
    fn parts_are_length_prefixed() {
        // "ab"+"c" and "a"+"bc" must not collide.
        assert_ne!(SessionId::channel("ab", "c"), SessionId::channel("a", "bc"));
    }
}
