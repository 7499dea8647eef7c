//! fedrelay's wire model.
//!
//! The protobuf definitions in `proto/fedrelay/v1/relay.proto`, compiled at build time by a
//! pure-Rust compiler. Everything that crosses a process boundary inside the relay is one of
//! these types: edges turn platform events into [`v1::Envelope`]s, sessions journal them and
//! hand them back to edges for delivery.

/// Version 1 of the wire model.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fedrelay.v1");
}

pub mod session_id;

pub use v1::{Address, Envelope, envelope::Body};

impl v1::Address {
    /// Builds an address from its three parts.
    pub fn new(
        platform: impl Into<String>,
        domain: impl Into<String>,
        user: impl Into<String>,
    ) -> Self {
        Self {
            platform: platform.into(),
            domain: domain.into(),
            user: user.into(),
        }
    }
}

impl std::fmt::Display for v1::Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}@{}", self.platform, self.user, self.domain)
    }
}

impl v1::envelope::Body {
    /// A short, content-free name of the body kind, for logs, metrics and the metadata log.
    pub fn kind(&self) -> &'static str {
        use v1::envelope::Body;
        match self {
            Body::Text(_) => "message",
            Body::Reaction(_) => "reaction",
            Body::Edit(_) => "edit",
            Body::Delete(_) => "delete",
            Body::Typing(_) => "typing",
            Body::File(_) => "file",
            Body::ContactRequest(_) => "contact_request",
            Body::ContactResponse(_) => "contact_response",
            Body::ChannelInvite(_) => "channel_invite",
            Body::Membership(_) => "membership",
            Body::ProfileQuery(_) => "profile_query",
            Body::Profile(_) => "profile",
            Body::Presence(_) => "presence",
            Body::Error(_) => "error",
        }
    }

    /// The metadata-log category: `im`, `presence`, `typing` or `error`.
    pub fn category(&self) -> &'static str {
        use v1::envelope::Body;
        match self {
            Body::Typing(_) => "typing",
            Body::Presence(_) => "presence",
            Body::Error(_) => "error",
            _ => "im",
        }
    }

    /// The message this body refers to, for edits, deletes and reactions.
    pub fn target(&self) -> Option<&v1::MessageRef> {
        use v1::envelope::Body;
        match self {
            Body::Reaction(r) => r.target.as_ref(),
            Body::Edit(e) => e.target.as_ref(),
            Body::Delete(d) => d.target.as_ref(),
            _ => None,
        }
    }

    /// Mutable access to the target reference, so a session can resolve or rewrite it.
    pub fn target_mut(&mut self) -> Option<&mut v1::MessageRef> {
        use v1::envelope::Body;
        match self {
            Body::Reaction(r) => r.target.as_mut(),
            Body::Edit(e) => e.target.as_mut(),
            Body::Delete(d) => d.target.as_mut(),
            _ => None,
        }
    }

    /// Whether a body is ephemeral: typing indicators are not worth retrying for long.
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, v1::envelope::Body::Typing(_))
    }
}
