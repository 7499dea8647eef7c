//! The Redis session store.
//!
//! Every key of a session carries its id as a hash tag (`fr:s:{<id>}:m`, `:j`, `:i`), so a
//! session lives in one Redis Cluster slot and each Lua script below runs atomically on it:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:m` | hash | `epoch`, `seq`, `c:<recipient>` delivery cursors |
//! | `…:j` | stream | the journal: entry id `0-<seq>`, field `e` = encoded envelope |
//! | `…:i` | hash | `n:<id space>:<native id>` → `<seq>:<relay id>` (also the dedup set), `r:<relay id>:<id space>` → native id, `s:<relay id>` → sender |
//!
//! Besides, `fr:active` is the set of sessions that may owe deliveries, which a new owner
//! resumes after a handoff.
//!
//! Calls share one multiplexed connection, so concurrent sessions' scripts are pipelined.

use super::{AckUpdate, AppendOutcome, AppendRequest, Claimed, SessionStore};
use crate::{SessionId, StoreError};
use async_trait::async_trait;
use fedrelay_proto::Envelope;
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::time::Duration;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://…`, or `rediss://…` for TLS (the system's roots, or `tls`).
    pub url: String,
    /// For `rediss://`: a CA to trust instead of the system's roots, and a client certificate
    /// for servers that require one.
    pub tls: RedisTls,
    /// Prefix of every key, so several deployments can share a Redis.
    pub key_prefix: String,
    /// A call that takes longer fails (and the origin retries), instead of stalling a session.
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

impl RedisStoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: RedisTls::default(),
            key_prefix: "fr".into(),
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// TLS material for `rediss://` URLs, in PEM.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CA certificates to trust instead of the system's.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and its key, for servers that require one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// A client for `cfg.url`, with the TLS material of `cfg.tls` for `rediss://`.
pub(crate) fn client(cfg: &RedisStoreConfig) -> Result<redis::Client, StoreError> {
    let tls = &cfg.tls;
    if tls.ca.is_none() && tls.client.is_none() {
        return Ok(redis::Client::open(cfg.url.as_str())?);
    }
    if !cfg.url.starts_with("rediss://") {
        return Err(StoreError::Config(
            "TLS settings for Redis need a rediss:// URL".into(),
        ));
    }
    let certs = redis::TlsCertificates {
        client_tls: tls
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: tls.ca.clone(),
    };
    Ok(redis::Client::build_with_tls(cfg.url.as_str(), certs)?)
}

/// Opens the shared, self-reconnecting connection. It connects lazily: a node starts while
/// Redis is down and turns ready once Redis answers.
pub(crate) fn connect(cfg: &RedisStoreConfig) -> Result<ConnectionManager, StoreError> {
    let client = client(cfg)?;
    let mcfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(cfg.response_timeout))
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_lazy_with_config(client, mcfg)?)
}

/// Sessions in Redis (standalone or Cluster), fenced by owner epochs.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    append: redis::Script,
    claim: redis::Script,
    ack: redis::Script,
}

impl RedisStore {
    pub fn new(cfg: &RedisStoreConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: connect(cfg)?,
            prefix: cfg.key_prefix.clone(),
            append: redis::Script::new(include_str!("lua/append.lua")),
            claim: redis::Script::new(include_str!("lua/claim.lua")),
            ack: redis::Script::new(include_str!("lua/ack.lua")),
        })
    }

    /// The shared connection, for other Redis-backed parts of the node (outbox, metadata log).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The set of sessions that may owe deliveries (see [`SessionStore::mark_active`]).
    fn active_key(&self) -> String {
        format!("{}:active", self.prefix)
    }

    fn keys(&self, id: SessionId) -> [String; 3] {
        let base = format!("{}:s:{{{}}}", self.prefix, id.to_hex());
        [
            format!("{base}:m"),
            format!("{base}:j"),
            format!("{base}:i"),
        ]
    }
}

/// Maps a script's `{'fenced', current}` / `{'step', last}` answer to an error.
fn script_error(reply: &[String], ours: u64, expected: u64) -> StoreError {
    let num = |i: usize| {
        reply
            .get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    match reply.first().map(String::as_str) {
        Some("fenced") => StoreError::Fenced {
            ours,
            current: num(1),
        },
        Some("step") => StoreError::OutOfStep {
            expected,
            found: num(1),
        },
        _ => StoreError::Corrupt("unexpected script reply".into()),
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn claim(&self, id: SessionId) -> Result<Claimed, StoreError> {
        let [meta, journal, _] = self.keys(id);
        let (epoch, fields, payloads): (u64, Vec<String>, Vec<Vec<u8>>) = self
            .claim
            .key(meta)
            .key(journal)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let mut last_seq = 0;
        let mut cursors = HashMap::new();
        for pair in fields.chunks_exact(2) {
            let parse = || {
                pair[1]
                    .parse::<u64>()
                    .map_err(|_| StoreError::Corrupt("non-numeric session meta".into()))
            };
            if pair[0] == "seq" {
                last_seq = parse()?;
            } else if let Some(k) = pair[0].strip_prefix("c:") {
                cursors.insert(k.to_string(), parse()?);
            }
        }
        let journal = payloads
            .iter()
            .map(|p| Envelope::decode(p.as_slice()).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Claimed {
            epoch,
            last_seq,
            cursors,
            journal,
        })
    }

    async fn append(
        &self,
        id: SessionId,
        epoch: u64,
        req: AppendRequest<'_>,
    ) -> Result<AppendOutcome, StoreError> {
        let [meta, journal, map] = self.keys(id);
        let (nfield, rfield, native) = match req.origin {
            Some((platform, native)) => (
                super::native_field(platform, native),
                super::relay_field(req.relay_msg_id, platform),
                native,
            ),
            None => (String::new(), String::new(), ""),
        };
        let reply: Vec<String> = self
            .append
            .key(meta)
            .key(journal)
            .key(map)
            .arg(epoch)
            .arg(req.seq)
            .arg(req.relay_msg_id)
            .arg(req.payload)
            .arg(nfield)
            .arg(rfield)
            .arg(native)
            .arg(super::sender_field(req.relay_msg_id))
            .arg(req.sender)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(AppendOutcome::Appended),
            Some("dup") => {
                let v = reply
                    .get(1)
                    .ok_or_else(|| StoreError::Corrupt("dup without id".into()))?;
                let (seq, relay_msg_id) = super::parse_seq_relay(v)?;
                Ok(AppendOutcome::Duplicate { relay_msg_id, seq })
            }
            _ => Err(script_error(&reply, epoch, req.seq)),
        }
    }

    async fn ack(&self, id: SessionId, epoch: u64, update: &AckUpdate) -> Result<(), StoreError> {
        let [meta, journal, map] = self.keys(id);
        let mut inv = self.ack.prepare_invoke();
        inv.key(meta)
            .key(journal)
            .key(map)
            .arg(epoch)
            .arg(update.trim_through)
            .arg(update.cursors.len());
        for (k, seq) in &update.cursors {
            inv.arg(k).arg(*seq);
        }
        for n in &update.natives {
            inv.arg(super::native_field(&n.platform, &n.native_id))
                .arg(format!("{}:{}", n.seq, n.relay_msg_id))
                .arg(super::relay_field(&n.relay_msg_id, &n.platform))
                .arg(&n.native_id);
        }
        let reply: Vec<String> = inv.invoke_async(&mut self.conn.clone()).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(script_error(&reply, epoch, 0)),
        }
    }

    async fn resolve_native(
        &self,
        id: SessionId,
        platform: &str,
        native_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let [_, _, map] = self.keys(id);
        let v: Option<String> = redis::cmd("HGET")
            .arg(map)
            .arg(super::native_field(platform, native_id))
            .query_async(&mut self.conn.clone())
            .await?;
        v.map(|v| super::parse_seq_relay(&v).map(|(_, r)| r))
            .transpose()
    }

    async fn native_for(
        &self,
        id: SessionId,
        relay_msg_id: &str,
        platform: &str,
    ) -> Result<Option<String>, StoreError> {
        let [_, _, map] = self.keys(id);
        Ok(redis::cmd("HGET")
            .arg(map)
            .arg(super::relay_field(relay_msg_id, platform))
            .query_async(&mut self.conn.clone())
            .await?)
    }

    async fn sender_of(
        &self,
        id: SessionId,
        relay_msg_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let [_, _, map] = self.keys(id);
        Ok(redis::cmd("HGET")
            .arg(map)
            .arg(super::sender_field(relay_msg_id))
            .query_async(&mut self.conn.clone())
            .await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn mark_active(&self, id: SessionId) -> Result<(), StoreError> {
        let _: u64 = redis::cmd("SADD")
            .arg(self.active_key())
            .arg(id.to_hex())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn mark_idle(&self, id: SessionId) -> Result<(), StoreError> {
        let _: u64 = redis::cmd("SREM")
            .arg(self.active_key())
            .arg(id.to_hex())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn active_sessions(&self) -> Result<Vec<SessionId>, StoreError> {
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(self.active_key())
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn.clone())
                .await?;
            out.extend(ids.iter().filter_map(|h| SessionId::from_hex(h)));
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}
