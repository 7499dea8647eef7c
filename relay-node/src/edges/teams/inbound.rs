//! `POST /api/messages`: activities from the Bot Connector.
//!
//! Order: size limit → token (before anything of the body is read) → activity → the
//! token's `serviceUrl` and endorsements against it → the tenant → what it is. Every
//! refusal is a 4xx with a JSON message and no side effect.

use super::activity::{Activity, ChannelAccount, Scope};
use super::commands::{self, Addr, Command};
use super::html;
use super::state::{Channel, Contact, ContactState, TeamsUser, Thread};
use super::{TeamsEdge, channel_key, platform_label};
use crate::control::policy::PolicyError;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fedrelay_proto::{Address, Envelope, v1};
use serde_json::{Value, json};
use session_actor::{SessionError, SessionId};
use std::sync::Arc;
use tracing::{Instrument, Span, debug, field, info_span};

pub fn router(edge: Arc<TeamsEdge>) -> Router {
    Router::new()
        .route("/api/messages", post(post_activity))
        .with_state(edge)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    metrics::counter!("fedrelay_teams_rejected_total", "reason" => code.to_string()).increment(1);
    let body = json!({ "error": code, "message": message.into() });
    (status, axum::Json(body)).into_response()
}

fn ok() -> Response {
    StatusCode::OK.into_response()
}

fn unavailable() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "could not take the activity now; retry later",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// An activity type as a metric label: known names as they are, anything else `other`.
fn type_label(kind: &str) -> &'static str {
    match kind {
        "message" => "message",
        "messageReaction" => "messageReaction",
        "messageUpdate" => "messageUpdate",
        "messageDelete" => "messageDelete",
        "conversationUpdate" => "conversationUpdate",
        "installationUpdate" => "installationUpdate",
        "invoke" => "invoke",
        "typing" => "typing",
        "event" => "event",
        "endOfConversation" => "endOfConversation",
        "contactRelationUpdate" => "contactRelationUpdate",
        _ => "other",
    }
}

async fn post_activity(
    State(edge): State<Arc<TeamsEdge>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = info_span!(
        "teams.inbound",
        activity_type = field::Empty,
        tenant = field::Empty,
        status = field::Empty,
    );
    crate::telemetry::set_parent_from_headers(&span, &headers);
    let resp = handle(&edge, headers, body).instrument(span.clone()).await;
    span.record("status", resp.status().as_u16());
    resp
}

async fn handle(edge: &TeamsEdge, headers: HeaderMap, body: Body) -> Response {
    let limit = edge.cfg.max_body_bytes;
    if crate::edges::declared_too_large(&headers, limit) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("activity over {limit} bytes"),
        );
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let verified = match edge.auth.verify(authorization).await {
        Ok(v) => v,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return error(status, e.code(), e.to_string());
        }
    };
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("activity over {limit} bytes"),
            );
        }
    };
    let activity: Activity = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("invalid activity: {e}"),
            );
        }
    };
    if let Err(e) = verified.check_activity(&activity.service_url, &activity.channel_id) {
        return error(StatusCode::FORBIDDEN, e.code(), e.to_string());
    }
    let Some(tenant) = activity.tenant_id().map(str::to_ascii_lowercase) else {
        return error(
            StatusCode::FORBIDDEN,
            "tenant",
            "the activity names no tenant",
        );
    };
    let Some(domain) = edge.tenants.get(&tenant).cloned() else {
        return error(
            StatusCode::FORBIDDEN,
            "tenant",
            "this relay does not serve the activity's tenant",
        );
    };
    if !edge.connector.allowed(&activity.service_url) {
        return error(
            StatusCode::FORBIDDEN,
            "service_url",
            "the activity's serviceUrl is not an allowed Bot Connector host",
        );
    }
    let label = type_label(&activity.kind);
    Span::current().record("activity_type", label);
    Span::current().record("tenant", tenant.as_str());
    metrics::counter!("fedrelay_teams_activities_total", "type" => label).increment(1);
    let ctx = Ctx {
        edge,
        a: &activity,
        tenant,
        domain,
    };
    match activity.kind.as_str() {
        "message" => ctx.message().await,
        "messageReaction" => ctx.reaction().await,
        "messageUpdate" => ctx.update().await,
        "messageDelete" => ctx.delete().await,
        "conversationUpdate" => ctx.conversation_update().await,
        "installationUpdate" => ctx.installation_update().await,
        "invoke" => ctx.invoke().await,
        "typing" => ctx.typing().await,
        _ => ok(),
    }
}

/// One authenticated activity being handled.
struct Ctx<'a> {
    edge: &'a TeamsEdge,
    a: &'a Activity,
    tenant: String,
    domain: String,
}

/// Where a message of a Teams user goes: a contact, or a channel's external members.
enum Dest {
    Contact(Address),
    Channel { key: String, members: Vec<Address> },
}

const HELP: &str = "<b>Commands</b><br/>\
<code>invite user@domain [note]</code> — ask someone outside your organisation to connect<br/>\
<code>accept [user@domain]</code> / <code>decline [user@domain]</code> — answer a contact request<br/>\
<code>contacts</code> — your contacts, and whether they are online<br/>\
<code>chat user@domain</code> — what you write next goes to them<br/>\
<code>to user@domain message</code> — send one message<br/>\
<code>profile user@domain</code> — who they are<br/>\
<code>status available|away|busy|dnd|offline|auto [note]</code> — what your contacts see<br/>\
<code>help</code> — this list<br/>\
To answer someone, reply to (quote) their message, or use <code>chat</code> or <code>to</code>.";

const CHANNEL_HELP: &str = "<b>Commands in a channel</b> (mention me first)<br/>\
<code>invite user@domain</code> — bring someone outside your organisation into this channel<br/>\
<code>remove user@domain</code> — take them out again<br/>\
<code>members</code> — who outside your organisation is in this channel<br/>\
Messages here that mention me are relayed to the channel's outside members.";

fn availability_of(s: &str) -> v1::presence::Availability {
    use v1::presence::Availability as A;
    match s {
        "away" => A::Away,
        "busy" => A::Busy,
        "dnd" => A::DoNotDisturb,
        "offline" => A::Offline,
        _ => A::Available,
    }
}

/// A reaction type Teams sends, as the emoji other platforms show.
pub fn emoji_of(kind: &str) -> String {
    match kind {
        "like" => "👍",
        "heart" => "❤️",
        "laugh" => "😆",
        "surprised" => "😮",
        "sad" => "😢",
        "angry" => "😠",
        other => other,
    }
    .to_string()
}

fn describe_refusal(e: &PolicyError) -> String {
    match e {
        PolicyError::UnknownDomain(d) => {
            format!(
                "{} is not a domain this relay connects to.",
                html::escape(d)
            )
        }
        PolicyError::NotFederated { from, to } => format!(
            "Your organisation ({}) is not federated with {}, so nothing was sent.",
            html::escape(from),
            html::escape(to)
        ),
        PolicyError::Denied { reason, .. } => {
            format!("That is not allowed here: {}.", html::escape(reason))
        }
    }
}

impl Ctx<'_> {
    fn conversation(&self) -> &str {
        self.a.conversation_id().unwrap_or("")
    }

    /// The Teams user who sent the activity: known by their Entra object id, or looked up
    /// once through the Bot Connector (`GET …/members/{id}`) for their address.
    async fn sender(&self) -> Result<TeamsUser, Response> {
        let Some(from) = self.a.from.as_ref() else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the activity has no `from`",
            ));
        };
        self.account(from, self.a.scope() == Scope::Personal).await
    }

    /// The Teams user behind an account of this activity's tenant. `personal`: the activity
    /// is in their chat with the bot, whose conversation is then where they are reached.
    async fn account(&self, from: &ChannelAccount, personal: bool) -> Result<TeamsUser, Response> {
        let Some(aad) = from.aad_object_id.as_deref().filter(|s| !s.is_empty()) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the activity's sender has no aadObjectId",
            ));
        };
        let st = &self.edge.state;
        let known = match st.user_by_aad(&self.tenant, aad).await {
            Ok(Some(user)) => st
                .user(&self.domain, &user)
                .await
                .map_err(|_| unavailable())?
                // A record is only ever this account's.
                .filter(|u| u.aad == aad),
            Ok(None) => None,
            Err(_) => return Err(unavailable()),
        };
        if let Some(mut u) = known {
            // The latest serviceUrl of an authenticated activity is where the user is reached.
            if personal
                && (u.conversation != self.conversation() || u.service_url != self.a.service_url)
            {
                u.conversation = self.conversation().to_string();
                u.service_url = self.a.service_url.clone();
                st.put_user(&u).await.map_err(|_| unavailable())?;
            }
            return Ok(u);
        }
        let member = self
            .edge
            .connector
            .member(&self.a.service_url, self.conversation(), &from.id)
            .await
            .map_err(|e| {
                debug!(code = e.code(), "could not look up a Teams member");
                unavailable()
            })?;
        let s = |k: &str| {
            member
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let upn = s("userPrincipalName");
        let email = s("email");
        let login = if upn.contains('@') { &upn } else { &email };
        let local: String = login
            .split('@')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
            .chars()
            .filter(|c| !c.is_whitespace() && !c.is_control())
            .collect();
        let tag: String = aad
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect::<String>()
            .to_ascii_lowercase();
        let base = if local.is_empty() {
            format!("user-{tag}")
        } else {
            local
        };
        // Two accounts of a tenant may share a local part (two UPN domains): the first to
        // claim it keeps it, atomically across nodes; the other gets a suffix.
        let mut user = None;
        for candidate in [base.clone(), format!("{base}.{tag}")] {
            match st.claim_name(&self.domain, &candidate, aad).await {
                Ok(true) => {
                    user = Some(candidate);
                    break;
                }
                Ok(false) => {}
                Err(_) => return Err(unavailable()),
            }
        }
        let Some(user) = user else {
            return Err(error(
                StatusCode::CONFLICT,
                "address_taken",
                "no relay address is free for this account",
            ));
        };
        let u = TeamsUser {
            user,
            domain: self.domain.clone(),
            tenant: self.tenant.clone(),
            aad: aad.to_string(),
            bf_id: from.id.clone(),
            name: from.name.clone().unwrap_or_else(|| s("name")),
            email,
            conversation: if personal {
                self.conversation().to_string()
            } else {
                String::new()
            },
            service_url: if personal {
                self.a.service_url.clone()
            } else {
                String::new()
            },
        };
        st.put_user(&u).await.map_err(|_| unavailable())?;
        Ok(u)
    }

    /// Says something where the activity came from.
    async fn say(&self, html: &str) -> Response {
        match self
            .edge
            .post(
                &self.a.service_url,
                self.conversation(),
                &self.tenant,
                html,
                None,
            )
            .await
        {
            Ok(_) => ok(),
            Err(e) => {
                debug!(code = e.code(), "could not answer in Teams");
                unavailable()
            }
        }
    }

    /// The channel of a channel-scope activity, recorded on first sight.
    async fn channel(&self) -> Result<Channel, Response> {
        let Some((id, name)) = self.a.channel() else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "a channel activity without a channel",
            ));
        };
        let key = channel_key(&id);
        let st = &self.edge.state;
        match st.channel(&key).await {
            Ok(Some(mut c)) => {
                // The latest serviceUrl of an authenticated activity is where it is reached.
                if c.service_url != self.a.service_url {
                    c.service_url = self.a.service_url.clone();
                    st.put_channel(&c).await.map_err(|_| unavailable())?;
                }
                Ok(c)
            }
            Ok(None) => {
                let c = Channel {
                    key,
                    domain: self.domain.clone(),
                    tenant: self.tenant.clone(),
                    conversation: id,
                    service_url: self.a.service_url.clone(),
                    name: name.unwrap_or_else(|| "a channel".into()),
                    team: self.a.team().map(|t| t.id.clone()).unwrap_or_default(),
                };
                st.put_channel(&c).await.map_err(|_| unavailable())?;
                Ok(c)
            }
            Err(_) => Err(unavailable()),
        }
    }

    async fn channel_members(&self, key: &str) -> Result<Vec<Address>, Response> {
        let members = self
            .edge
            .state
            .members(key)
            .await
            .map_err(|_| unavailable())?;
        Ok(members
            .into_iter()
            .filter_map(|(addr, platform)| {
                let a = Addr::parse(&addr)?;
                Some(Address::new(platform, a.domain, a.user))
            })
            .collect())
    }

    /// The outside members of a channel its domain may still talk to (the policy may have
    /// changed since they were invited).
    async fn reachable_members(&self, key: &str) -> Result<Vec<Address>, Response> {
        Ok(self
            .channel_members(key)
            .await?
            .into_iter()
            .filter(|m| self.edge.policy.check(&self.domain, &m.domain).is_ok())
            .collect())
    }

    /// The key the message map of this activity's conversation is under: the channel for
    /// channel messages (thread replies share it), else the conversation.
    fn map_key(&self, channel: Option<&str>) -> String {
        match channel {
            Some(k) => format!("ch:{k}"),
            None => self.conversation().to_string(),
        }
    }

    /// Submits one envelope of a Teams user and turns the outcome into the answer.
    async fn submit(&self, env: Envelope) -> Result<(), Response> {
        match self.edge.submit(env).await {
            Ok(_) => Ok(()),
            Err(SessionError::Invalid(_)) => Err(self
                .say("That could not be sent: the message is not valid.")
                .await),
            Err(SessionError::NotAllowed(m)) => Err(self
                .say(&format!("That was not sent: {}.", html::escape(&m)))
                .await),
            Err(SessionError::PendingApproval(_)) => Err(self
                .say("Your request waits for an administrator's approval; I will pass it on once it is approved.")
                .await),
            Err(SessionError::RateLimited(_)) => Err(self
                .say("Your organisation is sending too many messages right now; that one was not sent. Try again in a moment.")
                .await),
            Err(SessionError::UnknownTarget) => Err(self
                .say("I don't know that message any more, so the change was not relayed.")
                .await),
            Err(e) => {
                debug!(code = e.code(), "activity not journaled");
                Err(unavailable())
            }
        }
    }

    // === messages ===

    /// The user is typing in their chat with the bot: shown to the contact they are
    /// chatting with.
    async fn typing(&self) -> Response {
        if self.a.scope() != Scope::Personal {
            return ok();
        }
        let u = match self.sender().await {
            Ok(u) => u,
            Err(r) => return r,
        };
        let Ok(Some(t)) = self.edge.state.focus(&u.domain, &u.user).await else {
            return ok();
        };
        let Some(a) = Addr::parse(&t.address) else {
            return ok();
        };
        let Ok(to) = self.edge.resolve(&u.domain, &a) else {
            return ok();
        };
        let native = format!(
            "typing:{}",
            self.a
                .id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
        );
        let me = TeamsEdge::address_of(&u);
        let env = TeamsEdge::envelope(
            &me,
            &to,
            native,
            v1::envelope::Body::Typing(v1::Typing { active: true }),
        );
        match self.submit(env).await {
            Ok(()) => ok(),
            Err(r) => r,
        }
    }

    async fn message(&self) -> Response {
        if self.a.scope() == Scope::GroupChat {
            return self
                .say("I work in a chat with me and in team channels, not in group chats. Chat with me directly to reach people outside your organisation.")
                .await;
        }
        if self.a.id.as_deref().is_none_or(str::is_empty) {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "a message activity without an id",
            );
        }
        let u = match self.sender().await {
            Ok(u) => u,
            Err(r) => return r,
        };
        self.edge.seen(&u).await;
        // An Action.Submit button of one of the bot's cards.
        if let Some(cmd) = self.card_command() {
            return self.command(&u, cmd).await;
        }
        let (text, mentioned) = self.text();
        let channel = self.a.scope() == Scope::Channel;
        // In a channel, only what mentions the bot is a command: with every channel message
        // delivered (resource-specific consent), ordinary talk is relayed, never parsed.
        if (!channel || mentioned)
            && let Some(cmd) = commands::parse(&text.plain)
        {
            return match cmd {
                Ok(cmd) => self.command(&u, cmd).await,
                Err(usage) => {
                    self.say(&format!("Usage: <code>{}</code>", html::escape(usage.0)))
                        .await
                }
            };
        }
        let files = self.files();
        if text.plain.is_empty() && files.is_empty() {
            return ok();
        }
        let dest = match self.destination(&u).await {
            Ok(Some(d)) => d,
            Ok(None) if channel && mentioned => {
                return self
                    .say("Nobody outside your organisation is in this channel yet: <code>invite user@domain</code> brings someone in.")
                    .await;
            }
            Ok(None) if channel => return ok(),
            Ok(None) => {
                return self
                    .say("Who is this for? Reply to one of your contacts' messages, or write <code>chat user@domain</code> first, or <code>to user@domain message</code>. <code>help</code> lists everything.")
                    .await;
            }
            Err(r) => return r,
        };
        let mut bodies = Vec::new();
        if !text.plain.is_empty() {
            bodies.push(v1::envelope::Body::Text(text));
        }
        bodies.extend(files.into_iter().map(v1::envelope::Body::File));
        self.send_bodies(&u, dest, bodies).await
    }

    /// Sends the bodies of one Teams message to its destination, recording which contact or
    /// channel the message was with (for later edits, deletes and reactions).
    async fn send_bodies(
        &self,
        u: &TeamsUser,
        dest: Dest,
        bodies: Vec<v1::envelope::Body>,
    ) -> Response {
        let me = TeamsEdge::address_of(u);
        let id = self.a.id.clone().unwrap_or_default();
        if id.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "a message activity without an id",
            );
        }
        let (thread, channel) = match &dest {
            Dest::Contact(to) => (
                Thread {
                    platform: to.platform.clone(),
                    address: format!("{}@{}", to.user, to.domain),
                },
                None,
            ),
            Dest::Channel { key, .. } => (
                Thread {
                    platform: "teams".into(),
                    address: format!("#{key}@{}", u.domain),
                },
                Some(key.as_str()),
            ),
        };
        if self
            .edge
            .state
            .put_thread(&self.map_key(channel), &id, &thread)
            .await
            .is_err()
        {
            return unavailable();
        }
        for (i, body) in bodies.into_iter().enumerate() {
            // The first body carries the message's own id, so edits and reactions find it.
            let native = if i == 0 {
                id.clone()
            } else {
                format!("{id}:{i}")
            };
            let env = match &dest {
                Dest::Contact(to) => TeamsEdge::envelope(&me, to, native, body),
                Dest::Channel { key, members } => {
                    let mut env = TeamsEdge::envelope(&me, &me, native, body);
                    env.session_id = SessionId::channel("teams", key).0.to_vec();
                    env.recipients = members.clone();
                    env
                }
            };
            if let Err(r) = self.submit(env).await {
                return r;
            }
        }
        ok()
    }

    /// The contact (or channel) a message from Teams goes to.
    async fn destination(&self, u: &TeamsUser) -> Result<Option<Dest>, Response> {
        if self.a.scope() == Scope::Channel {
            let c = self.channel().await?;
            let members = self.reachable_members(&c.key).await?;
            if members.is_empty() {
                return Ok(None);
            }
            return Ok(Some(Dest::Channel {
                key: c.key,
                members,
            }));
        }
        let st = &self.edge.state;
        let quoted = match self.a.quoted_message() {
            Some(q) => st
                .thread_of(self.conversation(), &q)
                .await
                .map_err(|_| unavailable())?,
            None => None,
        };
        let thread = match quoted {
            Some(t) => Some(t),
            None => st
                .focus(&u.domain, &u.user)
                .await
                .map_err(|_| unavailable())?,
        };
        let Some(t) = thread else {
            return Ok(None);
        };
        let Some(a) = Addr::parse(&t.address) else {
            return Ok(None);
        };
        match self.edge.resolve(&u.domain, &a) {
            Ok(to) => Ok(Some(Dest::Contact(to))),
            Err(e) => {
                self.edge
                    .record_refusal(&TeamsEdge::address_of(u), &a, e.code());
                Err(self.say(&describe_refusal(&e)).await)
            }
        }
    }

    /// Files attached to a Teams message: shared files (download info) and inline content
    /// with a URL.
    fn files(&self) -> Vec<v1::File> {
        let mut out = Vec::new();
        for att in &self.a.attachments {
            let (url, mime) =
                if att.content_type == "application/vnd.microsoft.teams.file.download.info" {
                    let c = att.content.as_ref();
                    let url = c
                        .and_then(|c| c.get("downloadUrl"))
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    let ext = c
                        .and_then(|c| c.get("fileType"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    (url, mime_of_extension(ext).to_string())
                } else if att.content_type.starts_with("image/")
                    || att.content_type.starts_with("video/")
                    || att.content_type.starts_with("audio/")
                    || att.content_type == "application/pdf"
                {
                    (att.content_url.clone(), att.content_type.clone())
                } else {
                    continue;
                };
            let Some(url) = url.filter(|u| u.starts_with("https://") && u.len() <= 4096) else {
                continue;
            };
            out.push(v1::File {
                name: att
                    .name
                    .clone()
                    .filter(|n| !n.is_empty() && n.len() <= 256)
                    .unwrap_or_else(|| "file".into()),
                size: 0,
                mime,
                url,
            });
        }
        out
    }

    /// The activity's rich text with the bot's mentions removed, and whether it mentioned
    /// the bot (by name, or by a mention entity naming the bot's id).
    fn text(&self) -> (v1::Text, bool) {
        let bot_names = [self.edge.cfg.bot_name.as_str()];
        let (body, by_name) = html::strip_mentions(self.a.html_body().unwrap_or(""), &bot_names);
        let bot = self.bot_id();
        let by_entity = self.a.entities.iter().any(|e| {
            e.get("type").and_then(Value::as_str) == Some("mention")
                && e.get("mentioned")
                    .and_then(|m| m.get("id"))
                    .and_then(Value::as_str)
                    == Some(bot.as_str())
        });
        (html::to_text(&body), by_name || by_entity)
    }

    /// A command from an Action.Submit button (`value: {"fedrelay": "accept", "address": …}`).
    fn card_command(&self) -> Option<Command> {
        let v = self.a.value.as_ref()?;
        card_action(v)
    }

    // === commands ===

    async fn command(&self, u: &TeamsUser, cmd: Command) -> Response {
        let channel = self.a.scope() == Scope::Channel;
        match cmd {
            Command::Help if channel => self.say(CHANNEL_HELP).await,
            Command::Help => self.say(HELP).await,
            Command::Invite { to, .. } if channel => self.channel_invite(u, to).await,
            Command::Remove(a) if channel => self.channel_remove(u, a).await,
            Command::Members if channel => self.channel_list().await,
            _ if channel => self.say(CHANNEL_HELP).await,
            Command::Invite { to, note } => self.invite(u, to, note).await,
            Command::Accept(a) => self.answer(u, a, true).await.1,
            Command::Decline(a) => self.answer(u, a, false).await.1,
            Command::Contacts => self.contacts(u).await,
            Command::Profile(a) => self.profile(u, a).await,
            Command::Chat(a) => self.chat(u, a).await,
            Command::To { to, text } => {
                let t = html::to_text(&html::escape(&text));
                match self.edge.resolve(&u.domain, &to) {
                    Ok(addr) => {
                        self.send_bodies(u, Dest::Contact(addr), vec![v1::envelope::Body::Text(t)])
                            .await
                    }
                    Err(e) => self.refuse(u, &to, &e).await,
                }
            }
            Command::Status { availability, note } => self.status(u, &availability, note).await,
            Command::Remove(_) | Command::Members => {
                self.say("That command works in a channel.").await
            }
        }
    }

    async fn refuse(&self, u: &TeamsUser, to: &Addr, e: &PolicyError) -> Response {
        self.edge
            .record_refusal(&TeamsEdge::address_of(u), to, e.code());
        self.say(&describe_refusal(e)).await
    }

    async fn invite(&self, u: &TeamsUser, to: Addr, note: String) -> Response {
        let addr = match self.edge.resolve(&u.domain, &to) {
            Ok(a) => a,
            Err(e) => return self.refuse(u, &to, &e).await,
        };
        let st = &self.edge.state;
        let prev = match st.contact(&u.domain, &u.user, &to.to_string()).await {
            Ok(p) => p,
            Err(_) => return unavailable(),
        };
        match prev.map(|c| c.state) {
            // Inviting someone who already asked is accepting them.
            Some(ContactState::Requested) => return self.answer(u, Some(to), true).await.1,
            Some(ContactState::Accepted) => {
                return self
                    .say(&format!(
                        "You and <b>{}</b> are already connected.",
                        html::escape(&to.to_string())
                    ))
                    .await;
            }
            _ => {}
        }
        let me = TeamsEdge::address_of(u);
        let native = self
            .a
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let env = TeamsEdge::envelope(
            &me,
            &addr,
            native,
            v1::envelope::Body::ContactRequest(v1::ContactRequest { note }),
        );
        if let Err(r) = self.submit(env).await {
            return r;
        }
        let contact = Contact {
            platform: addr.platform.clone(),
            state: ContactState::Invited,
            name: String::new(),
            availability: String::new(),
            note: String::new(),
            email: String::new(),
        };
        if st
            .put_contact(&u.domain, &u.user, &to.to_string(), &contact)
            .await
            .is_err()
        {
            return unavailable();
        }
        self.say(&format!(
            "Invitation sent to <b>{}</b> ({}). I'll tell you here when they answer.",
            html::escape(&to.to_string()),
            platform_label(&addr.platform)
        ))
        .await
    }

    /// Accepts or declines a contact request: the one named, or the only one pending.
    /// Returns the text for an invoke answer as well as the chat answer.
    async fn answer(&self, u: &TeamsUser, a: Option<Addr>, accept: bool) -> (String, Response) {
        let st = &self.edge.state;
        let pending: Vec<(String, Contact)> = match st.contacts(&u.domain, &u.user).await {
            Ok(c) => c
                .into_iter()
                .filter(|(_, c)| c.state == ContactState::Requested)
                .collect(),
            Err(_) => return (String::new(), unavailable()),
        };
        let chosen = match a {
            Some(a) => pending
                .iter()
                .find(|(k, _)| *k == a.to_string())
                .cloned()
                .ok_or(format!(
                    "There is no pending request from {}.",
                    html::escape(&a.to_string())
                )),
            None if pending.len() <= 1 => pending
                .first()
                .cloned()
                .ok_or_else(|| "There is no pending contact request.".to_string()),
            None => Err(format!(
                "Several people are waiting: {}. Say which one, e.g. <code>accept {}</code>.",
                pending
                    .iter()
                    .map(|(k, _)| html::escape(k))
                    .collect::<Vec<_>>()
                    .join(", "),
                pending
                    .first()
                    .map(|(k, _)| html::escape(k))
                    .unwrap_or_default()
            )),
        };
        let (address, mut contact) = match chosen {
            Ok(c) => c,
            Err(m) => {
                let r = self.say(&m).await;
                return (m, r);
            }
        };
        let Some(to) = Addr::parse(&address) else {
            return (String::new(), ok());
        };
        let addr = match self.edge.resolve(&u.domain, &to) {
            Ok(a) => a,
            Err(e) => {
                let text = describe_refusal(&e);
                return (text, self.refuse(u, &to, &e).await);
            }
        };
        let me = TeamsEdge::address_of(u);
        let native = format!(
            "{}:{}",
            if accept { "accept" } else { "decline" },
            self.a
                .id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
        );
        let env = TeamsEdge::envelope(
            &me,
            &addr,
            native,
            v1::envelope::Body::ContactResponse(v1::ContactResponse { accepted: accept }),
        );
        if let Err(r) = self.submit(env).await {
            return (String::new(), r);
        }
        contact.state = if accept {
            ContactState::Accepted
        } else {
            ContactState::Declined
        };
        if st
            .put_contact(&u.domain, &u.user, &address, &contact)
            .await
            .is_err()
        {
            return (String::new(), unavailable());
        }
        let text = if accept {
            let thread = Thread {
                platform: addr.platform.clone(),
                address: address.clone(),
            };
            if st.set_focus(&u.domain, &u.user, &thread).await.is_err() {
                return (String::new(), unavailable());
            }
            format!(
                "You and <b>{}</b> are now connected. What you write here now goes to them.",
                html::escape(&address)
            )
        } else {
            format!("You declined <b>{}</b>.", html::escape(&address))
        };
        let r = self.say(&text).await;
        (text, r)
    }

    async fn contacts(&self, u: &TeamsUser) -> Response {
        let list = match self.edge.state.contacts(&u.domain, &u.user).await {
            Ok(l) => l,
            Err(_) => return unavailable(),
        };
        if list.is_empty() {
            return self
                .say("You have no contacts yet. <code>invite user@domain</code> asks someone to connect.")
                .await;
        }
        let focus = self
            .edge
            .state
            .focus(&u.domain, &u.user)
            .await
            .ok()
            .flatten();
        let mut out = String::from("<b>Your contacts</b><br/>");
        for (address, c) in list {
            let state = match c.state {
                ContactState::Accepted => {
                    if c.availability.is_empty() {
                        "unknown".to_string()
                    } else {
                        c.availability.replace('_', " ")
                    }
                }
                ContactState::Invited => "invited, no answer yet".into(),
                ContactState::Requested => "wants to connect (accept or decline)".into(),
                ContactState::Declined => "declined".into(),
            };
            let name = if c.name.is_empty() {
                String::new()
            } else {
                format!("{} ", html::escape(&c.name))
            };
            let note = if c.note.is_empty() {
                String::new()
            } else {
                format!(" — {}", html::escape(&c.note))
            };
            let focused = if focus.as_ref().is_some_and(|f| f.address == address) {
                " ← chatting"
            } else {
                ""
            };
            out.push_str(&format!(
                "{name}<code>{}</code> ({}): {}{note}{focused}<br/>",
                html::escape(&address),
                platform_label(&c.platform),
                html::escape(&state)
            ));
        }
        self.say(&out).await
    }

    async fn profile(&self, u: &TeamsUser, a: Addr) -> Response {
        let addr = match self.edge.resolve(&u.domain, &a) {
            Ok(x) => x,
            Err(e) => return self.refuse(u, &a, &e).await,
        };
        let me = TeamsEdge::address_of(u);
        let env = TeamsEdge::envelope(
            &me,
            &addr,
            format!("profile:{}", uuid::Uuid::now_v7()),
            v1::envelope::Body::ProfileQuery(v1::ProfileQuery {}),
        );
        if let Err(r) = self.submit(env).await {
            return r;
        }
        self.say(&format!(
            "I asked for <b>{}</b>'s profile; it appears here when their side answers.",
            html::escape(&a.to_string())
        ))
        .await
    }

    async fn chat(&self, u: &TeamsUser, a: Addr) -> Response {
        let addr = match self.edge.resolve(&u.domain, &a) {
            Ok(x) => x,
            Err(e) => return self.refuse(u, &a, &e).await,
        };
        let t = Thread {
            platform: addr.platform.clone(),
            address: a.to_string(),
        };
        if self
            .edge
            .state
            .set_focus(&u.domain, &u.user, &t)
            .await
            .is_err()
        {
            return unavailable();
        }
        self.say(&format!(
            "What you write now goes to <b>{}</b> ({}). Reply to someone else's message to answer them instead.",
            html::escape(&a.to_string()),
            platform_label(&addr.platform)
        ))
        .await
    }

    async fn status(&self, u: &TeamsUser, availability: &str, note: String) -> Response {
        let st = &self.edge.state;
        let set = (availability != "auto").then_some(availability);
        if st.set_status(&u.domain, &u.user, set).await.is_err() {
            return unavailable();
        }
        if let Err(e) = self
            .edge
            .publish_presence(u, availability_of(availability), note)
            .await
        {
            debug!(code = e.code(), "presence not published");
            return unavailable();
        }
        let text = match set {
            Some(a) => format!("Your contacts now see you as <b>{a}</b>."),
            None => "Your status now follows your activity.".into(),
        };
        self.say(&text).await
    }

    // === channels ===

    async fn channel_invite(&self, u: &TeamsUser, to: Addr) -> Response {
        let addr = match self.edge.resolve(&u.domain, &to) {
            Ok(a) => a,
            Err(e) => return self.refuse(u, &to, &e).await,
        };
        let c = match self.channel().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let invite = v1::envelope::Body::ChannelInvite(v1::ChannelInvite {
            channel_id: format!("#{}@{}", c.key, c.domain),
            channel_name: c.name.clone(),
        });
        if let Err(r) = self.change_member(u, &c, &addr, invite).await {
            return r;
        }
        self.say(&format!(
            "<b>{}</b> ({}) is invited: messages here that mention me reach them, and theirs appear here.",
            html::escape(&to.to_string()),
            platform_label(&addr.platform)
        ))
        .await
    }

    async fn channel_remove(&self, u: &TeamsUser, a: Addr) -> Response {
        let c = match self.channel().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let members = match self.channel_members(&c.key).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let Some(addr) = members
            .into_iter()
            .find(|m| m.user == a.user && m.domain == a.domain)
        else {
            return self
                .say(&format!(
                    "{} is not in this channel.",
                    html::escape(&a.to_string())
                ))
                .await;
        };
        let left = v1::envelope::Body::Membership(v1::Membership {
            channel_id: format!("#{}@{}", c.key, c.domain),
            change: v1::membership::Change::Left as i32,
        });
        if let Err(r) = self.change_member(u, &c, &addr, left).await {
            return r;
        }
        self.say(&format!(
            "{} is no longer in this channel.",
            html::escape(&a.to_string())
        ))
        .await
    }

    /// Adds `to` to the outside members of `c` (a channel invite) or removes them (any
    /// other body), and tells them in the channel's session.
    async fn change_member(
        &self,
        u: &TeamsUser,
        c: &Channel,
        to: &Address,
        body: v1::envelope::Body,
    ) -> Result<(), Response> {
        let joins = matches!(body, v1::envelope::Body::ChannelInvite(_));
        self.edge
            .state
            .set_member(
                &c.key,
                &format!("{}@{}", to.user, to.domain),
                joins.then_some(to.platform.as_str()),
            )
            .await
            .map_err(|_| unavailable())?;
        let mut env = TeamsEdge::envelope(
            &TeamsEdge::address_of(u),
            to,
            format!(
                "{}:{}",
                if joins { "invite" } else { "remove" },
                self.a.id.clone().unwrap_or_default()
            ),
            body,
        );
        env.session_id = SessionId::channel("teams", &c.key).0.to_vec();
        self.submit(env).await
    }

    async fn channel_list(&self) -> Response {
        let c = match self.channel().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match self.channel_members(&c.key).await {
            Ok(m) if m.is_empty() => {
                self.say("Nobody outside your organisation is in this channel. <code>invite user@domain</code> brings someone in.")
                    .await
            }
            Ok(m) => {
                let list: Vec<String> = m
                    .iter()
                    .map(|a| {
                        format!(
                            "<code>{}@{}</code> ({})",
                            html::escape(&a.user),
                            html::escape(&a.domain),
                            platform_label(&a.platform)
                        )
                    })
                    .collect();
                self.say(&format!("<b>Outside members</b><br/>{}", list.join("<br/>")))
                    .await
            }
            Err(r) => r,
        }
    }

    // === reactions, edits, deletes ===

    /// The contact or channel a reaction, edit or delete of message `id` is about.
    async fn thread_for(&self, u: &TeamsUser, id: &str) -> Result<Option<Dest>, Response> {
        let channel = if self.a.scope() == Scope::Channel {
            Some(self.channel().await?)
        } else {
            None
        };
        let key = self.map_key(channel.as_ref().map(|c| c.key.as_str()));
        let Some(t) = self
            .edge
            .state
            .thread_of(&key, id)
            .await
            .map_err(|_| unavailable())?
        else {
            return Ok(None);
        };
        if let Some(c) = channel {
            let members = self.reachable_members(&c.key).await?;
            return Ok((!members.is_empty()).then_some(Dest::Channel {
                key: c.key,
                members,
            }));
        }
        let Some(a) = Addr::parse(&t.address) else {
            return Ok(None);
        };
        match self.edge.resolve(&u.domain, &a) {
            Ok(to) => Ok(Some(Dest::Contact(to))),
            Err(e) => {
                self.edge
                    .record_refusal(&TeamsEdge::address_of(u), &a, e.code());
                Ok(None)
            }
        }
    }

    fn envelope_to(
        &self,
        u: &TeamsUser,
        dest: &Dest,
        native: String,
        body: v1::envelope::Body,
    ) -> Envelope {
        let me = TeamsEdge::address_of(u);
        match dest {
            Dest::Contact(to) => TeamsEdge::envelope(&me, to, native, body),
            Dest::Channel { key, members } => {
                let mut env = TeamsEdge::envelope(&me, &me, native, body);
                env.session_id = SessionId::channel("teams", key).0.to_vec();
                env.recipients = members.clone();
                env
            }
        }
    }

    /// The sender and the destination of a reaction, edit or delete of message `target`
    /// (`None`: a message the relay did not carry, to be ignored); 400 when there is no
    /// target id.
    async fn about(
        &self,
        target: Option<&String>,
        what: &str,
    ) -> Result<Option<(String, TeamsUser, Dest)>, Response> {
        let Some(target) = target.filter(|s| !s.is_empty()).cloned() else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("a {what} without the id of its message"),
            ));
        };
        let u = self.sender().await?;
        Ok(self
            .thread_for(&u, &target)
            .await?
            .map(|dest| (target, u, dest)))
    }

    /// When Teams says the event happened: with the message id, it tells two edits (or an
    /// undelete and a later delete) of one message apart.
    fn event_time(&self) -> Option<&str> {
        self.a
            .timestamp
            .as_deref()
            .filter(|t| !t.is_empty() && t.len() <= 64)
    }

    async fn reaction(&self) -> Response {
        let (target, u, dest) = match self.about(self.a.reply_to_id.as_ref(), "reaction").await {
            Ok(Some(x)) => x,
            Ok(None) => return ok(),
            Err(r) => return r,
        };
        let id = self
            .a
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let changes = self
            .a
            .reactions_added
            .iter()
            .map(|r| (r, true))
            .chain(self.a.reactions_removed.iter().map(|r| (r, false)));
        for (r, added) in changes {
            if r.kind.is_empty() || r.kind.len() > 64 {
                continue;
            }
            let native = format!("{id}:{}:{}", if added { "+" } else { "-" }, r.kind);
            let env = self.envelope_to(
                &u,
                &dest,
                native,
                v1::envelope::Body::Reaction(v1::Reaction {
                    target: Some(v1::MessageRef {
                        relay_msg_id: String::new(),
                        native_id: target.clone(),
                    }),
                    emoji: emoji_of(&r.kind),
                    added,
                }),
            );
            if let Err(r) = self.submit(env).await {
                return r;
            }
        }
        ok()
    }

    async fn update(&self) -> Response {
        let kind = self.a.event_type().unwrap_or("editMessage");
        if kind != "editMessage" && kind != "undeleteMessage" {
            return ok();
        }
        let (id, u, dest) = match self.about(self.a.id.as_ref(), "update").await {
            Ok(Some(x)) => x,
            Ok(None) => return ok(),
            Err(r) => return r,
        };
        let (mut text, mentioned) = self.text();
        // An edited `to user@domain text` is an edit of the text; other commands are not
        // messages, and editing them changes nothing.
        if self.a.scope() != Scope::Channel || mentioned {
            match commands::parse(&text.plain) {
                Some(Ok(Command::To { text: t, .. })) => text = html::to_text(&html::escape(&t)),
                Some(_) => return ok(),
                None => {}
            }
        }
        if text.plain.is_empty() {
            return ok();
        }
        // Each edit of a message is its own event: the time Teams gives it (else its text)
        // makes it unique.
        let when = self
            .event_time()
            .map(str::to_string)
            .unwrap_or_else(|| short_hash(&text.plain));
        let native = format!("{id}:{kind}:{when}");
        let env = self.envelope_to(
            &u,
            &dest,
            native,
            v1::envelope::Body::Edit(v1::Edit {
                target: Some(v1::MessageRef {
                    relay_msg_id: String::new(),
                    native_id: id,
                }),
                new_body: Some(text),
            }),
        );
        match self.submit(env).await {
            Ok(()) => ok(),
            Err(r) => r,
        }
    }

    async fn delete(&self) -> Response {
        if self
            .a
            .event_type()
            .is_some_and(|e| e != "softDeleteMessage")
        {
            return ok();
        }
        let (id, u, dest) = match self.about(self.a.id.as_ref(), "delete").await {
            Ok(Some(x)) => x,
            Ok(None) => return ok(),
            Err(r) => return r,
        };
        let env = self.envelope_to(
            &u,
            &dest,
            format!("{id}:delete:{}", self.event_time().unwrap_or("")),
            v1::envelope::Body::Delete(v1::Delete {
                target: Some(v1::MessageRef {
                    relay_msg_id: String::new(),
                    native_id: id,
                }),
            }),
        );
        match self.submit(env).await {
            Ok(()) => ok(),
            Err(r) => r,
        }
    }

    // === installation and membership ===

    fn bot_id(&self) -> String {
        format!("28:{}", self.edge.cfg.app_id)
    }

    fn is_bot(&self, id: &str) -> bool {
        id == self.bot_id() || self.a.recipient.as_ref().is_some_and(|r| r.id == id)
    }

    async fn welcome(&self, u: &TeamsUser) -> Response {
        let text = format!(
            "Hi {}! I connect you with people outside your organisation — on XMPP, SIP, Slack, Matrix and other platforms. To them your address is <b>{}@{}</b>.<br/><br/>{HELP}",
            html::escape(if u.name.is_empty() { "there" } else { &u.name }),
            html::escape(&u.user),
            html::escape(&u.domain),
        );
        self.say(&text).await
    }

    async fn installation_update(&self) -> Response {
        let action = self.a.action.as_deref().unwrap_or("");
        match (self.a.scope(), action) {
            (Scope::Personal, "add" | "add-upgrade") => match self.sender().await {
                Ok(u) if action == "add" => self.welcome(&u).await,
                Ok(_) => ok(),
                Err(r) => r,
            },
            (Scope::Personal, "remove") => {
                let aad = self
                    .a
                    .from
                    .as_ref()
                    .and_then(|f| f.aad_object_id.as_deref())
                    .unwrap_or("");
                let st = &self.edge.state;
                match st.user_by_aad(&self.tenant, aad).await {
                    Ok(Some(user)) => match st.forget_conversation(&self.domain, &user).await {
                        Ok(()) => ok(),
                        Err(_) => unavailable(),
                    },
                    Ok(None) => ok(),
                    Err(_) => unavailable(),
                }
            }
            (Scope::Channel, "add") => match self.channel().await {
                Ok(_) => self.say(CHANNEL_HELP).await,
                Err(r) => r,
            },
            (Scope::Channel, "remove") => self.forget_team().await,
            _ => ok(),
        }
    }

    /// The bot left a team, or the team was deleted: every channel of it is forgotten.
    async fn forget_team(&self) -> Response {
        let st = &self.edge.state;
        let result = match self.a.team() {
            Some(t) => st.forget_team(&t.id).await,
            None => match self.a.channel() {
                Some((id, _)) => st.forget_channel(&channel_key(&id)).await,
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => ok(),
            Err(_) => unavailable(),
        }
    }

    async fn conversation_update(&self) -> Response {
        let bot_added = self.a.members_added.iter().any(|m| self.is_bot(&m.id));
        let bot_removed = self.a.members_removed.iter().any(|m| self.is_bot(&m.id));
        match self.a.scope() {
            // The personal chat: remember where the user is (the welcome comes with the
            // installationUpdate).
            Scope::Personal if bot_added => match self.sender().await {
                Ok(_) => ok(),
                Err(r) => r,
            },
            Scope::Channel if bot_removed => self.forget_team().await,
            Scope::Channel if self.a.event_type() == Some("teamDeleted") => {
                self.forget_team().await
            }
            Scope::Channel if self.a.event_type() == Some("channelDeleted") => {
                match self.a.channel() {
                    Some((id, _)) => {
                        match self.edge.state.forget_channel(&channel_key(&id)).await {
                            Ok(()) => ok(),
                            Err(_) => unavailable(),
                        }
                    }
                    None => ok(),
                }
            }
            Scope::Channel if bot_added => match self.channel().await {
                Ok(_) => ok(),
                Err(r) => r,
            },
            Scope::Channel => self.team_members_changed().await,
            _ => ok(),
        }
    }

    /// Team members joined or left: the outside members of the team's channels are told.
    async fn team_members_changed(&self) -> Response {
        if self.a.members_added.is_empty() && self.a.members_removed.is_empty() {
            return ok();
        }
        let here = match self.channel().await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let st = &self.edge.state;
        let keys = match self.a.team() {
            Some(t) => match st.team_channels(&t.id).await {
                Ok(k) => k,
                Err(_) => return unavailable(),
            },
            None => vec![here.key.clone()],
        };
        let mut channels = Vec::new();
        for key in keys {
            let members = match self.reachable_members(&key).await {
                Ok(m) => m,
                Err(r) => return r,
            };
            if !members.is_empty() {
                channels.push((key, members));
            }
        }
        if channels.is_empty() {
            return ok();
        }
        let changes = self
            .a
            .members_added
            .iter()
            .map(|m| (m, v1::membership::Change::Joined))
            .chain(
                self.a
                    .members_removed
                    .iter()
                    .map(|m| (m, v1::membership::Change::Left)),
            );
        for (m, change) in changes {
            if self.is_bot(&m.id) {
                continue;
            }
            let Some(aad) = m.aad_object_id.as_deref().filter(|a| !a.is_empty()) else {
                continue;
            };
            let who = if change == v1::membership::Change::Left {
                // Someone who left can no longer be looked up: only a known user is named.
                match st.user_by_aad(&self.tenant, aad).await {
                    Ok(Some(user)) => Address::new("teams", self.domain.clone(), user),
                    Ok(None) => continue,
                    Err(_) => return unavailable(),
                }
            } else {
                match self.account(m, false).await {
                    Ok(u) => TeamsEdge::address_of(&u),
                    Err(r) => return r,
                }
            };
            for (key, members) in &channels {
                let mut env = TeamsEdge::envelope(
                    &who,
                    &who,
                    format!(
                        "member:{}:{}:{}",
                        self.a.id.clone().unwrap_or_default(),
                        m.id,
                        change as i32
                    ),
                    v1::envelope::Body::Membership(v1::Membership {
                        channel_id: format!("#{key}@{}", self.domain),
                        change: change as i32,
                    }),
                );
                env.session_id = SessionId::channel("teams", key).0.to_vec();
                env.recipients = members.clone();
                if let Err(e) = self.edge.submit(env).await {
                    debug!(code = e.code(), "membership change not journaled");
                    return unavailable();
                }
            }
        }
        ok()
    }

    // === invoke ===

    async fn invoke(&self) -> Response {
        let name = self.a.name.as_deref().unwrap_or("");
        if name != "adaptiveCard/action" {
            // As the Bot Framework SDK answers invokes a bot does not handle.
            return error(
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                "this bot does not handle that invoke",
            );
        }
        let cmd = self
            .a
            .value
            .as_ref()
            .and_then(|v| v.get("action"))
            .and_then(|a| a.get("data"))
            .and_then(card_action);
        let Some(cmd) = cmd else {
            return (
                StatusCode::OK,
                axum::Json(json!({
                    "statusCode": 400,
                    "type": "application/vnd.microsoft.error",
                    "value": {"code": "BadRequest", "message": "unknown card action"},
                })),
            )
                .into_response();
        };
        let u = match self.sender().await {
            Ok(u) => u,
            Err(r) => return r,
        };
        let (text, resp) = match cmd {
            Command::Accept(a) => self.answer(&u, a, true).await,
            Command::Decline(a) => self.answer(&u, a, false).await,
            _ => (String::new(), ok()),
        };
        if !resp.status().is_success() {
            return resp;
        }
        let plain = html::to_text(&text).plain;
        (
            StatusCode::OK,
            axum::Json(json!({
                "statusCode": 200,
                "type": "application/vnd.microsoft.activity.message",
                "value": plain,
            })),
        )
            .into_response()
    }
}

/// A card button's data: `{"fedrelay": "accept" | "decline", "address": "user@domain"}`.
fn card_action(v: &Value) -> Option<Command> {
    let verb = v.get("fedrelay").and_then(Value::as_str)?;
    let addr = v
        .get("address")
        .and_then(Value::as_str)
        .and_then(Addr::parse);
    match verb {
        "accept" => Some(Command::Accept(addr)),
        "decline" => Some(Command::Decline(addr)),
        _ => None,
    }
}

fn short_hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(s.as_bytes())[..6])
}

fn mime_of_extension(ext: &str) -> &'static str {
    match ext.to_ascii_lowercase().as_str() {
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "zip" => "application/zip",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        _ => "application/octet-stream",
    }
}

/// Everything the edge does with an activity body once its token checks out: parse it
/// and read its parts. The fuzz target calls it; it must never panic.
pub fn fuzz_activity(data: &[u8]) -> bool {
    let Ok(a) = serde_json::from_slice::<Activity>(data) else {
        return false;
    };
    let _ = a.tenant_id();
    let _ = a.scope();
    let _ = a.channel();
    let _ = a.quoted_message();
    if let Some(h) = a.html_body() {
        let t = html::to_text(&html::strip_mentions(h, &["fedrelay"]).0);
        let _ = commands::parse(&t.plain);
    }
    if let Some(v) = &a.value {
        let _ = card_action(v);
        if let Some(d) = v.get("action").and_then(|x| x.get("data")) {
            let _ = card_action(d);
        }
    }
    true
}
