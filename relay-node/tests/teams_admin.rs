//! The control plane and the Teams edge: what the relay keeps about a Teams user (the id,
//! name and email the Bot Framework gives it), shown to administrators and erased by
//! `forget`; a policy refusal explained to the Teams user by the bot.

mod common;

use anyhow::{Context, Result, ensure};
use common::teams::{self, User};
use common::{SECRET_B, Stream, client, post};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const BOOTSTRAP: &str = "bootstrap-token-of-the-teams-admin-test-0123456789";

async fn api(
    c: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut req = c
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await?;
    let s = r.status().as_u16();
    Ok((s, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_users_profile_and_contacts_are_shown_to_admins_and_forgotten_on_request()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, BOOTSTRAP)?;
    let rig = teams::start(&format!(
        "\n[api]\nlisten = \"127.0.0.1:{{API_PORT}}\"\nbootstrap_token_file = \"{}\"\n",
        token_file.display()
    ))
    .await?;
    let c = client()?;
    let base = rig.relay.api_url();
    let http = rig.relay.http_url();
    let alice = User::new("alice", "Alice Anders", 1);
    let mut bob = Stream::open(&c, &http, "b.example", SECRET_B, Some("$")).await?;
    teams::install(&rig, &alice).await?;
    let conv = alice.conversation.clone();
    teams::send_ok(
        &rig,
        &teams::personal(
            &rig,
            &alice,
            "message",
            json!({"text": "invite bob@b.example"}),
        ),
    )
    .await?;
    loop {
        let e = bob.next(WAIT).await?;
        if e.data["type"] == "contact_request" {
            break;
        }
    }

    // What the relay keeps: the Bot Framework's id, name and email, and the contact.
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::GET,
        "/api/v1/users/alice@contoso.com",
        BOOTSTRAP,
        None,
    )
    .await?;
    ensure!(s == 200, "{s} {v}");
    ensure!(v["platform"] == "teams", "{v}");
    ensure!(
        v["profile"]["name"] == "Alice Anders" && v["profile"]["email"] == "alice@contoso.com",
        "{v}"
    );
    ensure!(v["profile"]["id"] == alice.aad.as_str(), "{v}");
    let contacts = v["contacts"].as_array().context("contacts")?;
    ensure!(
        contacts.len() == 1 && contacts[0]["address"] == "bob@b.example",
        "{v}"
    );
    // Another domain's admin may not look.
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::POST,
        "/api/v1/tokens",
        BOOTSTRAP,
        Some(json!({"name": "b admin", "role": "domain-admin", "domains": ["b.example"]})),
    )
    .await?;
    ensure!(s == 201, "{s} {v}");
    let b_admin = v["token"].as_str().context("token")?.to_string();
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/users/alice@contoso.com"),
        (
            reqwest::Method::POST,
            "/api/v1/users/alice@contoso.com/forget",
        ),
    ] {
        let (s, v) = api(&c, &base, method.clone(), path, &b_admin, None).await?;
        ensure!(s == 403, "b's admin {method} {path}: {s} {v}");
    }

    // A rule written through the API refuses alice's next message; the bot says why.
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::PUT,
        "/api/v1/rules/no-b",
        BOOTSTRAP,
        Some(json!({"between": ["contoso.com", "b.example"], "action": "deny"})),
    )
    .await?;
    ensure!(s == 200, "{s} {v}");
    teams::send_ok(
        &rig,
        &teams::personal(
            &rig,
            &alice,
            "message",
            json!({"text": "to bob@b.example are you there?"}),
        ),
    )
    .await?;
    teams::wait_post(&rig, &conv, &["no-b", "denies"], WAIT).await?;
    // And bob's message to alice is refused in HTTP's terms.
    let (s, v) = post(
        &c,
        &http,
        "b.example",
        SECRET_B,
        &common::message("b-1", "bob", "alice@contoso.com", "hello?"),
    )
    .await?;
    ensure!(
        s == 403 && v["message"].as_str().unwrap_or("").contains("no-b"),
        "{s} {v}"
    );

    // The metadata log names alice (the invitation, bob's refused message).
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::GET,
        "/api/v1/log?user=alice@contoso.com",
        BOOTSTRAP,
        None,
    )
    .await?;
    let named = v["entries"].as_array().map_or(0, Vec::len);
    ensure!(s == 200 && named >= 2, "{s} {v}");

    // Forget: profile, contact and conversation reference are gone, and it is audited.
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::POST,
        "/api/v1/users/Alice@Contoso.com/forget",
        BOOTSTRAP,
        None,
    )
    .await?;
    ensure!(s == 200, "{s} {v}");
    ensure!(
        v["summary"]["teams"] == json!({"profile": true, "conversation": true, "contacts": 1}),
        "{v}"
    );
    ensure!(
        v["summary"]["metadata_entries_pseudonymised"]
            .as_u64()
            .is_some_and(|n| n as usize >= named),
        "{v}"
    );
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::GET,
        "/api/v1/log?user=alice@contoso.com",
        BOOTSTRAP,
        None,
    )
    .await?;
    ensure!(
        s == 200 && v["entries"] == json!([]),
        "alice is still in the log: {v}"
    );
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::GET,
        "/api/v1/log?domain=contoso.com",
        BOOTSTRAP,
        None,
    )
    .await?;
    ensure!(
        s == 200
            && v["entries"].as_array().is_some_and(|e| e.len() >= named
                && e.iter().any(|e| e["from"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("forgotten-") && f.ends_with("@contoso.com")))),
        "{v}"
    );
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::GET,
        "/api/v1/users/alice@contoso.com",
        BOOTSTRAP,
        None,
    )
    .await?;
    ensure!(
        s == 200 && v["profile"].is_null() && v["contacts"] == json!([]),
        "{s} {v}"
    );
    let (s, v) = api(
        &c,
        &base,
        reqwest::Method::GET,
        "/api/v1/audit",
        BOOTSTRAP,
        None,
    )
    .await?;
    ensure!(s == 200, "{s} {v}");
    let last = v["entries"]
        .as_array()
        .and_then(|e| e.last())
        .context("audit entries")?;
    ensure!(
        last["action"] == "user.forget"
            && last["who"] == "bootstrap"
            && last["detail"]
                .as_str()
                .unwrap_or("")
                .contains("alice@contoso.com"),
        "{last}"
    );
    Ok(())
}
