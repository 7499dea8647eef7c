//! The Teams edge takes an activity only with a token the Bot Connector signed for this bot
//! and this activity: every forgery and misdirected token is refused with 401 or 403, and a
//! refused activity has no effect (nothing relayed, nothing answered in Teams).

mod common;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::teams::{self, OTHER_TENANT, Rig, User, install, personal, posted_texts, send_ok};
use common::{SECRET_B, Stream, client, message, post};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use test_support::fake_bot_connector::{Forgery, post_activity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// POSTs `activity` with `authorization` as the `Authorization` header; the status and the
/// JSON answer (`Null` when there is none).
async fn post_with(
    rig: &Rig,
    activity: &Value,
    authorization: Option<&str>,
) -> Result<(u16, Value)> {
    let (status, body) = post_activity(&rig.relay.http_url(), activity, authorization).await?;
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn ensure_refused(what: &str, (status, body): (u16, Value), want: u16) -> Result<()> {
    ensure!(
        status == want,
        "{what}: answered {status}, not {want}: {body}"
    );
    ensure!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: the {status} answer has no `error`: {body}"
    );
    Ok(())
}

/// The next `message` event on `stream`; fails on any event before it that carries `forbidden`.
async fn next_message(stream: &mut Stream, forbidden: &str) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = stream
            .next(left)
            .await
            .context("waiting for a message event")?;
        ensure!(
            !ev.data.to_string().contains(forbidden),
            "a refused activity reached bob: {}",
            ev.data
        );
        if ev.data["type"] == "message" {
            return Ok(ev.data);
        }
    }
}

fn from_alice(rig: &Rig, alice: &User, text: &str) -> Value {
    personal(rig, alice, "message", json!({ "text": text }))
}

#[tokio::test]
async fn forged_and_misdirected_tokens_are_refused_without_effect() -> Result<()> {
    let rig = teams::start("").await?;
    // Microsoft's JWKS also serves keys endorsed for other channels; this one only for webchat.
    let webchat_kid = rig.fake.add_unendorsed_key();
    let alice = User::new("alice", "Alice Anders", 1);
    install(&rig, &alice).await?;
    let c = client()?;
    let base = rig.relay.http_url();
    let mut bob = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;
    send_ok(&rig, &from_alice(&rig, &alice, "chat bob@b.example")).await?;
    // A message from alice is relayed to bob now.
    send_ok(&rig, &from_alice(&rig, &alice, "before")).await?;
    let first = next_message(&mut bob, "forged").await?;
    ensure!(
        first["text"] == "before" && first["from"] == "alice@contoso.com",
        "alice's first message reached bob as {first}"
    );

    let calls_before = rig.fake.calls().len();
    for f in Forgery::ALL {
        if f.must_be_accepted() {
            continue;
        }
        let a = from_alice(&rig, &alice, &format!("forged {f:?}"));
        let fetches = rig.fake.jwks_fetches();
        let jwt = rig.fake.forge(f, &a);
        if f == Forgery::NoEndorsement {
            // Served since before the relay's first fetch: refused for its endorsements
            // alone, not as an unknown key.
            ensure!(
                kid_of(&jwt)? == webchat_kid,
                "NoEndorsement signs with {webchat_kid}"
            );
        }
        let token = bearer(&jwt);
        let want = match f {
            Forgery::ServiceUrlMismatch | Forgery::NoEndorsement => 403,
            _ => 401,
        };
        ensure_refused(
            &format!("{f:?}"),
            post_with(&rig, &a, Some(&token)).await?,
            want,
        )?;
        let fetched = rig.fake.jwks_fetches() - fetches;
        if f == Forgery::UnknownKid {
            ensure!(
                fetched == 1,
                "an unknown kid made {fetched} key fetches, not one"
            );
            ensure_refused(
                "UnknownKid again",
                post_with(&rig, &a, Some(&token)).await?,
                401,
            )?;
            let again = rig.fake.jwks_fetches() - fetches;
            ensure!(
                again == 1,
                "the same unknown kid within the minimum refetch interval fetched the keys again ({again} fetches)"
            );
        } else {
            ensure!(
                fetched == 0,
                "{f:?} made the relay fetch the keys ({fetched} times)"
            );
        }
    }

    let a = from_alice(&rig, &alice, "forged without authorization");
    ensure_refused("no Authorization", post_with(&rig, &a, None).await?, 401)?;
    let a = from_alice(&rig, &alice, "forged basic");
    ensure_refused("Basic", post_with(&rig, &a, Some("Basic xyz")).await?, 401)?;
    let a = from_alice(&rig, &alice, "forged garbage");
    ensure_refused(
        "Bearer garbage",
        post_with(&rig, &a, Some("Bearer garbage")).await?,
        401,
    )?;
    let a = from_alice(&rig, &alice, "forged bare token");
    let token = rig.fake.token_for(&a);
    ensure_refused("no scheme", post_with(&rig, &a, Some(&token)).await?, 401)?;

    // A valid token, but for another activity: this one names another service URL.
    let signed = from_alice(&rig, &alice, "forged signed original");
    let token = bearer(&rig.fake.token_for(&signed));
    let mut swapped = from_alice(&rig, &alice, "forged swapped body");
    swapped["serviceUrl"] = json!("https://smba.trafficmanager.net/amer/");
    ensure_refused(
        "another activity's token",
        post_with(&rig, &swapped, Some(&token)).await?,
        403,
    )?;

    // Signed for what it says, but from a tenant this relay does not serve.
    let mut other = from_alice(&rig, &alice, "forged other tenant");
    other["channelData"]["tenant"]["id"] = json!(OTHER_TENANT);
    other["conversation"]["tenantId"] = json!(OTHER_TENANT);
    let token = bearer(&rig.fake.token_for(&other));
    ensure_refused(
        "another tenant",
        post_with(&rig, &other, Some(&token)).await?,
        403,
    )?;

    // Signed for what it says, but the service URL is not a Bot Connector host this relay
    // may call (taking it would redirect alice's deliveries there).
    let mut elsewhere = from_alice(&rig, &alice, "forged service url");
    elsewhere["serviceUrl"] = json!("https://evil.example/amer/");
    let token = bearer(&rig.fake.token_for(&elsewhere));
    ensure_refused(
        "a service URL outside the allowed prefixes",
        post_with(&rig, &elsewhere, Some(&token)).await?,
        403,
    )?;

    // Nothing of the above reached bob: alice's next valid message is the next one he gets.
    send_ok(&rig, &from_alice(&rig, &alice, "marker")).await?;
    let next = next_message(&mut bob, "forged").await?;
    ensure!(
        next["text"] == "marker",
        "bob's next message after the refused ones is {next}"
    );
    // And nothing was answered or looked up in Teams for them.
    let calls = rig.fake.calls();
    let since: Vec<String> = calls[calls_before..]
        .iter()
        .map(|c| format!("{} {} -> {}: {}", c.method, c.path, c.status, c.body))
        .collect();
    ensure!(
        since.is_empty(),
        "connector calls while refusing activities: {since:?}"
    );

    // A token expired less than the clock skew ago is still good.
    let a = from_alice(&rig, &alice, "within skew");
    let token = bearer(&rig.fake.forge(Forgery::ExpiredWithinSkew, &a));
    let (status, body) = post_with(&rig, &a, Some(&token)).await?;
    ensure!(
        (200..300).contains(&status),
        "a token expired within the skew answered {status}: {body}"
    );
    let next = next_message(&mut bob, "forged").await?;
    ensure!(
        next["text"] == "within skew" && next["from_platform"] == "teams",
        "the message with a token expired within the skew reached bob as {next}"
    );

    // alice's conversation is still where the Bot Connector said it is.
    let (s, acc) = post(
        &c,
        &base,
        "b.example",
        SECRET_B,
        &message("after-matrix", "bob", "alice@contoso.com", "still here"),
    )
    .await?;
    ensure!(s == 202, "bob's message answered {s}: {acc}");
    let conversation = alice.conversation.clone();
    rig.fake
        .wait_calls("bob's message in alice's chat", WAIT, |calls| {
            calls.iter().any(|c| {
                c.conversation_id == conversation
                    && (200..300).contains(&c.status)
                    && c.body["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("still here"))
            })
        })
        .await?;
    Ok(())
}

/// The `kid` in a JWT's header.
fn kid_of(jwt: &str) -> Result<String> {
    let header = jwt.split('.').next().context("empty token")?;
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?;
    header["kid"]
        .as_str()
        .map(str::to_owned)
        .context("no kid in the header")
}

#[tokio::test]
async fn a_rotated_signing_key_is_fetched_once() -> Result<()> {
    // The first unknown key id after start may always refetch, whatever the interval.
    let rig = teams::start("").await?;
    let alice = User::new("alice", "Alice Anders", 1);
    install(&rig, &alice).await?;
    let fetches = rig.fake.jwks_fetches();
    let kid = rig.fake.rotate_key();

    for round in 1..=2 {
        let a = from_alice(&rig, &alice, "help");
        let token = rig.fake.token_for(&a);
        ensure!(
            kid_of(&token)? == kid,
            "the fake signs with {kid} after rotation"
        );
        let (status, body) = post_with(&rig, &a, Some(&bearer(&token))).await?;
        ensure!(
            (200..300).contains(&status),
            "round {round}: a token of the rotated-in key answered {status}: {body}"
        );
        let fetched = rig.fake.jwks_fetches() - fetches;
        ensure!(
            fetched == 1,
            "round {round}: {fetched} key fetches since the rotation, not one"
        );
    }
    let answers = posted_texts(&rig, &alice.conversation);
    ensure!(
        answers
            .iter()
            .filter(|t| t.starts_with("<b>Commands</b>"))
            .count()
            == 2,
        "both help requests are answered: {answers:?}"
    );
    Ok(())
}

/// POSTs `activity` with a chunked body (no `Content-Length`); the status.
async fn post_chunked(rig: &Rig, activity: &Value, authorization: &str) -> Result<u16> {
    let body = activity.to_string();
    let authority = format!("127.0.0.1:{}", rig.relay.http_port);
    let mut request = format!(
        "POST /api/messages HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nAuthorization: {authorization}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    for chunk in body.as_bytes().chunks(1000) {
        request.push_str(&format!("{:x}\r\n", chunk.len()));
        request.push_str(std::str::from_utf8(chunk)?);
        request.push_str("\r\n");
    }
    request.push_str("0\r\n\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(WAIT, exchange).await??;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    match status {
        Some(s) => Ok(s),
        None => bail!("no status line in {text:?}"),
    }
}

#[tokio::test]
async fn an_activity_over_the_size_limit_is_refused() -> Result<()> {
    let rig = teams::start("max_body_bytes = 2048").await?;
    let alice = User::new("alice", "Alice Anders", 1);
    install(&rig, &alice).await?;

    let big = from_alice(&rig, &alice, &"x".repeat(4096));
    let token = bearer(&rig.fake.token_for(&big));
    let (status, body) = post_with(&rig, &big, Some(&token)).await?;
    ensure!(
        status == 413 && body["error"] == "payload_too_large",
        "a 4 KB activity answered {status}: {body}"
    );
    let status = post_chunked(&rig, &big, &token).await?;
    ensure!(
        status == 413,
        "a 4 KB activity without Content-Length answered {status}"
    );

    // A small one is taken (and answered); the big ones were not (they would have been
    // answered "Who is this for?").
    send_ok(&rig, &from_alice(&rig, &alice, "help")).await?;
    let answers = posted_texts(&rig, &alice.conversation);
    ensure!(
        answers.len() == 2 && answers.iter().all(|t| !t.contains("Who is this for")),
        "alice's chat holds the welcome and the help only: {answers:?}"
    );
    Ok(())
}
