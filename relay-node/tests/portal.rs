//! The management portal in a real browser: headless Chromium over WebDriver, against two
//! relay nodes on real etcd and Redis, the portal served over TLS, and people signing in at a
//! real OpenID Connect provider (npm `oidc-provider`) with the authorization code flow.
//!
//! One scenario, as an administrator and an auditor would go through it: sign in; the
//! overview shows the traffic the test sent and the month it seeded; a domain made to wait for
//! approval and a contact request approved in the portal reaches its recipient; a rule added
//! in the portal (previewed first) refuses the next message, which the log search shows as an
//! error and the CSV export holds; bad input changes nothing; the auditor sees no edit control
//! and a forged edit is refused; signing out ends the session. Screenshots of each page are
//! kept in `target/test-artifacts/screenshots/`.

mod common;

use anyhow::{Context, Result, ensure};
use common::cluster::{Cluster, etcd_section, node_config};
use common::{SECRET_A, SECRET_B, Stream, message, post};
use fantoccini::Locator;
use serde_json::{Value, json};
use std::time::Duration;
use test_support::browser::Browser;
use test_support::oidc::{OidcClient, OidcProvider, OidcSetup, OidcUser};

const BOOTSTRAP: &str = "bootstrap-token-of-the-portal-tests-0123456789abcdef";
const AUDIENCE: &str = "urn:fedrelay:api";

struct World {
    cluster: Cluster,
    _idp: OidcProvider,
    _dir: tempfile::TempDir,
    /// The portal's origin on node 0: `https://127.0.0.1:<port>`.
    portal: String,
    /// An HTTPS client trusting the test CA.
    https: reqwest::Client,
    http: reqwest::Client,
}

impl World {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        test_support::certs::issue(dir.path(), "api-", "portal test CA", &["server"])?;
        let port = test_support::free_port()?;
        let portal = format!("https://127.0.0.1:{port}");
        let idp = OidcProvider::start(
            OidcSetup::new()
                .resource(AUDIENCE)
                .client(
                    OidcClient::new("fedrelay-portal", "portal-client-secret")
                        .redirect_uri(&format!("{portal}/portal/callback")),
                )
                .user(
                    OidcUser::new("ada", "ada-password")
                        .claim("roles", json!(["admin"]))
                        .claim("name", json!("Ada Admin")),
                )
                .user(OidcUser::new("aud", "aud-password").claim("roles", json!("auditor")))
                .user(OidcUser::new("nobody", "nobody-password")),
        )?;
        let token_file = dir.path().join("bootstrap-token");
        std::fs::write(&token_file, BOOTSTRAP)?;
        let secret_file = dir.path().join("portal-secret");
        std::fs::write(&secret_file, "portal-client-secret\n")?;
        let (cert, key) = (
            dir.path().join("api-server.pem"),
            dir.path().join("api-server.key"),
        );
        let api = format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nbootstrap_token_file = \"{}\"\n\
             [api.oidc]\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\n\
             [api.oidc.portal]\nclient_id = \"fedrelay-portal\"\nclient_secret_file = \"{}\"\n\
             redirect_url = \"{portal}/portal/callback\"\nscopes = \"profile api\"\n",
            cert.display(),
            key.display(),
            token_file.display(),
            idp.issuer(),
            secret_file.display()
        );
        let cluster = Cluster::start(
            "portal",
            2,
            Box::new(move |redis, etcd, name, i| {
                // Node 0 on the port the provider knows; node 1 behind the same name.
                let listen = if i == 0 {
                    format!("127.0.0.1:{port}")
                } else {
                    "127.0.0.1:{API_PORT}".to_string()
                };
                let extra = format!(
                    "{}{}",
                    etcd_section(name, etcd, 3),
                    api.replacen("[api]\n", &format!("[api]\nlisten = \"{listen}\"\n"), 1)
                );
                node_config(redis, &extra, i, &[])
            }),
            Vec::new(),
            Duration::from_secs(20),
        )
        .await?;
        let root = reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("api-ca.pem"))?)?;
        let https = reqwest::Client::builder()
            .tls_certs_only([root])
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            cluster,
            _idp: idp,
            _dir: dir,
            portal,
            https,
            http: common::client()?,
        })
    }

    /// A management API call with the bootstrap token.
    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .https
            .request(method, format!("{}{path}", self.portal))
            .bearer_auth(BOOTSTRAP);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    async fn policy_version(&self) -> Result<u64> {
        let (s, v) = self
            .api(reqwest::Method::GET, "/api/v1/policy", None)
            .await?;
        ensure!(s == 200, "{s} {v}");
        v["version"].as_u64().context("version")
    }
}

/// Signs in at the provider's form as `user`, from the portal's sign-in page.
async fn sign_in(b: &Browser, portal: &str, user: &str, password: &str) -> Result<()> {
    b.goto(&format!("{portal}/portal/")).await?;
    // Not signed in: the sign-in page.
    b.wait_for("#sign-in").await?.click().await?;
    b.wait_for("#username").await?.send_keys(user).await?;
    b.wait_for("#password").await?.send_keys(password).await?;
    b.wait_for("#submit").await?.click().await?;
    Ok(())
}

/// Every visible form control of the page has a label, and every button and link a name.
async fn labelled(b: &Browser) -> Result<()> {
    let unlabelled = b
        .client()
        .execute(
            "return Array.from(document.querySelectorAll(\
               'input:not([type=hidden]), select, textarea, button, a[href]'))\
             .filter(e => e.matches('button, a') ? !e.textContent.trim()\
                                                 : e.labels.length === 0)\
             .map(e => e.outerHTML);",
            Vec::new(),
        )
        .await?;
    ensure!(
        unlabelled.as_array().is_some_and(Vec::is_empty),
        "controls without a label or name on {}: {unlabelled}",
        b.client().current_url().await?
    );
    Ok(())
}

async fn current_path(b: &Browser) -> Result<String> {
    Ok(b.client().current_url().await?.path().to_string())
}

#[tokio::test]
async fn administrators_and_auditors_use_the_portal_in_a_real_browser() -> Result<()> {
    let w = World::start().await?;
    let portal = w.portal.clone();

    // Traffic to show: 7 messages from 3 users of a.example to 2 of b.example today, and a
    // seeded month, 40 days ago, of 5 messages to an XMPP partner.
    for k in 0..7 {
        let (s, v) = post(
            &w.http,
            &w.cluster.url(k % 2)?,
            "a.example",
            SECRET_A,
            &message(
                &format!("m{k}"),
                &format!("user{}", k % 3),
                &format!("peer{}@b.example", k % 2),
                "text the portal never shows",
            ),
        )
        .await?;
        ensure!(s == 202, "{s} {v}");
    }
    let seeded_at = relay_node::edges::now_ms() - 40 * 86_400_000;
    let seeded_month = relay_node::control::metadata::day_of(seeded_at)[..7].to_string();
    {
        use relay_node::control::usage::{StaticSides, UsageAggregator, UsageConfig, UsageStore};
        let seed = UsageAggregator::new(
            std::sync::Arc::new(StaticSides::new(["a.example"])),
            UsageConfig::default(),
        );
        for k in 0..5 {
            seed.add(&session_actor::MetadataEntry {
                at_ms: seeded_at + k,
                session_id: None,
                relay_msg_id: format!("seed-{k}"),
                sender: format!("s{k}@a.example"),
                sender_platform: "http".into(),
                receivers: vec!["r@partner.example".into()],
                receiver_platform: "xmpp".into(),
                category: "im",
                kind: "message".into(),
            });
        }
        let conn = redis::Client::open(w.cluster.redis.url())?
            .get_connection_manager()
            .await?;
        seed.flush(&UsageStore::redis(conn, "fr", 400)).await?;
    }
    // The nodes flush their counters about once a second.
    test_support::wait_for(
        "today's 7 messages in the usage report",
        Duration::from_secs(15),
        || {
            let w = &w;
            async move {
                let (s, v) = w
                    .api(reqwest::Method::GET, "/api/v1/usage/today", None)
                    .await
                    .ok()?;
                (s == 200 && v["total"]["messages"] == 7).then_some(())
            }
        },
    )
    .await?;

    // === The administrator signs in through the identity provider. ===
    let admin = Browser::start().await?;
    admin.goto(&format!("{portal}/portal/")).await?;
    admin.wait_for("#sign-in").await?;
    ensure!(current_path(&admin).await? == "/portal/login");
    admin.screenshot("portal-sign-in").await?;
    sign_in(&admin, &portal, "ada", "ada-password").await?;
    let who = admin.text_of("#who").await?;
    ensure!(who.contains("oidc:ada") && who.contains("admin"), "{who}");
    ensure!(current_path(&admin).await? == "/portal/");

    // The overview: today's numbers and the seeded month, in the chart and its table.
    ensure!(admin.text_of("#today-messages").await? == "7");
    let users: u64 = admin.text_of("#today-users").await?.parse()?;
    ensure!(
        (4..=6).contains(&users),
        "3 senders and 2 receivers, HyperLogLog says {users}"
    );
    ensure!(admin.text_of("#today-refused").await? == "0");
    let bar = admin
        .client()
        .find(Locator::Css(&format!(
            "#chart-messages g[data-category='{seeded_month}'] rect[data-series='http'] title"
        )))
        .await?
        .html(true)
        .await?;
    ensure!(
        bar.contains(&format!("http, {seeded_month}: 5 messages")),
        "{bar}"
    );
    let row = admin
        .client()
        .find(Locator::XPath(&format!(
            "//figure[@id='chart-messages']//tr[th='{seeded_month}']/td[@class='total']"
        )))
        .await?
        .html(true)
        .await?;
    ensure!(row.trim() == "5", "{seeded_month}: {row}");
    admin.screenshot("portal-overview").await?;
    labelled(&admin).await?;
    admin.screenshot_page("portal-overview-page").await?;
    // The table views open from the keyboard.
    for chart in ["#chart-internal", "#chart-external"] {
        admin
            .wait_for(&format!("{chart} summary"))
            .await?
            .send_keys(&fantoccini::key::Key::Enter)
            .await?;
    }
    let internal = admin.text_of("#chart-internal table").await?;
    ensure!(
        internal.contains("a.example 12") && internal.contains("b.example 7"),
        "{internal}"
    );
    let external = admin.text_of("#chart-external table").await?;
    ensure!(external.contains("partner.example 5"), "{external}");

    // === An approval domain: set in the portal's domain form, previewed, saved. ===
    admin
        .goto(&format!("{portal}/portal/policy?domain=b.example"))
        .await?;
    admin.wait_for("#domain-form").await?;
    let approval = admin.wait_for("#approval").await?;
    approval.click().await?;
    admin.wait_for("#domain-preview").await?.click().await?;
    admin.wait_for("#preview").await?;
    let summary = admin.text_of("#preview-summary").await?;
    ensure!(summary.contains("would change"), "{summary}");
    let changes = admin.text_of("#preview-changes").await?;
    ensure!(
        changes.contains("Held for approval") && changes.contains("contacts"),
        "{changes}"
    );
    admin.wait_for("#save").await?.click().await?;
    let done = admin.text_of(".notice.ok").await?;
    ensure!(done.contains("b.example is saved"), "{done}");

    // Alice asks bob; the request waits; the administrator approves it; bob gets it.
    let mut bob = Stream::open(&w.http, &w.cluster.url(1)?, "b.example", SECRET_B, None).await?;
    let (s, v) = post(
        &w.http,
        &w.cluster.url(0)?,
        "a.example",
        SECRET_A,
        &json!({"id": "ask-bob", "type": "contact_request", "from": "alice", "to": "bob@b.example"}),
    )
    .await?;
    ensure!(s == 202 && v["status"] == "pending_approval", "{s} {v}");
    admin.goto(&format!("{portal}/portal/approvals")).await?;
    let pending = admin.text_of("#approvals").await?;
    ensure!(
        pending.contains("alice@a.example") && pending.contains("bob@b.example"),
        "{pending}"
    );
    admin.screenshot("portal-approvals").await?;
    labelled(&admin).await?;
    admin
        .wait_for("#approvals button.primary")
        .await?
        .click()
        .await?;
    let done = admin.text_of(".notice.ok").await?;
    ensure!(done.contains("Approved"), "{done}");
    ensure!(
        admin
            .text_of("#no-approvals")
            .await?
            .contains("Nothing is waiting")
    );
    let mut got = None;
    for _ in 0..20 {
        let e = bob.next(Duration::from_secs(10)).await?;
        if e.data["type"] == "contact_request" {
            got = Some(e.data);
            break;
        }
    }
    let got = got.context("bob never got the approved contact request")?;
    ensure!(got["from"] == "alice@a.example", "{got}");

    // === A rule that blocks b.example, previewed, then saved. ===
    let version = w.policy_version().await?;
    admin.goto(&format!("{portal}/portal/policy")).await?;
    // Bad input first: an id the policy does not accept. Nothing changes.
    admin
        .wait_for("#rule-form #id")
        .await?
        .send_keys("no b!")
        .await?;
    admin
        .wait_for("#rule-form #from")
        .await?
        .select_by_value("b.example")
        .await?;
    admin
        .wait_for("#rule-form #to")
        .await?
        .select_by_value("a.example")
        .await?;
    admin
        .wait_for("#rule-form #action")
        .await?
        .select_by_value("deny")
        .await?;
    admin.wait_for("#rule-preview").await?.click().await?;
    let error = admin.text_of("#error").await?;
    ensure!(
        error.contains("Not saved") && error.contains("no b!"),
        "{error}"
    );
    ensure!(
        w.policy_version().await? == version,
        "a refused rule changed the policy"
    );
    // The form keeps what was typed; the id is corrected.
    let id = admin.wait_for("#rule-form #id").await?;
    ensure!(id.prop("value").await?.as_deref() == Some("no b!"));
    id.clear().await?;
    id.send_keys("block-b").await?;
    admin.wait_for("#rule-preview").await?.click().await?;
    admin.wait_for("#preview").await?;
    let changes = admin.text_of("#preview-changes").await?;
    ensure!(
        changes.contains("Refused:") && changes.contains("from b.example to a.example"),
        "{changes}"
    );
    admin.screenshot("portal-policy-preview").await?;
    labelled(&admin).await?;
    admin.wait_for("#save").await?.click().await?;
    let done = admin.text_of(".notice.ok").await?;
    ensure!(done.contains("rule block-b is saved"), "{done}");
    ensure!(admin.text_of("#rules").await?.contains("block-b"));
    admin.screenshot_page("portal-policy").await?;
    // Bad input in the domain form: a rate that is not a number. Nothing changes.
    let version = w.policy_version().await?;
    admin
        .goto(&format!("{portal}/portal/policy?domain=d.example"))
        .await?;
    admin
        .wait_for("#domain-form #per_second")
        .await?
        .send_keys("fast")
        .await?;
    admin.wait_for("#domain-preview").await?.click().await?;
    let error = admin.text_of("#error").await?;
    ensure!(error.contains("whole number"), "{error}");
    ensure!(w.policy_version().await? == version);

    // A message from b.example is refused on both nodes, naming the rule.
    for i in 0..2 {
        let (s, v) = post(
            &w.http,
            &w.cluster.url(i)?,
            "b.example",
            SECRET_B,
            &message(
                &format!("from-b-{i}"),
                "bob",
                "alice@a.example",
                "canary-from-b",
            ),
        )
        .await?;
        ensure!(
            s == 403 && v.to_string().contains("block-b"),
            "node {i}: {s} {v}"
        );
    }

    // The log search shows the refusals as errors.
    admin.goto(&format!("{portal}/portal/log")).await?;
    admin
        .wait_for("#log-form #domain")
        .await?
        .send_keys("b.example")
        .await?;
    admin
        .wait_for("#log-form #type")
        .await?
        .select_by_value("error")
        .await?;
    admin.wait_for("#log-search").await?.click().await?;
    let rows = test_support::wait_for(
        "the refusals in the log search",
        Duration::from_secs(10),
        || {
            let admin = &admin;
            async move {
                admin.client().refresh().await.ok()?;
                let rows = admin
                    .client()
                    .find_all(Locator::Css("#log tbody tr.error"))
                    .await
                    .ok()?;
                (rows.len() == 2).then_some(rows)
            }
        },
    )
    .await?;
    for r in rows {
        let text = r.text().await?;
        ensure!(
            text.contains("bob@b.example") && text.contains("error"),
            "{text}"
        );
    }
    admin.screenshot("portal-log").await?;
    labelled(&admin).await?;
    // A search the log cannot take is explained, and nothing is searched.
    admin
        .goto(&format!("{portal}/portal/log?from=yesterday&type=error"))
        .await?;
    let error = admin.text_of("#error").await?;
    ensure!(
        error.contains("From:") && error.contains("yesterday"),
        "{error}"
    );
    ensure!(
        admin
            .client()
            .find_all(Locator::Css("#log"))
            .await?
            .is_empty()
    );
    admin.client().back().await?;
    // The CSV export of the same search, fetched with the browser's session.
    let href = admin
        .wait_for("#export-csv")
        .await?
        .attr("href")
        .await?
        .context("export link")?;
    let cookie = admin.client().get_named_cookie("__Host-fedrelay").await?;
    let csv = w
        .https
        .get(format!("{portal}{href}"))
        .header("cookie", format!("__Host-fedrelay={}", cookie.value()))
        .send()
        .await?;
    ensure!(csv.status() == 200, "{}", csv.status());
    let csv = csv.text().await?;
    ensure!(
        csv.lines().count() == 3 && csv.contains("bob@b.example"),
        "{csv}"
    );
    ensure!(
        !csv.contains("canary-from-b"),
        "message text in the export: {csv}"
    );

    // The audit log names who changed what; the cluster page its nodes; the users page.
    admin.goto(&format!("{portal}/portal/audit")).await?;
    let audit = admin.text_of("#audit").await?;
    ensure!(
        audit.contains("oidc:ada") && audit.contains("rule.put") && audit.contains("block-b"),
        "{audit}"
    );
    admin.screenshot("portal-audit").await?;
    admin.goto(&format!("{portal}/portal/cluster")).await?;
    let nodes = admin.text_of("#nodes-ready").await?;
    ensure!(nodes == "2 of 2", "{nodes}");
    ensure!(admin.text_of("#nodes").await?.contains("n2"));
    admin.screenshot("portal-cluster").await?;
    admin
        .goto(&format!("{portal}/portal/users?address=alice@a.example"))
        .await?;
    ensure!(admin.text_of("#user-h").await? == "alice@a.example");
    admin.screenshot("portal-users").await?;
    labelled(&admin).await?;
    // Blocking a contact for a user is a user control the API keeps; unblocking removes it.
    let csrf = admin
        .client()
        .find(Locator::Css("input[name='_csrf']"))
        .await?
        .attr("value")
        .await?
        .context("csrf")?;
    let session = admin.client().get_named_cookie("__Host-fedrelay").await?;
    let portal_post = |path: &str, body: String| {
        w.https
            .post(format!("{portal}{path}"))
            .header("cookie", format!("__Host-fedrelay={}", session.value()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    for (block, want) in [("1", json!(["dan@d.example"])), ("0", Value::Null)] {
        let r = portal_post(
            "/portal/users/block",
            format!("_csrf={csrf}&address=alice%40a.example&contact=dan%40d.example&block={block}"),
        )
        .await?;
        ensure!(r.status() == 303, "block={block}: {}", r.status());
        let (_, controls) = w
            .api(reqwest::Method::GET, "/api/v1/controls", None)
            .await?;
        let mine = controls
            .as_array()
            .and_then(|c| c.iter().find(|c| c["id"] == "block.alice.a.example"))
            .map(|c| c["deny"].clone())
            .unwrap_or(Value::Null);
        ensure!(mine == want, "block={block}: {controls}");
    }
    // Forgetting alice, confirmed in the dialog the portal's script opens.
    let (s, v) = w
        .api(
            reqwest::Method::GET,
            "/api/v1/log?user=alice@a.example",
            None,
        )
        .await?;
    ensure!(
        s == 200 && v["entries"].as_array().is_some_and(|e| !e.is_empty()),
        "alice's contact request is in the log: {s} {v}"
    );
    admin
        .wait_for("form[action='/portal/users/forget'] button")
        .await?
        .click()
        .await?;
    let question = admin.client().get_alert_text().await?;
    ensure!(question.contains("Forget alice@a.example?"), "{question}");
    admin.client().accept_alert().await?;
    let done = admin.text_of(".notice.ok").await?;
    ensure!(done.contains("alice@a.example is forgotten"), "{done}");
    let (s, v) = w
        .api(
            reqwest::Method::GET,
            "/api/v1/log?user=alice@a.example",
            None,
        )
        .await?;
    ensure!(s == 200 && v["entries"] == json!([]), "{s} {v}");

    // Security headers of every page.
    let r = w.https.get(format!("{portal}/portal/login")).send().await?;
    let h = r.headers();
    let csp = h
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ensure!(
        csp.contains("frame-ancestors 'none'")
            && csp.contains("script-src 'self'")
            && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    ensure!(h.contains_key("strict-transport-security"));
    let body = r.text().await?;
    ensure!(
        body.matches("<script").count() == body.matches("<script src=").count(),
        "inline script in {body}"
    );

    // === The auditor: no edit control, and a forged edit is refused. ===
    let auditor = Browser::start().await?;
    sign_in(&auditor, &portal, "aud", "aud-password").await?;
    let who = auditor.text_of("#who").await?;
    ensure!(who.contains("auditor"), "{who}");
    let nav = auditor.text_of("nav").await?;
    ensure!(
        nav.contains("Overview")
            && !nav.contains("Domains and rules")
            && !nav.contains("Approvals"),
        "{nav}"
    );
    // The 7 messages and the approved contact request; the 2 refusals (counters reach the
    // report within a flush interval).
    test_support::wait_for("today's counts", Duration::from_secs(15), || {
        let w = &w;
        async move {
            let (_, v) = w
                .api(reqwest::Method::GET, "/api/v1/usage/today", None)
                .await
                .ok()?;
            (v["total"]["messages"] == 8 && v["total"]["errors"] == 2).then_some(())
        }
    })
    .await?;
    auditor.client().refresh().await?;
    ensure!(auditor.text_of("#today-messages").await? == "8");
    ensure!(auditor.text_of("#today-refused").await? == "2");
    auditor.screenshot("portal-auditor-overview").await?;
    auditor.goto(&format!("{portal}/portal/policy")).await?;
    let error = auditor.text_of("#error").await?;
    ensure!(error.contains("auditor role may not"), "{error}");
    ensure!(
        auditor
            .client()
            .find_all(Locator::Css(
                "form[method='post']:not([action='/portal/logout'])"
            ))
            .await?
            .is_empty(),
        "an edit control is shown to the auditor"
    );
    let csrf = auditor
        .client()
        .find(Locator::Css("input[name='_csrf']"))
        .await?
        .attr("value")
        .await?
        .context("csrf")?;
    let cookie = auditor.client().get_named_cookie("__Host-fedrelay").await?;
    let version = w.policy_version().await?;
    let r = w
        .https
        .post(format!("{portal}/portal/policy/rule"))
        .header("cookie", format!("__Host-fedrelay={}", cookie.value()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "_csrf={csrf}&op=save&id=sneaky&from=a.example&to=d.example&action=allow&version={version}"
        ))
        .send()
        .await?;
    ensure!(r.status() == 403, "{}", r.status());
    let text = r.text().await?;
    ensure!(text.contains("auditor role may not"), "{text}");
    ensure!(
        w.policy_version().await? == version,
        "the auditor's forged edit was stored"
    );
    // The administrator's form token does not carry over to the auditor's session.
    let r = w
        .https
        .post(format!("{portal}/portal/approvals/decide"))
        .header("cookie", format!("__Host-fedrelay={}", cookie.value()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("id=x&decision=approve")
        .send()
        .await?;
    ensure!(r.status() == 403, "no CSRF token: {}", r.status());

    // === Signing out ends the session. ===
    let old = admin.client().get_named_cookie("__Host-fedrelay").await?;
    admin.goto(&format!("{portal}/portal/")).await?;
    admin.wait_for("#logout").await?.click().await?;
    let notice = admin.text_of(".notice.ok").await?;
    ensure!(notice.contains("signed out"), "{notice}");
    admin.goto(&format!("{portal}/portal/policy")).await?;
    admin.wait_for("#sign-in").await?;
    ensure!(current_path(&admin).await? == "/portal/login");
    let r = w
        .https
        .get(format!("{portal}/portal/"))
        .header("cookie", format!("__Host-fedrelay={}", old.value()))
        .send()
        .await?;
    ensure!(
        r.status() == 303
            && r.headers()
                .get("location")
                .is_some_and(|l| l.to_str().unwrap_or("").starts_with("/portal/login")),
        "the old session still works: {}",
        r.status()
    );

    // Someone the provider knows but fedrelay gives no role is not let in.
    let nobody = Browser::start().await?;
    sign_in(&nobody, &portal, "nobody", "nobody-password").await?;
    let error = nobody.text_of("#error").await?;
    ensure!(error.contains("no fedrelay role"), "{error}");
    ensure!(current_path(&nobody).await? == "/portal/callback");

    // No message text reached any node's log.
    for i in 0..2 {
        let log = w.cluster.node(i)?.output()?;
        ensure!(
            !log.contains("text the portal never shows") && !log.contains("canary-from-b"),
            "node {i} logged content"
        );
    }
    admin.close().await?;
    auditor.close().await?;
    nobody.close().await?;
    Ok(())
}
