//! Deliveries to Teams when the Bot Connector misbehaves: an expired token is replaced once,
//! 429 waits for `Retry-After`, an outage holds messages until it ends, an undeliverable
//! message comes back to its sender as an error, and sends to one conversation stay within
//! Teams' published rate limits.

mod common;

use anyhow::{Context, Result, ensure};
use common::teams::{self, Rig, User, install};
use common::{SECRET_B, Stream, client, message, post};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use test_support::fake_bot_connector::Call;

const WAIT: Duration = Duration::from_secs(15);

/// A relay with alice installed in Teams, and bob's HTTP client.
struct Setup {
    rig: Rig,
    alice: User,
    c: reqwest::Client,
    base: String,
}

async fn setup(session_extra: &str) -> Result<Setup> {
    let rig = teams::start_with("", session_extra).await?;
    let alice = User::new("alice", "Alice Anders", 1);
    install(&rig, &alice).await?;
    let base = rig.relay.http_url();
    Ok(Setup {
        rig,
        alice,
        c: client()?,
        base,
    })
}

impl Setup {
    /// bob@b.example sends `text` to `to` as event `id`; its relay_msg_id.
    async fn bob_sends(&self, id: &str, to: &str, text: &str) -> Result<String> {
        let event = message(id, "bob", to, text);
        let (status, answer) = post(&self.c, &self.base, "b.example", SECRET_B, &event).await?;
        ensure!(status == 202, "bob's {id} answered {status}: {answer}");
        answer["relay_msg_id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no relay_msg_id in {answer}"))
    }

    async fn bob_to_alice(&self, id: &str, text: &str) -> Result<String> {
        self.bob_sends(id, "alice@contoso.com", text).await
    }

    /// Calls to alice's chat with the bot that carry `needle` in their text and answered
    /// `status` (any 2xx when `None`).
    fn to_alice(&self, calls: &[Call], needle: &str, status: Option<u16>) -> Vec<Call> {
        calls
            .iter()
            .filter(|c| {
                c.method == "POST"
                    && c.conversation_id == self.alice.conversation
                    && match status {
                        Some(s) => c.status == s,
                        None => (200..300).contains(&c.status),
                    }
                    && c.body["text"].as_str().is_some_and(|t| t.contains(needle))
            })
            .cloned()
            .collect()
    }

    /// Waits until a message with `needle` is posted in alice's chat; that post. It names
    /// bob as its sender.
    async fn delivered(&self, needle: &str) -> Result<Call> {
        let calls = self
            .rig
            .fake
            .wait_calls(&format!("{needle:?} posted to alice"), WAIT, |calls| {
                !self.to_alice(calls, needle, None).is_empty()
            })
            .await?;
        let post = self
            .to_alice(&calls, needle, None)
            .into_iter()
            .next()
            .context("the post vanished")?;
        let text = post.body["text"].as_str().unwrap_or_default();
        ensure!(
            text.contains("bob@b.example"),
            "the post does not say who sent it: {text}"
        );
        Ok(post)
    }

    /// Fails unless exactly one message with `needle` was posted in alice's chat.
    fn posted_once(&self, needle: &str) -> Result<()> {
        let n = self.to_alice(&self.rig.fake.calls(), needle, None).len();
        ensure!(n == 1, "{needle:?} was posted to alice {n} times");
        Ok(())
    }
}

#[tokio::test]
async fn an_expired_token_is_replaced_once_and_then_cached() -> Result<()> {
    let s = setup("").await?;
    s.bob_to_alice("m1", "token one").await?;
    let m1 = s.delivered("token one").await?;
    ensure!(
        m1.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer ")),
        "m1 was posted with {:?}",
        m1.authorization
    );

    s.rig.fake.expire_tokens();
    let tokens = s.rig.fake.token_requests();
    s.bob_to_alice("m2", "token two").await?;
    let m2 = s.delivered("token two").await?;
    let fetched = s.rig.fake.token_requests() - tokens;
    ensure!(fetched == 1, "m2 took {fetched} token requests, not one");
    let refused = s.to_alice(&s.rig.fake.calls(), "token two", Some(401));
    ensure!(
        refused.len() == 1 && refused[0].authorization == m1.authorization,
        "m2 was first refused once with m1's expired token: {refused:?}"
    );
    ensure!(
        m2.authorization != m1.authorization,
        "m2 was posted with m1's expired token"
    );

    // The new token is cached.
    let tokens = s.rig.fake.token_requests();
    s.bob_to_alice("m3", "token three").await?;
    let m3 = s.delivered("token three").await?;
    ensure!(
        s.rig.fake.token_requests() == tokens,
        "m3 requested a token although the one of m2 is valid"
    );
    ensure!(
        m3.authorization == m2.authorization,
        "m3 was not posted with m2's token"
    );
    for needle in ["token one", "token two", "token three"] {
        s.posted_once(needle)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_throttled_post_waits_for_retry_after() -> Result<()> {
    let s = setup("").await?;
    s.rig.fake.fail_next(1, 429, Some(1));
    s.bob_to_alice("m4", "throttled four").await?;
    let ok = s.delivered("throttled four").await?;
    let throttled = s.to_alice(&s.rig.fake.calls(), "throttled four", Some(429));
    let [throttled] = throttled.as_slice() else {
        anyhow::bail!("m4 was throttled {} times, not once", throttled.len());
    };
    let waited = ok.at.duration_since(throttled.at);
    ensure!(
        waited >= Duration::from_millis(950),
        "m4 was retried {waited:?} after a 429 with Retry-After: 1"
    );

    s.bob_to_alice("m4-after", "after four").await?;
    s.delivered("after four").await?;
    s.posted_once("throttled four")
}

#[tokio::test]
async fn messages_wait_out_an_outage_in_order() -> Result<()> {
    let s = setup("").await?;
    s.rig.fake.set_down(true);
    s.bob_to_alice("m5", "outage five").await?;
    s.bob_to_alice("m6", "outage six").await?;
    let conversation = s.alice.conversation.clone();
    s.rig
        .fake
        .wait_calls("two failed posts to alice", WAIT, |calls| {
            calls
                .iter()
                .filter(|c| c.conversation_id == conversation && c.status == 503)
                .count()
                >= 2
        })
        .await?;
    s.rig.fake.set_down(false);

    let five = s.delivered("outage five").await?;
    let six = s.delivered("outage six").await?;
    ensure!(five.at <= six.at, "m6 was posted before m5");
    s.bob_to_alice("m6-after", "after six").await?;
    let after = s.delivered("after six").await?;
    ensure!(six.at <= after.at, "a later message overtook m6");
    let sent = s.rig.fake.sent();
    let order: Vec<&str> = sent
        .iter()
        .filter(|c| c.conversation_id == conversation)
        .filter_map(|c| c.body["text"].as_str())
        .filter_map(|t| {
            ["outage five", "outage six", "after six"]
                .into_iter()
                .find(|n| t.contains(n))
        })
        .collect();
    ensure!(
        order == ["outage five", "outage six", "after six"],
        "posted to alice in the order {order:?}"
    );
    Ok(())
}

/// Reads bob's stream until `want` error events (by the relay_msg_id they are about) arrived.
async fn errors_about(stream: &mut Stream, want: &[&str]) -> Result<HashMap<String, Value>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut found = HashMap::new();
    while !want.iter().all(|id| found.contains_key(*id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = stream
            .next(left)
            .await
            .with_context(|| format!("error events seen so far: {found:?}"))?;
        if ev.data["type"] == "error" {
            let about = ev.data["target"]["relay_msg_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            found.insert(about, ev.data);
        }
    }
    Ok(found)
}

#[tokio::test]
async fn undeliverable_messages_come_back_as_errors() -> Result<()> {
    let s = setup("max_attempts = 3").await?;
    let mut bob = Stream::open(&s.c, &s.base, "b.example", SECRET_B, None).await?;
    s.rig.fake.set_down(true);
    let m7 = s.bob_to_alice("m7", "never seven").await?;
    let to_carol = s
        .bob_sends("m8", "carol@contoso.com", "carol never installed")
        .await?;

    let errors = errors_about(&mut bob, &[m7.as_str(), to_carol.as_str()]).await?;
    let e7 = &errors[&m7];
    ensure!(
        e7["code"] == "undeliverable" && e7["to"] == "bob@b.example",
        "the error about m7: {e7}"
    );
    let attempts = s.to_alice(&s.rig.fake.calls(), "never seven", Some(503));
    ensure!(!attempts.is_empty(), "m7 failed without a delivery attempt");
    let carol = &errors[&to_carol];
    ensure!(
        carol["code"] == "undeliverable" && carol["detail"] == "teams_not_installed",
        "the error about the message to carol: {carol}"
    );
    ensure!(
        s.rig.fake.sent().len() == 1,
        "only alice's welcome was posted: {:?}",
        s.rig.fake.sent()
    );
    Ok(())
}

#[tokio::test]
async fn sends_to_one_conversation_stay_within_teams_limits() -> Result<()> {
    let s = setup("").await?;
    let texts: Vec<String> = (1..=12).map(|i| format!("paced {i:02}")).collect();
    for (i, text) in texts.iter().enumerate() {
        s.bob_to_alice(&format!("p{i}"), text).await?;
    }
    let last = texts.last().context("no messages")?;
    s.delivered(last).await?;

    let sent: Vec<Call> = s
        .rig
        .fake
        .sent()
        .into_iter()
        .filter(|c| c.conversation_id == s.alice.conversation)
        .collect();
    let paced: Vec<&str> = sent
        .iter()
        .filter_map(|c| c.body["text"].as_str())
        .filter_map(|t| texts.iter().find(|n| t.contains(n.as_str())))
        .map(String::as_str)
        .collect();
    ensure!(
        paced == texts.iter().map(String::as_str).collect::<Vec<_>>(),
        "posted to alice: {paced:?}"
    );
    // Every post to the conversation counts, the welcome included. The times are when the
    // fake received each post, blurred by loopback and scheduling delays on a busy machine:
    // windows 100 ms shorter than Teams' are checked. Unpaced, all 12 would arrive within
    // a fraction of that.
    let mut at: Vec<Instant> = sent.iter().map(|c| c.at).collect();
    at.sort();
    for (window, max) in [
        (Duration::from_millis(900), 7),
        (Duration::from_millis(1900), 8),
    ] {
        for (i, start) in at.iter().enumerate() {
            let n = at[i..]
                .iter()
                .take_while(|t| t.duration_since(*start) < window)
                .count();
            ensure!(
                n <= max,
                "{n} posts to alice within {window:?} from post {i} (limit {max}); offsets {:?}",
                at.iter()
                    .map(|t| t.duration_since(at[0]))
                    .collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}
