//! The plan of one run: the domains and their secrets, the workload, the schedule, and how
//! event `i` is rendered — as a signed `POST /v1/events` body, or as an envelope for the
//! session service. Also where the domains come from when driving an existing deployment
//! (`--target`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedrelay_proto::v1::{self, envelope::Body};
use fedrelay_proto::{Address, Envelope};
use serde::Serialize;

use crate::contract::Fan;
use crate::scenario::{Action, Event, Schedule, Tag, Workload};

/// An HTTP-edge domain the harness plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub secret: String,
}

/// Everything that decides what one run sends.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Random id of this run, in every event id and message text.
    pub run_id: String,
    pub domains: Vec<DomainSpec>,
    pub workload: Workload,
    pub schedule: Schedule,
    /// Unix time in ms of `t0`, for `sent_at`.
    pub start_unix_ms: u64,
    /// The remote XMPP domain whose users send (`--protocol xmpp`).
    pub remote_domain: Option<String>,
    /// Channel members or followers by address, with their domain index.
    audience: HashMap<String, usize>,
}

/// A reference to an earlier message (see `docs/http-edge.md`).
#[derive(Debug, Serialize)]
struct TargetRef<'a> {
    relay_msg_id: &'a str,
}

/// The `POST /v1/events` body of an event (see `docs/http-edge.md`).
#[derive(Debug, Serialize)]
struct EventBody<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    from: String,
    to: String,
    sent_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<TargetRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    emoji: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    added: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    availability: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// One event, ready to sign and send.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// Index of the sending domain in `Plan::domains`.
    pub domain: usize,
    pub intended_ns: u64,
    pub body: Vec<u8>,
}

/// The emoji reactions carry.
const REACTION: &str = "👍";

/// The platform the harness's domains are on.
const PLATFORM: &str = "http";

impl Plan {
    pub fn new(
        run_id: String,
        domains: Vec<DomainSpec>,
        workload: Workload,
        schedule: Schedule,
        start_unix_ms: u64,
    ) -> Self {
        let mut plan = Self {
            run_id,
            domains,
            workload,
            schedule,
            start_unix_ms,
            remote_domain: None,
            audience: HashMap::new(),
        };
        plan.audience = plan
            .workload
            .audience
            .iter()
            .map(|&u| (plan.address(u), plan.workload.users[u].domain))
            .collect();
        plan
    }

    /// The address `u<local>@<domain>` of user `u` (a remote user's at the remote domain).
    pub fn address(&self, u: usize) -> String {
        let user = self.workload.users[u];
        let domain = match self.domains.get(user.domain) {
            Some(d) => d.name.as_str(),
            None => self.remote_domain.as_deref().unwrap_or("remote.invalid"),
        };
        format!("{}@{domain}", user.local_part())
    }

    /// Event `i` as an XMPP `<message type='chat'>` from its remote sender: the index of the
    /// receiving domain (a stream carries stanzas to one domain) and the stanza. Its `id` is
    /// the event id; its body carries the tag, as the HTTP edge's text does.
    pub fn stanza(&self, i: u64) -> Result<(usize, String)> {
        let ev = self.workload.event(i);
        if !self.workload.is_remote(ev.sender) || ev.action != Action::Message {
            bail!("event {i} is not a message from a remote user");
        }
        let &[to] = self.workload.recipients(&ev) else {
            bail!("an XMPP message has one recipient");
        };
        let domain = self.workload.users[to].domain;
        let stanza = format!(
            "<message type='chat' from='{}' to='{}' id='{}'><body>{}</body></message>",
            xml_escape(&self.address(ev.sender)),
            xml_escape(&self.address(to)),
            xml_escape(&self.event_id(i)),
            xml_escape(&self.tag(i).to_text())
        );
        Ok((domain, stanza))
    }

    /// The event number of an event id of this run (`lt-<run>-<i>`).
    pub fn global_of_event_id(&self, id: &str) -> Option<u64> {
        id.strip_prefix("lt-")?
            .strip_prefix(self.run_id.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    fn proto_address(&self, u: usize) -> Address {
        let user = self.workload.users[u];
        Address::new(
            PLATFORM,
            self.domains[user.domain].name.as_str(),
            user.local_part(),
        )
    }

    /// Who receives what, for the contract checker.
    pub fn fan(&self) -> Fan {
        if !self.workload.is_fan_out() {
            return Fan::One;
        }
        let presence = self.workload.is_presence();
        Fan::Audience {
            audience: self
                .workload
                .audience
                .iter()
                .map(|&u| self.address(u))
                .collect(),
            supersede: presence.then(|| {
                self.workload
                    .send_order
                    .iter()
                    .map(|&u| u32::try_from(u).unwrap_or(u32::MAX))
                    .collect()
            }),
        }
    }

    /// Whether `to` at domain `domain` is a recipient of event `global`.
    pub fn is_recipient(&self, global: u64, domain: usize, to: &str) -> bool {
        if global >= self.schedule.total_messages() {
            return false;
        }
        if self.workload.is_fan_out() {
            return self.audience.get(to) == Some(&domain);
        }
        let ev = self.workload.event(global);
        self.workload
            .recipients(&ev)
            .iter()
            .any(|&r| self.workload.users[r].domain == domain && self.address(r) == to)
    }

    /// Whether event `global` carries its tag (in its text or note); the others are recognised
    /// by the ids of their acceptance.
    pub fn carries_tag(&self, global: u64) -> bool {
        matches!(
            self.workload.event(global).action,
            Action::Message | Action::Edit { .. } | Action::Presence { .. }
        )
    }

    /// Whether a later event refers to event `global` (so its relay id is kept): in the
    /// mixed workload, messages are what edits, reactions and deletes refer to.
    pub fn is_target(&self, global: u64) -> bool {
        self.workload.is_mixed() && matches!(self.workload.event(global).action, Action::Message)
    }

    /// The tag of event `i`.
    pub fn tag(&self, i: u64) -> Tag {
        let ev = self.workload.event(i);
        Tag {
            run: self.run_id.clone(),
            sender: u32::try_from(ev.sender).unwrap_or(u32::MAX),
            n: ev.n,
            global: i,
            intended_ns: self.schedule.intended_ns(i),
        }
    }

    /// The event id the harness gives event `i`.
    pub fn event_id(&self, i: u64) -> String {
        format!("lt-{}-{i}", self.run_id)
    }

    /// Event `i` as a JSON body; `target` is the relay id of the message it refers to.
    pub fn message(&self, i: u64, target: Option<&str>) -> Result<OutMessage> {
        let ev = self.workload.event(i);
        let tag = self.tag(i);
        let intended_ns = tag.intended_ns;
        let to = match ev.action {
            Action::Presence { .. } => "*".to_owned(),
            _ => match self.workload.recipients(&ev) {
                [one] => self.address(*one),
                _ => bail!("the HTTP edge has no channel posts of its own: fan-out goes over gRPC"),
            },
        };
        let mut body = EventBody {
            id: self.event_id(i),
            kind: ev.action.kind(),
            from: self.workload.users[ev.sender].local_part(),
            to,
            sent_at: self.start_unix_ms + intended_ns / 1_000_000,
            text: None,
            target: None,
            emoji: None,
            added: None,
            active: None,
            availability: None,
            note: None,
        };
        if ev.action.target().is_some() {
            let Some(t) = target else {
                bail!("event {i} refers to a message that was not accepted");
            };
            body.target = Some(TargetRef { relay_msg_id: t });
        }
        match ev.action {
            Action::Message | Action::Edit { .. } => body.text = Some(tag.to_text()),
            Action::Reaction { .. } => {
                body.emoji = Some(REACTION);
                body.added = Some(true);
            }
            Action::Typing => body.active = Some(true),
            Action::Delete { .. } => {}
            Action::Presence { availability } => {
                body.availability = Some(availability);
                body.note = Some(tag.to_text());
            }
        }
        Ok(OutMessage {
            domain: self.workload.users[ev.sender].domain,
            intended_ns,
            body: serde_json::to_vec(&body).context("encoding an event body")?,
        })
    }

    /// The session event `ev` belongs to.
    fn session_id(&self, ev: &Event) -> Result<[u8; 16]> {
        if let Some(k) = ev.channel {
            return Ok(fedrelay_proto::session_id::channel(
                PLATFORM,
                &format!("loadtest-{k}"),
            ));
        }
        match self.workload.peer(ev.sender) {
            Some(p) => Ok(fedrelay_proto::session_id::one_to_one(
                &self.proto_address(ev.sender),
                &self.proto_address(p),
            )),
            None => bail!("presence goes over the HTTP edge, not gRPC"),
        }
    }

    /// Event `i` as an envelope for `SessionService.Deliver`, as an edge builds it: a new relay
    /// id, the origin (platform and the domain-scoped event id) that deduplicates retries, and
    /// every recipient.
    pub fn envelope(&self, i: u64, target: Option<&str>) -> Result<Envelope> {
        let ev = self.workload.event(i);
        let tag = self.tag(i);
        let sender = self.proto_address(ev.sender);
        let text = |plain: String| v1::Text {
            plain,
            rich: Vec::new(),
        };
        let target_ref = || -> Result<Option<v1::MessageRef>> {
            match target {
                Some(t) => Ok(Some(v1::MessageRef {
                    relay_msg_id: t.to_owned(),
                    native_id: String::new(),
                })),
                None => bail!("event {i} refers to a message that was not accepted"),
            }
        };
        let body = match ev.action {
            Action::Message => Body::Text(text(tag.to_text())),
            Action::Edit { .. } => Body::Edit(v1::Edit {
                target: target_ref()?,
                new_body: Some(text(tag.to_text())),
            }),
            Action::Reaction { .. } => Body::Reaction(v1::Reaction {
                target: target_ref()?,
                emoji: REACTION.to_owned(),
                added: true,
            }),
            Action::Typing => Body::Typing(v1::Typing { active: true }),
            Action::Delete { .. } => Body::Delete(v1::Delete {
                target: target_ref()?,
            }),
            Action::Presence { .. } => bail!("presence goes over the HTTP edge, not gRPC"),
        };
        let sent_at = self.start_unix_ms + tag.intended_ns / 1_000_000;
        Ok(Envelope {
            session_id: self.session_id(&ev)?.to_vec(),
            relay_msg_id: uuid::Uuid::now_v7().to_string(),
            origin: Some(v1::Origin {
                platform: PLATFORM.to_owned(),
                native_id: format!("{}:{}", sender.domain, self.event_id(i)),
            }),
            recipients: self
                .workload
                .recipients(&ev)
                .iter()
                .map(|&r| self.proto_address(r))
                .collect(),
            sender: Some(sender),
            sent_at_ms: i64::try_from(sent_at).unwrap_or(i64::MAX),
            trace_context: None,
            seq: 0,
            body: Some(body),
        })
    }

    /// The contact requests (from each follower to each publisher) and answers (each
    /// publisher accepting) that make the presence workload's followers follow, as
    /// `(domain index, body)` pairs: all requests first, then all answers.
    pub fn presence_setup(&self) -> Result<(Vec<OutMessage>, Vec<OutMessage>)> {
        let mut requests = Vec::new();
        let mut answers = Vec::new();
        if !self.workload.is_presence() {
            return Ok((requests, answers));
        }
        #[derive(Serialize)]
        struct Contact<'a> {
            id: String,
            #[serde(rename = "type")]
            kind: &'a str,
            from: String,
            to: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            accepted: Option<bool>,
        }
        for &p in &self.workload.send_order {
            for &f in &self.workload.audience {
                let req = Contact {
                    id: format!("lt-{}-req-{p}-{f}", self.run_id),
                    kind: "contact_request",
                    from: self.workload.users[f].local_part(),
                    to: self.address(p),
                    accepted: None,
                };
                requests.push(OutMessage {
                    domain: self.workload.users[f].domain,
                    intended_ns: 0,
                    body: serde_json::to_vec(&req).context("encoding a contact request")?,
                });
                let ans = Contact {
                    id: format!("lt-{}-ans-{p}-{f}", self.run_id),
                    kind: "contact_response",
                    from: self.workload.users[p].local_part(),
                    to: self.address(f),
                    accepted: Some(true),
                };
                answers.push(OutMessage {
                    domain: self.workload.users[p].domain,
                    intended_ns: 0,
                    body: serde_json::to_vec(&ans).context("encoding a contact response")?,
                });
            }
        }
        Ok((requests, answers))
    }
}

/// Escapes text for XML character data and quoted attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// 32 random bytes as hex, from the kernel's random source.
pub fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(hex::encode(buf))
}

/// Reads the HTTP-edge domains of an existing deployment from its relay config file (the same
/// TOML the relay reads): every `[[domains]]` with `platform = "http"`, its `name`, and its
/// `secret` or `secret_file` (relative paths are relative to the config file). Other keys are
/// ignored.
pub fn domains_from_relay_config(path: &Path) -> Result<Vec<DomainSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading relay config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    domains_from_relay_config_str(&text, |p| {
        let full = base.join(p);
        std::fs::read_to_string(&full)
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("reading secret_file {}", full.display()))
    })
    .with_context(|| format!("in {}", path.display()))
}

/// [`domains_from_relay_config`] on a string, with a function reading `secret_file`s.
pub fn domains_from_relay_config_str(
    text: &str,
    read_secret: impl Fn(&str) -> Result<String>,
) -> Result<Vec<DomainSpec>> {
    let v: toml::Table = toml::from_str(text).context("parsing TOML")?;
    let Some(domains) = v.get("domains").and_then(|d| d.as_array()) else {
        bail!("no [[domains]] in the relay config");
    };
    let mut out = Vec::new();
    for d in domains {
        if d.get("platform").and_then(|p| p.as_str()) != Some("http") {
            continue;
        }
        let Some(name) = d.get("name").and_then(|n| n.as_str()) else {
            bail!("a [[domains]] entry has no name");
        };
        let secret = match (
            d.get("secret").and_then(|s| s.as_str()),
            d.get("secret_file").and_then(|s| s.as_str()),
        ) {
            (Some(s), _) => s.to_owned(),
            (None, Some(f)) => read_secret(f)?,
            (None, None) => bail!("domain {name} has neither secret nor secret_file"),
        };
        out.push(DomainSpec {
            name: name.to_owned(),
            secret,
        });
    }
    Ok(out)
}

/// Parses a `--domain NAME=SECRET` flag.
pub fn parse_domain_flag(s: &str) -> Result<DomainSpec> {
    match s.split_once('=') {
        Some((name, secret)) if !name.is_empty() && !secret.is_empty() => Ok(DomainSpec {
            name: name.to_owned(),
            secret: secret.to_owned(),
        }),
        _ => bail!("--domain takes NAME=SECRET (got {s:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{ScenarioKind, Shape};
    use std::time::Duration;

    fn plan_of(kind: ScenarioKind, shape: Shape, rate: f64) -> Result<Plan> {
        Ok(Plan::new(
            "abcd".into(),
            (0..shape.domains)
                .map(|i| DomainSpec {
                    name: crate::scenario::domain_name(i),
                    secret: format!("s{i}"),
                })
                .collect(),
            kind.workload(&shape)?,
            Schedule::new(rate, Duration::ZERO, Duration::from_secs(1))?,
            1_732_350_000_000,
        ))
    }

    fn plan() -> Result<Plan> {
        plan_of(
            ScenarioKind::OneToOne,
            Shape {
                domains: 2,
                users: 4,
                ..Shape::default()
            },
            10.0,
        )
    }

    #[test]
    fn message_body_follows_the_docs() -> Result<()> {
        let p = plan()?;
        let m = p.message(2, None)?;
        let v: serde_json::Value = serde_json::from_slice(&m.body)?;
        // Message 2: send order is [0, 2, 1, 3]; user 1 (d1, u0) sends to user 0 (d0, u0).
        assert_eq!(m.domain, 1);
        assert_eq!(m.intended_ns, 200_000_000);
        assert_eq!(v["id"], "lt-abcd-2");
        assert_eq!(v["type"], "message");
        assert_eq!(v["from"], "u0");
        assert_eq!(v["to"], "u0@d0.loadtest.example");
        assert_eq!(v["sent_at"], 1_732_350_000_200u64);
        let text = v["text"].as_str().unwrap_or_default();
        let tag = Tag::parse(text);
        assert_eq!(tag, Some(p.tag(2)));
        assert_eq!(tag.map(|t| t.intended_ns), Some(200_000_000));
        assert_eq!(
            v.as_object().map(|o| o.len()),
            Some(6),
            "no extra fields: {v}"
        );
        assert!(p.is_recipient(2, 0, "u0@d0.loadtest.example"));
        assert!(
            !p.is_recipient(2, 1, "u0@d0.loadtest.example"),
            "wrong domain"
        );
        assert!(
            !p.is_recipient(2, 0, "u1@d0.loadtest.example"),
            "wrong user"
        );
        assert!(
            !p.is_recipient(10, 0, "u0@d0.loadtest.example"),
            "not in the run"
        );
        assert!(p.carries_tag(2));
        assert!(
            !p.is_target(2),
            "one-to-one has nothing that refers to a message"
        );
        Ok(())
    }

    #[test]
    fn mixed_events_refer_to_accepted_messages() -> Result<()> {
        let shape = Shape {
            domains: 2,
            users: 4,
            ..Shape::default()
        };
        let p = plan_of(ScenarioKind::Mixed, shape, 100.0)?;
        let w = &p.workload;
        let mut kinds = std::collections::BTreeMap::new();
        for i in 0..p.schedule.total_messages() {
            let ev = w.event(i);
            *kinds.entry(ev.action.kind()).or_insert(0) += 1;
            if let Some(t) = ev.action.target() {
                assert!(t < i, "event {i} refers to a later one");
                let target = w.event(t);
                assert_eq!(target.action, crate::scenario::Action::Message);
                assert!(p.is_target(t));
                match ev.action {
                    // A reaction is to the peer's message; edits and deletes to one's own.
                    crate::scenario::Action::Reaction { .. } => {
                        assert_eq!(Some(target.sender), w.peer(ev.sender))
                    }
                    _ => assert_eq!(target.sender, ev.sender),
                }
                // Without the target's relay id there is nothing to send.
                assert!(p.message(i, None).is_err());
                let v: serde_json::Value =
                    serde_json::from_slice(&p.message(i, Some("r-1"))?.body)?;
                assert_eq!(v["target"]["relay_msg_id"], "r-1");
            }
            assert_eq!(
                p.carries_tag(i),
                matches!(ev.action.kind(), "message" | "edit"),
                "{ev:?}"
            );
        }
        // 100 events of 4 senders: 25 each, so cycles 0..=2 complete plus five more.
        assert_eq!(kinds.get("message"), Some(&64));
        assert_eq!(kinds.get("edit"), Some(&12));
        assert_eq!(kinds.get("reaction"), Some(&8));
        assert_eq!(kinds.get("typing"), Some(&8));
        assert_eq!(kinds.get("delete"), Some(&8));
        // The typing, reaction and delete bodies follow the docs.
        let typing = (0..100)
            .find(|&i| w.event(i).action.kind() == "typing")
            .unwrap_or(0);
        let v: serde_json::Value = serde_json::from_slice(&p.message(typing, None)?.body)?;
        assert_eq!(v["active"], true);
        Ok(())
    }

    #[test]
    fn fan_out_envelopes_reach_every_member() -> Result<()> {
        let shape = Shape {
            domains: 3,
            channels: 2,
            members: 5,
            ..Shape::default()
        };
        let p = plan_of(ScenarioKind::FanOut, shape, 10.0)?;
        let e0 = p.envelope(0, None)?;
        let e1 = p.envelope(1, None)?;
        let e2 = p.envelope(2, None)?;
        assert_eq!(e0.recipients.len(), 5);
        assert_eq!(e0.session_id.len(), 16);
        assert_ne!(e0.session_id, e1.session_id, "two channels, two sessions");
        assert_eq!(e0.session_id, e2.session_id, "the same channel again");
        assert_eq!(
            e0.origin.as_ref().map(|o| o.native_id.as_str()),
            Some("d0.loadtest.example:lt-abcd-0")
        );
        let domains: std::collections::BTreeSet<_> =
            e0.recipients.iter().map(|a| a.domain.clone()).collect();
        assert_eq!(domains.len(), 3, "members spread over the domains");
        match &e0.body {
            Some(Body::Text(t)) => assert_eq!(Tag::parse(&t.plain), Some(p.tag(0))),
            other => anyhow::bail!("not a text: {other:?}"),
        }
        for r in &e0.recipients {
            let to = format!("{}@{}", r.user, r.domain);
            let d = p
                .domains
                .iter()
                .position(|d| d.name == r.domain)
                .unwrap_or(99);
            assert!(p.is_recipient(0, d, &to), "{to}");
        }
        assert!(
            !p.is_recipient(0, 0, "u0@d0.loadtest.example"),
            "the sender"
        );
        assert!(
            p.message(0, None).is_err(),
            "no channel posts on the HTTP edge"
        );
        match p.fan() {
            Fan::Audience {
                audience,
                supersede,
            } => {
                assert_eq!(audience.len(), 5);
                assert!(supersede.is_none());
            }
            Fan::One => anyhow::bail!("fan-out has an audience"),
        }
        Ok(())
    }

    #[test]
    fn one_to_one_envelope_session_is_the_pair() -> Result<()> {
        let p = plan()?;
        let a = p.envelope(0, None)?;
        // The other direction of the same pair: the same session.
        let b = p.envelope(2, None)?;
        assert_eq!(
            p.workload.peer(p.workload.event(0).sender),
            Some(p.workload.event(2).sender)
        );
        assert_eq!(a.recipients.len(), 1);
        assert_eq!(b.recipients.len(), 1);
        assert_eq!(a.session_id, b.session_id);
        Ok(())
    }

    #[test]
    fn presence_setup_and_updates() -> Result<()> {
        let shape = Shape {
            domains: 3,
            publishers: 2,
            subscribers: 3,
            ..Shape::default()
        };
        let p = plan_of(ScenarioKind::PresenceStorm, shape, 10.0)?;
        let (requests, answers) = p.presence_setup()?;
        assert_eq!((requests.len(), answers.len()), (6, 6));
        let r: serde_json::Value = serde_json::from_slice(&requests[0].body)?;
        assert_eq!(r["type"], "contact_request");
        assert_eq!(r["to"], "u0@d0.loadtest.example");
        let a: serde_json::Value = serde_json::from_slice(&answers[0].body)?;
        assert_eq!(a["type"], "contact_response");
        assert_eq!(a["accepted"], true);
        assert_eq!(a["from"], "u0");
        assert_eq!(
            a["to"],
            r["from"]
                .as_str()
                .map(|f| format!("{f}@{}", p.domains[requests[0].domain].name))
                .unwrap_or_default()
        );
        let m = p.message(3, None)?;
        let v: serde_json::Value = serde_json::from_slice(&m.body)?;
        assert_eq!(v["type"], "presence");
        assert_eq!(v["to"], "*");
        assert_eq!(v["availability"], "away");
        assert_eq!(Tag::parse(v["note"].as_str().unwrap_or("")), Some(p.tag(3)));
        assert!(
            p.envelope(0, None).is_err(),
            "presence is not sent over gRPC"
        );
        match p.fan() {
            Fan::Audience {
                audience,
                supersede,
            } => {
                assert_eq!(audience.len(), 3);
                assert_eq!(supersede, Some(vec![0, 1]));
            }
            Fan::One => anyhow::bail!("presence has followers"),
        }
        Ok(())
    }

    #[test]
    fn xmpp_stanzas_come_from_the_remote_domain() -> Result<()> {
        let shape = Shape {
            domains: 2,
            users: 8,
            ..Shape::default()
        };
        let mut p = Plan::new(
            "abcd".into(),
            (0..2)
                .map(|i| DomainSpec {
                    name: crate::scenario::domain_name(i),
                    secret: format!("s{i}"),
                })
                .collect(),
            ScenarioKind::OneToOne.workload_over(&shape, crate::scenario::Protocol::Xmpp)?,
            Schedule::new(10.0, Duration::ZERO, Duration::from_secs(1))?,
            0,
        );
        p.remote_domain = Some("xmpp.load".into());
        let (d, s) = p.stanza(1)?;
        // Sender 1 of 4 is remote user u1; its peer is the first user of domain 1.
        assert_eq!(d, 1);
        assert_eq!(
            s,
            format!(
                "<message type='chat' from='u1@xmpp.load' to='u0@d1.loadtest.example' \
                 id='lt-abcd-1'><body>{}</body></message>",
                p.tag(1).to_text()
            )
        );
        assert!(p.is_recipient(1, 1, "u0@d1.loadtest.example"));
        assert_eq!(p.global_of_event_id("lt-abcd-7"), Some(7));
        assert_eq!(p.global_of_event_id("lt-other-7"), None);
        assert_eq!(p.global_of_event_id("lt-abcd-x"), None);
        assert_eq!(xml_escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
        // The HTTP-edge workload has no remote senders.
        assert!(plan()?.stanza(0).is_err());
        Ok(())
    }

    #[test]
    fn event_ids_are_unique() -> Result<()> {
        let p = plan()?;
        let mut ids = std::collections::HashSet::new();
        for i in 0..p.schedule.total_messages() {
            let v: serde_json::Value = serde_json::from_slice(&p.message(i, None)?.body)?;
            assert!(ids.insert(v["id"].to_string()));
        }
        Ok(())
    }

    #[test]
    fn relay_config_domains() -> Result<()> {
        let text = r#"
            node_id = "n"
            [http]
            listen = "0.0.0.0:8080"
            [[domains]]
            name = "a.example"
            platform = "http"
            secret = "sa"
            delivery = "stream"
            [[domains]]
            name = "teams.example"
            platform = "teams"
            [[domains]]
            name = "b.example"
            platform = "http"
            secret_file = "secrets/b"
        "#;
        let d = domains_from_relay_config_str(text, |p| {
            assert_eq!(p, "secrets/b");
            Ok("sb".to_owned())
        })?;
        assert_eq!(
            d,
            vec![
                DomainSpec {
                    name: "a.example".into(),
                    secret: "sa".into()
                },
                DomainSpec {
                    name: "b.example".into(),
                    secret: "sb".into()
                }
            ]
        );
        assert!(domains_from_relay_config_str("x = 1", |_| Ok(String::new())).is_err());
        assert!(
            domains_from_relay_config_str(
                "[[domains]]\nname = \"a\"\nplatform = \"http\"\n",
                |_| Ok(String::new())
            )
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn domain_flag() -> Result<()> {
        assert_eq!(
            parse_domain_flag("a.example=s=cret")?,
            DomainSpec {
                name: "a.example".into(),
                secret: "s=cret".into()
            }
        );
        assert!(parse_domain_flag("a.example").is_err());
        assert!(parse_domain_flag("=x").is_err());
        assert!(parse_domain_flag("a=").is_err());
        Ok(())
    }

    #[test]
    fn random_hex_is_random() -> Result<()> {
        let a = random_hex(16)?;
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16)?);
        Ok(())
    }
}
