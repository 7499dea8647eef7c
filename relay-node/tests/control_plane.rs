//! The control plane on real processes: etcd, Redis and three relay nodes, each with its
//! management API. A policy change made through one node's API takes effect on every node; a
//! node that loses etcd keeps enforcing the last policy it had; tokens and roles decide who
//! may read and change what.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::cluster::{Cluster, NodeConfig, etcd_section, node_config};
use common::{SECRET_A, message, post};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const BOOTSTRAP: &str = "bootstrap-token-of-the-control-plane-tests-0123456789";

/// Node `i` of a cluster with the management API on `{API_PORT}` and the bootstrap token in
/// `token_file`.
fn config_with_api(token_file: String, api_extra: String) -> NodeConfig {
    Box::new(move |redis, etcd, name, i| {
        let extra = format!(
            "{}[api]\nlisten = \"127.0.0.1:{{API_PORT}}\"\nbootstrap_token_file = \"{token_file}\"\n{api_extra}",
            etcd_section(name, etcd, 3)
        );
        node_config(redis, &extra, i, &[])
    })
}

struct World {
    cluster: Cluster,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl World {
    async fn start(name: &str, nodes: usize) -> Result<Self> {
        Self::start_with(name, nodes, String::new()).await
    }

    /// With `api_extra` after the `[api]` keys (an `[api.oidc]` table, say).
    async fn start_with(name: &str, nodes: usize, api_extra: String) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("bootstrap-token");
        std::fs::write(&token_file, format!("{BOOTSTRAP}\n"))?;
        let cluster = Cluster::start(
            name,
            nodes,
            config_with_api(token_file.display().to_string(), api_extra),
            Vec::new(),
            Duration::from_secs(20),
        )
        .await?;
        Ok(Self {
            cluster,
            _dir: dir,
            http: common::client()?,
        })
    }

    fn api(&self, i: usize) -> Result<String> {
        Ok(self.cluster.node(i)?.api_url())
    }

    /// A request to node `i`'s API with `token`; the status and the JSON answer.
    async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.api(i)?));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn get(&self, i: usize, path: &str, token: &str) -> Result<(u16, Value)> {
        self.call(i, reqwest::Method::GET, path, Some(token), None)
            .await
    }

    /// alice@a.example → bob@b.example through node `i`'s HTTP edge.
    async fn alice_to_bob(&self, i: usize, id: &str) -> Result<(u16, Value)> {
        post(
            &self.http,
            &self.cluster.url(i)?,
            "a.example",
            SECRET_A,
            &message(
                id,
                "alice",
                "bob@b.example",
                "hello from the control plane test",
            ),
        )
        .await
    }

    async fn policy_version(&self, i: usize) -> Result<u64> {
        let (s, v) = self.get(i, "/api/v1/policy", BOOTSTRAP).await?;
        ensure!(s == 200, "GET /api/v1/policy on node {i}: {s} {v}");
        v["version"].as_u64().context("version")
    }
}

#[tokio::test]
async fn a_rule_changed_through_the_api_refuses_the_next_message_on_every_node_within_a_second()
-> Result<()> {
    let w = World::start("cp-live", 3).await?;
    for i in 0..3 {
        let (s, v) = w.alice_to_bob(i, &format!("before-{i}")).await?;
        ensure!(s == 202, "before the change, node {i} answered {s}: {v}");
    }
    // The policy seeded from the config file: the pairs a–b and a–c, allowed for everything.
    let (s, v) = w.get(1, "/api/v1/policy", BOOTSTRAP).await?;
    ensure!(s == 200, "{s} {v}");
    let seeded = v["version"].as_u64().context("version")?;
    let rules: Vec<&str> = v["policy"]["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    ensure!(rules == ["config-1", "config-2"], "seeded rules: {rules:?}");

    // A deny rule for the pair, written through node 1's API; it beats the allow rule.
    let started = Instant::now();
    let (s, v) = w
        .call(
            1,
            reqwest::Method::PUT,
            "/api/v1/rules/block-b",
            Some(BOOTSTRAP),
            Some(&json!({"between": ["a.example", "b.example"], "action": "deny"})),
        )
        .await?;
    ensure!(s == 200, "PUT rule: {s} {v}");
    let version = v["version"].as_u64().context("version")?;
    ensure!(version > seeded, "version {version} after {seeded}");
    ensure!(
        v["changes"][0]["op"] == "added" && v["changes"][0]["id"] == "block-b",
        "changes: {v}"
    );
    // Every node refuses alice's next message within a second of the change.
    for i in 0..3 {
        let mut n = 0;
        loop {
            n += 1;
            let (s, v) = w.alice_to_bob(i, &format!("after-{i}-{n}")).await?;
            if s == 403 {
                ensure!(
                    v["message"].as_str().unwrap_or("").contains("block-b"),
                    "the refusal names the rule: {v}"
                );
                break;
            }
            ensure!(s == 202, "node {i}: {s} {v}");
            if started.elapsed() > Duration::from_secs(1) {
                bail!("node {i} still accepted alice's message 1 s after the change");
            }
        }
        ensure!(w.policy_version(i).await? == version, "node {i}'s version");
    }
    // a–c is untouched.
    let (s, v) = post(
        &w.http,
        &w.cluster.url(2)?,
        "a.example",
        SECRET_A,
        &message("to-carol", "alice", "carol@c.example", "still allowed"),
    )
    .await?;
    ensure!(s == 202, "a→c after the change: {s} {v}");

    // The audit log says who changed what.
    let (s, v) = w.get(0, "/api/v1/audit", BOOTSTRAP).await?;
    ensure!(s == 200, "{s} {v}");
    let entries = v["entries"].as_array().context("entries")?;
    let actions: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    ensure!(
        actions == ["policy.seed", "rule.put"],
        "audit actions: {actions:?}"
    );
    let put = &entries[1];
    ensure!(put["who"] == "bootstrap", "{put}");
    ensure!(put["version"] == version, "{put}");
    ensure!(put["changes"][0]["id"] == "block-b", "{put}");
    ensure!(put["at_ms"].as_i64().is_some_and(|t| t > 0), "{put}");

    // An invalid change is refused whole, and nothing changes.
    let (s, v) = w
        .call(
            2,
            reqwest::Method::PUT,
            "/api/v1/rules/bad",
            Some(BOOTSTRAP),
            Some(&json!({"between": ["a.example", "nowhere.example"], "action": "allow"})),
        )
        .await?;
    ensure!(s == 422, "an invalid rule: {s} {v}");
    ensure!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("nowhere.example"),
        "{v}"
    );
    ensure!(w.policy_version(2).await? == version, "nothing changed");

    // A write based on an old version is refused (no lost update).
    let resp = w
        .http
        .put(format!("{}/api/v1/rules/late", w.api(0)?))
        .bearer_auth(BOOTSTRAP)
        .header("if-match", format!("\"{seeded}\""))
        .json(&json!({"between": ["a.example", "c.example"], "action": "deny"}))
        .send()
        .await?;
    ensure!(
        resp.status().as_u16() == 412,
        "stale If-Match: {}",
        resp.status()
    );
    ensure!(w.policy_version(0).await? == version, "nothing changed");
    Ok(())
}

#[tokio::test]
async fn without_etcd_the_last_policy_is_enforced_reads_are_served_and_writes_fail() -> Result<()> {
    let mut w = World::start("cp-etcd-down", 3).await?;
    let (s, v) = w
        .call(
            0,
            reqwest::Method::PUT,
            "/api/v1/rules/block-b",
            Some(BOOTSTRAP),
            Some(&json!({"between": ["a.example", "b.example"], "action": "deny"})),
        )
        .await?;
    ensure!(s == 200, "{s} {v}");
    let version = v["version"].as_u64().context("version")?;
    for i in 0..3 {
        test_support::wait_for(
            "every node on the new version",
            Duration::from_secs(5),
            || {
                let w = &w;
                async move { (w.policy_version(i).await.ok()? == version).then_some(()) }
            },
        )
        .await?;
    }
    w.cluster.etcd.stop()?;
    for i in 0..3 {
        // Enforced: alice's message to bob is refused by the rule.
        let (s, v) = w.alice_to_bob(i, &format!("etcd-down-{i}")).await?;
        ensure!(s == 403, "node {i} without etcd: {s} {v}");
        ensure!(
            v["message"].as_str().unwrap_or("").contains("block-b"),
            "{v}"
        );
        // Reads are served from the node's own copy.
        let (s, v) = w.get(i, "/api/v1/policy", BOOTSTRAP).await?;
        ensure!(
            s == 200 && v["version"] == version,
            "read on node {i}: {s} {v}"
        );
        let (s, v) = w
            .get(
                i,
                "/api/v1/explain?from=alice@a.example&to=bob@b.example",
                BOOTSTRAP,
            )
            .await?;
        ensure!(
            s == 200 && v["allowed"] == false && v["decided_by"]["id"] == "block-b",
            "explain on node {i}: {s} {v}"
        );
        // Writes fail with a clear error.
        let (s, v) = w
            .call(
                i,
                reqwest::Method::DELETE,
                "/api/v1/rules/block-b",
                Some(BOOTSTRAP),
                None,
            )
            .await?;
        ensure!(s == 503, "a write on node {i} without etcd: {s} {v}");
        ensure!(
            v["message"]
                .as_str()
                .unwrap_or("")
                .contains("policy store unavailable"),
            "{v}"
        );
    }
    // etcd back: writes work again and reach every node.
    w.cluster.etcd.start_again()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let version = loop {
        let (s, v) = w
            .call(
                1,
                reqwest::Method::DELETE,
                "/api/v1/rules/block-b",
                Some(BOOTSTRAP),
                None,
            )
            .await?;
        if s == 200 {
            break v["version"].as_u64().context("version")?;
        }
        ensure!(s == 503, "{s} {v}");
        ensure!(
            Instant::now() < deadline,
            "etcd back, writes still fail: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in 0..3 {
        test_support::wait_for(
            "every node on the version after etcd came back",
            Duration::from_secs(10),
            || {
                let w = &w;
                async move { (w.policy_version(i).await.ok()? >= version).then_some(()) }
            },
        )
        .await?;
    }
    Ok(())
}

fn contact_request(id: &str, from: &str, to: &str) -> Value {
    json!({"id": id, "type": "contact_request", "from": from, "to": to})
}

#[tokio::test]
async fn an_approval_domain_holds_a_contact_request_until_an_administrator_approves_it()
-> Result<()> {
    use common::{SECRET_B, Stream};
    let w = World::start("cp-approval", 3).await?;
    let (s, v) = w
        .call(
            0,
            reqwest::Method::PUT,
            "/api/v1/domains/b.example",
            Some(BOOTSTRAP),
            Some(&json!({"name": "b.example", "platform": "http", "side": "internal", "approval": true})),
        )
        .await?;
    ensure!(s == 200, "{s} {v}");
    let version = v["version"].as_u64().context("version")?;
    for i in 0..3 {
        test_support::wait_for(
            "the approval setting on every node",
            Duration::from_secs(5),
            || {
                let w = &w;
                async move { (w.policy_version(i).await.ok()? >= version).then_some(()) }
            },
        )
        .await?;
    }
    let mut bob = Stream::open(&w.http, &w.cluster.url(2)?, "b.example", SECRET_B, None).await?;
    let mut alice = Stream::open(&w.http, &w.cluster.url(0)?, "a.example", SECRET_A, None).await?;

    // Alice asks bob; she is told the request waits.
    let (s, v) = post(
        &w.http,
        &w.cluster.url(1)?,
        "a.example",
        SECRET_A,
        &contact_request("ask-bob", "alice", "bob@b.example"),
    )
    .await?;
    ensure!(s == 202 && v["status"] == "pending_approval", "{s} {v}");
    let held = v["approval_id"]
        .as_str()
        .context("approval_id")?
        .to_string();
    // Sent again by a retrying origin: held once, under the same id.
    let (s, v) = post(
        &w.http,
        &w.cluster.url(0)?,
        "a.example",
        SECRET_A,
        &contact_request("ask-bob", "alice", "bob@b.example"),
    )
    .await?;
    ensure!(s == 202 && v["approval_id"] == held.as_str(), "{s} {v}");
    // A message sent after the request reaches bob first: the request is held.
    let (s, v) = post(
        &w.http,
        &w.cluster.url(0)?,
        "a.example",
        SECRET_A,
        &message(
            "after-ask",
            "alice",
            "bob@b.example",
            "a message after the request",
        ),
    )
    .await?;
    ensure!(s == 202, "{s} {v}");
    let first = bob.next(Duration::from_secs(10)).await?;
    ensure!(
        first.data["type"] == "message",
        "bob's first event: {}",
        first.data
    );

    // Listed for the admin; a token for another domain's admin neither sees nor decides it.
    let (s, v) = w.get(1, "/api/v1/approvals", BOOTSTRAP).await?;
    ensure!(s == 200, "{s} {v}");
    let pending = v["pending"].as_array().context("pending")?;
    ensure!(pending.len() == 1, "{v}");
    ensure!(
        pending[0]["id"] == held.as_str()
            && pending[0]["from"] == "alice@a.example"
            && pending[0]["to"] == "bob@b.example",
        "{v}"
    );
    let (s, v) = w
        .call(
            0,
            reqwest::Method::POST,
            "/api/v1/tokens",
            Some(BOOTSTRAP),
            Some(&json!({"name": "c admin", "role": "domain-admin", "domains": ["c.example"]})),
        )
        .await?;
    ensure!(s == 201, "{s} {v}");
    let c_admin = v["token"].as_str().context("token")?.to_string();
    let (s, v) = w.get(0, "/api/v1/approvals", &c_admin).await?;
    ensure!(s == 200 && v["pending"] == json!([]), "{s} {v}");
    let (s, v) = w
        .call(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/approvals/{held}/approve"),
            Some(&c_admin),
            None,
        )
        .await?;
    ensure!(s == 403, "another domain's admin approving: {s} {v}");

    // Approved through node 2's API: the request goes through to bob.
    let (s, v) = w
        .call(
            2,
            reqwest::Method::POST,
            &format!("/api/v1/approvals/{held}/approve"),
            Some(BOOTSTRAP),
            None,
        )
        .await?;
    ensure!(s == 200 && v["decision"] == "approved", "{s} {v}");
    let ev = bob.next(Duration::from_secs(10)).await?;
    ensure!(
        ev.data["type"] == "contact_request" && ev.data["from"] == "alice@a.example",
        "bob's next event: {}",
        ev.data
    );
    let (s, v) = w
        .call(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/approvals/{held}/approve"),
            Some(BOOTSTRAP),
            None,
        )
        .await?;
    ensure!(s == 404, "approving twice: {s} {v}");

    // Dave's request to bob is declined: dave is told no.
    let (s, v) = post(
        &w.http,
        &w.cluster.url(0)?,
        "a.example",
        SECRET_A,
        &contact_request("dave-asks", "dave", "bob@b.example"),
    )
    .await?;
    ensure!(s == 202 && v["status"] == "pending_approval", "{s} {v}");
    let second = v["approval_id"]
        .as_str()
        .context("approval_id")?
        .to_string();
    let (s, v) = w
        .call(
            1,
            reqwest::Method::POST,
            &format!("/api/v1/approvals/{second}/decline"),
            Some(BOOTSTRAP),
            None,
        )
        .await?;
    ensure!(s == 200 && v["decision"] == "declined", "{s} {v}");
    let ev = alice.next(Duration::from_secs(10)).await?;
    ensure!(
        ev.data["type"] == "contact_response"
            && ev.data["accepted"] == false
            && ev.data["to"] == "dave@a.example"
            && ev.data["from"] == "bob@b.example",
        "dave's answer: {}",
        ev.data
    );
    let (s, v) = w.get(1, "/api/v1/approvals", BOOTSTRAP).await?;
    ensure!(s == 200 && v["pending"] == json!([]), "{s} {v}");
    // Both decisions are audited.
    let (s, v) = w.get(0, "/api/v1/audit", BOOTSTRAP).await?;
    ensure!(s == 200, "{s} {v}");
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    ensure!(
        actions.ends_with(&["approval.approve", "approval.decline"]),
        "{actions:?}"
    );
    Ok(())
}

/// What a caller may do: `admin`, `auditor`, `a-admin` (domain admin of a.example),
/// `d-admin` (domain admin of d.example, another domain).
struct Case {
    method: reqwest::Method,
    path: &'static str,
    body: Option<Value>,
    allowed: &'static [&'static str],
}

fn case(
    method: reqwest::Method,
    path: &'static str,
    body: Option<Value>,
    allowed: &'static [&'static str],
) -> Case {
    Case {
        method,
        path,
        body,
        allowed,
    }
}

/// Everything a refused request must leave alone: the policy, the tokens, the audit log.
async fn state_of(w: &World) -> Result<(Value, Value, usize)> {
    let (_, policy) = w.get(0, "/api/v1/policy", BOOTSTRAP).await?;
    let (_, tokens) = w.get(0, "/api/v1/tokens", BOOTSTRAP).await?;
    let (_, audit) = w.get(0, "/api/v1/audit?limit=1000", BOOTSTRAP).await?;
    let n = audit["entries"].as_array().map_or(0, Vec::len);
    Ok((policy, tokens, n))
}

#[tokio::test]
async fn every_role_reaches_exactly_its_endpoints_and_refusals_change_nothing() -> Result<()> {
    use reqwest::Method;
    use test_support::oidc::{OidcClient, OidcProvider, OidcSetup};
    // The enterprise's identity provider: access tokens for the API (and for another API).
    let idp = OidcProvider::start(
        OidcSetup::new()
            .resource("urn:fedrelay:api")
            .resource("urn:other:api")
            .client(OidcClient::new("idp-admin", "secret-1").claim("roles", json!(["admin"])))
            .client(OidcClient::new("idp-auditor", "secret-2").claim("roles", json!("auditor")))
            .client(
                OidcClient::new("idp-a-admin", "secret-3")
                    .claim("roles", json!(["domain-admin"]))
                    .claim("domains", json!(["a.example"])),
            )
            .client(OidcClient::new("idp-nobody", "secret-4"))
            .client(
                OidcClient::new("idp-brief", "secret-5")
                    .claim("roles", json!(["admin"]))
                    .ttl(4),
            ),
    )?;
    let w = World::start_with(
        "cp-roles",
        1,
        format!(
            "[api.oidc]\nissuer = \"{}\"\naudience = \"urn:fedrelay:api\"\nclock_skew_secs = 0\n",
            idp.issuer()
        ),
    )
    .await?;
    let mut tokens = std::collections::BTreeMap::new();
    for (name, client, secret) in [
        ("oidc-admin", "idp-admin", "secret-1"),
        ("oidc-auditor", "idp-auditor", "secret-2"),
        ("oidc-a-admin", "idp-a-admin", "secret-3"),
    ] {
        tokens.insert(name, idp.token(client, secret, "urn:fedrelay:api").await?);
    }
    for (name, role, domains) in [
        ("admin", "admin", json!([])),
        ("auditor", "auditor", json!([])),
        ("a-admin", "domain-admin", json!(["a.example"])),
        ("d-admin", "domain-admin", json!(["d.example"])),
    ] {
        let (s, v) = w
            .call(
                0,
                Method::POST,
                "/api/v1/tokens",
                Some(BOOTSTRAP),
                Some(&json!({"name": name, "role": role, "domains": domains})),
            )
            .await?;
        ensure!(s == 201, "token {name}: {s} {v}");
        ensure!(
            v["token"].as_str().is_some_and(|t| t.starts_with("frt_")),
            "{v}"
        );
        tokens.insert(name, v["token"].as_str().context("token")?.to_string());
    }
    // A token is shown once: the list has no secrets.
    let (_, list) = w.get(0, "/api/v1/tokens", BOOTSTRAP).await?;
    ensure!(!list.to_string().contains("frt_"), "{list}");
    ensure!(
        !list.to_string().contains("secret_sha256"),
        "hashes are not shown either: {list}"
    );

    const ALL: &[&str] = &[
        "admin",
        "auditor",
        "a-admin",
        "d-admin",
        "oidc-admin",
        "oidc-auditor",
        "oidc-a-admin",
    ];
    // An OIDC caller may what the API token of the same role may.
    let may = |c: &Case, who: &str| c.allowed.contains(&who.trim_start_matches("oidc-"));
    const ADMINS: &[&str] = &["admin", "a-admin", "d-admin"];
    const A_SIDE: &[&str] = &["admin", "a-admin"];
    const READERS: &[&str] = &["admin", "auditor"];
    const ADMIN: &[&str] = &["admin"];
    let policy_doc = {
        let (_, v) = w.get(0, "/api/v1/policy", BOOTSTRAP).await?;
        v["policy"].clone()
    };
    let cases = vec![
        case(Method::GET, "/api/v1/whoami", None, ALL),
        case(Method::GET, "/api/v1/policy", None, ADMINS),
        case(
            Method::PUT,
            "/api/v1/policy?dry_run=true",
            Some(policy_doc),
            ADMIN,
        ),
        case(Method::GET, "/api/v1/policy/export", None, ADMIN),
        case(Method::GET, "/api/v1/domains", None, ADMINS),
        case(Method::GET, "/api/v1/domains/a.example", None, ADMINS),
        case(
            Method::PUT,
            "/api/v1/domains/e.example",
            Some(json!({"platform": "xmpp", "side": "external"})),
            ADMIN,
        ),
        case(Method::GET, "/api/v1/rules", None, ADMINS),
        case(
            Method::PUT,
            "/api/v1/rules/a-out",
            Some(json!({"between": ["a.example", "*"], "action": "allow", "kinds": ["im"]})),
            A_SIDE,
        ),
        case(Method::DELETE, "/api/v1/rules/a-out", None, A_SIDE),
        case(
            Method::PUT,
            "/api/v1/groups/a-team",
            Some(json!({"members": ["x@a.example"]})),
            A_SIDE,
        ),
        case(Method::GET, "/api/v1/groups", None, ADMINS),
        case(
            Method::PUT,
            "/api/v1/controls/a-x",
            Some(json!({"who": ["group:a-team"], "federate": false})),
            A_SIDE,
        ),
        case(Method::GET, "/api/v1/controls", None, ADMINS),
        case(Method::DELETE, "/api/v1/controls/a-x", None, A_SIDE),
        case(Method::DELETE, "/api/v1/groups/a-team", None, A_SIDE),
        case(
            Method::GET,
            "/api/v1/explain?from=alice@a.example&to=bob@b.example",
            None,
            A_SIDE,
        ),
        case(Method::GET, "/api/v1/audit", None, READERS),
        case(Method::GET, "/api/v1/cluster", None, READERS),
        case(Method::GET, "/api/v1/tokens", None, ADMIN),
        case(
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "made in the matrix", "role": "auditor"})),
            ADMIN,
        ),
        case(Method::GET, "/api/v1/approvals", None, ADMINS),
        case(Method::POST, "/api/v1/approvals/none/approve", None, ADMINS),
    ];
    let mut checked = 0;
    for c in &cases {
        // No token, a malformed one and a made-up API token: 401, nothing changed.
        for bad in [None, Some("not-a-token"), Some("frt_0123456789abcdef_nope")] {
            let before = state_of(&w).await?;
            let (s, v) = w
                .call(0, c.method.clone(), c.path, bad, c.body.as_ref())
                .await?;
            ensure!(s == 401, "{} {} with {bad:?}: {s} {v}", c.method, c.path);
            ensure!(
                state_of(&w).await? == before,
                "{} {} changed something",
                c.method,
                c.path
            );
            checked += 1;
        }
        // Those refused go first, so each is refused what exists (a rule, a group) before an
        // allowed caller changes it.
        let order = ALL
            .iter()
            .filter(|w| !may(c, w))
            .chain(ALL.iter().filter(|w| may(c, w)));
        for who in order {
            let token = &tokens[who];
            let allowed = may(c, who);
            let before = state_of(&w).await?;
            let (s, v) = w
                .call(0, c.method.clone(), c.path, Some(token), c.body.as_ref())
                .await?;
            if allowed {
                ensure!(
                    s != 401 && s != 403,
                    "{who} may {} {}: {s} {v}",
                    c.method,
                    c.path
                );
            } else {
                ensure!(s == 403, "{who} may not {} {}: {s} {v}", c.method, c.path);
                ensure!(
                    state_of(&w).await? == before,
                    "{who}'s refused {} {} changed something",
                    c.method,
                    c.path
                );
            }
            checked += 1;
        }
    }
    ensure!(checked == cases.len() * (3 + ALL.len()), "{checked} checks");

    // An OIDC token for another audience, or from the right provider without a fedrelay role.
    let other = idp.token("idp-admin", "secret-1", "urn:other:api").await?;
    let (s, v) = w.get(0, "/api/v1/whoami", &other).await?;
    ensure!(
        s == 401 && v["message"].as_str().unwrap_or("").contains("audience"),
        "a token for another API: {s} {v}"
    );
    let nobody = idp
        .token("idp-nobody", "secret-4", "urn:fedrelay:api")
        .await?;
    let (s, v) = w.get(0, "/api/v1/whoami", &nobody).await?;
    ensure!(
        s == 403 && v["message"].as_str().unwrap_or("").contains("role"),
        "{s} {v}"
    );
    // An expired OIDC token.
    let brief = idp
        .token("idp-brief", "secret-5", "urn:fedrelay:api")
        .await?;
    let (s, v) = w.get(0, "/api/v1/whoami", &brief).await?;
    ensure!(s == 200 && v["name"] == "oidc:idp-brief", "{s} {v}");
    let v = test_support::wait_for("the OIDC token to expire", Duration::from_secs(20), || {
        let (w, brief) = (&w, &brief);
        async move {
            let (s, v) = w.get(0, "/api/v1/whoami", brief).await.ok()?;
            (s == 401).then_some(v)
        }
    })
    .await?;
    ensure!(
        v["message"].as_str().unwrap_or("").contains("expired"),
        "{v}"
    );

    // A domain admin sees only its own rules.
    let (s, v) = w.get(0, "/api/v1/rules", &tokens["d-admin"]).await?;
    ensure!(s == 200 && v == json!([]), "d's admin sees: {s} {v}");
    // Another domain's admin cannot touch a's rules, even by naming them.
    let (s, v) = w
        .call(
            0,
            Method::PUT,
            "/api/v1/rules/config-1",
            Some(&tokens["d-admin"]),
            Some(&json!({"between": ["d.example", "*"], "action": "allow"})),
        )
        .await?;
    ensure!(s == 403, "overwriting a's rule with d's: {s} {v}");

    // A revoked token stops working at once.
    let (s, v) = w
        .call(
            0,
            Method::POST,
            "/api/v1/tokens",
            Some(BOOTSTRAP),
            Some(&json!({"name": "short", "role": "auditor"})),
        )
        .await?;
    ensure!(s == 201, "{s} {v}");
    let short = v["token"].as_str().context("token")?.to_string();
    let id = v["id"].as_str().context("id")?.to_string();
    ensure!(
        w.get(0, "/api/v1/audit", &short).await?.0 == 200,
        "fresh token"
    );
    let (s, v) = w
        .call(
            0,
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(BOOTSTRAP),
            None,
        )
        .await?;
    ensure!(s == 200 && v["revoked_at_ms"].is_i64(), "{s} {v}");
    let (s, v) = w.get(0, "/api/v1/audit", &short).await?;
    ensure!(
        s == 401 && v["message"].as_str().unwrap_or("").contains("revoked"),
        "{s} {v}"
    );

    // An expired token is refused.
    let soon = common::now_secs() * 1000 + 4000;
    let (s, v) = w
        .call(
            0,
            Method::POST,
            "/api/v1/tokens",
            Some(BOOTSTRAP),
            Some(&json!({"name": "brief", "role": "auditor", "expires_at_ms": soon})),
        )
        .await?;
    ensure!(s == 201, "{s} {v}");
    let brief = v["token"].as_str().context("token")?.to_string();
    ensure!(
        w.get(0, "/api/v1/audit", &brief).await?.0 == 200,
        "not expired yet"
    );
    let v = test_support::wait_for("the token to expire", Duration::from_secs(20), || {
        let (w, brief) = (&w, &brief);
        async move {
            let (s, v) = w.get(0, "/api/v1/audit", brief).await.ok()?;
            (s == 401).then_some(v)
        }
    })
    .await?;
    ensure!(
        v["message"].as_str().unwrap_or("").contains("expired"),
        "{v}"
    );

    // Bad input is refused with the reason.
    for (body, why) in [
        (json!({"name": "x", "role": "root"}), "role"),
        (json!({"name": "", "role": "auditor"}), "name"),
        (json!({"name": "x", "role": "domain-admin"}), "domains"),
        (
            json!({"name": "x", "role": "domain-admin", "domains": ["nowhere.example"]}),
            "internal domain",
        ),
        (
            json!({"name": "x", "role": "auditor", "expires_in_days": 0}),
            "expires_in_days",
        ),
        (
            json!({"name": "x", "role": "auditor", "surprise": 1}),
            "surprise",
        ),
    ] {
        let (s, v) = w
            .call(
                0,
                Method::POST,
                "/api/v1/tokens",
                Some(BOOTSTRAP),
                Some(&body),
            )
            .await?;
        ensure!(s == 400, "{body}: {s} {v}");
        ensure!(
            v["message"].as_str().unwrap_or("").contains(why),
            "{body}: {v}"
        );
    }
    // The OpenAPI document needs no token.
    let (s, v) = w
        .call(0, Method::GET, "/api/v1/openapi.json", None, None)
        .await?;
    ensure!(s == 200 && v["openapi"] == "3.0.3", "{s}");
    Ok(())
}

#[tokio::test]
async fn usage_counts_what_was_sent_across_nodes_and_reports_twelve_seeded_months() -> Result<()> {
    use relay_node::control::usage::{StaticSides, UsageAggregator, UsageConfig, UsageStore};
    let w = World::start("cp-usage", 3).await?;
    // 10 users of a.example send 6 messages each to 5 users of b.example, through all nodes.
    let mut sent = 0;
    for u in 0..10 {
        for k in 0..6 {
            let (s, v) = post(
                &w.http,
                &w.cluster.url((u + k) % 3)?,
                "a.example",
                SECRET_A,
                &message(
                    &format!("u{u}-{k}"),
                    &format!("user{u}"),
                    &format!("peer{}@b.example", (u + k) % 5),
                    "counted, never logged",
                ),
            )
            .await?;
            ensure!(s == 202, "{s} {v}");
            sent += 1;
        }
    }
    // Three refused (no rule connects a and d).
    for i in 0..3 {
        let (s, v) = post(
            &w.http,
            &w.cluster.url(i)?,
            "a.example",
            SECRET_A,
            &message(&format!("refused-{i}"), "user0", "dan@d.example", "refused"),
        )
        .await?;
        ensure!(s == 403, "{s} {v}");
    }
    // Each node flushes its counters about once a second; the report sums them all.
    let today = test_support::wait_for(
        "the usage of what was sent",
        Duration::from_secs(15),
        || {
            let w = &w;
            async move {
                let (s, v) = w.get(1, "/api/v1/usage/today", BOOTSTRAP).await.ok()?;
                (s == 200 && v["total"]["messages"] == sent && v["total"]["errors"] == 3)
                    .then_some(v)
            }
        },
    )
    .await?;
    let total = &today["total"];
    let users = total["unique_users"].as_u64().context("unique users")?;
    ensure!(
        (14..=16).contains(&users),
        "15 people took part, HyperLogLog says {users}"
    );
    ensure!(
        today["total"]["internal_domains"]["a.example"]["messages"] == sent
            && today["total"]["internal_domains"]["b.example"]["messages"] == sent
            && today["total"]["platforms"]["http"]["messages"] == sent,
        "{today}"
    );
    ensure!(
        today["total"]["internal_domains"]["a.example"]["unique_users"]
            .as_u64()
            .is_some_and(|n| (9..=11).contains(&n)),
        "{today}"
    );
    // The counts never name anyone: no address, no text in the report.
    let text = today.to_string();
    ensure!(
        !text.contains("user0") && !text.contains("counted, never logged"),
        "{text}"
    );

    // Twelve seeded months of 2025 (one more message each month), as the nodes would have
    // flushed them, reported through the API in order.
    let seed = UsageAggregator::new(
        std::sync::Arc::new(StaticSides::new(["a.example"])),
        UsageConfig::default(),
    );
    for m in 1..=12i64 {
        let at = test_support_day_ms(2025, m, 10);
        for k in 0..m {
            seed.add(&session_actor::MetadataEntry {
                at_ms: at + k,
                session_id: None,
                relay_msg_id: format!("seed-{m}-{k}"),
                sender: format!("s{m}@a.example"),
                sender_platform: "http".into(),
                receivers: vec![format!("r{k}@partner.example")],
                receiver_platform: "xmpp".into(),
                category: "im",
                kind: "message".into(),
            });
        }
    }
    let conn = redis::Client::open(w.cluster.redis.url())?
        .get_connection_manager()
        .await?;
    seed.flush(&UsageStore::redis(conn, "fr", 400)).await?;
    let (s, v) = w
        .get(2, "/api/v1/usage?months=12&end=2025-12-31", BOOTSTRAP)
        .await?;
    ensure!(s == 200, "{s} {v}");
    let periods = v["periods"].as_array().context("periods")?;
    let names: Vec<&str> = periods
        .iter()
        .filter_map(|p| p["period"].as_str())
        .collect();
    ensure!(
        names
            == [
                "2025-01", "2025-02", "2025-03", "2025-04", "2025-05", "2025-06", "2025-07",
                "2025-08", "2025-09", "2025-10", "2025-11", "2025-12"
            ],
        "{names:?}"
    );
    for (i, p) in periods.iter().enumerate() {
        ensure!(p["messages"] == i as u64 + 1, "{p}");
        ensure!(
            p["external_domains"]["partner.example"]["messages"] == i as u64 + 1,
            "{p}"
        );
    }
    ensure!(v["total"]["messages"] == 78, "{}", v["total"]);
    let csv = w
        .http
        .get(format!(
            "{}/api/v1/usage?months=12&end=2025-12-31&format=csv",
            w.api(0)?
        ))
        .bearer_auth(BOOTSTRAP)
        .send()
        .await?;
    ensure!(
        csv.headers()
            .get("content-type")
            .is_some_and(|c| c.to_str().unwrap_or("").starts_with("text/csv"))
    );
    let csv = csv.text().await?;
    ensure!(
        csv.lines().next().is_some_and(|h| h.starts_with("period,")),
        "{csv}"
    );
    ensure!(csv.contains("2025-07"), "{csv}");
    Ok(())
}

/// Unix ms of noon UTC on a date.
fn test_support_day_ms(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    days * 86_400_000 + 12 * 3_600_000
}

#[tokio::test]
async fn the_metadata_log_holds_no_content_answers_queries_and_survives_a_restart() -> Result<()> {
    const CANARY: &str = "canary-7f3a9c-never-in-the-log";
    let mut w = World::start("cp-log", 3).await?;
    let started = common::now_secs() * 1000 - 1000;
    for i in 0..6 {
        let (s, v) = w.alice_to_bob(i % 3, &format!("log-{i}")).await?;
        ensure!(s == 202, "{s} {v}");
    }
    let (s, v) = post(
        &w.http,
        &w.cluster.url(1)?,
        "a.example",
        SECRET_A,
        &message("with-canary", "carol", "dan@c.example", CANARY),
    )
    .await?;
    ensure!(s == 202, "{s} {v}");
    let (s, v) = post(
        &w.http,
        &w.cluster.url(2)?,
        "a.example",
        SECRET_A,
        &message("refused", "carol", "dan@d.example", CANARY),
    )
    .await?;
    ensure!(s == 403, "{s} {v}");
    // Written in batches off the message path: all 8 entries show up.
    let q = format!("/api/v1/log?from={started}&domain=a.example&limit=100");
    let all = test_support::wait_for("eight log entries", Duration::from_secs(10), || {
        let (w, q) = (&w, &q);
        async move {
            let (s, v) = w.get(0, q, BOOTSTRAP).await.ok()?;
            (s == 200 && v["entries"].as_array().map(Vec::len) == Some(8)).then_some(v)
        }
    })
    .await?;
    let entries = all["entries"].as_array().context("entries")?;
    ensure!(
        entries
            .iter()
            .filter(|e| e["from"] == "alice@a.example" && e["to"] == json!(["bob@b.example"]))
            .count()
            == 6,
        "{all}"
    );
    let refusal = entries
        .iter()
        .find(|e| e["category"] == "error")
        .context("the refusal's entry")?;
    ensure!(
        refusal["kind"] == "not_federated" && refusal["to"] == json!(["dan@d.example"]),
        "{refusal}"
    );
    ensure!(
        !all.to_string().contains(CANARY),
        "content in the log: {all}"
    );
    // Filters and pagination.
    let (s, v) = w
        .get(
            1,
            &format!("/api/v1/log?from={started}&type=error"),
            BOOTSTRAP,
        )
        .await?;
    ensure!(
        s == 200 && v["entries"].as_array().map(Vec::len) == Some(1),
        "{v}"
    );
    let (s, v) = w
        .get(
            1,
            &format!("/api/v1/log?from={started}&user=carol@a.example"),
            BOOTSTRAP,
        )
        .await?;
    ensure!(
        s == 200 && v["entries"].as_array().map(Vec::len) == Some(2),
        "{v}"
    );
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/log?from={started}&domain=a.example&limit=3&cursor={c}"),
            None => format!("/api/v1/log?from={started}&domain=a.example&limit=3"),
        };
        let (s, v) = w.get(2, &path, BOOTSTRAP).await?;
        ensure!(s == 200, "{s} {v}");
        for e in v["entries"].as_array().context("entries")? {
            seen.push(e.clone());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    ensure!(&seen == entries, "pages joined differ from one query");
    // Exports: the same entries, as CSV and NDJSON, no content.
    for (format, lines) in [("csv", 9), ("ndjson", 8)] {
        let r = w
            .http
            .get(format!(
                "{}/api/v1/log/export?from={started}&domain=a.example&format={format}",
                w.api(0)?
            ))
            .bearer_auth(BOOTSTRAP)
            .send()
            .await?;
        ensure!(r.status() == 200, "{format}: {}", r.status());
        let text = r.text().await?;
        ensure!(text.lines().count() == lines, "{format}: {text}");
        ensure!(!text.contains(CANARY), "content in the {format} export");
    }
    // Bad input: a clear 400.
    for bad in [
        "/api/v1/log?type=gossip",
        "/api/v1/log?session=xyz",
        "/api/v1/log?cursor=bm9wZQ",
        "/api/v1/log?from=10&to=5",
        "/api/v1/log/export?format=xml",
    ] {
        let (s, v) = w.get(0, bad, BOOTSTRAP).await?;
        ensure!(s == 400 && v["message"].is_string(), "{bad}: {s} {v}");
    }
    // A node stops and another starts: the log is in Redis, not in the nodes.
    w.cluster.node_mut(0)?.terminate(Duration::from_secs(20))?;
    let n = w.cluster.add_node().await?;
    let (s, v) = w.get(n, &q, BOOTSTRAP).await?;
    ensure!(
        s == 200 && v["entries"] == all["entries"],
        "after the restart: {s} {v}"
    );
    // Nodes log ids, never content.
    for i in 1..=n {
        let out = w.cluster.node(i)?.output()?;
        ensure!(!out.contains(CANARY), "node {i} logged content");
    }
    Ok(())
}

#[tokio::test]
async fn the_api_speaks_tls_when_given_a_certificate_and_refuses_plaintext_off_loopback()
-> Result<()> {
    let redis = test_support::RedisServer::start()?;
    let dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, BOOTSTRAP)?;
    let api = format!(
        "[api]\nlisten = \"127.0.0.1:{{API_PORT}}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nbootstrap_token_file = \"{}\"\n",
        cert_path.display(),
        key_path.display(),
        token_file.display()
    );
    let node = test_support::RelayNode::start(&common::config(
        &redis.url(),
        "http://127.0.0.1:1/hook",
        &api,
    ))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes())?;
    let tls = reqwest::Client::builder().tls_certs_only([root]).build()?;
    let r = tls
        .get(format!("https://localhost:{}/api/v1/whoami", node.api_port))
        .bearer_auth(BOOTSTRAP)
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let plain = common::client()?
        .get(format!("http://127.0.0.1:{}/api/v1/whoami", node.api_port))
        .bearer_auth(BOOTSTRAP)
        .send()
        .await;
    ensure!(plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()));

    // Listening beyond loopback without TLS is refused at start.
    let open = format!(
        "[api]\nlisten = \"0.0.0.0:{{API_PORT}}\"\nbootstrap_token_file = \"{}\"\n",
        token_file.display()
    );
    let e = match test_support::RelayNode::start(&common::config(
        &redis.url(),
        "http://127.0.0.1:1/hook",
        &open,
    )) {
        Ok(_) => anyhow::bail!("the API listened on 0.0.0.0 without TLS"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        e.contains("api: listening on 0.0.0.0") && e.contains("without TLS"),
        "{e}"
    );
    Ok(())
}
