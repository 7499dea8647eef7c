//! JSON events of the HTTP edge ⇄ envelopes. See `docs/http-edge.md` for the format.

use fedrelay_proto::{Address, Body, Envelope, v1};
use serde::{Deserialize, Serialize};
use session_actor::SessionId;

/// Longest plain text accepted in one event (the body limit bounds it too).
const MAX_TEXT: usize = 32 * 1024;
const MAX_ID: usize = 256;
const MAX_RUNS: usize = 512;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub from: String,
    pub to: String,
    pub sent_at: Option<i64>,
    pub text: Option<String>,
    pub rich: Option<Vec<Run>>,
    pub target: Option<Target>,
    pub emoji: Option<String>,
    pub added: Option<bool>,
    pub active: Option<bool>,
    pub availability: Option<Availability>,
    pub note: Option<String>,
    pub accepted: Option<bool>,
    pub file: Option<FileRef>,
    pub profile: Option<ProfileIn>,
}

/// A user's answer to a profile query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileIn {
    pub display_name: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub organisation: String,
    #[serde(default)]
    pub avatar_url: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Message,
    Edit,
    Delete,
    Reaction,
    Typing,
    Presence,
    ContactRequest,
    ContactResponse,
    File,
    Profile,
    ProfileQuery,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub text: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub bold: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub italic: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub strike: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub code: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub event_id: Option<String>,
    pub relay_msg_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Available,
    Away,
    Busy,
    DoNotDisturb,
    Offline,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub name: String,
    pub size: u64,
    pub mime: String,
    pub url: String,
}

/// A 400 answer's message. Never logged: it may quote the caller's input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(m: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(m.into()))
}

fn need<T>(v: Option<T>, field: &str, kind: &str) -> Result<T, Invalid> {
    v.ok_or_else(|| Invalid(format!("`{field}` is required for type `{kind}`")))
}

/// A user part: 1–256 characters, no `@`, no whitespace or control characters.
fn check_user(u: &str, field: &str) -> Result<(), Invalid> {
    if u.is_empty()
        || u.len() > MAX_ID
        || u.contains('@')
        || u.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return invalid(format!(
            "`{field}` must be a user name of 1–{MAX_ID} characters without `@`, spaces or control characters"
        ));
    }
    Ok(())
}

fn check_id(s: &str, field: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > MAX_ID || s.chars().any(char::is_control) {
        return invalid(format!(
            "`{field}` must be 1–{MAX_ID} characters without control characters"
        ));
    }
    Ok(())
}

fn text_of(text: Option<String>, rich: Option<Vec<Run>>, kind: &str) -> Result<v1::Text, Invalid> {
    let plain = need(text, "text", kind)?;
    if plain.is_empty() || plain.len() > MAX_TEXT {
        return invalid(format!("`text` must be 1–{MAX_TEXT} bytes"));
    }
    let rich = rich.unwrap_or_default();
    if rich.len() > MAX_RUNS {
        return invalid(format!("`rich` has more than {MAX_RUNS} runs"));
    }
    for r in &rich {
        if let Some(l) = &r.link
            && !(l.starts_with("https://") || l.starts_with("http://") || l.starts_with("mailto:"))
        {
            return invalid("`rich[].link` must be an http(s) or mailto URL");
        }
    }
    Ok(v1::Text {
        plain,
        rich: rich
            .into_iter()
            .map(|r| v1::TextRun {
                text: r.text,
                bold: r.bold,
                italic: r.italic,
                strike: r.strike,
                code: r.code,
                link: r.link.unwrap_or_default(),
            })
            .collect(),
    })
}

fn target_of(t: Option<Target>, domain: &str, kind: &str) -> Result<v1::MessageRef, Invalid> {
    let t = need(t, "target", kind)?;
    match (t.event_id, t.relay_msg_id) {
        (Some(e), None) => {
            check_id(&e, "target.event_id")?;
            Ok(v1::MessageRef {
                relay_msg_id: String::new(),
                native_id: native_id(domain, &e),
            })
        }
        (None, Some(r)) => {
            check_id(&r, "target.relay_msg_id")?;
            Ok(v1::MessageRef {
                relay_msg_id: r,
                native_id: String::new(),
            })
        }
        _ => invalid("`target` needs exactly one of `event_id`, `relay_msg_id`"),
    }
}

/// Checks the fields every event has (`id`, `from`) before anything is recorded about it.
pub fn check_envelope_fields(ev: &InboundEvent) -> Result<(), Invalid> {
    check_id(&ev.id, "id")?;
    check_user(&ev.from, "from")
}

/// HTTP-edge native ids are scoped by domain, so two domains' `evt-1` never collide.
pub fn native_id(domain: &str, event_id: &str) -> String {
    format!("{domain}:{event_id}")
}

/// The recipient of an event: `user@domain` (domain lowercased).
pub fn parse_to(to: &str) -> Result<(String, String), Invalid> {
    let Some((user, domain)) = to.rsplit_once('@') else {
        return invalid("`to` must be `user@domain`");
    };
    check_user(user, "to")?;
    let domain = domain.to_ascii_lowercase();
    if domain.is_empty() || domain.len() > 253 {
        return invalid("`to` must be `user@domain`");
    }
    Ok((user.to_string(), domain))
}

/// Builds the envelope for a validated event from `domain` to `recipient`.
pub fn to_envelope(
    ev: InboundEvent,
    domain: &str,
    recipient: Address,
    now_ms: i64,
) -> Result<Envelope, Invalid> {
    check_id(&ev.id, "id")?;
    check_user(&ev.from, "from")?;
    let kind = match ev.kind {
        EventType::Message => "message",
        EventType::Edit => "edit",
        EventType::Delete => "delete",
        EventType::Reaction => "reaction",
        EventType::Typing => "typing",
        EventType::Presence => "presence",
        EventType::ContactRequest => "contact_request",
        EventType::ContactResponse => "contact_response",
        EventType::File => "file",
        EventType::Profile => "profile",
        EventType::ProfileQuery => "profile_query",
    };
    let body = match ev.kind {
        EventType::Message => Body::Text(text_of(ev.text, ev.rich, kind)?),
        EventType::Edit => Body::Edit(v1::Edit {
            target: Some(target_of(ev.target, domain, kind)?),
            new_body: Some(text_of(ev.text, ev.rich, kind)?),
        }),
        EventType::Delete => Body::Delete(v1::Delete {
            target: Some(target_of(ev.target, domain, kind)?),
        }),
        EventType::Reaction => {
            let emoji = need(ev.emoji, "emoji", kind)?;
            if emoji.is_empty() || emoji.len() > 64 {
                return invalid("`emoji` must be 1–64 bytes");
            }
            Body::Reaction(v1::Reaction {
                target: Some(target_of(ev.target, domain, kind)?),
                emoji,
                added: need(ev.added, "added", kind)?,
            })
        }
        EventType::Typing => Body::Typing(v1::Typing {
            active: need(ev.active, "active", kind)?,
        }),
        EventType::Presence => {
            use v1::presence::Availability as A;
            let a = match need(ev.availability, "availability", kind)? {
                Availability::Available => A::Available,
                Availability::Away => A::Away,
                Availability::Busy => A::Busy,
                Availability::DoNotDisturb => A::DoNotDisturb,
                Availability::Offline => A::Offline,
            };
            Body::Presence(v1::Presence {
                availability: a as i32,
                note: ev.note.unwrap_or_default(),
            })
        }
        EventType::ContactRequest => Body::ContactRequest(v1::ContactRequest {
            note: ev.note.unwrap_or_default(),
        }),
        EventType::ContactResponse => Body::ContactResponse(v1::ContactResponse {
            accepted: need(ev.accepted, "accepted", kind)?,
        }),
        EventType::ProfileQuery => Body::ProfileQuery(v1::ProfileQuery {}),
        EventType::Profile => {
            let p = need(ev.profile, "profile", kind)?;
            let fields = [&p.display_name, &p.email, &p.title, &p.organisation];
            if p.display_name.is_empty() || fields.iter().any(|f| f.len() > MAX_ID) {
                return invalid(
                    "`profile.display_name` is required and fields are at most 256 bytes",
                );
            }
            if !p.avatar_url.is_empty()
                && (!p.avatar_url.starts_with("https://") || p.avatar_url.len() > 4096)
            {
                return invalid("`profile.avatar_url` must be an https URL");
            }
            Body::Profile(v1::Profile {
                display_name: p.display_name,
                email: p.email,
                title: p.title,
                organisation: p.organisation,
                avatar_url: p.avatar_url,
            })
        }
        EventType::File => {
            let f = need(ev.file, "file", kind)?;
            if !f.url.starts_with("https://") && !f.url.starts_with("http://") {
                return invalid("`file.url` must be an http(s) URL");
            }
            if f.name.is_empty()
                || f.name.len() > MAX_ID
                || f.mime.len() > 255
                || f.url.len() > 4096
            {
                return invalid("`file` has an empty or oversized field");
            }
            Body::File(v1::File {
                name: f.name,
                size: f.size,
                mime: f.mime,
                url: f.url,
            })
        }
    };
    let sender = Address::new("http", domain, ev.from);
    // `#<key>@domain` names a channel of that domain's platform (a Teams channel the sender
    // was invited to): the channel's session, not a 1:1 one.
    let session_id = match recipient.user.strip_prefix('#') {
        Some(key) if !key.is_empty() => SessionId::channel(&recipient.platform, key),
        _ => SessionId::one_to_one(&sender, &recipient),
    };
    Ok(Envelope {
        session_id: session_id.0.to_vec(),
        relay_msg_id: String::new(),
        origin: Some(v1::Origin {
            platform: "http".into(),
            native_id: native_id(domain, &ev.id),
        }),
        sender: Some(sender),
        recipients: vec![recipient],
        sent_at_ms: ev.sent_at.filter(|t| *t > 0).unwrap_or(now_ms),
        trace_context: None,
        seq: 0,
        body: Some(body),
    })
}

// === outbound ===

#[derive(Debug, Serialize)]
pub struct OutboundEvent<'a> {
    pub session_id: String,
    pub seq: u64,
    pub relay_msg_id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub from: String,
    pub from_platform: &'a str,
    pub to: String,
    pub sent_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rich: Option<Vec<Run>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emoji: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability: Option<Availability>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileOut<'a>>,
}

#[derive(Debug, Serialize)]
pub struct TargetOut<'a> {
    pub relay_msg_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct ProfileOut<'a> {
    pub display_name: &'a str,
    pub email: &'a str,
    pub title: &'a str,
    pub organisation: &'a str,
    pub avatar_url: &'a str,
}

fn runs(t: &v1::Text) -> Option<Vec<Run>> {
    (!t.rich.is_empty()).then(|| {
        t.rich
            .iter()
            .map(|r| Run {
                text: r.text.clone(),
                bold: r.bold,
                italic: r.italic,
                strike: r.strike,
                code: r.code,
                link: (!r.link.is_empty()).then(|| r.link.clone()),
            })
            .collect()
    })
}

/// The event id the receiving domain knows a message by: its own native id, scoped
/// `<domain>:<id>` inside the relay.
fn event_id_for<'a>(native: &'a str, domain: &str) -> Option<&'a str> {
    native
        .strip_prefix(domain)
        .and_then(|r| r.strip_prefix(':'))
        .filter(|r| !r.is_empty())
}

/// Renders `env` as the JSON a domain receives. `recipient` is the address it is delivered to.
pub fn render(env: &Envelope, recipient: &Address) -> Result<Vec<u8>, serde_json::Error> {
    let sender = env.sender.clone().unwrap_or_default();
    let target = env.body.as_ref().and_then(Body::target).map(|t| TargetOut {
        relay_msg_id: &t.relay_msg_id,
        event_id: event_id_for(&t.native_id, &recipient.domain),
    });
    let mut ev = OutboundEvent {
        session_id: hex::encode(&env.session_id),
        seq: env.seq,
        relay_msg_id: &env.relay_msg_id,
        kind: env.body.as_ref().map(Body::kind).unwrap_or("unknown"),
        from: format!("{}@{}", sender.user, sender.domain),
        from_platform: env
            .sender
            .as_ref()
            .map(|s| s.platform.as_str())
            .unwrap_or(""),
        to: format!("{}@{}", recipient.user, recipient.domain),
        sent_at: env.sent_at_ms,
        text: None,
        rich: None,
        target,
        emoji: None,
        added: None,
        active: None,
        availability: None,
        note: None,
        accepted: None,
        file: None,
        code: None,
        detail: None,
        channel_id: None,
        channel_name: None,
        change: None,
        profile: None,
    };
    match env.body.as_ref() {
        Some(Body::Text(t)) => {
            ev.text = Some(&t.plain);
            ev.rich = runs(t);
        }
        Some(Body::Edit(e)) => {
            if let Some(t) = &e.new_body {
                ev.text = Some(&t.plain);
                ev.rich = runs(t);
            }
        }
        Some(Body::Reaction(r)) => {
            ev.emoji = Some(&r.emoji);
            ev.added = Some(r.added);
        }
        Some(Body::Typing(t)) => ev.active = Some(t.active),
        Some(Body::Presence(p)) => {
            use v1::presence::Availability as A;
            ev.availability = Some(match A::try_from(p.availability) {
                Ok(A::Away) => Availability::Away,
                Ok(A::Busy) => Availability::Busy,
                Ok(A::DoNotDisturb) => Availability::DoNotDisturb,
                Ok(A::Offline) => Availability::Offline,
                _ => Availability::Available,
            });
            ev.note = (!p.note.is_empty()).then_some(p.note.as_str());
        }
        Some(Body::ContactRequest(c)) => ev.note = (!c.note.is_empty()).then_some(c.note.as_str()),
        Some(Body::ContactResponse(c)) => ev.accepted = Some(c.accepted),
        Some(Body::File(f)) => {
            ev.file = Some(FileRef {
                name: f.name.clone(),
                size: f.size,
                mime: f.mime.clone(),
                url: f.url.clone(),
            })
        }
        Some(Body::ChannelInvite(c)) => {
            ev.channel_id = Some(&c.channel_id);
            ev.channel_name = Some(&c.channel_name);
        }
        Some(Body::Membership(m)) => {
            ev.channel_id = Some(&m.channel_id);
            ev.change = Some(match v1::membership::Change::try_from(m.change) {
                Ok(v1::membership::Change::Left) => "left",
                _ => "joined",
            });
        }
        Some(Body::Profile(p)) => {
            ev.profile = Some(ProfileOut {
                display_name: &p.display_name,
                email: &p.email,
                title: &p.title,
                organisation: &p.organisation,
                avatar_url: &p.avatar_url,
            })
        }
        Some(Body::Error(e)) => {
            ev.code = Some(&e.code);
            ev.detail = Some(&e.detail);
            if let Some(about) = &e.about {
                ev.target = Some(TargetOut {
                    relay_msg_id: &about.relay_msg_id,
                    event_id: None,
                });
            }
        }
        Some(Body::ProfileQuery(_)) | Some(Body::Delete(_)) | None => {}
    }
    serde_json::to_vec(&ev)
}

/// Everything the edge does with an untrusted body once its signature checks out — parse,
/// validate, build the envelope, render it back — plus signature checking of arbitrary
/// headers. The fuzz target calls it; it must never panic. Returns whether the body made a
/// valid envelope, so tests can tell deep inputs from shallow ones.
pub fn fuzz_event(data: &[u8]) -> bool {
    // Arbitrary header values against the signature checker.
    let (head, body) = data.split_at(data.len().min(48));
    let head = String::from_utf8_lossy(head);
    let mut parts = head.splitn(2, '\n');
    let ts = parts.next().unwrap_or("");
    let sig = parts.next().unwrap_or("");
    let _ = super::sign::verify(b"0123456789abcdef", ts, sig, body, 1_000, 300);

    let Ok(ev) = serde_json::from_slice::<InboundEvent>(data) else {
        return false;
    };
    let Ok((user, domain)) = parse_to(&ev.to) else {
        return false;
    };
    let recipient = Address::new("http", domain, user);
    match to_envelope(ev, "fuzz.example", recipient.clone(), 1) {
        Ok(env) => render(&env, &recipient).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Envelope, Invalid> {
        let ev: InboundEvent = serde_json::from_str(json).map_err(|e| Invalid(e.to_string()))?;
        let (user, domain) = parse_to(&ev.to)?;
        to_envelope(ev, "a.example", Address::new("http", domain, user), 42)
    }

    #[test]
    fn message_round_trips_through_render() -> Result<(), Box<dyn std::error::Error>> {
        let env = parse(
            r#"{"id":"e1","type":"message","from":"bob","to":"Alice@B.Example","text":"hi","rich":[{"text":"hi","bold":true}]}"#,
        )?;
        assert_eq!(env.sent_at_ms, 42);
        assert_eq!(
            env.origin.as_ref().map(|o| o.native_id.as_str()),
            Some("a.example:e1")
        );
        assert_eq!(env.recipients[0].domain, "b.example");
        let out: serde_json::Value = serde_json::from_slice(&render(&env, &env.recipients[0])?)?;
        assert_eq!(out["type"], "message");
        assert_eq!(out["from"], "bob@a.example");
        assert_eq!(out["to"], "Alice@b.example");
        assert_eq!(out["text"], "hi");
        assert_eq!(out["rich"][0]["bold"], true);
        Ok(())
    }

    #[test]
    fn targets_name_the_recipients_own_ids() -> Result<(), Box<dyn std::error::Error>> {
        let mut env = parse(
            r#"{"id":"e2","type":"reaction","from":"bob","to":"al@b.example","target":{"event_id":"e1"},"emoji":"👍","added":true}"#,
        )?;
        // The sender's id is scoped by its domain.
        assert_eq!(
            env.body
                .as_ref()
                .and_then(Body::target)
                .map(|t| t.native_id.as_str()),
            Some("a.example:e1")
        );
        if let Some(t) = env.body.as_mut().and_then(Body::target_mut) {
            t.relay_msg_id = "r1".into();
            t.native_id = "b.example:77".into();
        }
        let out: serde_json::Value = serde_json::from_slice(&render(&env, &env.recipients[0])?)?;
        assert_eq!(out["target"]["relay_msg_id"], "r1");
        assert_eq!(out["target"]["event_id"], "77");
        Ok(())
    }

    #[test]
    fn bad_events_get_clear_messages() {
        for (json, needle) in [
            (
                r#"{"id":"e","type":"message","from":"bob","to":"al@b.example"}"#,
                "`text` is required",
            ),
            (
                r#"{"id":"e","type":"edit","from":"bob","to":"al@b.example","text":"x"}"#,
                "`target` is required",
            ),
            (
                r#"{"id":"e","type":"message","from":"bob","to":"nobody","text":"x"}"#,
                "user@domain",
            ),
            (
                r#"{"id":"e","type":"message","from":"b ob","to":"al@b.example","text":"x"}"#,
                "`from`",
            ),
            (
                r#"{"id":"","type":"message","from":"bob","to":"al@b.example","text":"x"}"#,
                "`id`",
            ),
            (
                r#"{"id":"e","type":"delete","from":"bob","to":"al@b.example","target":{"event_id":"1","relay_msg_id":"2"}}"#,
                "exactly one",
            ),
            (
                r#"{"id":"e","type":"file","from":"bob","to":"al@b.example","file":{"name":"x","size":1,"mime":"a/b","url":"file:///etc/passwd"}}"#,
                "http(s)",
            ),
            (
                r#"{"id":"e","type":"message","from":"bob","to":"al@b.example","text":"x","extra":1}"#,
                "unknown field",
            ),
            (
                r#"{"id":"e","type":"shout","from":"bob","to":"al@b.example"}"#,
                "unknown variant",
            ),
        ] {
            match parse(json) {
                Err(Invalid(m)) => assert!(m.contains(needle), "{json}: {m}"),
                Ok(_) => panic!("accepted: {json}"),
            }
        }
    }
}
