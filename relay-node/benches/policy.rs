//! The federation policy check on the message path, with a large policy: 10,000 external
//! domains, one rule each with one of the internal domains, 100 wildcard rules, 1,000 user
//! controls over 50 groups of 20 users.
//!
//! Measured, per message, single thread:
//! - **decide**: [`Compiled::decide`] for one (sender, receiver, kind);
//! - **enforce**: [`Policy::enforce`] on a 1:1 text envelope, as the node's gate runs it for
//!   every envelope (the current version's load, lower-casing checks, the decision, the rate
//!   limit);
//! - **compile**: building the lookup structure from the document (once per policy change).
//!
//! `cargo bench -p relay-node --bench policy` runs the full size and prints ns per message
//! (target: ≤ 1 µs with 10,000 rules). Without `--bench`, as `cargo test --all-targets` runs
//! it, a small size checks that the decisions are the expected ones and nothing more.

#![allow(clippy::print_stdout)]

use anyhow::Context;
use relay_node::config::Platform;
use relay_node::control::policy::Policy;
use relay_node::control::policy::compiled::{Compiled, Party};
use relay_node::control::policy::model::{
    Action, DomainPolicy, Group, Initiate, Kind, PolicyDoc, Rule, Side, UserControl,
};
use std::hint::black_box;
use std::time::Instant;

struct Size {
    external: usize,
    internal: usize,
    groups: usize,
    group_size: usize,
    controls: usize,
    iterations: usize,
}

fn build(size: &Size) -> PolicyDoc {
    let mut doc = PolicyDoc::default();
    for i in 0..size.internal {
        doc.domains.push(DomainPolicy {
            name: format!("int{i}.example.com"),
            platform: Platform::Teams,
            side: Side::Internal,
            approval: false,
            rate_limit: None,
        });
    }
    for i in 0..size.external {
        doc.domains.push(DomainPolicy {
            name: format!("partner{i}.example.org"),
            platform: if i % 2 == 0 {
                Platform::Xmpp
            } else {
                Platform::Sip
            },
            side: Side::External,
            approval: i % 10 == 0,
            rate_limit: None,
        });
        doc.rules.push(Rule {
            id: format!("r{i}"),
            between: [
                format!("int{}.example.com", i % size.internal),
                format!("partner{i}.example.org"),
            ],
            action: if i % 50 == 49 {
                Action::Deny
            } else {
                Action::Allow
            },
            initiate: if i % 3 == 0 {
                Initiate::Internal
            } else {
                Initiate::Either
            },
            kinds: None,
            note: None,
        });
    }
    for i in 0..100.min(size.external) {
        doc.rules.push(Rule {
            id: format!("w{i}"),
            between: [
                format!("partner{}.example.org", i * 7 % size.external),
                "*".into(),
            ],
            action: Action::Deny,
            initiate: Initiate::Either,
            kinds: None,
            note: None,
        });
    }
    for g in 0..size.groups {
        doc.groups.push(Group {
            name: format!("g{g}"),
            members: (0..size.group_size)
                .map(|u| {
                    format!(
                        "user{}@int{}.example.com",
                        g * size.group_size + u,
                        g % size.internal
                    )
                })
                .collect(),
        });
    }
    for c in 0..size.controls {
        doc.users.push(UserControl {
            id: format!("c{c}"),
            who: vec![if c % 2 == 0 {
                format!("group:g{}", c % size.groups)
            } else {
                format!("user{c}@int{}.example.com", c % size.internal)
            }],
            federate: c % 97 != 0,
            allow: if c % 5 == 0 {
                vec![format!("partner{}.example.org", c % size.external)]
            } else {
                Vec::new()
            },
            deny: vec![format!("partner{}.example.org", (c + 1) % size.external)],
            note: None,
        });
    }
    doc
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let size = if full {
        Size {
            external: 10_000,
            internal: 20,
            groups: 50,
            group_size: 20,
            controls: 1_000,
            iterations: 2_000_000,
        }
    } else {
        Size {
            external: 200,
            internal: 4,
            groups: 5,
            group_size: 4,
            controls: 20,
            iterations: 2_000,
        }
    };
    let doc = build(&size);
    doc.validate().context("the generated policy is valid")?;
    let t = Instant::now();
    let compiled = Compiled::new(doc.clone(), 1);
    let compile = t.elapsed();

    // Senders and receivers cycle through the domains and users, so lookups miss the caches
    // as a real mix would.
    let pairs: Vec<(String, String, String, String)> = (0..4096)
        .map(|i| {
            let e = (i * 7919) % size.external;
            let int = e % size.internal;
            (
                format!("user{}", i % (size.groups * size.group_size * 2)),
                format!("int{int}.example.com"),
                format!("bob{i}"),
                format!("partner{e}.example.org"),
            )
        })
        .collect();

    // The decisions are the ones the policy says, before anything is timed.
    let mut allowed = 0usize;
    for (su, sd, ru, rd) in &pairs {
        let d = compiled.decide(
            Party {
                user: su,
                domain: sd,
            },
            Party {
                user: ru,
                domain: rd,
            },
            Kind::Im,
            false,
        );
        allowed += usize::from(d.is_allowed());
        let e: usize = rd
            .trim_start_matches("partner")
            .trim_end_matches(".example.org")
            .parse()
            .context("index")?;
        if e % 50 == 49 {
            assert!(!d.is_allowed(), "rule r{e} denies");
        }
    }
    assert!(allowed > 0 && allowed < pairs.len(), "a mix of decisions");

    let t = Instant::now();
    let mut n_allowed = 0usize;
    for i in 0..size.iterations {
        let (su, sd, ru, rd) = &pairs[i & 4095];
        let d = compiled.decide(
            Party {
                user: su,
                domain: sd,
            },
            Party {
                user: ru,
                domain: rd,
            },
            black_box(Kind::Im),
            false,
        );
        n_allowed += usize::from(d.is_allowed());
    }
    let decide = t.elapsed();
    black_box(n_allowed);

    let policy = Policy::new(doc, 1);
    let envs: Vec<fedrelay_proto::Envelope> = pairs
        .iter()
        .map(|(su, sd, ru, rd)| fedrelay_proto::Envelope {
            sender: Some(fedrelay_proto::Address::new(
                "teams",
                sd.as_str(),
                su.as_str(),
            )),
            recipients: vec![fedrelay_proto::Address::new(
                "xmpp",
                rd.as_str(),
                ru.as_str(),
            )],
            body: Some(fedrelay_proto::v1::envelope::Body::Text(
                fedrelay_proto::v1::Text::default(),
            )),
            ..Default::default()
        })
        .collect();
    let mut env = envs[0].clone();
    let t = Instant::now();
    let mut n_ok = 0usize;
    for i in 0..size.iterations {
        // Only the recipient list is restored: enforcement may remove refused recipients.
        let src = &envs[i & 4095];
        env.sender.clone_from(&src.sender);
        env.recipients.clone_from(&src.recipients);
        n_ok += usize::from(policy.enforce(black_box(&mut env)).is_ok());
    }
    let enforce = t.elapsed();
    black_box(n_ok);

    let per = |d: std::time::Duration| d.as_nanos() as f64 / size.iterations as f64;
    println!(
        "policy: {} domains, {} rules, {} user controls, {} groups",
        compiled.doc().domains.len(),
        compiled.doc().rules.len(),
        compiled.doc().users.len(),
        compiled.doc().groups.len()
    );
    println!("compile: {:.1} ms", compile.as_secs_f64() * 1e3);
    println!("decide:  {:.0} ns per message", per(decide));
    println!(
        "enforce: {:.0} ns per message (incl. restoring the envelope's sender and recipient)",
        per(enforce)
    );
    if full {
        let worst = per(decide).max(per(enforce));
        println!(
            "target ≤ 1000 ns per message: {}",
            if worst <= 1000.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
