//! `POST /api/v1/policy/preview`: what a change to a domain or a rule would allow or refuse,
//! before it is saved. The change is made to a copy of the live policy and validated as a
//! save would validate it; then the traffic it concerns is explained by both policies.

use super::{
    ApiError, ApiResult, ApiState, Principal, Role, remove_domain, remove_owned, set_domain,
    set_rule,
};
use crate::control::policy::compiled::{Compiled, Explanation};
use crate::control::policy::explain_in;
use crate::control::policy::model::{DomainPolicy, Kind, PolicyDoc, Rule, Side};
use axum::extract::State;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

/// At most this many domains are paired with a domain whose rules or settings change.
const MAX_PEERS: usize = 50;

/// The user part of the addresses a preview explains (a domain's rules hold for all its users
/// but those a user control names).
const ANY_USER: &str = "anyone";

/// One change, as the API's writes make it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum Proposal {
    PutRule(Rule),
    DeleteRule(String),
    PutDomain(DomainPolicy),
    DeleteDomain(String),
}

/// One (sender domain, receiver domain, kind) before and after the change.
#[derive(Debug, Serialize)]
pub(super) struct Effect {
    pub from: String,
    pub to: String,
    pub kind: &'static str,
    pub before: Outcome,
    pub after: Outcome,
    pub changed: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct Outcome {
    /// `allow`, `approval` or `deny`.
    pub outcome: &'static str,
    pub reason: String,
}

impl From<Explanation> for Outcome {
    fn from(e: Explanation) -> Self {
        Outcome {
            outcome: e.outcome,
            reason: e.reason,
        }
    }
}

/// The domains a change concerns and the domains each is paired with.
fn pairs(doc: &PolicyDoc, touched: &BTreeSet<String>) -> Vec<(String, String)> {
    let side = |d: &str| doc.domains.iter().find(|x| x.name == d).map(|x| x.side);
    let mut out = BTreeSet::new();
    for a in touched {
        let peers: Vec<&str> = if let Some(s) = side(a) {
            // Every domain of the other side, and other internal domains for an internal one.
            doc.domains
                .iter()
                .filter(|x| &x.name != a && (x.side != s || s == Side::Internal))
                .map(|x| x.name.as_str())
                .take(MAX_PEERS)
                .collect()
        } else {
            Vec::new()
        };
        for b in peers {
            if touched.contains(b) && b < a.as_str() {
                continue;
            }
            out.insert((a.clone(), b.to_string()));
        }
    }
    out.into_iter().collect()
}

fn rule_domains(r: &Rule, doc: &PolicyDoc, touched: &mut BTreeSet<String>) {
    let [a, b] = &r.between;
    let declared = |d: &str| doc.domains.iter().any(|x| x.name == d);
    match (a.as_str(), b.as_str()) {
        ("*", d) | (d, "*") if declared(d) => {
            touched.insert(d.to_string());
        }
        (x, y) => {
            // A rule between two named domains concerns that pair alone.
            if declared(x) && declared(y) {
                touched.insert(format!("{x}\u{0}{y}"));
            }
        }
    }
}

pub(super) async fn preview(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult {
    let proposal: Proposal = super::json_body(&body)?;
    let live = s.policy.current();
    let before_doc = live.doc().clone();
    let mut doc = before_doc.clone();
    let mut touched = BTreeSet::new();
    match proposal {
        Proposal::PutRule(mut r) => {
            p.require(&[Role::Admin, Role::DomainAdmin])?;
            if r.id.trim().is_empty() {
                return Err(ApiError::invalid("a rule needs an id"));
            }
            r.between = r.between.map(|d| d.to_ascii_lowercase());
            if let Some(old) = before_doc.rules.iter().find(|x| x.id == r.id) {
                rule_domains(old, &before_doc, &mut touched);
            }
            rule_domains(&r, &before_doc, &mut touched);
            set_rule(&p, &mut doc, r)?;
        }
        Proposal::DeleteRule(id) => {
            p.require(&[Role::Admin, Role::DomainAdmin])?;
            if let Some(old) = before_doc.rules.iter().find(|x| x.id == id) {
                rule_domains(old, &before_doc, &mut touched);
            }
            remove_owned(
                &mut doc,
                &p,
                "rule",
                &id,
                |d| &mut d.rules,
                |r| &r.id,
                super::owns_rule,
            )?;
        }
        Proposal::PutDomain(d) => {
            p.require(&[Role::Admin])?;
            let mut d = d;
            d.name = d.name.trim().to_ascii_lowercase();
            touched.insert(d.name.clone());
            set_domain(&mut doc, d);
        }
        Proposal::DeleteDomain(name) => {
            p.require(&[Role::Admin])?;
            let name = name.trim().to_ascii_lowercase();
            touched.insert(name.clone());
            remove_domain(&mut doc, &name)?;
        }
    }
    let doc = doc.normalized();
    doc.validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let changes = before_doc.diff(&doc);
    let after = Compiled::new(doc.clone(), live.version());

    // Named pairs of rules come as "a\0b"; the rest are domains paired with their peers.
    let mut list: BTreeSet<(String, String)> = BTreeSet::new();
    let mut single = BTreeSet::new();
    for t in &touched {
        match t.split_once('\u{0}') {
            Some((a, b)) => {
                list.insert((a.to_string(), b.to_string()));
            }
            None => {
                single.insert(t.clone());
            }
        }
    }
    // A domain that only exists on one side of the change is paired in the policy that has it.
    list.extend(pairs(&before_doc, &single));
    list.extend(pairs(&doc, &single));
    let mut effects = Vec::new();
    for (a, b) in &list {
        for (from, to) in [(a, b), (b, a)] {
            for kind in Kind::ALL {
                let sender = format!("{ANY_USER}@{from}");
                let receiver = format!("{ANY_USER}@{to}");
                let (Some(x), Some(y)) = (
                    explain_in(&live, &sender, &receiver, kind),
                    explain_in(&after, &sender, &receiver, kind),
                ) else {
                    continue;
                };
                let changed = x.outcome != y.outcome;
                effects.push(Effect {
                    from: from.clone(),
                    to: to.clone(),
                    kind: kind.as_str(),
                    before: x.into(),
                    after: y.into(),
                    changed,
                });
            }
        }
    }
    Ok(Json(serde_json::json!({
        "version": live.version(),
        "valid": true,
        "changes": changes,
        "effects": effects,
    }))
    .into_response())
}
