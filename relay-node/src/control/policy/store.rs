//! Where the policy document and the audit trail live: etcd (under the cluster's prefix) or
//! memory (`--dev`, single nodes without etcd).
//!
//! etcd keys, under `/fedrelay/<cluster>/`:
//! - `policy`: the document as JSON; its mod revision is the policy's version;
//! - `audit/<ms, 16 digits>-<random>`: one JSON [`AuditEntry`] per change, written in the same
//!   transaction as the change it records.
//!
//! A write names the version it was based on and fails if another write came first, so two
//! administrators never overwrite each other unseen. Every node watches `policy` and applies
//! each new version; a version that fails validation (written around the API, say) is not
//! applied and the node keeps its last good policy, as it does while etcd is unreachable.

use super::Policy;
use super::model::{Change, PolicyDoc};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tracing::{info, warn};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the policy changed since version {expected} (now {current}); reload and retry")]
    Conflict { expected: u64, current: u64 },
    #[error("policy store unavailable: {0}")]
    Unavailable(String),
    #[error("stored policy is unreadable: {0}")]
    Corrupt(String),
}

/// One administrative change: who, when, what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// The authenticated principal (token name, OIDC subject), or `config` for the seed.
    pub who: String,
    /// `policy.update`, `policy.import`, `policy.seed`, `token.create`, `user.forget`, ...
    pub action: String,
    /// What changed; for a policy, one entry per domain, group, rule or control.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Free text of the action (never message content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The policy version the change produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// An API token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// Who or what it is for.
    pub name: String,
    /// `admin`, `auditor` or `domain-admin`.
    pub role: String,
    /// A `domain-admin`'s internal domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    pub created_at_ms: i64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
    /// Hex SHA-256 of the token's secret part.
    pub secret_sha256: String,
}

#[async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    /// The stored document and its version; `None` before the first write.
    async fn load(&self) -> Result<Option<(PolicyDoc, u64)>, StoreError>;

    /// Stores `doc` if the stored version is still `expected` (`0`: nothing stored yet;
    /// `None`: whatever is stored), recording `audit` with it. The new version.
    async fn save(
        &self,
        doc: &PolicyDoc,
        expected: Option<u64>,
        audit: AuditEntry,
    ) -> Result<u64, StoreError>;

    /// Records an administrative action that is not a policy change.
    async fn audit(&self, entry: AuditEntry) -> Result<(), StoreError>;

    /// Audit entries from `since_ms` on, oldest first, at most `limit`.
    async fn audit_log(&self, since_ms: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Stores (creates or replaces) an API token's record.
    async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// An API token's record by id.
    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Every API token's record, oldest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Keeps `policy` on the stored version until the node stops.
    fn follow(self: Arc<Self>, policy: Arc<Policy>) -> tokio::task::JoinHandle<()>;
}

/// `--dev` and etcd-less single nodes: the policy and its audit trail in memory.
#[derive(Default)]
pub struct MemoryPolicyStore {
    inner: Mutex<MemoryInner>,
    policy: Mutex<Option<Arc<Policy>>>,
}

#[derive(Default)]
struct MemoryInner {
    doc: Option<(PolicyDoc, u64)>,
    audit: Vec<AuditEntry>,
    tokens: Vec<TokenRecord>,
}

#[async_trait]
impl PolicyStore for MemoryPolicyStore {
    async fn load(&self) -> Result<Option<(PolicyDoc, u64)>, StoreError> {
        Ok(self.lock().doc.clone())
    }

    async fn save(
        &self,
        doc: &PolicyDoc,
        expected: Option<u64>,
        mut audit: AuditEntry,
    ) -> Result<u64, StoreError> {
        let version = {
            let mut g = self.lock();
            let current = g.doc.as_ref().map_or(0, |(_, v)| *v);
            if let Some(e) = expected
                && e != current
            {
                return Err(StoreError::Conflict {
                    expected: e,
                    current,
                });
            }
            let version = current + 1;
            g.doc = Some((doc.clone(), version));
            audit.version = Some(version);
            g.audit.push(audit);
            version
        };
        if let Some(p) = self.policy.lock().ok().and_then(|p| p.clone()) {
            p.apply(doc.clone(), version);
        }
        Ok(version)
    }

    async fn audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.lock().audit.push(entry);
        Ok(())
    }

    async fn audit_log(&self, since_ms: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(self
            .lock()
            .audit
            .iter()
            .filter(|a| a.at_ms >= since_ms)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let mut g = self.lock();
        match g.tokens.iter_mut().find(|t| t.id == token.id) {
            Some(t) => *t = token.clone(),
            None => g.tokens.push(token.clone()),
        }
        Ok(())
    }

    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.iter().find(|t| t.id == id).cloned())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.clone())
    }

    fn follow(self: Arc<Self>, policy: Arc<Policy>) -> tokio::task::JoinHandle<()> {
        if let Ok(mut p) = self.policy.lock() {
            *p = Some(policy);
        }
        tokio::spawn(async {})
    }
}

impl MemoryPolicyStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The policy in etcd.
pub struct EtcdPolicyStore {
    endpoints: Vec<String>,
    tls: Option<TlsOptions>,
    /// `/fedrelay/<cluster>/`
    prefix: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EtcdPolicyStore {
    pub fn new(endpoints: Vec<String>, prefix: &str, tls: Option<TlsOptions>) -> Self {
        let prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        Self {
            endpoints,
            tls,
            prefix,
            client: tokio::sync::Mutex::new(None),
        }
    }

    fn policy_key(&self) -> String {
        format!("{}policy", self.prefix)
    }

    fn audit_prefix(&self) -> String {
        format!("{}audit/", self.prefix)
    }

    fn audit_key(&self, at_ms: i64) -> String {
        format!(
            "{}{:016}-{:08x}",
            self.audit_prefix(),
            at_ms.max(0),
            rand::random::<u32>()
        )
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.clone());
        }
        Client::connect(&self.endpoints, Some(opts))
            .await
            .map_err(unavailable)
    }

    /// A connected client (shared; reconnects after a failure).
    async fn client(&self) -> Result<Client, StoreError> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect().await?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let c = self.client().await?;
        let r = f(c).await;
        if matches!(r, Err(StoreError::Unavailable(_))) {
            self.forget_client().await;
        }
        r
    }
}

fn parse_doc(bytes: &[u8]) -> Result<PolicyDoc, StoreError> {
    let doc: PolicyDoc =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    doc.validate()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(doc)
}

#[async_trait]
impl PolicyStore for EtcdPolicyStore {
    async fn load(&self) -> Result<Option<(PolicyDoc, u64)>, StoreError> {
        let key = self.policy_key();
        self.with_client(|mut c| async move {
            let r = c.get(key, None).await.map_err(unavailable)?;
            match r.kvs().first() {
                None => Ok(None),
                Some(kv) => Ok(Some((parse_doc(kv.value())?, kv.mod_revision() as u64))),
            }
        })
        .await
    }

    async fn save(
        &self,
        doc: &PolicyDoc,
        expected: Option<u64>,
        audit: AuditEntry,
    ) -> Result<u64, StoreError> {
        let key = self.policy_key();
        let audit_key = self.audit_key(audit.at_ms);
        let value = serde_json::to_vec(doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_client(|mut c| async move {
            let compare = match expected {
                None => Vec::new(),
                Some(v) => vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    v as i64,
                )],
            };
            // The audit entry's version is the transaction's revision, which is the policy's
            // new mod revision; it is filled in below for the caller's copy and written as
            // null-free JSON without it (the key's order gives the sequence).
            let audit_value =
                serde_json::to_vec(&audit).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let txn = Txn::new().when(compare).and_then(vec![
                TxnOp::put(key.clone(), value, None),
                TxnOp::put(audit_key, audit_value, None),
            ]);
            let r = c.txn(txn).await.map_err(unavailable)?;
            if !r.succeeded() {
                let current = c
                    .get(key, None)
                    .await
                    .map_err(unavailable)?
                    .kvs()
                    .first()
                    .map_or(0, |kv| kv.mod_revision() as u64);
                return Err(StoreError::Conflict {
                    expected: expected.unwrap_or(0),
                    current,
                });
            }
            Ok(r.header().map_or(0, |h| h.revision() as u64))
        })
        .await
    }

    async fn audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let key = self.audit_key(entry.at_ms);
        let value = serde_json::to_vec(&entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_client(|mut c| async move {
            c.put(key, value, None).await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn audit_log(&self, since_ms: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let from = format!("{}{:016}", self.audit_prefix(), since_ms.max(0));
        let end = format!("{}~", self.audit_prefix());
        self.with_client(|mut c| async move {
            let r = c
                .get(
                    from,
                    Some(
                        GetOptions::new()
                            .with_range(end)
                            .with_limit(limit as i64)
                            .with_sort(SortTarget::Key, SortOrder::Ascend),
                    ),
                )
                .await
                .map_err(unavailable)?;
            r.kvs()
                .iter()
                .map(|kv| {
                    let mut e: AuditEntry = serde_json::from_slice(kv.value())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    if e.version.is_none() && !e.changes.is_empty() {
                        e.version = Some(kv.mod_revision() as u64);
                    }
                    Ok(e)
                })
                .collect()
        })
        .await
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let key = format!("{}tokens/{}", self.prefix, token.id);
        let value = serde_json::to_vec(token).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_client(|mut c| async move {
            c.put(key, value, None).await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let key = format!("{}tokens/{id}", self.prefix);
        self.with_client(|mut c| async move {
            let r = c.get(key, None).await.map_err(unavailable)?;
            r.kvs()
                .first()
                .map(|kv| {
                    serde_json::from_slice(kv.value())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .transpose()
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let key = format!("{}tokens/", self.prefix);
        self.with_client(|mut c| async move {
            let r = c
                .get(key, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(unavailable)?;
            let mut out: Vec<TokenRecord> = r
                .kvs()
                .iter()
                .map(|kv| {
                    serde_json::from_slice(kv.value())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .collect::<Result<_, _>>()?;
            out.sort_by_key(|t| t.created_at_ms);
            Ok(out)
        })
        .await
    }

    fn follow(self: Arc<Self>, policy: Arc<Policy>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match self.watch_once(&policy).await {
                    Ok(()) => delay = Duration::from_millis(100),
                    Err(e) => {
                        metrics::counter!("fedrelay_policy_watch_errors_total").increment(1);
                        warn!(error = %e, "policy watch lost; the last good policy stays in force");
                        self.forget_client().await;
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }
}

impl EtcdPolicyStore {
    /// Reads the current version, applies it, then applies every later one until the watch
    /// ends.
    async fn watch_once(&self, policy: &Policy) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let key = self.policy_key();
        let r = c.get(key.clone(), None).await.map_err(unavailable)?;
        let start = r.header().map_or(0, |h| h.revision()) + 1;
        if let Some(kv) = r.kvs().first() {
            apply(policy, kv.value(), kv.mod_revision() as u64);
        }
        let mut stream = c
            .watch(key, Some(WatchOptions::new().with_start_revision(start)))
            .await
            .map_err(unavailable)?;
        while let Some(resp) = stream.message().await.map_err(unavailable)? {
            if resp.canceled() {
                return Err(StoreError::Unavailable("watch cancelled".into()));
            }
            for ev in resp.events() {
                if ev.event_type() == EventType::Put
                    && let Some(kv) = ev.kv()
                {
                    apply(policy, kv.value(), kv.mod_revision() as u64);
                }
            }
        }
        Err(StoreError::Unavailable("watch stream ended".into()))
    }
}

fn apply(policy: &Policy, bytes: &[u8], version: u64) {
    if version <= policy.current().version() && version != 0 {
        return;
    }
    match parse_doc(bytes) {
        Ok(doc) => {
            if policy.apply(doc, version) {
                info!(version, "policy applied");
            }
        }
        Err(e) => {
            metrics::counter!("fedrelay_policy_rejected_total").increment(1);
            warn!(version, error = %e, "stored policy is invalid; keeping the last good one");
        }
    }
}
