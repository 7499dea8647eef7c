//! A Teams user (through the fake Bot Connector) and a user on the HTTP edge: contact
//! request and answer, chat both ways, rich text, edits, deletes, reactions, typing, files,
//! profiles, a channel, policy refusals and the bot's own answers.

mod common;

use anyhow::{Context, Result, ensure};
use common::teams::{self, Rig, User};
use common::{SECRET_B, Stream, client, post};
use serde_json::{Value, json};
use std::time::Duration;
use test_support::fake_bot_connector::Call;

const WAIT: Duration = Duration::from_secs(10);

async fn wait_post(rig: &Rig, conversation: &str, needles: &[&str]) -> Result<Call> {
    teams::wait_post(rig, conversation, needles, WAIT).await
}

/// The next event on bob's stream of a type other than presence.
async fn next_event(s: &mut Stream) -> Result<Value> {
    loop {
        let e = s.next(WAIT).await?;
        if e.data["type"] != "presence" {
            return Ok(e.data);
        }
    }
}

/// A rig with alice installed, a client, and b.example's stream from now on (bob's side).
async fn with_alice() -> Result<(Rig, User, reqwest::Client, Stream)> {
    let rig = teams::start("").await?;
    let alice = User::new("alice", "Alice Anders", 1);
    let c = client()?;
    let bob = Stream::open(&c, &rig.relay.http_url(), "b.example", SECRET_B, Some("$")).await?;
    teams::install(&rig, &alice).await?;
    Ok((rig, alice, c, bob))
}

async fn bob_posts(base: &str, event: Value) -> Result<Value> {
    let c = client()?;
    let (status, v) = post(&c, base, "b.example", SECRET_B, &event).await?;
    ensure!(
        status == 202,
        "bob's {} answered {status}: {v}",
        event["type"]
    );
    Ok(v)
}

async fn alice_says(rig: &Rig, alice: &User, extra: Value) -> Result<Value> {
    let a = teams::personal(rig, alice, "message", extra);
    teams::send_ok(rig, &a).await?;
    Ok(a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_and_http_users_chat_with_everything() -> Result<()> {
    // Installing the bot: a welcome naming the user's relay address.
    let (rig, alice, _, mut bob) = with_alice().await?;
    let base = rig.relay.http_url();
    let conv = alice.conversation.clone();
    wait_post(&rig, &conv, &["alice@contoso.com", "invite"]).await?;

    // invite → a contact request on bob's side.
    alice_says(
        &rig,
        &alice,
        json!({"text": "invite bob@b.example let's talk"}),
    )
    .await?;
    let req = next_event(&mut bob).await?;
    ensure!(req["type"] == "contact_request", "{req}");
    ensure!(
        req["from"] == "alice@contoso.com" && req["from_platform"] == "teams",
        "{req}"
    );
    ensure!(req["note"] == "let's talk", "{req}");
    wait_post(&rig, &conv, &["Invitation sent", "bob@b.example"]).await?;

    // Bob accepts: Alice is told, and her chat now goes to bob.
    bob_posts(
        &base,
        json!({"id": "acc-1", "type": "contact_response", "from": "bob", "to": "alice@contoso.com", "accepted": true}),
    )
    .await?;
    wait_post(
        &rig,
        &conv,
        &["bob@b.example", "accepted your contact request"],
    )
    .await?;

    // Bob → Alice: shown with who sent it.
    let m1 = bob_posts(
        &base,
        json!({"id": "b-1", "type": "message", "from": "bob", "to": "alice@contoso.com",
               "text": "hello alice", "rich": [{"text": "hello "}, {"text": "alice", "bold": true}]}),
    )
    .await?;
    let shown = wait_post(
        &rig,
        &conv,
        &["bob@b.example", "HTTP", "hello <b>alice</b>"],
    )
    .await?;
    let bob_msg_activity = shown.reply["id"]
        .as_str()
        .context("activity id")?
        .to_string();

    // Alice → Bob (her focus is bob after the accept), with rich text from the HTML body.
    let a1 = alice_says(
        &rig,
        &alice,
        json!({"text": "hi bob", "textFormat": "xml", "attachments": [
            {"contentType": "text/html", "content": "<p>hi <b>bob</b> &amp; <a href=\"https://ex.example/x\">link</a></p>"}]}),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "message" && e["text"] == "hi bob & link",
        "{e}"
    );
    ensure!(
        e["rich"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r["bold"] == true && r["text"] == "bob")
            && r.iter().any(|r| r["link"] == "https://ex.example/x")),
        "{e}"
    );
    let a1_relay = e["relay_msg_id"].as_str().context("relay id")?.to_string();

    // Alice edits, then deletes, her message.
    teams::send_ok(
        &rig,
        &teams::edit(&rig, &alice, &a1["id"], "hi bob (edited)"),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(e["type"] == "edit" && e["text"] == "hi bob (edited)", "{e}");
    ensure!(e["target"]["relay_msg_id"] == a1_relay.as_str(), "{e}");
    teams::send_ok(
        &rig,
        &teams::personal(
            &rig,
            &alice,
            "messageDelete",
            json!({
            "id": a1["id"],
            "channelData": {"tenant": {"id": teams::TENANT}, "eventType": "softDeleteMessage"}}),
        ),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "delete" && e["target"]["relay_msg_id"] == a1_relay.as_str(),
        "{e}"
    );

    // Alice reacts to bob's message: bob's side gets it against his own event id.
    teams::send_ok(
        &rig,
        &teams::personal(
            &rig,
            &alice,
            "messageReaction",
            json!({
            "replyToId": bob_msg_activity, "reactionsAdded": [{"type": "like"}]}),
        ),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "reaction" && e["emoji"] == "👍" && e["added"] == true,
        "{e}"
    );
    ensure!(e["target"]["event_id"] == "b-1", "{e}");
    ensure!(e["target"]["relay_msg_id"] == m1["relay_msg_id"], "{e}");

    // Bob edits and deletes his message: the bot's own message is changed and removed.
    bob_posts(
        &base,
        json!({"id": "b-1-edit", "type": "edit", "from": "bob", "to": "alice@contoso.com",
               "target": {"event_id": "b-1"}, "text": "hello again"}),
    )
    .await?;
    rig.fake
        .wait_calls("the bot message updated", WAIT, |cs| {
            cs.iter().any(|c| {
                c.method == "PUT"
                    && c.status == 200
                    && c.activity_id.as_deref() == Some(bob_msg_activity.as_str())
                    && c.body["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("hello again") && t.contains("edited"))
            })
        })
        .await?;
    // Bob reacts to Alice's (deleted) message by its relay id.
    bob_posts(
        &base,
        json!({"id": "b-r1", "type": "reaction", "from": "bob", "to": "alice@contoso.com",
               "target": {"relay_msg_id": a1_relay}, "emoji": "🎉", "added": true}),
    )
    .await?;
    wait_post(&rig, &conv, &["bob@b.example", "reacted", "🎉"]).await?;
    bob_posts(
        &base,
        json!({"id": "b-1-del", "type": "delete", "from": "bob", "to": "alice@contoso.com",
               "target": {"event_id": "b-1"}}),
    )
    .await?;
    rig.fake
        .wait_calls("the bot message deleted", WAIT, |cs| {
            cs.iter().any(|c| {
                c.method == "DELETE"
                    && c.status == 200
                    && c.activity_id.as_deref() == Some(bob_msg_activity.as_str())
            })
        })
        .await?;

    // Typing both ways.
    bob_posts(
        &base,
        json!({"id": "b-t1", "type": "typing", "from": "bob", "to": "alice@contoso.com", "active": true}),
    )
    .await?;
    rig.fake
        .wait_calls("a typing indicator", WAIT, |cs| {
            cs.iter()
                .any(|c| c.conversation_id == conv && c.body["type"] == "typing")
        })
        .await?;
    teams::send_ok(&rig, &teams::personal(&rig, &alice, "typing", json!({}))).await?;
    let e = next_event(&mut bob).await?;
    ensure!(e["type"] == "typing" && e["active"] == true, "{e}");

    // Files both ways, as links.
    alice_says(
        &rig,
        &alice,
        json!({"text": "", "attachments": [{
            "contentType": "application/vnd.microsoft.teams.file.download.info",
            "name": "plan.pdf",
            "content": {"downloadUrl": "https://contoso.sharepoint.com/plan.pdf?tempauth=x", "uniqueId": "u1", "fileType": "pdf"}}]}),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "file" && e["file"]["name"] == "plan.pdf",
        "{e}"
    );
    ensure!(e["file"]["mime"] == "application/pdf", "{e}");
    ensure!(
        e["file"]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://contoso.sharepoint.com/plan.pdf")),
        "{e}"
    );
    bob_posts(
        &base,
        json!({"id": "b-f1", "type": "file", "from": "bob", "to": "alice@contoso.com",
               "file": {"name": "specs.zip", "size": 2048, "mime": "application/zip", "url": "https://b.example/f/specs.zip"}}),
    )
    .await?;
    wait_post(
        &rig,
        &conv,
        &["specs.zip", "https://b.example/f/specs.zip", "2 KB"],
    )
    .await?;

    // Profiles both ways: alice asks bob's side, bob answers; bob asks, the edge answers
    // for alice with what the Bot Framework gave it.
    alice_says(&rig, &alice, json!({"text": "profile bob@b.example"})).await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "profile_query" && e["from"] == "alice@contoso.com",
        "{e}"
    );
    bob_posts(
        &base,
        json!({"id": "b-p1", "type": "profile", "from": "bob", "to": "alice@contoso.com",
               "profile": {"display_name": "Bob Builder", "email": "bob@b.example", "title": "Engineer"}}),
    )
    .await?;
    wait_post(&rig, &conv, &["Bob Builder", "Engineer"]).await?;
    bob_posts(
        &base,
        json!({"id": "b-pq", "type": "profile_query", "from": "bob", "to": "alice@contoso.com"}),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "profile" && e["profile"]["display_name"] == "Alice Anders",
        "{e}"
    );
    ensure!(e["profile"]["email"] == "alice@contoso.com", "{e}");
    // Known by name now: bob's next message is headed "Bob Builder".
    bob_posts(
        &base,
        common::message("b-2", "bob", "alice@contoso.com", "named now"),
    )
    .await?;
    wait_post(&rig, &conv, &["<b>Bob Builder</b>", "named now"]).await?;

    // A reply to a relayed message goes to its sender even with the focus elsewhere.
    let once = alice_says(&rig, &alice, json!({"text": "to bob@b.example one-off"})).await?;
    let e = next_event(&mut bob).await?;
    ensure!(e["type"] == "message" && e["text"] == "one-off", "{e}");
    let once_relay = e["relay_msg_id"].clone();
    // Editing such a message edits its text, not the command around it.
    teams::send_ok(
        &rig,
        &teams::edit(&rig, &alice, &once["id"], "to bob@b.example one-off, fixed"),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(e["type"] == "edit" && e["text"] == "one-off, fixed", "{e}");
    ensure!(e["target"]["relay_msg_id"] == once_relay, "{e}");

    // contacts lists bob, accepted, with his presence once he publishes it.
    bob_posts(
        &base,
        json!({"id": "b-pr", "type": "presence", "from": "bob", "to": "*", "availability": "away", "note": "lunch"}),
    )
    .await?;
    let listed = |texts: &[String]| {
        texts.iter().any(|t| {
            t.contains("Your contacts") && t.contains("bob@b.example") && t.contains("away")
        })
    };
    test_support::wait_for("contacts with bob away", WAIT, || async {
        if listed(&teams::posted_texts(&rig, &conv)) {
            return Some(());
        }
        alice_says(&rig, &alice, json!({"text": "contacts"}))
            .await
            .ok()?;
        let calls = rig
            .fake
            .wait_calls("the contacts answer", WAIT, |cs| {
                cs.iter().any(|c| {
                    c.body["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("Your contacts"))
                })
            })
            .await
            .ok()?;
        calls
            .iter()
            .any(|c| {
                c.body["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("Your contacts") && t.contains("away"))
            })
            .then_some(())
    })
    .await?;

    // Bob's status reaches alice's: her `status busy` is published to bob.
    alice_says(&rig, &alice, json!({"text": "status busy in a meeting"})).await?;
    let e = loop {
        let e = bob.next(WAIT).await?;
        if e.data["type"] == "presence" && e.data["availability"] == "busy" {
            break e.data;
        }
    };
    ensure!(
        e["note"] == "in a meeting" && e["from"] == "alice@contoso.com",
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_requests_from_outside_are_answered_in_teams() -> Result<()> {
    let (rig, alice, c, mut bob) = with_alice().await?;
    let base = rig.relay.http_url();
    let conv = alice.conversation.clone();

    // Bob asks; Teams shows a card with Accept / Decline.
    bob_posts(
        &base,
        json!({"id": "cr-1", "type": "contact_request", "from": "bob", "to": "alice@contoso.com", "note": "from the conference"}),
    )
    .await?;
    let card = wait_post(&rig, &conv, &["bob@b.example", "wants to connect"]).await?;
    ensure!(
        card.body["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive",
        "{}",
        card.body
    );
    // Carol asks too; `accept` alone is then ambiguous.
    bob_posts(
        &base,
        json!({"id": "cr-2", "type": "contact_request", "from": "carol", "to": "alice@contoso.com"}),
    )
    .await?;
    wait_post(&rig, &conv, &["carol@b.example", "wants to connect"]).await?;
    alice_says(&rig, &alice, json!({"text": "accept"})).await?;
    wait_post(&rig, &conv, &["Several people are waiting"]).await?;

    // The card's Accept button is an invoke, answered in the HTTP response.
    let invoke = teams::personal(
        &rig,
        &alice,
        "invoke",
        json!({"name": "adaptiveCard/action", "value": {"action": {"type": "Action.Execute", "verb": "accept",
               "data": {"fedrelay": "accept", "address": "bob@b.example"}}}}),
    );
    let (status, body) = teams::send(&rig, &invoke).await?;
    ensure!(status == 200, "{status} {body}");
    let answer: Value = serde_json::from_str(&body)?;
    ensure!(answer["statusCode"] == 200, "{answer}");
    ensure!(
        answer["value"]
            .as_str()
            .is_some_and(|v| v.contains("connected")),
        "{answer}"
    );
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "contact_response" && e["accepted"] == true,
        "{e}"
    );
    ensure!(e["to"] == "bob@b.example", "{e}");

    // Carol is declined by name.
    alice_says(&rig, &alice, json!({"text": "decline carol@b.example"})).await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "contact_response" && e["accepted"] == false,
        "{e}"
    );
    ensure!(e["to"] == "carol@b.example", "{e}");

    // An "accepted" nobody asked for changes nothing: carol (c.example) is not made a
    // contact and does not take over alice's chat with bob. Her message after it proves
    // the answer was handled first (one session, in order).
    let (status, v) = post(&c, &base, "c.example", common::SECRET_C,
        &json!({"id": "c-acc", "type": "contact_response", "from": "carol", "to": "alice@contoso.com", "accepted": true})).await?;
    ensure!(status == 202, "{status} {v}");
    let (status, v) = post(
        &c,
        &base,
        "c.example",
        common::SECRET_C,
        &common::message("c-m1", "carol", "alice@contoso.com", "hello from c"),
    )
    .await?;
    ensure!(status == 202, "{status} {v}");
    wait_post(&rig, &conv, &["carol@c.example", "hello from c"]).await?;
    ensure!(
        !teams::posted_texts(&rig, &conv)
            .iter()
            .any(|t| t.contains("carol@c.example") && t.contains("accepted")),
        "an unasked-for answer was shown as an acceptance"
    );
    alice_says(&rig, &alice, json!({"text": "still for bob"})).await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "message" && e["text"] == "still for bob",
        "{e}"
    );

    // An invoke the bot does not handle: 501, as the Bot Framework SDK answers.
    let other = teams::personal(
        &rig,
        &alice,
        "invoke",
        json!({"name": "composeExtension/query", "value": {}}),
    );
    let (status, _) = teams::send(&rig, &other).await?;
    ensure!(status == 501, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_relayed_to_its_invited_outside_members() -> Result<()> {
    let (rig, alice, c, mut outside) = with_alice().await?;
    let base = rig.relay.http_url();
    let mut carol = Stream::open(&c, &base, "c.example", common::SECRET_C, Some("$")).await?;
    let channel = "19:projectx@thread.tacv2";
    let in_channel = |text: &str| {
        teams::in_channel(
            &rig,
            &alice,
            channel,
            "message",
            json!({
            "text": format!("<at>fedrelay</at> {text}"),
            "entities": [{"type": "mention", "text": "<at>fedrelay</at>",
                          "mentioned": {"id": format!("28:{}", rig.fake.config().app_id), "name": "fedrelay"}}]}),
        )
    };

    // The bot is added to the team; in the channel, alice invites bob and carol.
    let added = teams::in_channel(
        &rig,
        &alice,
        channel,
        "conversationUpdate",
        json!({
        "membersAdded": [{"id": format!("28:{}", rig.fake.config().app_id)}]}),
    );
    teams::send_ok(&rig, &added).await?;
    let mut channel_addr = String::new();
    for (who, stream) in [
        ("bob@b.example", &mut outside),
        ("carol@c.example", &mut carol),
    ] {
        teams::send_ok(&rig, &in_channel(&format!("invite {who}"))).await?;
        let e = next_event(stream).await?;
        ensure!(
            e["type"] == "channel_invite" && e["channel_name"] == "Project X",
            "{e}"
        );
        ensure!(e["to"] == who, "{e}");
        channel_addr = e["channel_id"].as_str().context("channel id")?.to_string();
        wait_post(&rig, channel, &[who, "is invited"]).await?;
    }
    ensure!(
        channel_addr.starts_with('#') && channel_addr.ends_with("@contoso.com"),
        "{channel_addr}"
    );

    // A channel message mentioning the bot reaches both.
    teams::send_ok(&rig, &in_channel("welcome to Project X")).await?;
    for (who, stream) in [
        ("bob@b.example", &mut outside),
        ("carol@c.example", &mut carol),
    ] {
        let e = next_event(stream).await?;
        ensure!(
            e["type"] == "message" && e["text"] == "welcome to Project X",
            "{e}"
        );
        ensure!(e["from"] == "alice@contoso.com" && e["to"] == who, "{e}");
    }

    // A colleague joins the team: the outside members are told who.
    let dave = User::new("dave", "Dave Dalton", 4);
    rig.fake.add_member(dave.member());
    let joined = teams::in_channel(
        &rig,
        &alice,
        channel,
        "conversationUpdate",
        json!({
        "membersAdded": [{"id": dave.bf_id, "aadObjectId": dave.aad}],
        "channelData": {"tenant": {"id": teams::TENANT}, "eventType": "teamMemberAdded",
                        "team": {"id": "19:team-general@thread.tacv2"}, "channel": {"id": channel, "name": "Project X"}}}),
    );
    teams::send_ok(&rig, &joined).await?;
    for (who, stream) in [
        ("bob@b.example", &mut outside),
        ("carol@c.example", &mut carol),
    ] {
        let e = next_event(stream).await?;
        ensure!(e["type"] == "membership" && e["change"] == "joined", "{e}");
        ensure!(e["from"] == "dave@contoso.com" && e["to"] == who, "{e}");
        ensure!(e["channel_id"] == channel_addr.as_str(), "{e}");
    }

    // Bob's answer appears in the channel, headed with his name, and reaches carol.
    let sent = bob_posts(
        &base,
        common::message("b-ch1", "bob", &channel_addr, "thanks, glad to be here"),
    )
    .await?;
    let shown = wait_post(&rig, channel, &["bob@b.example", "thanks, glad to be here"]).await?;
    ensure!(
        shown.conversation_id == channel,
        "{}",
        shown.conversation_id
    );
    let e = next_event(&mut carol).await?;
    ensure!(
        e["type"] == "message" && e["text"] == "thanks, glad to be here",
        "{e}"
    );
    ensure!(
        e["from"] == "bob@b.example" && e["to"] == "carol@c.example",
        "{e}"
    );
    ensure!(e["session_id"] == sent["session_id"], "{e}");
    // His edit changes the channel post and carol's copy.
    bob_posts(
        &base,
        json!({"id": "b-ch1-e", "type": "edit", "from": "bob", "to": channel_addr,
                            "target": {"event_id": "b-ch1"}, "text": "thanks, very glad"}),
    )
    .await?;
    rig.fake
        .wait_calls("the channel post updated", WAIT, |cs| {
            cs.iter().any(|c| {
                c.method == "PUT"
                    && c.activity_id.as_deref() == shown.reply["id"].as_str()
                    && c.body["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("very glad"))
            })
        })
        .await?;
    let e = next_event(&mut carol).await?;
    ensure!(
        e["type"] == "edit" && e["text"] == "thanks, very glad" && e["to"] == "carol@c.example",
        "{e}"
    );

    // `members` lists both; `remove` takes bob out, and he is told.
    teams::send_ok(&rig, &in_channel("members")).await?;
    wait_post(
        &rig,
        channel,
        &["Outside members", "bob@b.example", "carol@c.example"],
    )
    .await?;
    teams::send_ok(&rig, &in_channel("remove bob@b.example")).await?;
    let e = next_event(&mut outside).await?;
    ensure!(
        e["type"] == "membership" && e["change"] == "left" && e["to"] == "bob@b.example",
        "{e}"
    );
    // Without a mention, channel talk is relayed as it is, never read as a command (with
    // resource-specific consent the bot gets every channel message).
    let plain = teams::in_channel(
        &rig,
        &alice,
        channel,
        "message",
        json!({"text": "to be clear: kick-off at 10"}),
    );
    teams::send_ok(&rig, &plain).await?;
    let e = next_event(&mut carol).await?;
    ensure!(
        e["type"] == "message" && e["text"] == "to be clear: kick-off at 10",
        "{e}"
    );
    // A removed member can no longer write into the channel: his message comes back to him
    // as an error, and nothing is posted.
    let posts_before = rig.fake.sent().len();
    let refused = bob_posts(
        &base,
        common::message("b-ch2", "bob", &channel_addr, "let me back in"),
    )
    .await?;
    let e = next_event(&mut outside).await?;
    ensure!(
        e["type"] == "error" && e["detail"] == "teams_not_member",
        "{e}"
    );
    ensure!(
        e["target"]["relay_msg_id"] == refused["relay_msg_id"],
        "{e}"
    );
    ensure!(
        rig.fake.sent().len() == posts_before,
        "a non-member's message was posted"
    );
    // Nothing more reaches him from the channel; carol still gets it; a 1:1 message reaches him.
    teams::send_ok(&rig, &in_channel("after removal")).await?;
    let e = next_event(&mut carol).await?;
    ensure!(
        e["text"] == "after removal" && e["to"] == "carol@c.example",
        "{e}"
    );
    alice_says(&rig, &alice, json!({"text": "to bob@b.example direct"})).await?;
    let e = next_event(&mut outside).await?;
    ensure!(
        e["text"] == "direct" && e["to"] == "bob@b.example",
        "the channel message reached a removed member: {e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_explained_and_nothing_is_relayed() -> Result<()> {
    let (rig, alice, c, mut bob) = with_alice().await?;
    let base = rig.relay.http_url();
    let conv = alice.conversation.clone();
    let mut dan = Stream::open(&c, &base, "d.example", common::SECRET_D, Some("$")).await?;

    // No federation rule connects contoso.com and d.example: the bot says so.
    alice_says(&rig, &alice, json!({"text": "invite dan@d.example"})).await?;
    wait_post(&rig, &conv, &["not federated with d.example"]).await?;
    alice_says(&rig, &alice, json!({"text": "to dan@d.example hello"})).await?;
    wait_post(&rig, &conv, &["not federated with d.example"]).await?;
    // And the other way: d.example may not write to contoso.com.
    let (status, v) = post(
        &c,
        &base,
        "d.example",
        common::SECRET_D,
        &common::message("d-1", "dan", "alice@contoso.com", "hi"),
    )
    .await?;
    ensure!(status == 403, "{status} {v}");
    // A message with nobody chosen: the bot asks who it is for.
    alice_says(&rig, &alice, json!({"text": "who gets this?"})).await?;
    wait_post(&rig, &conv, &["Who is this for?"]).await?;
    // A command used wrongly gets its usage.
    alice_says(&rig, &alice, json!({"text": "invite bob"})).await?;
    wait_post(&rig, &conv, &["Usage", "invite"]).await?;

    // A tenant this relay does not serve: 403, nothing relayed.
    let mut foreign = teams::personal(
        &rig,
        &alice,
        "message",
        json!({"text": "to bob@b.example from elsewhere"}),
    );
    foreign["channelData"]["tenant"]["id"] = json!(teams::OTHER_TENANT);
    foreign["conversation"]["tenantId"] = json!(teams::OTHER_TENANT);
    let (status, body) = teams::send(&rig, &foreign).await?;
    ensure!(status == 403 && body.contains("tenant"), "{status} {body}");

    // An activity type the edge does not know: 200, and counted by type.
    teams::send_ok(
        &rig,
        &teams::personal(&rig, &alice, "somethingNew", json!({})),
    )
    .await?;
    let metrics = common::metrics(&c, &rig.relay.admin_url()).await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("fedrelay_teams_activities_total")
                && l.contains("type=\"other\"")),
        "no count of unknown activity types"
    );

    // Nothing reached anyone: the first events bob and dan see are the markers.
    alice_says(&rig, &alice, json!({"text": "to bob@b.example marker"})).await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["text"] == "marker",
        "something was relayed before the marker: {e}"
    );
    dan.expect_none(Duration::from_millis(300)).await?;

    // Uninstalling forgets the conversation: bob's next message fails visibly to him.
    teams::send_ok(
        &rig,
        &teams::personal(
            &rig,
            &alice,
            "installationUpdate",
            json!({"action": "remove"}),
        ),
    )
    .await?;
    let before = rig.fake.sent().len();
    let sent = bob_posts(
        &base,
        common::message("b-gone", "bob", "alice@contoso.com", "are you there?"),
    )
    .await?;
    let e = next_event(&mut bob).await?;
    ensure!(
        e["type"] == "error" && e["detail"] == "teams_not_installed",
        "{e}"
    );
    ensure!(e["target"]["relay_msg_id"] == sent["relay_msg_id"], "{e}");
    ensure!(
        rig.fake.sent().len() == before,
        "something was posted after the uninstall"
    );
    Ok(())
}
