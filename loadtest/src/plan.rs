//! The plan of one run: the domains and their secrets, the workload, the schedule, and how
//! message `i` is rendered as a signed `POST /v1/events` body. Also where the domains come
//! from when driving an existing deployment (`--target`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::contract::Expected;
use crate::scenario::{Schedule, Tag, Workload};

/// An HTTP-edge domain the harness plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub secret: String,
}

/// Everything that decides what one run sends.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Random id of this run, in every event id and message text.
    pub run_id: String,
    pub domains: Vec<DomainSpec>,
    pub workload: Workload,
    pub schedule: Schedule,
    /// Unix time in ms of `t0`, for `sent_at`.
    pub start_unix_ms: u64,
}

/// The `POST /v1/events` body of a message (see `docs/http-edge.md`).
#[derive(Debug, Serialize)]
struct MessageBody {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    from: String,
    to: String,
    text: String,
    sent_at: u64,
}

/// One message, ready to sign and send.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// Index of the sending domain in `Plan::domains`.
    pub domain: usize,
    pub intended_ns: u64,
    pub body: Vec<u8>,
}

impl Plan {
    /// The address `u<local>@<domain>` of user `u`.
    pub fn address(&self, u: usize) -> String {
        let user = self.workload.users[u];
        format!("{}@{}", user.local_part(), self.domains[user.domain].name)
    }

    /// Where message `global` should arrive.
    pub fn expected(&self, global: u64) -> Option<Expected> {
        if global >= self.schedule.total_messages() {
            return None;
        }
        let (_, recipient, _) = self.workload.message(global);
        Some(Expected {
            domain: self.workload.users[recipient].domain,
            to: self.address(recipient),
        })
    }

    /// The tag of message `i`.
    pub fn tag(&self, i: u64) -> Tag {
        let (sender, _, n) = self.workload.message(i);
        Tag {
            run: self.run_id.clone(),
            sender: u32::try_from(sender).unwrap_or(u32::MAX),
            n,
            global: i,
            intended_ns: self.schedule.intended_ns(i),
        }
    }

    /// Message `i` as a JSON body.
    pub fn message(&self, i: u64) -> Result<OutMessage> {
        let (sender, recipient, _) = self.workload.message(i);
        let tag = self.tag(i);
        let intended_ns = tag.intended_ns;
        let body = MessageBody {
            id: format!("lt-{}-{i}", self.run_id),
            kind: "message",
            from: self.workload.users[sender].local_part(),
            to: self.address(recipient),
            text: tag.to_text(),
            sent_at: self.start_unix_ms + intended_ns / 1_000_000,
        };
        Ok(OutMessage {
            domain: self.workload.users[sender].domain,
            intended_ns,
            body: serde_json::to_vec(&body).context("encoding a message body")?,
        })
    }
}

/// 32 random bytes as hex, from the kernel's random source.
pub fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(hex::encode(buf))
}

/// Reads the HTTP-edge domains of an existing deployment from its relay config file (the same
/// TOML the relay reads): every `[[domains]]` with `platform = "http"`, its `name`, and its
/// `secret` or `secret_file` (relative paths are relative to the config file). Other keys are
/// ignored.
pub fn domains_from_relay_config(path: &Path) -> Result<Vec<DomainSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading relay config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    domains_from_relay_config_str(&text, |p| {
        let full = base.join(p);
        std::fs::read_to_string(&full)
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("reading secret_file {}", full.display()))
    })
    .with_context(|| format!("in {}", path.display()))
}

/// [`domains_from_relay_config`] on a string, with a function reading `secret_file`s.
pub fn domains_from_relay_config_str(
    text: &str,
    read_secret: impl Fn(&str) -> Result<String>,
) -> Result<Vec<DomainSpec>> {
    let v: toml::Table = toml::from_str(text).context("parsing TOML")?;
    let Some(domains) = v.get("domains").and_then(|d| d.as_array()) else {
        bail!("no [[domains]] in the relay config");
    };
    let mut out = Vec::new();
    for d in domains {
        if d.get("platform").and_then(|p| p.as_str()) != Some("http") {
            continue;
        }
        let Some(name) = d.get("name").and_then(|n| n.as_str()) else {
            bail!("a [[domains]] entry has no name");
        };
        let secret = match (
            d.get("secret").and_then(|s| s.as_str()),
            d.get("secret_file").and_then(|s| s.as_str()),
        ) {
            (Some(s), _) => s.to_owned(),
            (None, Some(f)) => read_secret(f)?,
            (None, None) => bail!("domain {name} has neither secret nor secret_file"),
        };
        out.push(DomainSpec {
            name: name.to_owned(),
            secret,
        });
    }
    Ok(out)
}

/// Parses a `--domain NAME=SECRET` flag.
pub fn parse_domain_flag(s: &str) -> Result<DomainSpec> {
    match s.split_once('=') {
        Some((name, secret)) if !name.is_empty() && !secret.is_empty() => Ok(DomainSpec {
            name: name.to_owned(),
            secret: secret.to_owned(),
        }),
        _ => bail!("--domain takes NAME=SECRET (got {s:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ScenarioKind;
    use std::time::Duration;

    fn plan() -> Result<Plan> {
        Ok(Plan {
            run_id: "abcd".into(),
            domains: (0..2)
                .map(|i| DomainSpec {
                    name: crate::scenario::domain_name(i),
                    secret: format!("s{i}"),
                })
                .collect(),
            workload: ScenarioKind::OneToOne.workload(4, 2)?,
            schedule: Schedule::new(10.0, Duration::ZERO, Duration::from_secs(1))?,
            start_unix_ms: 1_732_350_000_000,
        })
    }

    #[test]
    fn message_body_follows_the_docs() -> Result<()> {
        let p = plan()?;
        let m = p.message(2)?;
        let v: serde_json::Value = serde_json::from_slice(&m.body)?;
        // Message 2: send order is [0, 2, 1, 3]; user 1 (d1, u0) sends to user 0 (d0, u0).
        assert_eq!(m.domain, 1);
        assert_eq!(m.intended_ns, 200_000_000);
        assert_eq!(v["id"], "lt-abcd-2");
        assert_eq!(v["type"], "message");
        assert_eq!(v["from"], "u0");
        assert_eq!(v["to"], "u0@d0.loadtest.example");
        assert_eq!(v["sent_at"], 1_732_350_000_200u64);
        let text = v["text"].as_str().unwrap_or_default();
        let tag = Tag::parse(text);
        assert_eq!(tag, Some(p.tag(2)));
        assert_eq!(tag.map(|t| t.intended_ns), Some(200_000_000));
        assert_eq!(
            v.as_object().map(|o| o.len()),
            Some(6),
            "no extra fields: {v}"
        );
        let e = p.expected(2);
        assert_eq!(
            e,
            Some(Expected {
                domain: 0,
                to: "u0@d0.loadtest.example".into()
            })
        );
        assert_eq!(p.expected(10), None);
        Ok(())
    }

    #[test]
    fn event_ids_are_unique() -> Result<()> {
        let p = plan()?;
        let mut ids = std::collections::HashSet::new();
        for i in 0..p.schedule.total_messages() {
            let v: serde_json::Value = serde_json::from_slice(&p.message(i)?.body)?;
            assert!(ids.insert(v["id"].to_string()));
        }
        Ok(())
    }

    #[test]
    fn relay_config_domains() -> Result<()> {
        let text = r#"
            node_id = "n"
            [http]
            listen = "0.0.0.0:8080"
            [[domains]]
            name = "a.example"
            platform = "http"
            secret = "sa"
            delivery = "stream"
            [[domains]]
            name = "teams.example"
            platform = "teams"
            [[domains]]
            name = "b.example"
            platform = "http"
            secret_file = "secrets/b"
        "#;
        let d = domains_from_relay_config_str(text, |p| {
            assert_eq!(p, "secrets/b");
            Ok("sb".to_owned())
        })?;
        assert_eq!(
            d,
            vec![
                DomainSpec {
                    name: "a.example".into(),
                    secret: "sa".into()
                },
                DomainSpec {
                    name: "b.example".into(),
                    secret: "sb".into()
                }
            ]
        );
        assert!(domains_from_relay_config_str("x = 1", |_| Ok(String::new())).is_err());
        assert!(
            domains_from_relay_config_str(
                "[[domains]]\nname = \"a\"\nplatform = \"http\"\n",
                |_| Ok(String::new())
            )
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn domain_flag() -> Result<()> {
        assert_eq!(
            parse_domain_flag("a.example=s=cret")?,
            DomainSpec {
                name: "a.example".into(),
                secret: "s=cret".into()
            }
        );
        assert!(parse_domain_flag("a.example").is_err());
        assert!(parse_domain_flag("=x").is_err());
        assert!(parse_domain_flag("a=").is_err());
        Ok(())
    }

    #[test]
    fn random_hex_is_random() -> Result<()> {
        let a = random_hex(16)?;
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16)?);
        Ok(())
    }
}
