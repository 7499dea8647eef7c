//! The federation policy as administrators write it: domains, federation rules between them,
//! user and group controls. One document, stored whole (in etcd, or in memory for `--dev`),
//! validated whole before it is stored, exported and imported as a file (TOML or JSON).

use crate::config::{Config, Platform};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use thiserror::Error;

/// A policy that cannot be applied, with the first reason found.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid policy: {0}")]
pub struct InvalidPolicy(pub String);

/// The whole policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    #[serde(default)]
    pub domains: Vec<DomainPolicy>,
    /// Named sets of internal users, for user controls.
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Controls on internal users and groups.
    #[serde(default)]
    pub users: Vec<UserControl>,
}

/// Which side of the federation a domain is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The enterprise's own users (a Teams tenant, an internal XMPP/SIP/HTTP domain).
    Internal,
    /// A partner's, customer's or supplier's domain.
    External,
}

/// A domain the relay serves, bound to one platform (and so to one edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// Taken from the path when written through the API.
    #[serde(default)]
    pub name: String,
    pub platform: Platform,
    pub side: Side,
    /// New contact requests to or from this domain's users wait for an administrator.
    #[serde(default, skip_serializing_if = "is_false")]
    pub approval: bool,
    /// Messages per second this domain's users may send through each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    /// Messages allowed at once after a quiet spell; defaults to `per_second`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Taken from the path when written through the API.
    #[serde(default)]
    pub name: String,
    /// `user@domain` addresses of internal users.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Who may start a conversation (send a contact request or a channel invitation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initiate {
    #[default]
    Either,
    /// Only users of an internal domain; the other side may answer.
    Internal,
}

/// The kinds of traffic a rule can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Messages, edits, deletes, reactions.
    Im,
    /// Presence and profiles.
    Presence,
    Typing,
    Files,
    /// Channel invitations and membership.
    Invites,
    /// Contact requests and their answers: allowed by any rule that allows the pair,
    /// subject to `initiate`.
    Contacts,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Im,
        Kind::Presence,
        Kind::Typing,
        Kind::Files,
        Kind::Invites,
        Kind::Contacts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Im => "im",
            Kind::Presence => "presence",
            Kind::Typing => "typing",
            Kind::Files => "files",
            Kind::Invites => "invites",
            Kind::Contacts => "contacts",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of kinds, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub fn all() -> Self {
        Kinds(Kind::ALL.iter().fold(0, |m, k| m | k.bit()))
    }

    pub fn of(kinds: &[Kind]) -> Self {
        // Contacts go with every rule that lets the pair talk at all.
        Kinds(kinds.iter().fold(Kind::Contacts.bit(), |m, k| m | k.bit()))
    }

    pub fn contains(self, k: Kind) -> bool {
        self.0 & k.bit() != 0
    }
}

/// A federation rule between two domains (`*` for any declared domain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Taken from the path when written through the API.
    #[serde(default)]
    pub id: String,
    pub between: [String; 2],
    pub action: Action,
    #[serde(default)]
    pub initiate: Initiate,
    /// What may pass; all kinds when absent. Ignored for `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<Kind>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Controls on internal users: who they may federate with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserControl {
    /// Taken from the path when written through the API.
    #[serde(default)]
    pub id: String,
    /// `user@domain` addresses and `group:<name>` entries.
    pub who: Vec<String>,
    /// `false`: these users may not federate at all.
    #[serde(default = "yes")]
    pub federate: bool,
    /// External domains and `user@domain` addresses these users may reach; any that the
    /// domain rules allow when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// External domains and addresses these users may not reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn yes() -> bool {
    true
}

/// Rules, groups and controls are named by ids of this shape.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Lower-cases an address or domain as the policy compares them.
pub fn norm(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

/// `user@domain`, with a user part and a valid domain.
fn split_address(a: &str) -> Option<(&str, &str)> {
    let (u, d) = a.rsplit_once('@')?;
    (!u.is_empty() && crate::config::valid_domain(d)).then_some((u, d))
}

impl PolicyDoc {
    /// The policy a config file implies: its `[[domains]]` (internal unless the platform
    /// federates: XMPP and SIP domains are external; `side` overrides) and each
    /// `[[federation]]` pair allowed for everything.
    pub fn from_config(cfg: &Config) -> Self {
        let domains = cfg
            .domains
            .iter()
            .map(|d| DomainPolicy {
                name: norm(&d.name),
                platform: d.platform,
                side: d.side.unwrap_or(match d.platform {
                    Platform::Xmpp | Platform::Sip => Side::External,
                    Platform::Http | Platform::Teams => Side::Internal,
                }),
                approval: false,
                rate_limit: None,
            })
            .collect();
        let rules = cfg
            .federation
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                id: format!("config-{}", i + 1),
                between: [norm(&r.between[0]), norm(&r.between[1])],
                action: Action::Allow,
                initiate: Initiate::Either,
                kinds: None,
                note: None,
            })
            .collect();
        PolicyDoc {
            domains,
            groups: Vec::new(),
            rules,
            users: Vec::new(),
        }
    }

    /// Reads a policy file: JSON when it starts with `{`, TOML otherwise.
    pub fn parse(text: &str) -> Result<Self, InvalidPolicy> {
        let doc: PolicyDoc = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| InvalidPolicy(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| InvalidPolicy(e.message().to_string()))?
        };
        doc.validate()?;
        Ok(doc)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Lower-cases every name and address, so lookups need not.
    pub fn normalized(mut self) -> Self {
        for d in &mut self.domains {
            d.name = norm(&d.name);
        }
        for g in &mut self.groups {
            g.members.iter_mut().for_each(|m| *m = norm(m));
        }
        for r in &mut self.rules {
            r.between.iter_mut().for_each(|d| *d = norm(d));
        }
        for u in &mut self.users {
            for list in [&mut u.who, &mut u.allow, &mut u.deny] {
                list.iter_mut().for_each(|m| *m = norm(m));
            }
        }
        self
    }

    /// Checks the whole document; the first problem is the error.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        let bad = |m: String| Err(InvalidPolicy(m));
        let mut domains = BTreeMap::new();
        for d in &self.domains {
            let name = norm(&d.name);
            if !crate::config::valid_domain(&name) {
                return bad(format!("domain `{}` is not a valid domain name", d.name));
            }
            if domains.insert(name, d).is_some() {
                return bad(format!("domain `{}` is declared twice", d.name));
            }
            if let Some(r) = d.rate_limit
                && (r.per_second == 0 || r.burst == Some(0))
            {
                return bad(format!(
                    "domain `{}`: a rate limit needs per_second and burst above 0",
                    d.name
                ));
            }
        }
        let side_of = |a: &str| -> Option<Side> {
            let (_, d) = split_address(a)?;
            domains.get(&norm(d)).map(|d| d.side)
        };
        let mut groups = HashSet::new();
        for g in &self.groups {
            if !valid_id(&g.name) {
                return bad(format!(
                    "group name `{}` must be 1-64 letters, digits, '-', '_' or '.'",
                    g.name
                ));
            }
            if !groups.insert(g.name.as_str()) {
                return bad(format!("group `{}` is declared twice", g.name));
            }
            for m in &g.members {
                match side_of(m) {
                    Some(Side::Internal) => {}
                    Some(Side::External) => {
                        return bad(format!(
                            "group `{}`: {m} is not in an internal domain",
                            g.name
                        ));
                    }
                    None => {
                        return bad(format!(
                            "group `{}`: {m} is not a user@domain address of a declared domain",
                            g.name
                        ));
                    }
                }
            }
        }
        let mut ids = HashSet::new();
        for r in &self.rules {
            if !valid_id(&r.id) {
                return bad(format!(
                    "rule id `{}` must be 1-64 letters, digits, '-', '_' or '.'",
                    r.id
                ));
            }
            if !ids.insert(r.id.as_str()) {
                return bad(format!("rule id `{}` is used twice", r.id));
            }
            for d in &r.between {
                if d != "*" && !domains.contains_key(&norm(d)) {
                    return bad(format!(
                        "rule `{}` names `{d}`, which is not a declared domain (or `*`)",
                        r.id
                    ));
                }
            }
            if let Some(k) = &r.kinds
                && k.is_empty()
                && r.action == Action::Allow
            {
                return bad(format!(
                    "rule `{}` allows no kind of traffic: remove `kinds` to allow all, or deny",
                    r.id
                ));
            }
        }
        let mut ids = HashSet::new();
        for u in &self.users {
            if !valid_id(&u.id) {
                return bad(format!(
                    "user control id `{}` must be 1-64 letters, digits, '-', '_' or '.'",
                    u.id
                ));
            }
            if !ids.insert(u.id.as_str()) {
                return bad(format!("user control id `{}` is used twice", u.id));
            }
            if u.who.is_empty() {
                return bad(format!("user control `{}` names nobody in `who`", u.id));
            }
            for w in &u.who {
                if let Some(g) = w.strip_prefix("group:") {
                    if !groups.contains(g) {
                        return bad(format!(
                            "user control `{}` names group `{g}`, which is not declared",
                            u.id
                        ));
                    }
                } else if side_of(w) != Some(Side::Internal) {
                    return bad(format!(
                        "user control `{}`: {w} is not a user@domain address of an internal domain",
                        u.id
                    ));
                }
            }
            for t in u.allow.iter().chain(&u.deny) {
                let domain = split_address(t).map_or(t.as_str(), |(_, d)| d);
                if !crate::config::valid_domain(&norm(domain)) {
                    return bad(format!(
                        "user control `{}`: `{t}` is neither a domain nor a user@domain address",
                        u.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// What changed from `self` to `new`, one line per domain, group, rule or control
    /// added, removed or changed, in a stable order. Empty when nothing changed.
    pub fn diff(&self, new: &PolicyDoc) -> Vec<Change> {
        let mut out = Vec::new();
        diff_by(&mut out, "domain", &self.domains, &new.domains, |d| {
            d.name.clone()
        });
        diff_by(&mut out, "group", &self.groups, &new.groups, |g| {
            g.name.clone()
        });
        diff_by(&mut out, "rule", &self.rules, &new.rules, |r| r.id.clone());
        diff_by(&mut out, "user control", &self.users, &new.users, |u| {
            u.id.clone()
        });
        out
    }
}

/// One difference between two policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `added`, `removed` or `changed`.
    pub op: String,
    /// `domain`, `group`, `rule` or `user control`.
    pub what: String,
    pub id: String,
    /// The item before (changed, removed) and after (added, changed), as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = match self.op.as_str() {
            "added" => '+',
            "removed" => '-',
            _ => '~',
        };
        write!(f, "{sign} {} {}", self.what, self.id)?;
        if let Some(a) = self.after.as_ref().or(self.before.as_ref()) {
            write!(f, ": {a}")?;
        }
        Ok(())
    }
}

fn diff_by<T: Serialize + PartialEq>(
    out: &mut Vec<Change>,
    what: &str,
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> String,
) {
    let old_map: BTreeMap<String, &T> = old.iter().map(|t| (key(t), t)).collect();
    let new_map: BTreeMap<String, &T> = new.iter().map(|t| (key(t), t)).collect();
    let json = |t: &T| serde_json::to_value(t).ok();
    for (id, o) in &old_map {
        match new_map.get(id) {
            None => out.push(Change {
                op: "removed".into(),
                what: what.into(),
                id: id.clone(),
                before: json(o),
                after: None,
            }),
            Some(n) if *n != *o => out.push(Change {
                op: "changed".into(),
                what: what.into(),
                id: id.clone(),
                before: json(o),
                after: json(n),
            }),
            Some(_) => {}
        }
    }
    for (id, n) in &new_map {
        if !old_map.contains_key(id) {
            out.push(Change {
                op: "added".into(),
                what: what.into(),
                id: id.clone(),
                before: None,
                after: json(n),
            });
        }
    }
}
