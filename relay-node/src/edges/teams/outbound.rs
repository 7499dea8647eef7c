//! Deliveries to Teams: each envelope for a Teams user (their chat with the bot) or a
//! Teams channel (`#<key>`) becomes a Bot Connector call. Every relayed message says who
//! sent it (name, address, platform); edits and deletes change or remove the bot's own
//! message; reactions, which a bot cannot add, are shown as a short message quoting the
//! one reacted to. A delivery retried after a partial failure does not post twice.

use super::connector::ConnectorError;
use super::html;
use super::state::{Contact, ContactState, StateError, Thread};
use super::{TeamsEdge, platform_label};
use fedrelay_proto::{Address, Envelope, v1};
use serde_json::{Value, json};
use session_actor::DeliveryError;
use std::sync::Arc;
use tracing::debug;

/// Where a delivery goes in Teams.
struct Target {
    service_url: String,
    conversation: String,
    tenant: String,
    /// The message-map key (`ch:<key>` for a channel).
    map_key: String,
    /// The Teams user, for 1:1 deliveries.
    user: Option<(String, String)>,
}

fn internal(e: StateError) -> DeliveryError {
    DeliveryError::internal("teams_state", e.to_string())
}

fn connector_error(e: ConnectorError) -> DeliveryError {
    let mut d = if e.retryable() {
        DeliveryError::retryable(e.code(), e.to_string())
    } else {
        DeliveryError::permanent(e.code(), e.to_string())
    };
    d.retry_after = e.retry_after();
    d
}

fn addr(a: &Address) -> String {
    format!("{}@{}", a.user, a.domain)
}

/// Who a relayed message is from, as its first line.
fn header(sender: &Address, name: &str) -> String {
    let shown = if name.is_empty() { &sender.user } else { name };
    format!(
        "<b>{}</b> <i>{} · {}</i>",
        html::escape(shown),
        html::escape(&addr(sender)),
        platform_label(&sender.platform)
    )
}

fn file_line(f: &v1::File) -> String {
    let size = match f.size {
        0 => String::new(),
        n if n < 1024 => format!(", {n} B"),
        n if n < 1024 * 1024 => format!(", {} KB", n / 1024),
        n => format!(", {:.1} MB", n as f64 / 1_048_576.0),
    };
    let link = if f.url.starts_with("https://") || f.url.starts_with("http://") {
        format!(
            "<a href=\"{}\">{}</a>",
            html::escape(&f.url),
            html::escape(&f.name)
        )
    } else {
        html::escape(&f.name)
    };
    format!("📎 {link} ({}{size})", html::escape(&f.mime))
}

fn availability_name(p: &v1::Presence) -> &'static str {
    use v1::presence::Availability as A;
    match A::try_from(p.availability) {
        Ok(A::Away) => "away",
        Ok(A::Busy) => "busy",
        Ok(A::DoNotDisturb) => "do_not_disturb",
        Ok(A::Offline) => "offline",
        _ => "available",
    }
}

/// An Adaptive Card with Accept / Decline buttons for a contact request.
fn request_card(from: &Address, note: &str) -> Value {
    let who = addr(from);
    // TextRuns, unlike TextBlocks, render no Markdown: what the sender wrote stays text.
    let mut body = vec![json!({
        "type": "RichTextBlock",
        "inlines": [{"type": "TextRun",
                     "text": format!("{who} ({}) wants to connect with you.", platform_label(&from.platform))}],
    })];
    if !note.is_empty() {
        body.push(json!({"type": "RichTextBlock",
                         "inlines": [{"type": "TextRun", "text": note, "isSubtle": true}]}));
    }
    json!([{
        "contentType": "application/vnd.microsoft.card.adaptive",
        "content": {
            "type": "AdaptiveCard",
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "version": "1.4",
            "body": body,
            "actions": [
                {"type": "Action.Execute", "title": "Accept", "verb": "accept",
                 "data": {"fedrelay": "accept", "address": who}},
                {"type": "Action.Execute", "title": "Decline", "verb": "decline",
                 "data": {"fedrelay": "decline", "address": who}},
            ],
        },
    }])
}

impl TeamsEdge {
    /// Delivers a batch to one Teams recipient.
    pub async fn deliver(
        &self,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        let target = self.target(recipient).await?;
        let mut out = Vec::with_capacity(batch.len());
        let channel = recipient.user.strip_prefix('#');
        let members: Vec<String> = match channel {
            Some(key) => self
                .state
                .members(key)
                .await
                .map_err(internal)?
                .into_iter()
                .map(|(a, _)| a)
                .collect(),
            None => Vec::new(),
        };
        for env in batch {
            // Only the channel's outside members write into it. A refusal fails the batch;
            // the session then delivers one by one and returns an error to this sender only.
            if channel.is_some()
                && !env
                    .sender
                    .as_ref()
                    .is_some_and(|s| members.contains(&addr(s)))
            {
                return Err(DeliveryError::permanent(
                    "teams_not_member",
                    "the sender is not a member of that channel",
                ));
            }
            out.push(self.deliver_one(&target, env).await?);
            if let Some(key) = channel {
                self.forward_in_channel(key, env).await?;
            }
            let kind = env.body.as_ref().map(|b| b.kind()).unwrap_or("unknown");
            metrics::counter!("fedrelay_messages_out_total", "edge" => "teams", "kind" => kind)
                .increment(1);
        }
        Ok(out)
    }

    async fn target(&self, recipient: &Address) -> Result<Target, DeliveryError> {
        if let Some(key) = recipient.user.strip_prefix('#') {
            let c = self
                .state
                .channel(key)
                .await
                .map_err(internal)?
                .filter(|c| c.domain.eq_ignore_ascii_case(&recipient.domain))
                .ok_or_else(|| {
                    DeliveryError::permanent("teams_no_channel", "the bot is not in that channel")
                })?;
            return Ok(Target {
                service_url: c.service_url,
                conversation: c.conversation,
                tenant: c.tenant,
                map_key: format!("ch:{key}"),
                user: None,
            });
        }
        let domain = recipient.domain.to_ascii_lowercase();
        // Teams users' relay names are lowercase.
        let u = self
            .state
            .user(&domain, &recipient.user.to_ascii_lowercase())
            .await
            .map_err(internal)?
            .filter(|u| !u.conversation.is_empty())
            .ok_or_else(|| {
                DeliveryError::permanent(
                    "teams_not_installed",
                    "the recipient has not installed the bot in Teams",
                )
            })?;
        Ok(Target {
            map_key: u.conversation.clone(),
            service_url: u.service_url,
            conversation: u.conversation,
            tenant: u.tenant,
            user: Some((domain, u.user)),
        })
    }

    /// The sender's name as the recipient knows it (from a profile they were sent).
    async fn name_of(&self, t: &Target, sender: &Address) -> String {
        match &t.user {
            Some((d, u)) => self
                .state
                .contact(d, u, &addr(sender))
                .await
                .ok()
                .flatten()
                .map(|c| c.name)
                .unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Posts a new message for `env`, once: a retry finds the earlier post.
    async fn post_once(
        &self,
        t: &Target,
        env: &Envelope,
        html: &str,
        extra: Option<(&str, Value)>,
    ) -> Result<Option<String>, DeliveryError> {
        if let Some(id) = self
            .state
            .posted(&t.map_key, &env.relay_msg_id)
            .await
            .map_err(internal)?
        {
            return Ok(Some(id));
        }
        let id = self
            .post(&t.service_url, &t.conversation, &t.tenant, html, extra)
            .await
            .map_err(connector_error)?;
        self.state
            .put_posted(&t.map_key, &env.relay_msg_id, &id)
            .await
            .map_err(internal)?;
        if let Some(sender) = &env.sender {
            let thread = Thread {
                platform: sender.platform.clone(),
                address: addr(sender),
            };
            self.state
                .put_thread(&t.map_key, &id, &thread)
                .await
                .map_err(internal)?;
        }
        Ok(Some(id))
    }

    /// Updates a contact of the Teams user `t` is for. Someone not yet a contact becomes one
    /// in state `create`, or is left alone when that is `None`.
    async fn update_contact(
        &self,
        t: &Target,
        who: &Address,
        create: Option<ContactState>,
        f: impl FnOnce(&mut Contact),
    ) -> Result<(), DeliveryError> {
        let Some((d, u)) = &t.user else {
            return Ok(());
        };
        let key = addr(who);
        let known = self.state.contact(d, u, &key).await.map_err(internal)?;
        let mut c = match (known, create) {
            (Some(c), _) => c,
            (None, Some(state)) => Contact {
                platform: who.platform.clone(),
                state,
                name: String::new(),
                availability: String::new(),
                note: String::new(),
                email: String::new(),
            },
            (None, None) => return Ok(()),
        };
        f(&mut c);
        self.state
            .put_contact(d, u, &key, &c)
            .await
            .map_err(internal)
    }

    async fn deliver_one(
        &self,
        t: &Target,
        env: &Envelope,
    ) -> Result<Option<String>, DeliveryError> {
        use v1::envelope::Body;
        let sender = env.sender.clone().unwrap_or_default();
        let Some(body) = env.body.as_ref() else {
            return Ok(None);
        };
        let name = self.name_of(t, &sender).await;
        let head = header(&sender, &name);
        match body {
            Body::Text(text) => {
                let html = format!("{head}<br/>{}", html::from_text(text));
                self.post_once(t, env, &html, None).await
            }
            Body::File(f) => {
                let html = format!("{head}<br/>{}", file_line(f));
                self.post_once(t, env, &html, None).await
            }
            Body::Edit(e) => {
                let new = e.new_body.as_ref().map(html::from_text).unwrap_or_default();
                let native = e
                    .target
                    .as_ref()
                    .map(|r| r.native_id.clone())
                    .unwrap_or_default();
                if native.is_empty() {
                    let html = format!("{head} <i>edited a message:</i><br/>{new}");
                    return self.post_once(t, env, &html, None).await;
                }
                let activity = json!({
                    "type": "message",
                    "id": native,
                    "textFormat": "xml",
                    "text": format!("{head}<br/>{new} <i>(edited)</i>"),
                });
                self.connector
                    .update(
                        &t.service_url,
                        &t.conversation,
                        &t.tenant,
                        &native,
                        &activity,
                    )
                    .await
                    .map_err(connector_error)?;
                Ok(None)
            }
            Body::Delete(d) => {
                let native = d
                    .target
                    .as_ref()
                    .map(|r| r.native_id.clone())
                    .unwrap_or_default();
                if native.is_empty() {
                    let html = format!("{head} <i>deleted a message.</i>");
                    return self.post_once(t, env, &html, None).await;
                }
                match self
                    .connector
                    .delete(&t.service_url, &t.conversation, &t.tenant, &native)
                    .await
                {
                    // Already gone is gone.
                    Ok(()) | Err(ConnectorError::Status { status: 404, .. }) => Ok(None),
                    Err(e) => Err(connector_error(e)),
                }
            }
            Body::Reaction(r) => {
                let native = r
                    .target
                    .as_ref()
                    .map(|r| r.native_id.clone())
                    .unwrap_or_default();
                let verb = if r.added {
                    "reacted"
                } else {
                    "removed the reaction"
                };
                let mut html = format!("{head} <i>{verb}</i> {}", html::escape(&r.emoji));
                let extra = if native.is_empty() {
                    None
                } else {
                    html = format!("<quoted messageId=\"{}\"/>{html}", html::escape(&native));
                    Some((
                        "entities",
                        json!([{"type": "quotedReply", "quotedReply": {"messageId": native}}]),
                    ))
                };
                self.post_once(t, env, &html, extra).await
            }
            Body::Typing(ty) => {
                if ty.active && t.user.is_some() && self.typing_due(&t.conversation) {
                    let activity = json!({"type": "typing"});
                    if let Err(e) = self
                        .connector
                        .send(&t.service_url, &t.conversation, &t.tenant, &activity)
                        .await
                    {
                        // A lost typing indicator is not worth a retry.
                        debug!(code = e.code(), "typing indicator not shown");
                    }
                }
                Ok(None)
            }
            Body::Presence(p) => {
                let availability = availability_name(p);
                let note = p.note.clone();
                self.update_contact(t, &sender, None, |c| {
                    c.availability = availability.to_string();
                    c.note = note;
                })
                .await?;
                Ok(None)
            }
            Body::ContactRequest(c) => {
                self.update_contact(t, &sender, Some(ContactState::Requested), |contact| {
                    // A repeated request from an accepted contact changes nothing.
                    if contact.state != ContactState::Accepted {
                        contact.state = ContactState::Requested;
                    }
                })
                .await?;
                let who = html::escape(&addr(&sender));
                let mut html = format!(
                    "{head}<br/>wants to connect with you. Answer <code>accept {who}</code> or <code>decline {who}</code>."
                );
                if !c.note.is_empty() {
                    html.push_str(&format!("<br/><i>“{}”</i>", html::escape(&c.note)));
                }
                self.post_once(
                    t,
                    env,
                    &html,
                    Some(("attachments", request_card(&sender, &c.note))),
                )
                .await
            }
            Body::ContactResponse(c) => {
                // Only an answer to the Teams user's own invitation counts: an unasked-for
                // "accepted" must not make its sender a contact or take over the chat.
                let invited = match &t.user {
                    Some((d, u)) => self
                        .state
                        .contact(d, u, &addr(&sender))
                        .await
                        .map_err(internal)?
                        .is_some_and(|c| c.state == ContactState::Invited),
                    None => false,
                };
                if !invited {
                    debug!("contact response without an invitation ignored");
                    return Ok(None);
                }
                let accepted = c.accepted;
                self.update_contact(t, &sender, None, |contact| {
                    contact.state = if accepted {
                        ContactState::Accepted
                    } else {
                        ContactState::Declined
                    };
                })
                .await?;
                let who = html::escape(&addr(&sender));
                let html = if accepted {
                    if let Some((d, u)) = &t.user {
                        let thread = Thread {
                            platform: sender.platform.clone(),
                            address: addr(&sender),
                        };
                        self.state
                            .set_focus(d, u, &thread)
                            .await
                            .map_err(internal)?;
                    }
                    format!(
                        "{head}<br/>accepted your contact request. You are now chatting with {who}: write here to talk to them (<code>chat</code> switches to someone else)."
                    )
                } else {
                    format!("{head}<br/>declined your contact request.")
                };
                self.post_once(t, env, &html, None).await
            }
            Body::ProfileQuery(_) => {
                self.answer_profile(t, env, &sender).await?;
                Ok(None)
            }
            Body::Profile(p) => {
                let (n, e) = (p.display_name.clone(), p.email.clone());
                self.update_contact(t, &sender, None, |c| {
                    c.name = n;
                    c.email = e;
                })
                .await?;
                let mut lines = vec![format!(
                    "<b>{}</b> — <code>{}</code> ({})",
                    html::escape(if p.display_name.is_empty() {
                        &sender.user
                    } else {
                        &p.display_name
                    }),
                    html::escape(&addr(&sender)),
                    platform_label(&sender.platform)
                )];
                for (label, v) in [
                    ("Email", &p.email),
                    ("Title", &p.title),
                    ("Organisation", &p.organisation),
                ] {
                    if !v.is_empty() {
                        lines.push(format!("{label}: {}", html::escape(v)));
                    }
                }
                self.post_once(t, env, &lines.join("<br/>"), None).await
            }
            Body::ChannelInvite(c) => {
                let html = format!(
                    "{head}<br/>invited you to the channel <b>{}</b> (<code>{}</code>).",
                    html::escape(&c.channel_name),
                    html::escape(&c.channel_id)
                );
                self.post_once(t, env, &html, None).await
            }
            Body::Membership(m) => {
                let verb = match v1::membership::Change::try_from(m.change) {
                    Ok(v1::membership::Change::Left) => "left",
                    _ => "joined",
                };
                let html = format!("{head} <i>{verb} the conversation.</i>");
                self.post_once(t, env, &html, None).await
            }
            Body::Error(e) => {
                let html = format!(
                    "⚠️ A message could not be delivered ({}): {}",
                    html::escape(&e.code),
                    html::escape(&e.detail)
                );
                self.post_once(t, env, &html, None).await
            }
        }
    }

    /// An outside member's message to a channel also reaches the channel's other outside
    /// members (those whose domain may talk to the sender's): as a copy in the channel's
    /// session, from the same sender. The copy's origin id is derived from the original's
    /// relay id, so a retried delivery journals it once; edits, deletes and reactions name
    /// the copy of their target the same way.
    async fn forward_in_channel(&self, key: &str, env: &Envelope) -> Result<(), DeliveryError> {
        use v1::envelope::Body;
        let Some(sender) = env.sender.as_ref().filter(|s| s.platform != "teams") else {
            return Ok(());
        };
        let mut body = match &env.body {
            Some(
                b @ (Body::Text(_)
                | Body::File(_)
                | Body::Edit(_)
                | Body::Delete(_)
                | Body::Reaction(_)),
            ) => b.clone(),
            _ => return Ok(()),
        };
        let members = self.state.members(key).await.map_err(internal)?;
        let sender_key = addr(sender);
        let recipients: Vec<Address> = members
            .into_iter()
            .filter(|(a, _)| *a != sender_key)
            .filter_map(|(a, platform)| {
                let (user, d) = a.rsplit_once('@')?;
                self.policy
                    .check(&sender.domain.to_ascii_lowercase(), d)
                    .ok()?;
                Some(Address::new(platform, d, user))
            })
            .collect();
        if recipients.is_empty() {
            return Ok(());
        }
        if let Some(target) = body.target_mut() {
            let original = std::mem::take(&mut target.relay_msg_id);
            target.native_id = format!("fwd:{original}");
        }
        let copy = Envelope {
            session_id: env.session_id.clone(),
            relay_msg_id: String::new(),
            origin: Some(v1::Origin {
                platform: "teams".into(),
                native_id: format!("fwd:{}", env.relay_msg_id),
            }),
            sender: Some(sender.clone()),
            recipients,
            sent_at_ms: env.sent_at_ms,
            trace_context: None,
            seq: 0,
            body: Some(body),
        };
        match self.submit(copy).await {
            Ok(_) => Ok(()),
            // The target was never forwarded (sent before the member joined): nothing to change.
            Err(session_actor::SessionError::UnknownTarget) => Ok(()),
            Err(e) => {
                debug!(code = e.code(), "channel copy not journaled yet");
                Err(DeliveryError::internal(
                    "teams_channel_copy",
                    "the copy for the channel's other members was not journaled",
                ))
            }
        }
    }

    /// Someone asked for a Teams user's profile: the edge answers for them with what the
    /// Bot Framework gave it (name and email; nothing from Graph).
    async fn answer_profile(
        &self,
        t: &Target,
        env: &Envelope,
        asker: &Address,
    ) -> Result<(), DeliveryError> {
        let Some((d, u)) = &t.user else {
            return Ok(());
        };
        let Some(user) = self.state.user(d, u).await.map_err(internal)? else {
            return Ok(());
        };
        let me = Self::address_of(&user);
        let mut answer = Self::envelope(
            &me,
            asker,
            format!("profile-answer:{}", env.relay_msg_id),
            v1::envelope::Body::Profile(v1::Profile {
                display_name: user.name.clone(),
                email: user.email.clone(),
                title: String::new(),
                organisation: String::new(),
                avatar_url: String::new(),
            }),
        );
        answer.session_id = env.session_id.clone();
        match self.submit(answer).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == "not_owner" || e.code() == "unavailable" => Err(
                DeliveryError::internal("teams_profile", "profile answer not journaled yet"),
            ),
            Err(e) => {
                debug!(code = e.code(), "profile answer refused");
                Ok(())
            }
        }
    }
}
