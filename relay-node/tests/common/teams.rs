//! A relay with a Teams domain, pointed at the fake Bot Connector, plus Teams activities as
//! the Bot Connector would send them.
#![allow(dead_code)]

use super::{SECRET_B, SECRET_C, SECRET_D};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use test_support::fake_bot_connector::{Call, FakeBotConnector, FakeConfig, Member, post_activity};
use test_support::{RedisServer, RelayNode};

/// The tenant contoso.com is bound to.
pub const TENANT: &str = "22222222-2222-2222-2222-222222222222";
/// A tenant this relay does not serve.
pub const OTHER_TENANT: &str = "33333333-3333-3333-3333-333333333333";

pub struct Rig {
    pub fake: FakeBotConnector,
    pub relay: RelayNode,
    pub redis: RedisServer,
}

/// The config of a relay serving contoso.com on Teams, b.example on HTTP (stream delivery,
/// federated with contoso.com), c.example on HTTP (stream, federated with contoso.com and
/// b.example) and d.example on HTTP (federated with nobody).
pub fn teams_config(fake: &FakeBotConnector, redis_url: &str, extra: &str) -> String {
    config_text(fake, redis_url, extra, "")
}

/// [`teams_config`] with `session_extra` appended to its `[session]` section.
pub fn teams_config_with(
    fake: &FakeBotConnector,
    redis_url: &str,
    teams_extra: &str,
    session_extra: &str,
) -> String {
    config_text(fake, redis_url, teams_extra, session_extra)
}

fn config_text(fake: &FakeBotConnector, redis_url: &str, extra: &str, session: &str) -> String {
    let c = fake.config();
    format!(
        r#"node_id = "teams-1"
[http]
listen = "127.0.0.1:{{HTTP_PORT}}"
[admin]
listen = "127.0.0.1:{{ADMIN_PORT}}"
[store]
backend = "redis"
redis_url = "{redis_url}"
[session]
retry_base_ms = 50
retry_max_ms = 500
ack_flush_ms = 10
{session}
[telemetry]
log_format = "json"
log_level = "info"
[teams]
app_id = "{app_id}"
app_password = "{password}"
app_tenant_id = "{tenant}"
openid_metadata_url = "{meta}"
token_url = "{token}"
service_url_prefixes = ["{base}/"]
{extra}
[[domains]]
name = "contoso.com"
platform = "teams"
tenant_id = "{TENANT}"
[[domains]]
name = "b.example"
platform = "http"
secret = "{SECRET_B}"
[[domains]]
name = "d.example"
platform = "http"
secret = "{SECRET_D}"
[[domains]]
name = "c.example"
platform = "http"
secret = "{SECRET_C}"
[[federation]]
between = ["contoso.com", "b.example"]
[[federation]]
between = ["contoso.com", "c.example"]
[[federation]]
between = ["b.example", "c.example"]
"#,
        app_id = c.app_id,
        password = c.app_password,
        tenant = c.app_tenant_id,
        meta = fake.openid_metadata_url(),
        token = fake.token_url(),
        base = fake.base_url(),
    )
}

/// Starts Redis, the fake Bot Connector and a relay. `teams_extra` goes into `[teams]`;
/// `extra` after the domains (more `[session]` keys are not possible there: use
/// `teams_extra` for `[teams]` keys only).
pub async fn start(teams_extra: &str) -> Result<Rig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start()?;
    let fake = FakeBotConnector::start(FakeConfig::default()).await?;
    let relay = RelayNode::start(&teams_config(&fake, &redis.url(), teams_extra))?;
    Ok(Rig { fake, relay, redis })
}

/// [`start`], with `session_extra` appended to the relay's `[session]` section (e.g.
/// `max_attempts = 3`).
pub async fn start_with(teams_extra: &str, session_extra: &str) -> Result<Rig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start()?;
    let fake = FakeBotConnector::start(FakeConfig::default()).await?;
    let config = teams_config_with(&fake, &redis.url(), teams_extra, session_extra);
    let relay = RelayNode::start(&config)?;
    Ok(Rig { fake, relay, redis })
}

/// A Teams user of contoso.com, registered with the fake so the relay can look them up.
#[derive(Debug, Clone)]
pub struct User {
    pub bf_id: String,
    pub aad: String,
    pub name: String,
    pub upn: String,
    /// Their personal conversation with the bot.
    pub conversation: String,
}

impl User {
    pub fn new(local: &str, name: &str, n: u32) -> Self {
        Self {
            bf_id: format!("29:1teams-user-{local}"),
            aad: format!("aaaaaaaa-0000-0000-0000-{n:012}"),
            name: name.into(),
            upn: format!("{local}@contoso.com"),
            conversation: format!("a:1personal-{local}"),
        }
    }

    pub fn member(&self) -> Member {
        let mut parts = self.name.splitn(2, ' ');
        Member {
            id: self.bf_id.clone(),
            aad_object_id: self.aad.clone(),
            name: self.name.clone(),
            given_name: parts.next().unwrap_or("").into(),
            surname: parts.next().unwrap_or("").into(),
            email: self.upn.clone(),
            user_principal_name: self.upn.clone(),
            tenant_id: TENANT.into(),
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1_700_000_000_000);

/// A fresh activity id (Teams uses millisecond timestamps in 1:1 chats).
pub fn next_id() -> String {
    NEXT_ID.fetch_add(1, Ordering::Relaxed).to_string()
}

/// An activity of `kind` from `u` in their personal chat with the bot, with `extra` fields
/// merged in.
pub fn personal(rig: &Rig, u: &User, kind: &str, extra: Value) -> Value {
    let mut a = json!({
        "type": kind,
        "id": next_id(),
        "timestamp": "2026-11-23T10:00:00.000Z",
        "serviceUrl": rig.fake.service_url(),
        "channelId": "msteams",
        "from": {"id": u.bf_id, "name": u.name, "aadObjectId": u.aad},
        "recipient": {"id": format!("28:{}", rig.fake.config().app_id), "name": "fedrelay"},
        "conversation": {"id": u.conversation, "conversationType": "personal", "tenantId": TENANT},
        "channelData": {"tenant": {"id": TENANT}},
        "locale": "en-US",
    });
    merge(&mut a, extra);
    a
}

/// An activity of `kind` from `u` in a team channel.
pub fn in_channel(rig: &Rig, u: &User, channel: &str, kind: &str, extra: Value) -> Value {
    let mut a = personal(rig, u, kind, json!({}));
    a["conversation"] = json!({
        "id": format!("{channel};messageid={}", next_id()),
        "conversationType": "channel",
        "isGroup": true,
        "tenantId": TENANT,
    });
    a["channelData"] = json!({
        "tenant": {"id": TENANT},
        "team": {"id": "19:team-general@thread.tacv2", "name": "Partners"},
        "channel": {"id": channel, "name": "Project X"},
    });
    merge(&mut a, extra);
    a
}

fn merge(a: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(e)) = (a.as_object_mut(), extra) {
        for (k, v) in e {
            a.insert(k, v);
        }
    }
}

/// `u`'s edit of their message `id` to `text` (a `messageUpdate` / `editMessage`).
pub fn edit(rig: &Rig, u: &User, id: &Value, text: &str) -> Value {
    personal(
        rig,
        u,
        "messageUpdate",
        json!({"id": id, "text": text,
               "channelData": {"tenant": {"id": TENANT}, "eventType": "editMessage"}}),
    )
}

/// Sends an activity signed as the Bot Connector signs it; returns status and body.
pub async fn send(rig: &Rig, activity: &Value) -> Result<(u16, String)> {
    let token = rig.fake.token_for(activity);
    post_activity(
        &rig.relay.http_url(),
        activity,
        Some(&format!("Bearer {token}")),
    )
    .await
}

/// Sends an activity and fails unless the relay answers 2xx.
pub async fn send_ok(rig: &Rig, activity: &Value) -> Result<String> {
    let (status, body) = send(rig, activity).await?;
    if !(200..300).contains(&status) {
        anyhow::bail!("activity {} answered {status}: {body}", activity["type"]);
    }
    Ok(body)
}

/// Installs the bot for `u` (the installationUpdate Teams sends) and waits for the welcome.
pub async fn install(rig: &Rig, u: &User) -> Result<()> {
    rig.fake.add_member(u.member());
    let before = rig.fake.sent().len();
    send_ok(
        rig,
        &personal(rig, u, "installationUpdate", json!({"action": "add"})),
    )
    .await?;
    rig.fake
        .wait_calls("the welcome", std::time::Duration::from_secs(10), |c| {
            c.iter()
                .filter(|c| c.method == "POST" && (200..300).contains(&c.status))
                .count()
                > before
        })
        .await?;
    Ok(())
}

/// The text of the bot messages posted to `conversation`, in order.
pub fn posted_texts(rig: &Rig, conversation: &str) -> Vec<String> {
    rig.fake
        .sent()
        .iter()
        .filter(|c| c.conversation_id == conversation && c.body["type"] == "message")
        .map(|c| c.body["text"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Waits for a successful POST to `conversation` whose text contains every one of `needles`;
/// returns it.
pub async fn wait_post(
    rig: &Rig,
    conversation: &str,
    needles: &[&str],
    timeout: std::time::Duration,
) -> Result<Call> {
    let found = |c: &Call| {
        c.method == "POST"
            && (200..300).contains(&c.status)
            && c.conversation_id.starts_with(conversation)
            && needles
                .iter()
                .all(|n| c.body["text"].as_str().unwrap_or("").contains(n))
    };
    let calls = match rig
        .fake
        .wait_calls(&format!("a post with {needles:?}"), timeout, |cs| {
            cs.iter().any(found)
        })
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let texts: Vec<String> = rig
                .fake
                .calls()
                .iter()
                .map(|c| c.body["text"].as_str().unwrap_or("").to_string())
                .collect();
            return Err(e.context(format!("posted: {texts:?}")));
        }
    };
    calls.into_iter().find(found).context("the post vanished")
}
