//! What the Teams edge remembers, in Redis (shared by every node) or in memory (`--dev`).
//!
//! Keys, under the store prefix:
//! - `<p>:t:u:<domain>/<user>` — a Teams user: Entra object id, Bot Framework id, name,
//!   email, the bot conversation and its `serviceUrl`, the focused contact, a set status.
//! - `<p>:t:aad:<tenant>` — Entra object id → user part.
//! - `<p>:t:c:<domain>/<user>` — the user's contacts: address → state, name, presence.
//! - `<p>:t:names:<domain>` — user part → Entra object id: who holds each name.
//! - `<p>:t:m:<conversation>:<bucket>` — `a:<activity id>` → the contact or channel a message
//!   was with, `r:<relay msg id>` → the activity the relay posted for it (so a retried
//!   delivery is not posted twice). In 30-day buckets, each expiring 60 days after its last
//!   write.
//! - `<p>:t:ch:<channel key>` — a channel the bot is in: conversation, `serviceUrl`, name,
//!   team, and `m:<address>` for each external member.
//! - `<p>:t:team:<team id>` — the keys of the team's channels the bot has seen.
//!
//! Names, emails and addresses are kept; message content never is.

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("teams state store: {0}")]
pub struct StateError(pub String);

/// Hashes of strings with an optional expiry: all the edge needs of a store.
#[async_trait]
pub trait Kv: Send + Sync + 'static {
    async fn get(&self, key: &str, field: &str) -> Result<Option<String>, StateError>;
    async fn set(
        &self,
        key: &str,
        field: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StateError>;
    async fn del(&self, key: &str, field: &str) -> Result<(), StateError>;
    /// Sets `field` only if it is not set; returns the value it holds afterwards.
    async fn claim(&self, key: &str, field: &str, value: &str) -> Result<String, StateError>;
    async fn all(&self, key: &str) -> Result<HashMap<String, String>, StateError>;
    async fn remove(&self, key: &str) -> Result<(), StateError>;
}

/// A hash and when it expires.
type Entry = (HashMap<String, String>, Option<Instant>);

#[derive(Default)]
pub struct MemoryKv {
    map: Mutex<HashMap<String, Entry>>,
}

impl MemoryKv {
    fn with<T>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&mut HashMap<String, String>>) -> T,
    ) -> Result<T, StateError> {
        let mut map = self.map.lock().map_err(|_| StateError("poisoned".into()))?;
        if map
            .get(key)
            .is_some_and(|(_, exp)| exp.is_some_and(|e| e <= Instant::now()))
        {
            map.remove(key);
        }
        Ok(f(map.get_mut(key).map(|(h, _)| h)))
    }
}

#[async_trait]
impl Kv for MemoryKv {
    async fn get(&self, key: &str, field: &str) -> Result<Option<String>, StateError> {
        self.with(key, |h| h.and_then(|h| h.get(field).cloned()))
    }
    async fn set(
        &self,
        key: &str,
        field: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        self.with(key, |_| ())?;
        let mut map = self.map.lock().map_err(|_| StateError("poisoned".into()))?;
        let entry = map.entry(key.to_string()).or_default();
        entry.0.insert(field.to_string(), value.to_string());
        if let Some(ttl) = ttl {
            entry.1 = Some(Instant::now() + ttl);
        }
        Ok(())
    }
    async fn del(&self, key: &str, field: &str) -> Result<(), StateError> {
        self.with(key, |h| {
            if let Some(h) = h {
                h.remove(field);
            }
        })
    }
    async fn claim(&self, key: &str, field: &str, value: &str) -> Result<String, StateError> {
        self.with(key, |_| ())?;
        let mut map = self.map.lock().map_err(|_| StateError("poisoned".into()))?;
        let entry = map.entry(key.to_string()).or_default();
        Ok(entry
            .0
            .entry(field.to_string())
            .or_insert_with(|| value.to_string())
            .clone())
    }
    async fn all(&self, key: &str) -> Result<HashMap<String, String>, StateError> {
        self.with(key, |h| h.cloned().unwrap_or_default())
    }
    async fn remove(&self, key: &str) -> Result<(), StateError> {
        let mut map = self.map.lock().map_err(|_| StateError("poisoned".into()))?;
        map.remove(key);
        Ok(())
    }
}

pub struct RedisKv {
    conn: ConnectionManager,
}

impl RedisKv {
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }
}

fn redis_err(e: redis::RedisError) -> StateError {
    StateError(e.to_string())
}

#[async_trait]
impl Kv for RedisKv {
    async fn get(&self, key: &str, field: &str) -> Result<Option<String>, StateError> {
        let mut c = self.conn.clone();
        redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query_async(&mut c)
            .await
            .map_err(redis_err)
    }
    async fn set(
        &self,
        key: &str,
        field: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        let mut p = redis::pipe();
        p.atomic()
            .cmd("HSET")
            .arg(key)
            .arg(field)
            .arg(value)
            .ignore();
        if let Some(ttl) = ttl {
            p.cmd("PEXPIRE")
                .arg(key)
                .arg(ttl.as_millis() as u64)
                .ignore();
        }
        p.query_async::<()>(&mut c).await.map_err(redis_err)
    }
    async fn del(&self, key: &str, field: &str) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        redis::cmd("HDEL")
            .arg(key)
            .arg(field)
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }
    async fn claim(&self, key: &str, field: &str, value: &str) -> Result<String, StateError> {
        let mut c = self.conn.clone();
        let (_, held): (i64, Option<String>) = redis::pipe()
            .atomic()
            .cmd("HSETNX")
            .arg(key)
            .arg(field)
            .arg(value)
            .cmd("HGET")
            .arg(key)
            .arg(field)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(held.unwrap_or_default())
    }
    async fn all(&self, key: &str) -> Result<HashMap<String, String>, StateError> {
        let mut c = self.conn.clone();
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(redis_err)
    }
    async fn remove(&self, key: &str) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }
}

/// A Teams user who installed the bot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TeamsUser {
    /// The user part of their relay address (`alice` of `alice@contoso.com`).
    pub user: String,
    pub domain: String,
    pub tenant: String,
    pub aad: String,
    /// Bot Framework id (`29:…`).
    pub bf_id: String,
    pub name: String,
    pub email: String,
    /// The personal conversation with the bot, and where to reach it.
    pub conversation: String,
    pub service_url: String,
}

/// What [`TeamsState::forget_user`] erased.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Forgotten {
    pub profile: bool,
    pub conversation: bool,
    pub contacts: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContactState {
    /// The Teams user invited them; no answer yet.
    Invited,
    /// They asked the Teams user; no answer yet.
    Requested,
    Accepted,
    Declined,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Contact {
    pub platform: String,
    pub state: ContactState,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub availability: String,
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub email: String,
}

/// What a message in a Teams conversation was about: a contact (`user@domain` on a
/// platform) or a channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Thread {
    pub platform: String,
    pub address: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Channel {
    pub key: String,
    pub domain: String,
    pub tenant: String,
    pub conversation: String,
    pub service_url: String,
    pub name: String,
    pub team: String,
}

/// The message map is kept in 30-day buckets: writes go to the current one, reads look in
/// it and the one before, and a bucket expires 60 days after its last write. So a mapping
/// lives at least 30 days and a busy conversation's map does not grow forever.
const BUCKET_SECS: u64 = 30 * 86_400;
const BUCKET_TTL: Duration = Duration::from_secs(2 * BUCKET_SECS);

fn bucket_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / BUCKET_SECS)
        .unwrap_or(0)
}

pub struct TeamsState {
    kv: Box<dyn Kv>,
    prefix: String,
}

fn json<T: Serialize>(v: &T) -> Result<String, StateError> {
    serde_json::to_string(v).map_err(|e| StateError(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(s: Option<String>) -> Option<T> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

impl TeamsState {
    pub fn new(kv: Box<dyn Kv>, prefix: &str) -> Self {
        Self {
            kv,
            prefix: prefix.to_string(),
        }
    }

    fn user_key(&self, domain: &str, user: &str) -> String {
        format!("{}:t:u:{domain}/{user}", self.prefix)
    }
    fn contacts_key(&self, domain: &str, user: &str) -> String {
        format!("{}:t:c:{domain}/{user}", self.prefix)
    }
    fn aad_key(&self, tenant: &str) -> String {
        format!("{}:t:aad:{tenant}", self.prefix)
    }
    fn messages_key(&self, conversation: &str, bucket: u64) -> String {
        format!("{}:t:m:{conversation}:{bucket}", self.prefix)
    }
    fn names_key(&self, domain: &str) -> String {
        format!("{}:t:names:{domain}", self.prefix)
    }
    fn team_key(&self, team: &str) -> String {
        format!("{}:t:team:{team}", self.prefix)
    }

    async fn message_get(
        &self,
        conversation: &str,
        field: &str,
    ) -> Result<Option<String>, StateError> {
        let now = bucket_now();
        for b in [now, now.saturating_sub(1)] {
            if let Some(v) = self
                .kv
                .get(&self.messages_key(conversation, b), field)
                .await?
            {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    async fn message_set(
        &self,
        conversation: &str,
        field: &str,
        value: &str,
    ) -> Result<(), StateError> {
        self.kv
            .set(
                &self.messages_key(conversation, bucket_now()),
                field,
                value,
                Some(BUCKET_TTL),
            )
            .await
    }

    /// Claims the user part `user` of `domain` for the Entra object id `aad`, atomically
    /// across nodes; returns whether `aad` holds it.
    pub async fn claim_name(
        &self,
        domain: &str,
        user: &str,
        aad: &str,
    ) -> Result<bool, StateError> {
        Ok(self.kv.claim(&self.names_key(domain), user, aad).await? == aad)
    }
    fn channel_key(&self, key: &str) -> String {
        format!("{}:t:ch:{key}", self.prefix)
    }

    /// The user parts given out in `domain`, sorted.
    pub async fn users(&self, domain: &str) -> Result<Vec<String>, StateError> {
        let mut v: Vec<String> = self
            .kv
            .all(&self.names_key(domain))
            .await?
            .into_keys()
            .collect();
        v.sort();
        Ok(v)
    }

    pub async fn user(&self, domain: &str, user: &str) -> Result<Option<TeamsUser>, StateError> {
        Ok(parse(
            self.kv.get(&self.user_key(domain, user), "user").await?,
        ))
    }

    /// The user part an Entra object id was given.
    pub async fn user_by_aad(&self, tenant: &str, aad: &str) -> Result<Option<String>, StateError> {
        self.kv.get(&self.aad_key(tenant), aad).await
    }

    pub async fn put_user(&self, u: &TeamsUser) -> Result<(), StateError> {
        self.kv
            .set(&self.aad_key(&u.tenant), &u.aad, &u.user, None)
            .await?;
        self.kv
            .set(&self.user_key(&u.domain, &u.user), "user", &json(u)?, None)
            .await
    }

    /// Forgets a user's conversation reference (the bot was uninstalled): nothing more is
    /// sent to them until they install it again.
    pub async fn forget_conversation(&self, domain: &str, user: &str) -> Result<(), StateError> {
        if let Some(mut u) = self.user(domain, user).await? {
            if !u.conversation.is_empty() {
                let now = bucket_now();
                for b in [now, now.saturating_sub(1)] {
                    self.kv
                        .remove(&self.messages_key(&u.conversation, b))
                        .await?;
                }
            }
            u.conversation.clear();
            u.service_url.clear();
            self.kv
                .set(&self.user_key(domain, user), "user", &json(&u)?, None)
                .await?;
        }
        self.kv.del(&self.user_key(domain, user), "focus").await
    }

    /// Erases everything kept about a Teams user: their profile (id, name, email), focus and
    /// status, their contacts, their conversation reference and its recent message maps, and
    /// the claim on their user name. What was erased, by kind.
    pub async fn forget_user(&self, domain: &str, user: &str) -> Result<Forgotten, StateError> {
        let mut out = Forgotten::default();
        if let Some(u) = self.user(domain, user).await? {
            out.profile = true;
            if !u.conversation.is_empty() {
                out.conversation = true;
                let now = bucket_now();
                for b in [now, now.saturating_sub(1)] {
                    self.kv
                        .remove(&self.messages_key(&u.conversation, b))
                        .await?;
                }
            }
            if !u.aad.is_empty() {
                self.kv.del(&self.aad_key(&u.tenant), &u.aad).await?;
                if self.kv.get(&self.names_key(domain), user).await?.as_deref() == Some(&u.aad) {
                    self.kv.del(&self.names_key(domain), user).await?;
                }
            }
        }
        out.contacts = self.contacts(domain, user).await?.len();
        self.kv.remove(&self.contacts_key(domain, user)).await?;
        self.kv.remove(&self.user_key(domain, user)).await?;
        Ok(out)
    }

    pub async fn focus(&self, domain: &str, user: &str) -> Result<Option<Thread>, StateError> {
        Ok(parse(
            self.kv.get(&self.user_key(domain, user), "focus").await?,
        ))
    }

    pub async fn set_focus(&self, domain: &str, user: &str, t: &Thread) -> Result<(), StateError> {
        self.kv
            .set(&self.user_key(domain, user), "focus", &json(t)?, None)
            .await
    }

    /// A status the user set with `status`; while set, activity does not change it.
    pub async fn status(&self, domain: &str, user: &str) -> Result<Option<String>, StateError> {
        self.kv.get(&self.user_key(domain, user), "status").await
    }

    pub async fn set_status(
        &self,
        domain: &str,
        user: &str,
        status: Option<&str>,
    ) -> Result<(), StateError> {
        let key = self.user_key(domain, user);
        match status {
            Some(s) => self.kv.set(&key, "status", s, None).await,
            None => self.kv.del(&key, "status").await,
        }
    }

    pub async fn contacts(
        &self,
        domain: &str,
        user: &str,
    ) -> Result<Vec<(String, Contact)>, StateError> {
        let mut v: Vec<(String, Contact)> = self
            .kv
            .all(&self.contacts_key(domain, user))
            .await?
            .into_iter()
            .filter_map(|(k, c)| Some((k, serde_json::from_str(&c).ok()?)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    pub async fn contact(
        &self,
        domain: &str,
        user: &str,
        address: &str,
    ) -> Result<Option<Contact>, StateError> {
        Ok(parse(
            self.kv
                .get(&self.contacts_key(domain, user), address)
                .await?,
        ))
    }

    pub async fn put_contact(
        &self,
        domain: &str,
        user: &str,
        address: &str,
        c: &Contact,
    ) -> Result<(), StateError> {
        self.kv
            .set(&self.contacts_key(domain, user), address, &json(c)?, None)
            .await
    }

    /// What the message `activity` of `conversation` was about.
    pub async fn thread_of(
        &self,
        conversation: &str,
        activity: &str,
    ) -> Result<Option<Thread>, StateError> {
        Ok(parse(
            self.message_get(conversation, &format!("a:{activity}"))
                .await?,
        ))
    }

    pub async fn put_thread(
        &self,
        conversation: &str,
        activity: &str,
        t: &Thread,
    ) -> Result<(), StateError> {
        self.message_set(conversation, &format!("a:{activity}"), &json(t)?)
            .await
    }

    /// The activity already posted for a relay message (a retried delivery).
    pub async fn posted(
        &self,
        conversation: &str,
        relay_msg_id: &str,
    ) -> Result<Option<String>, StateError> {
        self.message_get(conversation, &format!("r:{relay_msg_id}"))
            .await
    }

    pub async fn put_posted(
        &self,
        conversation: &str,
        relay_msg_id: &str,
        activity: &str,
    ) -> Result<(), StateError> {
        self.message_set(conversation, &format!("r:{relay_msg_id}"), activity)
            .await
    }

    pub async fn channel(&self, key: &str) -> Result<Option<Channel>, StateError> {
        Ok(parse(self.kv.get(&self.channel_key(key), "channel").await?))
    }

    pub async fn put_channel(&self, c: &Channel) -> Result<(), StateError> {
        if !c.team.is_empty() {
            self.kv
                .set(&self.team_key(&c.team), &c.key, "1", None)
                .await?;
        }
        self.kv
            .set(&self.channel_key(&c.key), "channel", &json(c)?, None)
            .await
    }

    pub async fn forget_channel(&self, key: &str) -> Result<(), StateError> {
        if let Some(c) = self.channel(key).await?
            && !c.team.is_empty()
        {
            self.kv.del(&self.team_key(&c.team), key).await?;
        }
        self.kv.remove(&self.channel_key(key)).await
    }

    /// The keys of the channels of a team the bot has seen.
    pub async fn team_channels(&self, team: &str) -> Result<Vec<String>, StateError> {
        let mut v: Vec<String> = self
            .kv
            .all(&self.team_key(team))
            .await?
            .into_keys()
            .collect();
        v.sort();
        Ok(v)
    }

    /// Forgets every channel of a team (the bot was removed from it, or it was deleted).
    pub async fn forget_team(&self, team: &str) -> Result<(), StateError> {
        for key in self.team_channels(team).await? {
            self.kv.remove(&self.channel_key(&key)).await?;
        }
        self.kv.remove(&self.team_key(team)).await
    }

    /// External members of a channel: address → platform.
    pub async fn members(&self, key: &str) -> Result<Vec<(String, String)>, StateError> {
        let mut v: Vec<(String, String)> = self
            .kv
            .all(&self.channel_key(key))
            .await?
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("m:")?.to_string(), v)))
            .collect();
        v.sort();
        Ok(v)
    }

    pub async fn set_member(
        &self,
        key: &str,
        address: &str,
        platform: Option<&str>,
    ) -> Result<(), StateError> {
        let k = self.channel_key(key);
        let field = format!("m:{address}");
        match platform {
            Some(p) => self.kv.set(&k, &field, p, None).await,
            None => self.kv.del(&k, &field).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_state_round_trips() -> Result<(), StateError> {
        let s = TeamsState::new(Box::<MemoryKv>::default(), "fr");
        let u = TeamsUser {
            user: "alice".into(),
            domain: "contoso.com".into(),
            tenant: "t1".into(),
            aad: "aad-1".into(),
            conversation: "a:1".into(),
            ..TeamsUser::default()
        };
        s.put_user(&u).await?;
        assert_eq!(s.user("contoso.com", "alice").await?, Some(u.clone()));
        assert_eq!(
            s.user_by_aad("t1", "aad-1").await?.as_deref(),
            Some("alice")
        );
        let t = Thread {
            platform: "http".into(),
            address: "bob@b.example".into(),
        };
        s.put_thread("a:1", "act-1", &t).await?;
        s.put_posted("a:1", "relay-1", "act-1").await?;
        assert_eq!(s.thread_of("a:1", "act-1").await?, Some(t));
        assert_eq!(s.posted("a:1", "relay-1").await?.as_deref(), Some("act-1"));
        s.forget_conversation("contoso.com", "alice").await?;
        assert_eq!(s.thread_of("a:1", "act-1").await?, None);
        let u = s.user("contoso.com", "alice").await?;
        assert_eq!(u.map(|u| u.conversation), Some(String::new()));
        Ok(())
    }
}
