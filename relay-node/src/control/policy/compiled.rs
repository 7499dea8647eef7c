//! A policy compiled into hash lookups: deciding one message costs a few hash probes and
//! allocates nothing.
//!
//! Order of a decision for (sender, receiver, kind):
//! 1. both domains must be declared, else `unknown_domain`;
//! 2. the user controls of each internal party talking outside its own domain: a control
//!    with `federate = false`, a `deny` entry naming the other party, or `allow` lists that
//!    name it nowhere refuse;
//! 3. the most specific federation rule for the pair of domains (both named, then one named
//!    and `*`, then `*` with `*`; at equal specificity `deny` wins, then the first written):
//!    none is a refusal (default deny), `deny` refuses, `allow` lets through the kinds it
//!    lists, and with `initiate = "internal"` only internal users may start a conversation;
//! 4. a contact request to or from a domain with `approval` waits for an administrator.

use super::model::{Action, Initiate, Kind, Kinds, PolicyDoc, Side, norm};
use crate::config::Platform;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// What a decision says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    /// Allowed once an administrator approves it (contact requests only).
    Approval,
    Deny(DenyCode),
}

/// Why something was refused: a stable code for protocol answers, metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyCode {
    UnknownDomain,
    /// No rule connects the two domains (default deny).
    NotFederated,
    DeniedByRule,
    KindNotAllowed,
    /// Only internal users may start a conversation.
    InternalInitiatesOnly,
    UserMayNotFederate,
    UserNotAllowed,
    RateLimited,
}

impl DenyCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::UnknownDomain => "unknown_domain",
            DenyCode::NotFederated => "not_federated",
            DenyCode::DeniedByRule => "denied_by_rule",
            DenyCode::KindNotAllowed => "kind_not_allowed",
            DenyCode::InternalInitiatesOnly => "internal_initiates_only",
            DenyCode::UserMayNotFederate => "user_may_not_federate",
            DenyCode::UserNotAllowed => "user_not_allowed",
            DenyCode::RateLimited => "rate_limited",
        }
    }
}

/// What decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    Rule(u32),
    UserControl(u32),
    /// No rule: default deny; or a declared-domain check.
    Default,
    /// A domain's approval requirement or rate limit.
    Domain(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub by: DecidedBy,
}

impl Decision {
    fn deny(code: DenyCode, by: DecidedBy) -> Self {
        Decision {
            outcome: Outcome::Deny(code),
            by,
        }
    }

    pub fn is_allowed(&self) -> bool {
        !matches!(self.outcome, Outcome::Deny(_))
    }
}

/// One side of a message, as the policy sees it: lower-case user and domain.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    pub user: &'a str,
    pub domain: &'a str,
}

struct DomainInfo {
    name: String,
    platform: Platform,
    side: Side,
    approval: bool,
    limiter: Option<Mutex<Bucket>>,
}

struct CRule {
    id: String,
    allow: bool,
    initiate: Initiate,
    kinds: Kinds,
}

struct CControl {
    id: String,
    federate: bool,
    allow_domains: HashSet<u32>,
    allow_addrs: HashSet<String>,
    deny_domains: HashSet<u32>,
    deny_addrs: HashSet<String>,
    has_allow: bool,
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    per_second: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The compiled policy.
pub struct Compiled {
    doc: PolicyDoc,
    /// The store's version of the document (etcd's mod revision; a counter in memory).
    version: u64,
    domain_index: HashMap<String, u32>,
    domains: Vec<DomainInfo>,
    rules: Vec<CRule>,
    pair: HashMap<(u32, u32), u32>,
    /// Per domain, the rule of (domain, `*`).
    wild: Vec<Option<u32>>,
    any: Option<u32>,
    /// Per internal user, their controls: their own first, then their groups'.
    user_controls: HashMap<String, Vec<u32>>,
    controls: Vec<CControl>,
}

thread_local! {
    /// Reused by lookups of `user@domain` keys, so a decision allocates nothing.
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Of two rules for the same pair at the same specificity: deny wins, then the first.
fn better(rules: &[CRule], a: u32, b: u32) -> u32 {
    match (rules[a as usize].allow, rules[b as usize].allow) {
        (true, false) => b,
        (false, true) => a,
        _ => a.min(b),
    }
}

fn keep(slot: &mut Option<u32>, rules: &[CRule], r: u32) {
    *slot = Some(match *slot {
        Some(old) => better(rules, old, r),
        None => r,
    });
}

impl Compiled {
    /// Compiles a document that passed [`PolicyDoc::validate`].
    pub fn new(doc: PolicyDoc, version: u64) -> Self {
        let doc = doc.normalized();
        let mut domain_index = HashMap::new();
        let mut domains = Vec::new();
        for d in &doc.domains {
            domain_index.insert(d.name.clone(), domains.len() as u32);
            domains.push(DomainInfo {
                name: d.name.clone(),
                platform: d.platform,
                side: d.side,
                approval: d.approval,
                limiter: d.rate_limit.map(|r| {
                    let burst = f64::from(r.burst.unwrap_or(r.per_second));
                    Mutex::new(Bucket {
                        tokens: burst,
                        per_second: f64::from(r.per_second),
                        burst,
                        at: Instant::now(),
                    })
                }),
            });
        }
        let rules: Vec<CRule> = doc
            .rules
            .iter()
            .map(|r| CRule {
                id: r.id.clone(),
                allow: r.action == Action::Allow,
                initiate: r.initiate,
                kinds: r.kinds.as_deref().map_or(Kinds::all(), Kinds::of),
            })
            .collect();
        let mut pair: HashMap<(u32, u32), u32> = HashMap::new();
        let mut wild = vec![None; domains.len()];
        let mut any = None;
        for (i, r) in doc.rules.iter().enumerate() {
            let i = i as u32;
            let ix = |d: &str| domain_index.get(d).copied();
            match (ix(&r.between[0]), ix(&r.between[1])) {
                (Some(a), Some(b)) => {
                    for k in [(a, b), (b, a)] {
                        let mut slot = pair.get(&k).copied();
                        keep(&mut slot, &rules, i);
                        if let Some(s) = slot {
                            pair.insert(k, s);
                        }
                    }
                }
                (Some(a), None) | (None, Some(a)) => keep(&mut wild[a as usize], &rules, i),
                (None, None) => keep(&mut any, &rules, i),
            }
        }
        let controls: Vec<CControl> = doc
            .users
            .iter()
            .map(|u| {
                let mut c = CControl {
                    id: u.id.clone(),
                    federate: u.federate,
                    allow_domains: HashSet::new(),
                    allow_addrs: HashSet::new(),
                    deny_domains: HashSet::new(),
                    deny_addrs: HashSet::new(),
                    has_allow: !u.allow.is_empty(),
                };
                for (list, domains_set, addrs) in [
                    (&u.allow, &mut c.allow_domains, &mut c.allow_addrs),
                    (&u.deny, &mut c.deny_domains, &mut c.deny_addrs),
                ] {
                    for t in list {
                        if t.contains('@') {
                            addrs.insert(t.clone());
                        } else if let Some(&d) = domain_index.get(t) {
                            domains_set.insert(d);
                        } else {
                            // A domain not (yet) declared: nobody there can be reached anyway;
                            // keep it as a never-matching entry so `allow` stays restrictive.
                        }
                    }
                }
                c
            })
            .collect();
        let groups: HashMap<&str, &Vec<String>> = doc
            .groups
            .iter()
            .map(|g| (g.name.as_str(), &g.members))
            .collect();
        let mut own: HashMap<String, Vec<u32>> = HashMap::new();
        let mut via_group: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, u) in doc.users.iter().enumerate() {
            for w in &u.who {
                match w.strip_prefix("group:") {
                    Some(g) => {
                        for m in groups.get(g).into_iter().flat_map(|m| m.iter()) {
                            via_group.entry(norm(m)).or_default().push(i as u32);
                        }
                    }
                    None => own.entry(w.clone()).or_default().push(i as u32),
                }
            }
        }
        for (user, list) in via_group {
            own.entry(user).or_default().extend(list);
        }
        Compiled {
            doc,
            version,
            domain_index,
            domains,
            rules,
            pair,
            wild,
            any,
            user_controls: own,
            controls,
        }
    }

    pub fn doc(&self) -> &PolicyDoc {
        &self.doc
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The platform of a declared domain (lower case).
    pub fn platform_of(&self, domain: &str) -> Option<Platform> {
        self.domain_index
            .get(domain)
            .map(|&i| self.domains[i as usize].platform)
    }

    pub fn side_of(&self, domain: &str) -> Option<Side> {
        self.domain_index
            .get(domain)
            .map(|&i| self.domains[i as usize].side)
    }

    /// The rule deciding a pair of declared domains.
    fn rule_for(&self, a: u32, b: u32) -> Option<u32> {
        if let Some(&r) = self.pair.get(&(a, b)) {
            return Some(r);
        }
        match (self.wild[a as usize], self.wild[b as usize]) {
            (Some(x), Some(y)) => Some(better(&self.rules, x, y)),
            (Some(x), None) | (None, Some(x)) => Some(x),
            (None, None) => self.any,
        }
    }

    /// Whether users of `from` may reach users of `to` at all: both declared and an `allow`
    /// rule for the pair. Edges use it to address a recipient before a message exists.
    pub fn domains_connected(&self, from: &str, to: &str) -> Decision {
        let (Some(&a), Some(&b)) = (self.domain_index.get(from), self.domain_index.get(to)) else {
            return Decision::deny(DenyCode::UnknownDomain, DecidedBy::Default);
        };
        match self.rule_for(a, b) {
            None => Decision::deny(DenyCode::NotFederated, DecidedBy::Default),
            Some(r) if !self.rules[r as usize].allow => {
                Decision::deny(DenyCode::DeniedByRule, DecidedBy::Rule(r))
            }
            Some(r) => Decision {
                outcome: Outcome::Allow,
                by: DecidedBy::Rule(r),
            },
        }
    }

    /// The decision for one message of `kind` from `sender` to `receiver`; `initiating` for
    /// contact requests and channel invitations. Names must be lower case.
    pub fn decide(
        &self,
        sender: Party<'_>,
        receiver: Party<'_>,
        kind: Kind,
        initiating: bool,
    ) -> Decision {
        let (Some(&s), Some(&r)) = (
            self.domain_index.get(sender.domain),
            self.domain_index.get(receiver.domain),
        ) else {
            return Decision::deny(DenyCode::UnknownDomain, DecidedBy::Default);
        };
        let s_info = &self.domains[s as usize];
        let r_info = &self.domains[r as usize];
        if s != r {
            if s_info.side == Side::Internal
                && let Some(d) = self.check_user(sender, receiver, r)
            {
                return d;
            }
            if r_info.side == Side::Internal
                && let Some(d) = self.check_user(receiver, sender, s)
            {
                return d;
            }
        }
        let Some(rule) = self.rule_for(s, r) else {
            return Decision::deny(DenyCode::NotFederated, DecidedBy::Default);
        };
        let cr = &self.rules[rule as usize];
        if !cr.allow {
            return Decision::deny(DenyCode::DeniedByRule, DecidedBy::Rule(rule));
        }
        if !cr.kinds.contains(kind) {
            return Decision::deny(DenyCode::KindNotAllowed, DecidedBy::Rule(rule));
        }
        if initiating && cr.initiate == Initiate::Internal && s_info.side != Side::Internal {
            return Decision::deny(DenyCode::InternalInitiatesOnly, DecidedBy::Rule(rule));
        }
        if kind == Kind::Contacts && initiating && s != r {
            for (i, d) in [(s, s_info), (r, r_info)] {
                if d.approval {
                    return Decision {
                        outcome: Outcome::Approval,
                        by: DecidedBy::Domain(i),
                    };
                }
            }
        }
        Decision {
            outcome: Outcome::Allow,
            by: DecidedBy::Rule(rule),
        }
    }

    /// The user controls of internal `user` talking to `other` (of domain index `other_d`):
    /// a refusal, or `None` when they let it through.
    fn check_user(&self, user: Party<'_>, other: Party<'_>, other_d: u32) -> Option<Decision> {
        if self.user_controls.is_empty() {
            return None;
        }
        KEY.with(|k| {
            let mut k = k.borrow_mut();
            k.clear();
            k.push_str(user.user);
            k.push('@');
            k.push_str(user.domain);
            let list = self.user_controls.get(k.as_str())?;
            k.clear();
            k.push_str(other.user);
            k.push('@');
            k.push_str(other.domain);
            let other_addr = k.as_str();
            let mut first_allow_list = None;
            let mut allowed_by_list = false;
            for &c in list {
                let cc = &self.controls[c as usize];
                let by = DecidedBy::UserControl(c);
                if !cc.federate {
                    return Some(Decision::deny(DenyCode::UserMayNotFederate, by));
                }
                if cc.deny_domains.contains(&other_d) || cc.deny_addrs.contains(other_addr) {
                    return Some(Decision::deny(DenyCode::UserNotAllowed, by));
                }
                if cc.has_allow {
                    first_allow_list.get_or_insert(c);
                    allowed_by_list |=
                        cc.allow_domains.contains(&other_d) || cc.allow_addrs.contains(other_addr);
                }
            }
            match first_allow_list {
                Some(c) if !allowed_by_list => Some(Decision::deny(
                    DenyCode::UserNotAllowed,
                    DecidedBy::UserControl(c),
                )),
                _ => None,
            }
        })
    }

    /// Takes one message from the sending domain's rate limit; false when over it.
    pub fn admit(&self, domain: &str) -> bool {
        let Some(&i) = self.domain_index.get(domain) else {
            return true;
        };
        match &self.domains[i as usize].limiter {
            None => true,
            Some(b) => b.lock().map(|mut b| b.take(Instant::now())).unwrap_or(true),
        }
    }

    /// The rate-limit decision for a refused admission.
    pub fn rate_limited(&self, domain: &str) -> Decision {
        let i = self.domain_index.get(domain).copied().unwrap_or(0);
        Decision::deny(DenyCode::RateLimited, DecidedBy::Domain(i))
    }

    /// A decision in words, for people and the management API.
    pub fn explain(
        &self,
        d: &Decision,
        sender: Party<'_>,
        receiver: Party<'_>,
        kind: Kind,
    ) -> Explanation {
        let (by_type, id) = match d.by {
            DecidedBy::Rule(r) => ("rule", Some(self.rules[r as usize].id.clone())),
            DecidedBy::UserControl(c) => {
                ("user_control", Some(self.controls[c as usize].id.clone()))
            }
            DecidedBy::Default => ("default", None),
            DecidedBy::Domain(i) => (
                "domain",
                self.domains.get(i as usize).map(|d| d.name.clone()),
            ),
        };
        let from = format!("{}@{}", sender.user, sender.domain);
        let to = format!("{}@{}", receiver.user, receiver.domain);
        let rule = id.clone().unwrap_or_default();
        let k = kind.as_str();
        let reason = match d.outcome {
            Outcome::Allow => match d.by {
                DecidedBy::Rule(_) => format!(
                    "rule `{rule}` allows {k} between {} and {}",
                    sender.domain, receiver.domain
                ),
                _ => format!("{k} from {from} to {to} is allowed"),
            },
            Outcome::Approval => format!(
                "a contact request between {from} and {to} waits for an administrator's approval (domain {rule} requires it)"
            ),
            Outcome::Deny(code) => match code {
                DenyCode::UnknownDomain => {
                    let unknown = if self.domain_index.contains_key(sender.domain) {
                        receiver.domain
                    } else {
                        sender.domain
                    };
                    format!("domain {unknown} is not served by this relay")
                }
                DenyCode::NotFederated => format!(
                    "no federation rule connects {} and {} (default deny)",
                    sender.domain, receiver.domain
                ),
                DenyCode::DeniedByRule => format!(
                    "rule `{rule}` denies traffic between {} and {}",
                    sender.domain, receiver.domain
                ),
                DenyCode::KindNotAllowed => format!(
                    "rule `{rule}` does not allow {k} between {} and {}",
                    sender.domain, receiver.domain
                ),
                DenyCode::InternalInitiatesOnly => format!(
                    "rule `{rule}` lets only users of an internal domain start a conversation with {}",
                    receiver.domain
                ),
                DenyCode::UserMayNotFederate => {
                    format!("user control `{rule}` does not let this user federate")
                }
                DenyCode::UserNotAllowed => {
                    format!("user control `{rule}` does not let {from} and {to} talk")
                }
                DenyCode::RateLimited => {
                    format!(
                        "domain {} is over its rate limit; try again shortly",
                        sender.domain
                    )
                }
            },
        };
        Explanation {
            allowed: d.is_allowed(),
            outcome: match d.outcome {
                Outcome::Allow => "allow",
                Outcome::Approval => "approval",
                Outcome::Deny(_) => "deny",
            },
            code: match d.outcome {
                Outcome::Deny(c) => Some(c.as_str()),
                _ => None,
            },
            decided_by: DecidedByView { kind: by_type, id },
            reason,
            policy_version: self.version,
        }
    }
}

/// A decision in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub allowed: bool,
    /// `allow`, `approval` or `deny`.
    pub outcome: &'static str,
    /// The refusal's code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    pub decided_by: DecidedByView,
    pub reason: String,
    pub policy_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecidedByView {
    /// `rule`, `user_control`, `domain` or `default`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}
