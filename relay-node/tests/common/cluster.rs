//! The multi-process cluster of the cluster tests (`tests/cluster.rs`) and the cluster bench
//! (`benches/cluster.rs`): one real Redis, one real etcd and `relay-node` processes on
//! loopback, the nodes' `GET /cluster` views, the owners the cluster's rendezvous hash gives
//! sessions, the messages of numbered sender/recipient pairs, and the end of b.example's
//! outbox.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use session_actor::SessionId;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use test_support::{EtcdServer, RedisServer, RelayNode};

/// The `cluster` crate's shard map. Test binaries that `use common::*` see this module as
/// `cluster`, in place of the crate: through these, their `cluster::ShardMap` and
/// `cluster::Member` still name the crate's types.
pub use ::cluster::{Member, ShardMap};

/// Webhook URL of domain c.example, which the cluster tests and the bench never send to.
pub const UNUSED_WEBHOOK: &str = "http://127.0.0.1:9/hook";

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Node `i` is `n{i+1}`.
pub fn node_id(i: usize) -> String {
    format!("n{}", i + 1)
}

/// Polls `probe` until it yields a value, or fails after `timeout` naming `what` and the
/// description `probe` gave of what it saw last.
pub async fn wait_seen<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = (Option<T>, String)>,
{
    let last = Mutex::new(String::new());
    let r = test_support::wait_for(what, timeout, || async {
        let (got, seen) = probe().await;
        *lock(&last) = seen;
        got
    })
    .await;
    r.with_context(|| format!("last seen: {}", lock(&last)))
}

// === node configs ================================================================

/// The `[cluster]` section of an etcd-membership node of cluster `name`, gRPC on
/// `{GRPC_PORT}`.
pub fn etcd_section(name: &str, etcd: &str, lease_ttl_secs: u64) -> String {
    format!(
        "[cluster]\nmembership = \"etcd\"\nname = \"{name}\"\netcd_endpoints = [\"{etcd}\"]\n\
         lease_ttl_secs = {lease_ttl_secs}\ngrpc_listen = \"127.0.0.1:{{GRPC_PORT}}\"\n"
    )
}

/// The HTTP-edge test config (domains a–d, see [`super::config`]) with `extra`, as node `i`,
/// with each `(from, to)` of `edits` replaced; fails when the test config no longer has one
/// of them.
pub fn node_config(
    redis_url: &str,
    extra: &str,
    i: usize,
    edits: &[(&str, &str)],
) -> Result<String> {
    let mut cfg = super::config(redis_url, UNUSED_WEBHOOK, extra);
    let id_line = format!("node_id = \"{}\"\n", node_id(i));
    let node_id_edit = ("node_id = \"test-1\"\n", id_line.as_str());
    for &(from, to) in std::iter::once(&node_id_edit).chain(edits) {
        ensure!(
            cfg.contains(from),
            "the test config (tests/common) no longer has {from:?}"
        );
        cfg = cfg.replace(from, to);
    }
    Ok(cfg)
}

/// The config of node `i` from Redis's URL, etcd's endpoint and the cluster's name.
pub type NodeConfig = Box<dyn Fn(&str, &str, &str, usize) -> Result<String> + Send + Sync>;

// === views =======================================================================

/// One member's entry in `GET /cluster`.
#[derive(Debug, Clone)]
pub struct MemberView {
    pub node_id: String,
    pub sessions_active: u64,
}

/// A node's `GET /cluster`, the parts used here.
#[derive(Debug, Clone)]
pub struct View {
    pub node_id: String,
    pub revision: i64,
    pub ready: bool,
    pub members: Vec<MemberView>,
    pub handoffs_in_flight: Option<u64>,
}

impl View {
    pub fn parse(v: &Value) -> Result<Self> {
        let members = v["members"]
            .as_array()
            .context("no members")?
            .iter()
            .map(|m| {
                Ok(MemberView {
                    node_id: m["node_id"].as_str().context("member node_id")?.to_string(),
                    sessions_active: m["sessions_active"].as_u64().unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            node_id: v["node_id"].as_str().context("node_id")?.to_string(),
            revision: v["revision"].as_i64().context("revision")?,
            ready: v["ready"].as_bool().unwrap_or(false),
            members,
            handoffs_in_flight: v["handoffs_in_flight"].as_u64(),
        })
    }

    /// The members' node ids, sorted.
    pub fn member_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.members.iter().map(|m| m.node_id.clone()).collect();
        ids.sort();
        ids
    }

    /// `sessions_active` of the node itself.
    pub fn own_sessions(&self) -> Option<u64> {
        self.members
            .iter()
            .find(|m| m.node_id == self.node_id)
            .map(|m| m.sessions_active)
    }
}

/// `GET /cluster` of the node whose admin listener is `admin_url`.
pub async fn view_at(http: &reqwest::Client, admin_url: &str) -> Result<View> {
    let url = format!("{admin_url}/cluster");
    let v: Value = http
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    View::parse(&v).with_context(|| format!("GET {url}: {v}"))
}

// === the cluster =================================================================

fn start_node(cfg: &str, env: &[(String, String)]) -> Result<RelayNode> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    RelayNode::start_with_env(cfg, &env)
}

/// Redis, etcd and the relay nodes of one test or scenario. Node `i` is `n{i+1}`; a killed
/// node keeps its slot (and its log).
pub struct Cluster {
    pub name: String,
    pub redis: RedisServer,
    pub etcd: EtcdServer,
    pub nodes: Vec<RelayNode>,
    pub http: reqwest::Client,
    config: NodeConfig,
    /// `FEDRELAY_*` overrides every node starts with.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts Redis, etcd and `n` nodes configured by `config` (with `env`), and waits up to
    /// `timeout` until every node sees all of them.
    pub async fn start(
        name: &str,
        n: usize,
        config: NodeConfig,
        env: Vec<(String, String)>,
        timeout: Duration,
    ) -> Result<Self> {
        let redis = RedisServer::start()?;
        let etcd = EtcdServer::start()?;
        let mut starts = Vec::new();
        for i in 0..n {
            let cfg = config(&redis.url(), &etcd.endpoint(), name, i)?;
            let env = env.clone();
            starts.push(tokio::task::spawn_blocking(move || start_node(&cfg, &env)));
        }
        let mut nodes = Vec::new();
        for (i, s) in starts.into_iter().enumerate() {
            nodes.push(
                s.await?
                    .with_context(|| format!("starting {}", node_id(i)))?,
            );
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cluster = Self {
            name: name.to_string(),
            redis,
            etcd,
            nodes,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            config,
            env,
        };
        let all: Vec<usize> = (0..n).collect();
        let r = cluster.wait_converged(&all, timeout).await;
        cluster.explain(r)?;
        Ok(cluster)
    }

    /// Starts one more node and returns its index (it is not waited for beyond `/readyz`).
    pub async fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let cfg = (self.config)(&self.redis.url(), &self.etcd.endpoint(), &self.name, i)?;
        let env = self.env.clone();
        let node = tokio::task::spawn_blocking(move || start_node(&cfg, &env)).await??;
        self.nodes.push(node);
        Ok(i)
    }

    pub fn node(&self, i: usize) -> Result<&RelayNode> {
        self.nodes.get(i).with_context(|| format!("no node {i}"))
    }

    pub fn node_mut(&mut self, i: usize) -> Result<&mut RelayNode> {
        self.nodes
            .get_mut(i)
            .with_context(|| format!("no node {i}"))
    }

    /// The base URL of node `i`'s HTTP edge.
    pub fn url(&self, i: usize) -> Result<String> {
        Ok(self.node(i)?.http_url())
    }

    pub async fn view(&self, i: usize) -> Result<View> {
        view_at(&self.http, &self.node(i)?.admin_url()).await
    }

    pub async fn views(&self, nodes: &[usize]) -> Result<Vec<View>> {
        let mut out = Vec::new();
        for &i in nodes {
            out.push(self.view(i).await?);
        }
        Ok(out)
    }

    /// Waits until each of `nodes` is ready and sees exactly `nodes` as members, all at the
    /// same membership revision; returns their views.
    pub async fn wait_converged(&self, nodes: &[usize], timeout: Duration) -> Result<Vec<View>> {
        let mut want: Vec<String> = nodes.iter().map(|&i| node_id(i)).collect();
        want.sort();
        let what = format!("{want:?} to agree on the membership");
        wait_seen(&what, timeout, || async {
            match self.views(nodes).await {
                Ok(views) => {
                    let seen = views
                        .iter()
                        .map(|v| {
                            format!(
                                "{}: revision {}, ready {}, members {:?}",
                                v.node_id,
                                v.revision,
                                v.ready,
                                v.member_ids()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    let agree = views.iter().all(|v| {
                        v.ready && v.member_ids() == want && v.revision == views[0].revision
                    });
                    (agree.then_some(views), seen)
                }
                Err(e) => (None, format!("{e:#}")),
            }
        })
        .await
    }

    /// Waits until each of `nodes` says it hosts as many sessions as `want` gives it
    /// (`sessions_active` of itself); returns their views.
    pub async fn wait_hosting(
        &self,
        nodes: &[usize],
        want: &[Option<u64>],
        timeout: Duration,
    ) -> Result<Vec<View>> {
        let r = wait_seen("every node to host its sessions", timeout, || async {
            match self.views(nodes).await {
                Ok(views) => {
                    let counts: Vec<Option<u64>> = views.iter().map(View::own_sessions).collect();
                    let seen = format!("{counts:?}");
                    ((counts == want).then_some(views), seen)
                }
                Err(e) => (None, format!("{e:#}")),
            }
        })
        .await;
        r.with_context(|| format!("sessions_active per node: want {want:?}"))
    }

    /// Pids of the running relay nodes.
    pub fn relay_pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(RelayNode::pid).collect()
    }

    /// The sum of a counter over the running nodes' `/metrics`.
    pub async fn metric_sum(&self, name: &str) -> Result<f64> {
        let mut sum = 0.0;
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            let text = self
                .http
                .get(format!("{}/metrics", n.admin_url()))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            for line in text.lines() {
                let Some(rest) = line.strip_prefix(name) else {
                    continue;
                };
                if rest.starts_with(' ') || rest.starts_with('{') {
                    sum += rest
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0);
                }
            }
        }
        Ok(sum)
    }

    /// The last lines each node logged above INFO (and anything not JSON, like a panic).
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let text = n.output().unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains(r#""level":"INFO""#) && !l.contains(r#""level":"DEBUG""#))
                .collect();
            out.push_str(&format!("--- {} ---\n", node_id(i)));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// `r`, with the nodes' warnings attached when it is an error.
    pub fn explain<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.context(format!("node logs:\n{}", self.log_tails())))
    }
}

/// The owning node (an index of `nodes`' members) of each of `sessions`, by the cluster's
/// own rendezvous hash over the members `nodes`.
pub fn owners_by_hash(nodes: &[usize], sessions: &[SessionId]) -> Result<Vec<usize>> {
    let map = ShardMap::new(
        0,
        nodes
            .iter()
            .map(|&i| Member::new(node_id(i), String::new()))
            .collect(),
    );
    sessions
        .iter()
        .map(|id| {
            let owner = map.owner(id).context("an empty shard map")?;
            nodes
                .iter()
                .copied()
                .find(|&i| node_id(i) == owner.node_id)
                .context("the owner is no node")
        })
        .collect()
}

// === messages of numbered pairs ==================================================

/// Message `idx` of pair `p` in run `run`: alice-p@a.example → bob-p@b.example, event id
/// `<run>-p<p>-m<idx>`, text `<run> p<p> m<idx>`.
pub fn pair_message(run: &str, p: usize, idx: u64) -> Value {
    super::message(
        &format!("{run}-p{p}-m{idx}"),
        &format!("alice-{p}"),
        &format!("bob-{p}@b.example"),
        &format!("{run} p{p} m{idx}"),
    )
}

/// [`pair_message`] as a request body.
pub fn message_body(run: &str, p: usize, idx: u64) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&pair_message(run, p, idx))?)
}

/// `"<run> p<p> m<idx>"` → `(p, idx)`.
pub fn parse_text(run: &str, text: &str) -> Option<(usize, u64)> {
    let rest = text.strip_prefix(run)?.strip_prefix(" p")?;
    let (p, m) = rest.split_once(" m")?;
    Some((p.parse().ok()?, m.parse().ok()?))
}

// === the outbox ==================================================================

/// A stream entry id `<ms>-<n>` as a comparable pair.
pub fn stream_id(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The id of the newest entry of a domain's outbox (`fr:o:{<domain>}`), read from Redis.
pub async fn outbox_end(redis_url: &str, domain: &str) -> Result<Option<(u64, u64)>> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let last: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(format!("fr:o:{{{domain}}}"))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .context("xrevrange")?;
    Ok(last.first().and_then(|(id, _)| stream_id(id)))
}

/// Per session, how many of its seqs `1..=max` are missing from `seqs` (nothing but these
/// was ever journaled on a fresh Redis): `(session, missing, max)` for each with a gap.
pub fn seq_gaps<'a, S: AsRef<str> + 'a>(
    seqs: impl IntoIterator<Item = (&'a S, &'a std::collections::HashSet<u64>)>,
) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (session, s) in seqs {
        let max = s.iter().copied().max().unwrap_or(0);
        let gaps = max.saturating_sub(s.len() as u64);
        if gaps > 0 {
            out.push((session.as_ref().to_string(), gaps, max));
        }
    }
    out
}

/// The first few breaches of a delivery contract, for its report.
#[derive(Debug, Default)]
pub struct Examples(pub Vec<String>);

impl Examples {
    pub fn add(&mut self, s: String) {
        if self.0.len() < 10 {
            self.0.push(s);
        }
    }
}
