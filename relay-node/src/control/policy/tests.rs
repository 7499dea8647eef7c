use super::compiled::{Compiled, DecidedBy, Outcome, Party};
use super::model::{Kind, PolicyDoc};
use super::*;
use anyhow::Context;
use fedrelay_proto::v1;

const DOC: &str = r#"
[[domains]]
name = "contoso.com"
platform = "teams"
side = "internal"

[[domains]]
name = "labs.contoso.com"
platform = "xmpp"
side = "internal"

[[domains]]
name = "partner.org"
platform = "xmpp"
side = "external"

[[domains]]
name = "supplier.net"
platform = "sip"
side = "external"
approval = true

[[domains]]
name = "rival.com"
platform = "http"
side = "external"

[[domains]]
name = "busy.example"
platform = "http"
side = "external"
rate_limit = { per_second = 1, burst = 2 }

[[groups]]
name = "sales"
members = ["Carol@contoso.com", "dave@contoso.com"]

[[rules]]
id = "contoso-any"
between = ["contoso.com", "*"]
action = "allow"
kinds = ["im", "presence", "typing"]

[[rules]]
id = "no-rival"
between = ["*", "rival.com"]
action = "deny"

[[rules]]
id = "partner"
between = ["contoso.com", "partner.org"]
action = "allow"
initiate = "internal"

[[rules]]
id = "labs-supplier"
between = ["labs.contoso.com", "supplier.net"]
action = "allow"

[[rules]]
id = "busy"
between = ["busy.example", "contoso.com"]
action = "allow"

[[users]]
id = "sales-partner-only"
who = ["group:sales"]
allow = ["partner.org", "eve@supplier.net"]

[[users]]
id = "mallory-off"
who = ["mallory@contoso.com"]
federate = false

[[users]]
id = "no-frank"
who = ["alice@contoso.com"]
deny = ["frank@partner.org"]
"#;

fn compiled() -> anyhow::Result<Compiled> {
    let doc = PolicyDoc::parse(DOC).context("valid policy")?;
    Ok(Compiled::new(doc, 7))
}

fn p<'a>(a: &'a str) -> Party<'a> {
    let (user, domain) = a.split_once('@').unwrap_or((a, ""));
    Party { user, domain }
}

fn decide(c: &Compiled, from: &str, to: &str, kind: Kind, initiating: bool) -> Decision {
    c.decide(p(from), p(to), kind, initiating)
}

fn deny_code(d: Decision) -> Option<&'static str> {
    match d.outcome {
        Outcome::Deny(c) => Some(c.as_str()),
        _ => None,
    }
}

#[test]
fn the_most_specific_rule_decides_and_deny_wins_at_equal_specificity() -> anyhow::Result<()> {
    let c = compiled()?;
    // The exact pair beats the wildcard rule, which allows no files.
    let d = decide(
        &c,
        "alice@contoso.com",
        "bob@partner.org",
        Kind::Files,
        false,
    );
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.by, DecidedBy::Rule(2));
    // The wildcard rule: IM yes, files no.
    assert!(decide(&c, "alice@contoso.com", "x@busy.example", Kind::Im, false).is_allowed());
    let d = decide(
        &c,
        "alice@contoso.com",
        "x@supplier.net",
        Kind::Files,
        false,
    );
    assert_eq!(deny_code(d), Some("kind_not_allowed"));
    assert_eq!(d.by, DecidedBy::Rule(0));
    // contoso ↔ * (allow) and * ↔ rival (deny) are equally specific: deny wins.
    let d = decide(&c, "alice@contoso.com", "r@rival.com", Kind::Im, false);
    assert_eq!(deny_code(d), Some("denied_by_rule"));
    assert_eq!(d.by, DecidedBy::Rule(1));
    // The same in the other direction.
    let d = decide(&c, "r@rival.com", "alice@contoso.com", Kind::Im, false);
    assert_eq!(deny_code(d), Some("denied_by_rule"));
    Ok(())
}

#[test]
fn what_no_rule_allows_is_refused() -> anyhow::Result<()> {
    let c = compiled()?;
    let d = decide(&c, "x@partner.org", "y@supplier.net", Kind::Im, false);
    assert_eq!(deny_code(d), Some("not_federated"));
    assert_eq!(d.by, DecidedBy::Default);
    let d = decide(&c, "x@partner.org", "y@unknown.example", Kind::Im, false);
    assert_eq!(deny_code(d), Some("unknown_domain"));
    // A domain does not talk to itself unless a rule says so.
    let d = decide(&c, "x@partner.org", "y@partner.org", Kind::Im, false);
    assert_eq!(deny_code(d), Some("not_federated"));
    Ok(())
}

#[test]
fn only_internal_users_start_conversations_where_the_rule_says_so() -> anyhow::Result<()> {
    let c = compiled()?;
    let d = decide(
        &c,
        "bob@partner.org",
        "alice@contoso.com",
        Kind::Contacts,
        true,
    );
    assert_eq!(deny_code(d), Some("internal_initiates_only"));
    // Bob may answer, and chat once connected.
    assert!(
        decide(
            &c,
            "bob@partner.org",
            "alice@contoso.com",
            Kind::Contacts,
            false
        )
        .is_allowed()
    );
    assert!(decide(&c, "bob@partner.org", "alice@contoso.com", Kind::Im, false).is_allowed());
    assert!(
        decide(
            &c,
            "alice@contoso.com",
            "bob@partner.org",
            Kind::Contacts,
            true
        )
        .is_allowed()
    );
    let d = decide(
        &c,
        "bob@partner.org",
        "alice@contoso.com",
        Kind::Invites,
        true,
    );
    assert_eq!(deny_code(d), Some("internal_initiates_only"));
    Ok(())
}

#[test]
fn user_controls_narrow_what_domain_rules_allow() -> anyhow::Result<()> {
    let c = compiled()?;
    // Carol (group sales, written in mixed case) may reach partner.org and eve only.
    assert!(decide(&c, "carol@contoso.com", "bob@partner.org", Kind::Im, false).is_allowed());
    assert!(decide(&c, "carol@contoso.com", "eve@supplier.net", Kind::Im, false).is_allowed());
    let d = decide(&c, "carol@contoso.com", "zed@supplier.net", Kind::Im, false);
    assert_eq!(deny_code(d), Some("user_not_allowed"));
    assert_eq!(d.by, DecidedBy::UserControl(0));
    // Both directions: a message to Carol from outside her list is refused too.
    let d = decide(&c, "zed@supplier.net", "carol@contoso.com", Kind::Im, false);
    assert_eq!(deny_code(d), Some("user_not_allowed"));
    // Mallory may not federate at all.
    let d = decide(
        &c,
        "mallory@contoso.com",
        "bob@partner.org",
        Kind::Im,
        false,
    );
    assert_eq!(deny_code(d), Some("user_may_not_federate"));
    assert_eq!(d.by, DecidedBy::UserControl(1));
    // Alice may not talk to frank, but to bob.
    let d = decide(
        &c,
        "frank@partner.org",
        "alice@contoso.com",
        Kind::Im,
        false,
    );
    assert_eq!(deny_code(d), Some("user_not_allowed"));
    assert_eq!(d.by, DecidedBy::UserControl(2));
    assert!(decide(&c, "alice@contoso.com", "bob@partner.org", Kind::Im, false).is_allowed());
    Ok(())
}

#[test]
fn contact_requests_with_an_approval_domain_wait_for_an_administrator() -> anyhow::Result<()> {
    let c = compiled()?;
    let d = decide(
        &c,
        "lab@labs.contoso.com",
        "eve@supplier.net",
        Kind::Contacts,
        true,
    );
    assert_eq!(d.outcome, Outcome::Approval);
    assert_eq!(d.by, DecidedBy::Domain(3));
    // Once connected, messages pass without approval.
    assert!(matches!(
        decide(
            &c,
            "lab@labs.contoso.com",
            "eve@supplier.net",
            Kind::Im,
            false
        )
        .outcome,
        Outcome::Allow
    ));
    Ok(())
}

#[test]
fn the_rate_limit_of_a_domain_refuses_beyond_its_burst() -> anyhow::Result<()> {
    let c = compiled()?;
    assert!(c.admit("busy.example"));
    assert!(c.admit("busy.example"));
    assert!(!c.admit("busy.example"));
    // Other domains have no limit.
    for _ in 0..100 {
        assert!(c.admit("contoso.com"));
    }
    Ok(())
}

#[test]
fn explanations_name_the_rule_that_decided() -> anyhow::Result<()> {
    let policy = Policy::new(PolicyDoc::parse(DOC).context("valid")?, 3);
    let e = policy
        .explain("Alice@Contoso.com", "r@rival.com", Kind::Im)
        .context("addresses")?;
    assert!(!e.allowed);
    assert_eq!(e.code, Some("denied_by_rule"));
    assert_eq!(e.decided_by.kind, "rule");
    assert_eq!(e.decided_by.id.as_deref(), Some("no-rival"));
    assert!(e.reason.contains("no-rival"), "{}", e.reason);
    assert_eq!(e.policy_version, 3);
    let e = policy
        .explain("x@partner.org", "y@supplier.net", Kind::Im)
        .context("addresses")?;
    assert_eq!(e.decided_by.kind, "default");
    assert!(e.reason.contains("default deny"), "{}", e.reason);
    let e = policy
        .explain("carol@contoso.com", "zed@supplier.net", Kind::Im)
        .context("addresses")?;
    assert_eq!(e.decided_by.kind, "user_control");
    assert_eq!(e.decided_by.id.as_deref(), Some("sales-partner-only"));
    assert!(
        policy
            .explain("nobody", "y@supplier.net", Kind::Im)
            .is_none()
    );
    Ok(())
}

fn text_env(from: (&str, &str), to: &[(&str, &str)]) -> Envelope {
    Envelope {
        sender: Some(Address::new("teams", from.1, from.0)),
        recipients: to
            .iter()
            .map(|(u, d)| Address::new("xmpp", *d, *u))
            .collect(),
        body: Some(v1::envelope::Body::Text(v1::Text::default())),
        ..Default::default()
    }
}

#[test]
fn enforcement_drops_refused_recipients_and_refuses_when_none_is_left() -> anyhow::Result<()> {
    let policy = Policy::new(PolicyDoc::parse(DOC).context("valid")?, 1);
    let mut env = text_env(
        ("alice", "contoso.com"),
        &[("bob", "partner.org"), ("r", "rival.com")],
    );
    let done = policy.enforce(&mut env).context("bob is allowed")?;
    assert_eq!(env.recipients.len(), 1);
    assert_eq!(env.recipients[0].user, "bob");
    assert_eq!(done.refused.len(), 1);
    assert_eq!(done.refused[0].1.code, Some("denied_by_rule"));

    let mut env = text_env(("alice", "contoso.com"), &[("r", "rival.com")]);
    let r = policy.enforce(&mut env).err().context("refused")?;
    assert_eq!(r.code, "denied_by_rule");
    assert!(r.reason.contains("no-rival"));

    // Error reports of the relay itself pass whatever the policy.
    let mut env = text_env(("alice", "contoso.com"), &[("r", "rival.com")]);
    env.body = Some(v1::envelope::Body::Error(v1::Error::default()));
    assert!(policy.enforce(&mut env).is_ok());
    Ok(())
}

#[test]
fn a_new_version_applies_at_once_and_an_older_one_never_rolls_back() -> anyhow::Result<()> {
    let policy = Policy::new(PolicyDoc::parse(DOC).context("valid")?, 5);
    assert!(policy.check("contoso.com", "partner.org").is_ok());
    let mut doc = PolicyDoc::parse(DOC).context("valid")?;
    doc.rules
        .retain(|r| r.id != "partner" && r.id != "contoso-any");
    assert!(policy.apply(doc.clone(), 6));
    assert_eq!(
        policy.check("contoso.com", "partner.org"),
        Err(PolicyError::NotFederated {
            from: "contoso.com".into(),
            to: "partner.org".into()
        })
    );
    assert!(!policy.apply(PolicyDoc::parse(DOC).context("valid")?, 4));
    assert!(policy.check("contoso.com", "partner.org").is_err());
    assert_eq!(*policy.subscribe().borrow(), 6);
    Ok(())
}

#[test]
fn invalid_documents_are_refused_with_the_reason() -> anyhow::Result<()> {
    let cases = [
        (
            "[[rules]]\nid = \"r\"\nbetween = [\"a.example\", \"*\"]\naction = \"allow\"\n",
            "not a declared domain",
        ),
        (
            "[[domains]]\nname = \"a.example\"\nplatform = \"http\"\nside = \"internal\"\n[[domains]]\nname = \"A.example\"\nplatform = \"http\"\nside = \"internal\"\n",
            "declared twice",
        ),
        (
            "[[domains]]\nname = \"a.example\"\nplatform = \"http\"\nside = \"internal\"\n[[users]]\nid = \"u\"\nwho = [\"group:nope\"]\n",
            "not declared",
        ),
        (
            "[[domains]]\nname = \"a.example\"\nplatform = \"http\"\nside = \"external\"\n[[groups]]\nname = \"g\"\nmembers = [\"x@a.example\"]\n",
            "not in an internal domain",
        ),
        (
            "[[domains]]\nname = \"a.example\"\nplatform = \"http\"\nside = \"internal\"\n[[rules]]\nid = \"r\"\nbetween = [\"a.example\", \"*\"]\naction = \"allow\"\nkinds = []\n",
            "allows no kind",
        ),
        (
            "[[domains]]\nname = \"a.example\"\nplatform = \"http\"\nside = \"internal\"\nrate_limit = { per_second = 0 }\n",
            "rate limit",
        ),
        (
            "[[domains]]\nname = \"a.example\"\nplatform = \"fax\"\nside = \"internal\"\n",
            "fax",
        ),
        ("[surprise]\n", "surprise"),
    ];
    for (text, why) in cases {
        let e = PolicyDoc::parse(text).err().context(text)?;
        assert!(e.to_string().contains(why), "{text}: {e}");
    }
    Ok(())
}

#[test]
fn a_diff_lists_what_was_added_removed_and_changed() -> anyhow::Result<()> {
    let old = PolicyDoc::parse(DOC).context("valid")?;
    let mut new = old.clone();
    new.rules.retain(|r| r.id != "busy");
    new.rules[0].kinds = None;
    new.groups.push(model::Group {
        name: "ops".into(),
        members: vec!["ops@contoso.com".into()],
    });
    let d = old.diff(&new);
    let lines: Vec<String> = d
        .iter()
        .map(|c| format!("{} {} {}", c.op, c.what, c.id))
        .collect();
    assert_eq!(
        lines,
        [
            "added group ops",
            "removed rule busy",
            "changed rule contoso-any"
        ]
    );
    assert!(old.diff(&old).is_empty());
    // The file form reads back to the same policy.
    assert_eq!(PolicyDoc::parse(&old.to_toml()).context("round trip")?, old);
    assert_eq!(
        PolicyDoc::parse(&serde_json::to_string(&old).context("json")?)
            .context("json round trip")?,
        old
    );
    Ok(())
}

#[test]
fn a_config_file_implies_a_policy_with_its_pairs() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = crate::config::Config::dev(std::iter::empty())?;
    let policy = Policy::from_config(&cfg);
    assert_eq!(
        policy.check("alpha.example", "beta.example")?,
        Platform::Http
    );
    assert_eq!(
        policy.check("beta.example", "alpha.example")?,
        Platform::Http
    );
    assert!(policy.check("alpha.example", "alpha.example").is_err());
    assert_eq!(
        policy.check("alpha.example", "evil.example"),
        Err(PolicyError::UnknownDomain("evil.example".into()))
    );
    Ok(())
}
