//! The portal's pages. Each is made from management API calls carrying the session's token;
//! each change is a POST (its CSRF token already checked) that becomes one API call, whose
//! validation message is shown with the form as it was filled in when the API refuses.

use super::charts::{bars, grouped_columns};
use super::html::{
    Form, Nav, Notice, button_form, csrf_field, esc, input_time_of, num, page, parse_input_time,
    qv, select, text_input, time_of,
};
use super::{Failure, PortalState, Sess, error_page, failed};
use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::Arc;

type Params = Query<HashMap<String, String>>;

/// Percent-encodes one path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn render(
    status: StatusCode,
    title: &str,
    nav: Nav,
    sess: &Sess,
    notice: Option<&Notice>,
    body: &str,
) -> Response {
    (status, Html(page(title, nav, Some(&sess.s), notice, body))).into_response()
}

fn is_admin(sess: &Sess) -> bool {
    sess.s.role == "admin"
}

fn can_edit_policy(sess: &Sess) -> bool {
    matches!(sess.s.role.as_str(), "admin" | "domain-admin")
}

/// After a change: back to `location`, where the next page of the session says what was done.
async fn done(st: &PortalState, sess: &Sess, location: &str, message: String) -> Response {
    // A notice that cannot be kept only goes unshown: the change is made.
    let _ = st.sessions.flash(&sess.id, &message).await;
    Redirect::to(location).into_response()
}

/// What the session's last change did, once.
async fn done_notice(st: &PortalState, sess: &Sess) -> Option<Notice> {
    st.sessions
        .take_flash(&sess.id)
        .await
        .ok()
        .flatten()
        .map(Notice::Ok)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

// === overview ===

/// The top `n` of a `{name: {messages, ...}}` map, by messages.
fn top(map: &Value, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = map
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, c)| (k.clone(), u(&c["messages"])))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

pub async fn overview(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
) -> Response {
    let t = &sess.s.token;
    let (report, today) = tokio::join!(
        st.call(t, Method::GET, "/api/v1/usage?months=12", None, None),
        st.call(t, Method::GET, "/api/v1/usage/today", None, None)
    );
    let (report, today) = match (report, today) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(f), _) | (_, Err(f)) => return failed(&st, &sess, f),
    };
    render(
        StatusCode::OK,
        "Overview",
        Nav::Overview,
        &sess,
        None,
        &overview_body(&report, &today),
    )
}

/// The overview's content from the API's 12-month report and today's.
pub fn overview_body(report: &Value, today: &Value) -> String {
    let periods = report["periods"].as_array().cloned().unwrap_or_default();
    let months: Vec<String> = periods
        .iter()
        .map(|p| s(&p["period"]).to_string())
        .collect();
    let platforms: BTreeSet<String> = periods
        .iter()
        .filter_map(|p| p["platforms"].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    let series = |field: &str| -> Vec<(String, Vec<u64>)> {
        platforms
            .iter()
            .map(|pl| {
                (
                    pl.clone(),
                    periods
                        .iter()
                        .map(|p| u(&p["platforms"][pl][field]))
                        .collect(),
                )
            })
            .collect()
    };
    let total = &report["total"];
    let td = &today["total"];
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<section aria-labelledby=\"today-h\" class=\"cards\"><h2 id=\"today-h\">Today so far (UTC)</h2>\
         <dl class=\"stats\">\
         <div><dt>Messages</dt><dd id=\"today-messages\">{}</dd></div>\
         <div><dt>Unique users</dt><dd id=\"today-users\">{}</dd></div>\
         <div><dt>Refused</dt><dd id=\"today-refused\">{}</dd></div></dl>",
        num(u(&td["messages"])),
        num(u(&td["unique_users"])),
        num(u(&td["errors"]))
    );
    let today_platforms = td["platforms"].as_object();
    if let Some(m) = today_platforms.filter(|m| !m.is_empty()) {
        h.push_str("<table id=\"today-platforms\"><caption>Today by platform</caption><thead><tr><th scope=\"col\">Platform</th><th scope=\"col\">Messages</th><th scope=\"col\">Unique users</th><th scope=\"col\">Refused</th></tr></thead><tbody>");
        for (k, c) in m {
            let _ = write!(
                h,
                "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(k),
                num(u(&c["messages"])),
                num(u(&c["unique_users"])),
                num(u(&c["errors"]))
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");
    let _ = write!(
        h,
        "<section aria-labelledby=\"year-h\"><h2 id=\"year-h\">The last 12 months: {} to {}</h2>\
         <dl class=\"stats\"><div><dt>Messages</dt><dd id=\"year-messages\">{}</dd></div>\
         <div><dt>Unique users</dt><dd id=\"year-users\">{}</dd></div>\
         <div><dt>Refused</dt><dd id=\"year-refused\">{}</dd></div></dl>",
        esc(s(&report["first_day"])),
        esc(s(&report["last_day"])),
        num(u(&total["messages"])),
        num(u(&total["unique_users"])),
        num(u(&total["errors"]))
    );
    let month_totals: Vec<u64> = periods.iter().map(|p| u(&p["messages"])).collect();
    let user_totals: Vec<u64> = periods.iter().map(|p| u(&p["unique_users"])).collect();
    h.push_str(&grouped_columns(
        "chart-messages",
        "Messages per month, by platform (a message between two platforms counts for both)",
        "messages",
        &months,
        &series("messages"),
        "All platforms",
        &month_totals,
    ));
    h.push_str(&grouped_columns(
        "chart-users",
        "Unique users per month, by platform",
        "users",
        &months,
        &series("unique_users"),
        "All platforms (each user once)",
        &user_totals,
    ));
    h.push_str("<div class=\"two\">");
    h.push_str(&bars(
        "chart-internal",
        "Top internal domains, 12 months",
        "messages",
        &top(&total["internal_domains"], 10),
    ));
    h.push_str(&bars(
        "chart-external",
        "Top external domains, 12 months",
        "messages",
        &top(&total["external_domains"], 10),
    ));
    h.push_str("</div></section>");
    h
}

// === domains and rules ===

const PLATFORMS: [&str; 4] = ["teams", "xmpp", "sip", "http"];
const KINDS: [&str; 6] = ["im", "presence", "typing", "files", "invites", "contacts"];

/// What the policy forms were filled in with, to show them again.
#[derive(Default)]
struct Filled {
    domain: Option<Form>,
    rule: Option<Form>,
}

pub async fn policy(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Query(q): Params,
) -> Response {
    let mut filled = Filled::default();
    // Editing a domain or rule: its form filled in with it.
    let doc = match st
        .call(&sess.s.token, Method::GET, "/api/v1/policy", None, None)
        .await
    {
        Ok(d) => d,
        Err(f) => return failed(&st, &sess, f),
    };
    if let Some(name) = q.get("domain")
        && let Some(d) = doc["policy"]["domains"]
            .as_array()
            .and_then(|a| a.iter().find(|d| s(&d["name"]) == name))
    {
        let mut f = vec![
            ("name".to_string(), s(&d["name"]).to_string()),
            ("platform".to_string(), s(&d["platform"]).to_string()),
            ("side".to_string(), s(&d["side"]).to_string()),
            (
                "per_second".to_string(),
                d["rate_limit"]["per_second"]
                    .as_u64()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            ),
            (
                "burst".to_string(),
                d["rate_limit"]["burst"]
                    .as_u64()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            ),
        ];
        if d["approval"].as_bool() == Some(true) {
            f.push(("approval".into(), "on".into()));
        }
        filled.domain = Some(Form(f));
    }
    if let Some(id) = q.get("rule")
        && let Some(r) = doc["policy"]["rules"]
            .as_array()
            .and_then(|a| a.iter().find(|r| s(&r["id"]) == id))
    {
        let mut f = vec![
            ("id".to_string(), s(&r["id"]).to_string()),
            ("from".to_string(), s(&r["between"][0]).to_string()),
            ("to".to_string(), s(&r["between"][1]).to_string()),
            ("action".to_string(), s(&r["action"]).to_string()),
            ("initiate".to_string(), s(&r["initiate"]).to_string()),
            ("note".to_string(), s(&r["note"]).to_string()),
        ];
        for k in r["kinds"].as_array().into_iter().flatten() {
            f.push(("kinds".into(), s(k).to_string()));
        }
        filled.rule = Some(Form(f));
    }
    let notice = done_notice(&st, &sess).await;
    policy_page(&sess, &doc, &filled, notice.as_ref(), "", StatusCode::OK)
}

fn policy_page(
    sess: &Sess,
    doc: &Value,
    filled: &Filled,
    notice: Option<&Notice>,
    preview: &str,
    status: StatusCode,
) -> Response {
    let version = u(&doc["version"]);
    let policy = &doc["policy"];
    let domains = policy["domains"].as_array().cloned().unwrap_or_default();
    let mut h = String::with_capacity(32 * 1024);
    let _ = write!(
        h,
        "<p>Policy version <strong id=\"policy-version\">{version}</strong>. A change is checked as a whole before it is stored, applies on every node within a second, and is recorded in the audit log.</p>"
    );
    h.push_str(preview);
    // Domains.
    h.push_str("<section aria-labelledby=\"domains-h\"><h2 id=\"domains-h\">Domains</h2><table id=\"domains\"><thead><tr><th scope=\"col\">Domain</th><th scope=\"col\">Platform</th><th scope=\"col\">Side</th><th scope=\"col\">Contact requests</th><th scope=\"col\">Rate limit</th>");
    if is_admin(sess) {
        h.push_str("<th scope=\"col\">Actions</th>");
    }
    h.push_str("</tr></thead><tbody>");
    for d in &domains {
        let name = s(&d["name"]);
        let rate = match d["rate_limit"]["per_second"].as_u64() {
            Some(p) => format!(
                "{p}/s, burst {}",
                d["rate_limit"]["burst"].as_u64().unwrap_or(p)
            ),
            None => "none".into(),
        };
        let _ = write!(
            h,
            "<tr data-domain=\"{}\"><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            esc(name),
            esc(name),
            esc(s(&d["platform"])),
            esc(s(&d["side"])),
            if d["approval"].as_bool() == Some(true) {
                "wait for approval"
            } else {
                "pass"
            },
            esc(&rate)
        );
        if is_admin(sess) {
            let _ = write!(
                h,
                "<td><a href=\"/portal/policy?domain={}#domain-form\">Edit<span class=\"sr\"> {}</span></a> {}</td>",
                qv(name),
                esc(name),
                button_form(
                    &sess.s,
                    "/portal/policy/domain/delete",
                    &[("name", name), ("version", &version.to_string())],
                    &format!("Delete {name}"),
                    "danger",
                    Some(&format!("Delete the domain {name}?")),
                )
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    if is_admin(sess) {
        h.push_str(&domain_form(sess, filled.domain.as_ref(), version));
    }
    h.push_str("</section>");
    // Rules.
    h.push_str("<section aria-labelledby=\"rules-h\"><h2 id=\"rules-h\">Federation rules</h2><p>The most specific rule decides; at equal specificity deny wins; no rule means deny.</p><table id=\"rules\"><thead><tr><th scope=\"col\">Rule</th><th scope=\"col\">Between</th><th scope=\"col\">Action</th><th scope=\"col\">Who may start</th><th scope=\"col\">Kinds</th><th scope=\"col\">Note</th>");
    if can_edit_policy(sess) {
        h.push_str("<th scope=\"col\">Actions</th>");
    }
    h.push_str("</tr></thead><tbody>");
    for r in policy["rules"].as_array().into_iter().flatten() {
        let id = s(&r["id"]);
        let kinds = r["kinds"]
            .as_array()
            .map(|k| k.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "all".into());
        let _ = write!(
            h,
            "<tr data-rule=\"{}\"><th scope=\"row\">{}</th><td>{} ↔ {}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td>",
            esc(id),
            esc(id),
            esc(s(&r["between"][0])),
            esc(s(&r["between"][1])),
            esc(s(&r["action"])),
            esc(s(&r["action"])),
            esc(if s(&r["initiate"]) == "internal" {
                "internal users"
            } else {
                "either side"
            }),
            esc(&kinds),
            esc(s(&r["note"]))
        );
        if can_edit_policy(sess) {
            let _ = write!(
                h,
                "<td><a href=\"/portal/policy?rule={}#rule-form\">Edit<span class=\"sr\"> {}</span></a> {}</td>",
                qv(id),
                esc(id),
                button_form(
                    &sess.s,
                    "/portal/policy/rule/delete",
                    &[("id", id), ("version", &version.to_string())],
                    &format!("Delete {id}"),
                    "danger",
                    Some(&format!("Delete the rule {id}?")),
                )
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    if can_edit_policy(sess) {
        h.push_str(&rule_form(sess, &domains, filled.rule.as_ref(), version));
    }
    h.push_str("</section>");
    // Groups and user controls, read only here.
    h.push_str("<section aria-labelledby=\"groups-h\"><h2 id=\"groups-h\">Groups and user controls</h2><table id=\"groups\"><caption>Groups</caption><thead><tr><th scope=\"col\">Group</th><th scope=\"col\">Members</th></tr></thead><tbody>");
    for g in policy["groups"].as_array().into_iter().flatten() {
        let members = g["members"]
            .as_array()
            .map(|m| m.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            esc(s(&g["name"])),
            esc(&members)
        );
    }
    h.push_str("</tbody></table><table id=\"controls\"><caption>User controls</caption><thead><tr><th scope=\"col\">Control</th><th scope=\"col\">Who</th><th scope=\"col\">Federate</th><th scope=\"col\">Only with</th><th scope=\"col\">Never with</th></tr></thead><tbody>");
    for c in policy["controls"].as_array().into_iter().flatten() {
        let list = |v: &Value| {
            v.as_array()
                .map(|m| m.iter().map(s).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        };
        let _ = write!(
            h,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(s(&c["id"])),
            esc(&list(&c["who"])),
            if c["federate"].as_bool() == Some(false) {
                "no"
            } else {
                "yes"
            },
            esc(&list(&c["allow"])),
            esc(&list(&c["deny"]))
        );
    }
    h.push_str("</tbody></table></section>");
    render(status, "Domains and rules", Nav::Policy, sess, notice, &h)
}

fn domain_form(sess: &Sess, f: Option<&Form>, version: u64) -> String {
    let empty = Form::default();
    let f = f.unwrap_or(&empty);
    let opts = |xs: &[&str]| -> Vec<(String, String)> {
        xs.iter().map(|x| (x.to_string(), x.to_string())).collect()
    };
    let platform = if f.get("platform").is_empty() {
        "http".to_string()
    } else {
        f.get("platform")
    };
    let side = if f.get("side").is_empty() {
        "external".to_string()
    } else {
        f.get("side")
    };
    format!(
        "<form method=\"post\" action=\"/portal/policy/domain\" id=\"domain-form\" class=\"card\">\
         <h3>Declare or change a domain</h3>{}<input type=\"hidden\" name=\"version\" value=\"{version}\">\
         {}{}{}\
         <div class=\"field check\"><input type=\"checkbox\" id=\"approval\" name=\"approval\"{}><label for=\"approval\">New contact requests wait for an administrator's approval</label></div>\
         {}{}\
         <div class=\"buttons\"><button type=\"submit\" name=\"op\" value=\"preview\" id=\"domain-preview\">Preview the change</button></div></form>",
        csrf_field(&sess.s),
        text_input(
            "name",
            "Domain name",
            &f.get("name"),
            "required autocomplete=\"off\""
        ),
        select("platform", "Platform", &opts(&PLATFORMS), &platform),
        select("side", "Side", &opts(&["internal", "external"]), &side),
        if f.has("approval") { " checked" } else { "" },
        text_input(
            "per_second",
            "Rate limit: messages per second per node (empty: none)",
            &f.get("per_second"),
            "inputmode=\"numeric\""
        ),
        text_input(
            "burst",
            "Burst (empty: the rate)",
            &f.get("burst"),
            "inputmode=\"numeric\""
        ),
    )
}

fn rule_form(sess: &Sess, domains: &[Value], f: Option<&Form>, version: u64) -> String {
    let empty = Form::default();
    let f = f.unwrap_or(&empty);
    let mut names: Vec<(String, String)> = domains
        .iter()
        .map(|d| (s(&d["name"]).to_string(), s(&d["name"]).to_string()))
        .collect();
    names.push(("*".into(), "* (any other domain)".into()));
    let kinds = f.all("kinds");
    let mut boxes = String::new();
    for k in KINDS {
        let _ = write!(
            boxes,
            "<span class=\"check\"><input type=\"checkbox\" id=\"kind-{k}\" name=\"kinds\" value=\"{k}\"{}><label for=\"kind-{k}\">{k}</label></span>",
            if kinds.iter().any(|x| x == k) {
                " checked"
            } else {
                ""
            }
        );
    }
    let action = if f.get("action").is_empty() {
        "allow".to_string()
    } else {
        f.get("action")
    };
    let initiate = if f.get("initiate").is_empty() {
        "either".to_string()
    } else {
        f.get("initiate")
    };
    let opts = |xs: &[(&str, &str)]| -> Vec<(String, String)> {
        xs.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    format!(
        "<form method=\"post\" action=\"/portal/policy/rule\" id=\"rule-form\" class=\"card\">\
         <h3>Add or change a rule</h3>{}<input type=\"hidden\" name=\"version\" value=\"{version}\">\
         {}{}{}{}{}\
         <fieldset><legend>Kinds allowed (none ticked: all)</legend>{boxes}</fieldset>{}\
         <div class=\"buttons\"><button type=\"submit\" name=\"op\" value=\"preview\" id=\"rule-preview\">Preview the change</button></div></form>",
        csrf_field(&sess.s),
        text_input(
            "id",
            "Rule id (letters, digits, - _ .)",
            &f.get("id"),
            "required autocomplete=\"off\""
        ),
        select("from", "Between", &names, &f.get("from")),
        select("to", "And", &names, &f.get("to")),
        select(
            "action",
            "Action",
            &opts(&[("allow", "allow"), ("deny", "deny")]),
            &action
        ),
        select(
            "initiate",
            "Who may start a conversation",
            &opts(&[
                ("either", "either side"),
                ("internal", "internal users only")
            ]),
            &initiate
        ),
        text_input("note", "Note", &f.get("note"), ""),
    )
}

/// A rule's JSON from its form.
fn rule_of(f: &Form) -> Result<(String, Value), String> {
    let id = f.get("id");
    if id.is_empty() {
        return Err("Give the rule an id.".into());
    }
    let (a, b) = (f.get("from"), f.get("to"));
    if a.is_empty() || b.is_empty() {
        return Err("Choose the two domains the rule is between.".into());
    }
    let mut r = json!({
        "id": id,
        "between": [a, b],
        "action": f.get("action"),
        "initiate": if f.get("initiate").is_empty() { "either".to_string() } else { f.get("initiate") },
    });
    let kinds = f.all("kinds");
    if !kinds.is_empty() {
        r["kinds"] = json!(kinds);
    }
    let note = f.get("note");
    if !note.is_empty() {
        r["note"] = json!(note);
    }
    Ok((id, r))
}

/// A domain's JSON from its form.
fn domain_of(f: &Form) -> Result<(String, Value), String> {
    let name = f.get("name").to_ascii_lowercase();
    if name.is_empty() {
        return Err("Give the domain's name.".into());
    }
    let whole = |field: &str, label: &str| -> Result<Option<u64>, String> {
        let v = f.get(field);
        if v.is_empty() {
            return Ok(None);
        }
        match v.parse::<u64>() {
            Ok(n) if n > 0 && n <= u32::MAX as u64 => Ok(Some(n)),
            _ => Err(format!(
                "{label} must be a whole number above 0, not `{v}`."
            )),
        }
    };
    let per_second = whole("per_second", "Messages per second")?;
    let burst = whole("burst", "Burst")?;
    let mut d = json!({
        "name": name,
        "platform": f.get("platform"),
        "side": f.get("side"),
        "approval": f.has("approval"),
    });
    match (per_second, burst) {
        (Some(p), b) => {
            d["rate_limit"] = json!({"per_second": p});
            if let Some(b) = b {
                d["rate_limit"]["burst"] = json!(b);
            }
        }
        (None, Some(_)) => return Err("A burst needs a rate: give messages per second too.".into()),
        (None, None) => {}
    }
    Ok((name, d))
}

/// The version the form was based on.
fn version_of(f: &Form) -> Option<u64> {
    f.get("version").parse().ok()
}

/// The effects of a preview: what the change would newly refuse or allow, then all of it.
fn preview_section(kind: &str, form_action: &str, sess: &Sess, f: &Form, p: &Value) -> String {
    let effects = p["effects"].as_array().cloned().unwrap_or_default();
    let changed: Vec<&Value> = effects.iter().filter(|e| e["changed"] == true).collect();
    let mut h = format!(
        "<section id=\"preview\" class=\"card preview\" aria-labelledby=\"preview-h\"><h2 id=\"preview-h\">Preview: what this {kind} change would do</h2>"
    );
    let changes = p["changes"].as_array().map_or(0, |c| c.len());
    if changes == 0 {
        h.push_str(
            "<p id=\"preview-summary\">This is the policy as it is: nothing would change.</p>",
        );
    } else if changed.is_empty() {
        h.push_str("<p id=\"preview-summary\">No traffic between these domains would be allowed or refused differently.</p>");
    } else {
        // One line per direction and outcome, naming its kinds.
        let mut lines: Vec<(String, String, String, String, Vec<String>, String)> = Vec::new();
        for e in &changed {
            let key = (
                s(&e["from"]).to_string(),
                s(&e["to"]).to_string(),
                s(&e["before"]["outcome"]).to_string(),
                s(&e["after"]["outcome"]).to_string(),
            );
            match lines
                .iter_mut()
                .find(|l| (&l.0, &l.1, &l.2, &l.3) == (&key.0, &key.1, &key.2, &key.3))
            {
                Some(l) => l.4.push(s(&e["kind"]).to_string()),
                None => lines.push((
                    key.0,
                    key.1,
                    key.2,
                    key.3,
                    vec![s(&e["kind"]).to_string()],
                    s(&e["after"]["reason"]).to_string(),
                )),
            }
        }
        let _ = write!(
            h,
            "<p id=\"preview-summary\">{} outcomes would change:</p><ul id=\"preview-changes\">",
            changed.len()
        );
        for (from, to, before, after, kinds, why) in &lines {
            let _ = write!(
                h,
                "<li class=\"{}\"><strong>{}</strong> {} from {} to {} (now: {}). {}</li>",
                esc(after),
                match after.as_str() {
                    "deny" => "Refused:",
                    "approval" => "Held for approval:",
                    _ => "Allowed:",
                },
                esc(&kinds.join(", ")),
                esc(from),
                esc(to),
                esc(before),
                esc(why)
            );
        }
        h.push_str("</ul>");
    }
    if !effects.is_empty() {
        h.push_str("<details><summary>Every outcome before and after</summary><table><thead><tr><th scope=\"col\">From</th><th scope=\"col\">To</th><th scope=\"col\">Kind</th><th scope=\"col\">Before</th><th scope=\"col\">After</th><th scope=\"col\">Why</th></tr></thead><tbody>");
        for e in &effects {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(s(&e["from"])),
                esc(s(&e["to"])),
                esc(s(&e["kind"])),
                esc(s(&e["before"]["outcome"])),
                esc(s(&e["after"]["outcome"])),
                esc(s(&e["after"]["reason"]))
            );
        }
        h.push_str("</tbody></table></details>");
    }
    // Saving sends exactly what was previewed, based on the version previewed.
    let _ = write!(
        h,
        "<form method=\"post\" action=\"{form_action}\" id=\"save-form\">{}",
        csrf_field(&sess.s)
    );
    for (k, v) in &f.0 {
        if k == "_csrf" || k == "op" || k == "version" {
            continue;
        }
        let _ = write!(
            h,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(k),
            esc(v)
        );
    }
    let _ = write!(
        h,
        "<input type=\"hidden\" name=\"version\" value=\"{}\"><div class=\"buttons\">\
         <button type=\"submit\" name=\"op\" value=\"save\" class=\"primary\" id=\"save\">Save the {kind}</button> \
         <a href=\"/portal/policy\">Cancel</a></div></form></section>",
        u(&p["version"])
    );
    h
}

/// Shows the policy page with the form as filled in and what went wrong (nothing changed).
async fn refused(
    st: &PortalState,
    sess: &Sess,
    filled: Filled,
    status: StatusCode,
    message: &str,
) -> Response {
    match st
        .call(&sess.s.token, Method::GET, "/api/v1/policy", None, None)
        .await
    {
        Ok(doc) => policy_page(
            sess,
            &doc,
            &filled,
            Some(&Notice::Error(format!("Not saved: {message}"))),
            "",
            status,
        ),
        Err(f) => failed(st, sess, f),
    }
}

fn stale(f: &Failure) -> bool {
    f.status == StatusCode::PRECONDITION_FAILED
}

const STALE: &str = "the policy changed since this page was loaded; review the change against the current policy and try again";

async fn submit(
    st: &PortalState,
    sess: &Sess,
    form: Form,
    what: &str,
    parsed: Result<(String, Value), String>,
) -> Response {
    let rule = what == "rule";
    let filled = |form: Form| {
        if rule {
            Filled {
                rule: Some(form),
                domain: None,
            }
        } else {
            Filled {
                domain: Some(form),
                rule: None,
            }
        }
    };
    let (key, item) = match parsed {
        Ok(x) => x,
        Err(m) => return refused(st, sess, filled(form), StatusCode::BAD_REQUEST, &m).await,
    };
    let t = &sess.s.token;
    if form.get("op") == "save" {
        let uri = if rule {
            format!("/api/v1/rules/{}", seg(&key))
        } else {
            format!("/api/v1/domains/{}", seg(&key))
        };
        return match st
            .call(t, Method::PUT, &uri, Some(&item), version_of(&form))
            .await
        {
            Ok(v) => {
                done(
                    st,
                    sess,
                    "/portal/policy",
                    format!(
                        "The {what} {key} is saved: policy version {}.",
                        u(&v["version"])
                    ),
                )
                .await
            }
            Err(f) if f.status == StatusCode::UNAUTHORIZED => failed(st, sess, f),
            Err(f) if stale(&f) => refused(st, sess, filled(form), f.status, STALE).await,
            Err(f) => refused(st, sess, filled(form), f.status, &f.message).await,
        };
    }
    let body = if rule {
        json!({ "put_rule": item })
    } else {
        json!({ "put_domain": item })
    };
    match st
        .call(t, Method::POST, "/api/v1/policy/preview", Some(&body), None)
        .await
    {
        Ok(p) => match st.call(t, Method::GET, "/api/v1/policy", None, None).await {
            Ok(doc) => {
                let preview =
                    preview_section(what, &format!("/portal/policy/{what}"), sess, &form, &p);
                policy_page(sess, &doc, &filled(form), None, &preview, StatusCode::OK)
            }
            Err(f) => failed(st, sess, f),
        },
        Err(f) if f.status == StatusCode::UNAUTHORIZED => failed(st, sess, f),
        Err(f) => refused(st, sess, filled(form), f.status, &f.message).await,
    }
}

pub async fn rule_submit(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let parsed = rule_of(&form);
    submit(&st, &sess, form, "rule", parsed).await
}

pub async fn domain_submit(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let parsed = domain_of(&form);
    submit(&st, &sess, form, "domain", parsed).await
}

async fn delete(
    st: &PortalState,
    sess: &Sess,
    form: &Form,
    what: &str,
    uri: String,
    key: &str,
) -> Response {
    match st
        .call(&sess.s.token, Method::DELETE, &uri, None, version_of(form))
        .await
    {
        Ok(v) => {
            done(
                st,
                sess,
                "/portal/policy",
                format!(
                    "The {what} {key} is deleted: policy version {}.",
                    u(&v["version"])
                ),
            )
            .await
        }
        Err(f) if f.status == StatusCode::UNAUTHORIZED => failed(st, sess, f),
        Err(f) => {
            let m = if stale(&f) {
                STALE.to_string()
            } else {
                f.message
            };
            refused(st, sess, Filled::default(), f.status, &m).await
        }
    }
}

pub async fn rule_delete(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let id = form.get("id");
    delete(
        &st,
        &sess,
        &form,
        "rule",
        format!("/api/v1/rules/{}", seg(&id)),
        &id,
    )
    .await
}

pub async fn domain_delete(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let name = form.get("name");
    delete(
        &st,
        &sess,
        &form,
        "domain",
        format!("/api/v1/domains/{}", seg(&name)),
        &name,
    )
    .await
}

// === users ===

pub async fn users(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Query(q): Params,
) -> Response {
    let t = &sess.s.token;
    let domains = match st.call(t, Method::GET, "/api/v1/domains", None, None).await {
        Ok(d) => d,
        Err(f) => return failed(&st, &sess, f),
    };
    let mine: Vec<String> = domains
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| s(&d["side"]) == "internal")
        .map(|d| s(&d["name"]).to_string())
        .filter(|d| is_admin(&sess) || sess.s.domains.contains(d))
        .collect();
    let address = q
        .get("address")
        .map(|a| a.trim().to_ascii_lowercase())
        .filter(|a| !a.is_empty());
    let domain = q
        .get("domain")
        .cloned()
        .or_else(|| {
            address
                .as_ref()
                .and_then(|a| a.rsplit_once('@').map(|(_, d)| d.to_string()))
        })
        .or_else(|| mine.first().cloned())
        .unwrap_or_default();
    let mut notice = done_notice(&st, &sess).await;
    let mut status = StatusCode::OK;
    let mut h = String::new();
    let opts: Vec<(String, String)> = mine.iter().map(|d| (d.clone(), d.clone())).collect();
    let _ = write!(
        h,
        "<form method=\"get\" action=\"/portal/users\" class=\"search\">{}{}<button type=\"submit\" id=\"users-show\">Show</button></form>",
        select("domain", "Internal domain", &opts, &domain),
        text_input(
            "address",
            "Or a user's address (user@domain)",
            address.as_deref().unwrap_or(""),
            "autocomplete=\"off\""
        ),
    );
    if let Some(a) = &address {
        match st
            .call(
                t,
                Method::GET,
                &format!("/api/v1/users/{}", seg(a)),
                None,
                None,
            )
            .await
        {
            Ok(user) => h.push_str(&user_detail(&st, &sess, &user).await),
            Err(f) if f.status == StatusCode::UNAUTHORIZED => return failed(&st, &sess, f),
            Err(f) => {
                status = f.status;
                notice = Some(Notice::Error(f.message));
            }
        }
    } else if !domain.is_empty() {
        match st
            .call(
                t,
                Method::GET,
                &format!("/api/v1/users?domain={}", qv(&domain)),
                None,
                None,
            )
            .await
        {
            Ok(list) => {
                let users = list["users"].as_array().cloned().unwrap_or_default();
                let _ = write!(
                    h,
                    "<section aria-labelledby=\"users-h\"><h2 id=\"users-h\">Users of {} ({})</h2>",
                    esc(&domain),
                    esc(s(&list["platform"]))
                );
                if users.is_empty() {
                    h.push_str("<p>The relay knows no users of this domain: it keeps Teams users who have talked to its bot; for other platforms, look a user up by address.</p>");
                } else {
                    h.push_str("<ul id=\"user-list\">");
                    for user in &users {
                        let _ = write!(
                            h,
                            "<li><a href=\"/portal/users?address={}\">{}</a></li>",
                            qv(s(user)),
                            esc(s(user))
                        );
                    }
                    h.push_str("</ul>");
                }
                h.push_str("</section>");
            }
            Err(f) if f.status == StatusCode::UNAUTHORIZED => return failed(&st, &sess, f),
            Err(f) => {
                status = f.status;
                notice = Some(Notice::Error(f.message));
            }
        }
    }
    render(status, "Users", Nav::Users, &sess, notice.as_ref(), &h)
}

/// The id of the user control the portal keeps for one user's blocks.
fn block_control_id(address: &str) -> String {
    let clean: String = address
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '.'
            }
        })
        .collect();
    let mut id = format!("block.{clean}");
    id.truncate(64);
    id
}

async fn user_detail(st: &PortalState, sess: &Sess, user: &Value) -> String {
    let t = &sess.s.token;
    let address = s(&user["address"]).to_string();
    let mut h = format!(
        "<section aria-labelledby=\"user-h\" id=\"user\"><h2 id=\"user-h\">{}</h2><dl class=\"facts\"><dt>Platform</dt><dd>{}</dd>",
        esc(&address),
        esc(s(&user["platform"]))
    );
    if user["profile"].is_object() {
        let _ = write!(
            h,
            "<dt>Name</dt><dd>{}</dd><dt>Email</dt><dd>{}</dd><dt>Directory id</dt><dd>{}</dd>",
            esc(s(&user["profile"]["name"])),
            esc(s(&user["profile"]["email"])),
            esc(s(&user["profile"]["id"]))
        );
    }
    h.push_str("</dl>");
    let contacts = user["contacts"].as_array().cloned().unwrap_or_default();
    h.push_str("<table id=\"contacts\"><caption>External contacts</caption><thead><tr><th scope=\"col\">Contact</th><th scope=\"col\">Platform</th><th scope=\"col\">State</th><th scope=\"col\">Chat allowed</th><th scope=\"col\">Why</th><th scope=\"col\">Actions</th></tr></thead><tbody>");
    if contacts.is_empty() {
        h.push_str("<tr><td colspan=\"6\">No contacts.</td></tr>");
    }
    let own = block_control_id(&address);
    let blocked_by_me: Vec<String> = match st
        .call(t, Method::GET, "/api/v1/controls", None, None)
        .await
    {
        Ok(c) => c
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| s(&c["id"]) == own)
            .and_then(|c| c["deny"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|d| s(d).to_string())
            .collect(),
        Err(_) => Vec::new(),
    };
    for c in &contacts {
        let other = s(&c["address"]);
        let e = st
            .call(
                t,
                Method::GET,
                &format!(
                    "/api/v1/explain?from={}&to={}&kind=im",
                    qv(&address),
                    qv(other)
                ),
                None,
                None,
            )
            .await;
        let (allowed, why) = match &e {
            Ok(e) => (e["allowed"] == true, s(&e["reason"]).to_string()),
            Err(f) => (false, f.message.clone()),
        };
        let blocked = blocked_by_me.iter().any(|b| b == other);
        let _ = write!(
            h,
            "<tr data-contact=\"{}\"><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(other),
            esc(other),
            esc(s(&c["platform"])),
            esc(s(&c["state"])),
            if allowed { "allow" } else { "deny" },
            if allowed { "allowed" } else { "blocked" },
            esc(&why),
            button_form(
                &sess.s,
                "/portal/users/block",
                &[
                    ("address", &address),
                    ("contact", other),
                    ("block", if blocked { "0" } else { "1" })
                ],
                &format!("{} {other}", if blocked { "Unblock" } else { "Block" }),
                "",
                None,
            )
        );
    }
    h.push_str("</tbody></table>");
    let _ = write!(
        h,
        "<section class=\"card danger-zone\"><h3>Forget this user</h3><p>Erases the relay's profile, contacts and conversations of {} and replaces the address in the metadata log with a pseudonym. This cannot be undone.</p>{}</section></section>",
        esc(&address),
        button_form(
            &sess.s,
            "/portal/users/forget",
            &[("address", &address)],
            &format!("Forget {address}"),
            "danger",
            Some(&format!("Forget {address}? This cannot be undone.")),
        )
    );
    h
}

pub async fn block(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let (address, contact) = (
        form.get("address").to_ascii_lowercase(),
        form.get("contact").to_ascii_lowercase(),
    );
    if !address.contains('@') || !contact.contains('@') {
        return error_page(
            Some(&sess.s),
            StatusCode::BAD_REQUEST,
            "Both the user and the contact must be user@domain addresses.",
        );
    }
    let t = &sess.s.token;
    let id = block_control_id(&address);
    let controls = match st
        .call(t, Method::GET, "/api/v1/controls", None, None)
        .await
    {
        Ok(c) => c,
        Err(f) => return failed(&st, &sess, f),
    };
    let mut deny: Vec<String> = controls
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| s(&c["id"]) == id)
        .and_then(|c| c["deny"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|d| s(d).to_string())
        .collect();
    let blocking = form.get("block") == "1";
    deny.retain(|d| d != &contact);
    if blocking {
        deny.push(contact.clone());
    }
    let back = format!("/portal/users?address={}", qv(&address));
    let r = if deny.is_empty() {
        st.call(
            t,
            Method::DELETE,
            &format!("/api/v1/controls/{}", seg(&id)),
            None,
            None,
        )
        .await
    } else {
        let body = json!({"who": [address], "deny": deny, "note": "blocks made in the portal"});
        st.call(
            t,
            Method::PUT,
            &format!("/api/v1/controls/{}", seg(&id)),
            Some(&body),
            None,
        )
        .await
    };
    match r {
        Ok(_) => {
            let m = format!(
                "{contact} is {} for {address}.",
                if blocking {
                    "blocked"
                } else {
                    "no longer blocked"
                }
            );
            done(&st, &sess, &back, m).await
        }
        Err(f) => failed(&st, &sess, f),
    }
}

pub async fn forget(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let address = form.get("address");
    match st
        .call(
            &sess.s.token,
            Method::POST,
            &format!("/api/v1/users/{}/forget", seg(&address)),
            None,
            None,
        )
        .await
    {
        Ok(v) => {
            let n = u(&v["summary"]["metadata_entries_pseudonymised"]);
            let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
            done(
                &st,
                &sess,
                &format!("/portal/users?domain={}", qv(domain)),
                format!("{address} is forgotten: {n} metadata entries pseudonymised."),
            )
            .await
        }
        Err(f) => failed(&st, &sess, f),
    }
}

// === approvals ===

pub async fn approvals(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
) -> Response {
    let list = match st
        .call(&sess.s.token, Method::GET, "/api/v1/approvals", None, None)
        .await
    {
        Ok(l) => l,
        Err(f) => return failed(&st, &sess, f),
    };
    let items = list["pending"]
        .as_array()
        .or(list.as_array())
        .cloned()
        .unwrap_or_default();
    let mut h = String::from(
        "<table id=\"approvals\"><caption>Contact requests waiting for a decision</caption><thead><tr><th scope=\"col\">Requested (UTC)</th><th scope=\"col\">From</th><th scope=\"col\">To</th><th scope=\"col\">Why it waits</th><th scope=\"col\">Decision</th></tr></thead><tbody>",
    );
    if items.is_empty() {
        h.push_str("<tr><td colspan=\"5\" id=\"no-approvals\">Nothing is waiting.</td></tr>");
    }
    for p in &items {
        let id = s(&p["id"]);
        let _ = write!(
            h,
            "<tr data-approval=\"{}\"><td>{}</td><td>{} <span class=\"muted\">({})</span></td><td>{} <span class=\"muted\">({})</span></td><td>{}</td><td>{} {}</td></tr>",
            esc(id),
            time_of(p["requested_at_ms"].as_i64().unwrap_or(0)),
            esc(s(&p["from"])),
            esc(s(&p["from_platform"])),
            esc(s(&p["to"])),
            esc(s(&p["to_platform"])),
            esc(s(&p["reason"])),
            button_form(
                &sess.s,
                "/portal/approvals/decide",
                &[("id", id), ("decision", "approve")],
                &format!("Approve {} to {}", s(&p["from"]), s(&p["to"])),
                "primary",
                None
            ),
            button_form(
                &sess.s,
                "/portal/approvals/decide",
                &[("id", id), ("decision", "decline")],
                &format!("Decline {} to {}", s(&p["from"]), s(&p["to"])),
                "danger",
                None
            ),
        );
    }
    h.push_str("</tbody></table>");
    let notice = done_notice(&st, &sess).await;
    render(
        StatusCode::OK,
        "Approvals",
        Nav::Approvals,
        &sess,
        notice.as_ref(),
        &h,
    )
}

pub async fn decide(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Extension(form): Extension<Form>,
) -> Response {
    let id = form.get("id");
    let decision = form.get("decision");
    if decision != "approve" && decision != "decline" {
        return error_page(
            Some(&sess.s),
            StatusCode::BAD_REQUEST,
            "The decision must be approve or decline.",
        );
    }
    match st
        .call(
            &sess.s.token,
            Method::POST,
            &format!("/api/v1/approvals/{}/{decision}", seg(&id)),
            None,
            None,
        )
        .await
    {
        Ok(_) => {
            let m = if decision == "approve" {
                "Approved: the contact request is on its way."
            } else {
                "Declined: the requester is told."
            };
            done(&st, &sess, "/portal/approvals", m.to_string()).await
        }
        Err(f) => failed(&st, &sess, f),
    }
}

// === the metadata log ===

const TYPES: [&str; 4] = ["im", "presence", "typing", "error"];

/// The API query of the log form's fields, or what is wrong with them.
fn log_query(q: &HashMap<String, String>) -> Result<String, String> {
    let mut out = Vec::new();
    for (field, label) in [("from", "From"), ("to", "To")] {
        if let Some(v) = q.get(field).filter(|v| !v.trim().is_empty()) {
            let ms = parse_input_time(v).ok_or_else(|| {
                format!("{label}: `{v}` is not a date and time (YYYY-MM-DDTHH:MM, UTC).")
            })?;
            out.push(format!("{field}={ms}"));
        }
    }
    for field in ["domain", "user", "session", "cursor"] {
        if let Some(v) = q.get(field).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            out.push(format!("{field}={}", qv(v)));
        }
    }
    if let Some(v) = q.get("type").map(|v| v.trim()).filter(|v| !v.is_empty()) {
        if !TYPES.contains(&v) {
            return Err(format!("Type: `{v}` is not one of {}.", TYPES.join(", ")));
        }
        out.push(format!("type={v}"));
    }
    Ok(out.join("&"))
}

/// ` (platform)` after an address, or nothing when it is not known.
fn platform(p: &str) -> String {
    if p.is_empty() {
        String::new()
    } else {
        format!(" <span class=\"muted\">({})</span>", esc(p))
    }
}

pub async fn log(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Query(q): Params,
) -> Response {
    let now = crate::edges::now_ms();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let from = q
        .get("from")
        .cloned()
        .unwrap_or_else(|| input_time_of(now - 86_400_000));
    let to = q
        .get("to")
        .cloned()
        .unwrap_or_else(|| input_time_of(now + 60_000));
    let mut types = vec![(String::new(), "any".to_string())];
    types.extend(TYPES.iter().map(|t| (t.to_string(), t.to_string())));
    let mut h = format!(
        "<form method=\"get\" action=\"/portal/log\" class=\"search\" id=\"log-form\">\
         <div class=\"field\"><label for=\"from\">From (UTC)</label><input type=\"datetime-local\" id=\"from\" name=\"from\" value=\"{}\"></div>\
         <div class=\"field\"><label for=\"to\">To (UTC)</label><input type=\"datetime-local\" id=\"to\" name=\"to\" value=\"{}\"></div>\
         {}{}{}{}\
         <button type=\"submit\" id=\"log-search\">Search</button></form>",
        esc(&from),
        esc(&to),
        text_input("domain", "Domain", &get("domain"), "autocomplete=\"off\""),
        text_input(
            "user",
            "User (user@domain)",
            &get("user"),
            "autocomplete=\"off\""
        ),
        select("type", "Type", &types, &get("type")),
        text_input(
            "session",
            "Session",
            &get("session"),
            "autocomplete=\"off\""
        ),
    );
    let mut params = q.clone();
    params.insert("from".into(), from);
    params.insert("to".into(), to);
    let query = match log_query(&params) {
        Ok(x) => x,
        Err(m) => {
            return render(
                StatusCode::BAD_REQUEST,
                "Metadata log",
                Nav::Log,
                &sess,
                Some(&Notice::Error(m)),
                &h,
            );
        }
    };
    let page_data = match st
        .call(
            &sess.s.token,
            Method::GET,
            &format!("/api/v1/log?{query}&limit=100"),
            None,
            None,
        )
        .await
    {
        Ok(p) => p,
        Err(f) if f.status == StatusCode::UNAUTHORIZED => return failed(&st, &sess, f),
        Err(f) => {
            return render(
                f.status,
                "Metadata log",
                Nav::Log,
                &sess,
                Some(&Notice::Error(f.message)),
                &h,
            );
        }
    };
    let export_query = query
        .split('&')
        .filter(|p| !p.starts_with("cursor="))
        .collect::<Vec<_>>()
        .join("&");
    let _ = write!(
        h,
        "<p><a class=\"button\" id=\"export-csv\" href=\"/portal/log/export?{}\" download>Export as CSV</a> <span class=\"muted\">Every entry of the search, not only this page. The log holds ids and types, never message content.</span></p>",
        esc(&export_query)
    );
    let entries = page_data["entries"].as_array().cloned().unwrap_or_default();
    h.push_str("<table id=\"log\"><thead><tr><th scope=\"col\">Time (UTC)</th><th scope=\"col\">Type</th><th scope=\"col\">Kind or refusal</th><th scope=\"col\">From</th><th scope=\"col\">To</th><th scope=\"col\">Session</th><th scope=\"col\">Message id</th></tr></thead><tbody>");
    if entries.is_empty() {
        h.push_str("<tr><td colspan=\"7\" id=\"log-empty\">No entries match.</td></tr>");
    }
    for e in &entries {
        let to = e["to"]
            .as_array()
            .map(|t| t.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            esc(s(&e["category"])),
            time_of(e["at_ms"].as_i64().unwrap_or(0)),
            esc(s(&e["category"])),
            esc(s(&e["kind"])),
            esc(s(&e["from"])),
            platform(s(&e["from_platform"])),
            esc(&to),
            platform(s(&e["to_platform"])),
            esc(s(&e["session"])),
            esc(s(&e["msg"]))
        );
    }
    h.push_str("</tbody></table>");
    if let Some(c) = page_data["next_cursor"].as_str() {
        let mut next = params.clone();
        next.insert("cursor".into(), c.to_string());
        let qs: Vec<String> = next
            .iter()
            .map(|(k, v)| format!("{}={}", qv(k), qv(v)))
            .collect();
        let _ = write!(
            h,
            "<p><a href=\"/portal/log?{}\" id=\"log-next\">Next page</a></p>",
            esc(&qs.join("&"))
        );
    }
    render(StatusCode::OK, "Metadata log", Nav::Log, &sess, None, &h)
}

pub async fn log_export(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    // The export link carries the API's own parameters (times in Unix ms).
    let mut parts = vec!["format=csv".to_string()];
    for k in ["from", "to", "domain", "user", "type", "session"] {
        if let Some(v) = q.get(k) {
            parts.push(format!("{k}={}", qv(v)));
        }
    }
    let uri = format!("/api/v1/log/export?{}", parts.join("&"));
    match st.raw(&sess.s.token, Method::GET, &uri, None, None).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            failed(
                &st,
                &sess,
                Failure {
                    status,
                    message: s(&v["message"]).to_string(),
                },
            )
        }
        Err(f) => failed(&st, &sess, f),
    }
}

// === audit and cluster ===

pub async fn audit(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
    Query(q): Params,
) -> Response {
    let since: i64 = q.get("since").and_then(|v| v.parse().ok()).unwrap_or(0);
    let v = match st
        .call(
            &sess.s.token,
            Method::GET,
            &format!("/api/v1/audit?since={since}&limit=200"),
            None,
            None,
        )
        .await
    {
        Ok(v) => v,
        Err(f) => return failed(&st, &sess, f),
    };
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let mut h = String::from(
        "<p>Every change to the policy, tokens and users, oldest first, with who made it.</p><table id=\"audit\"><thead><tr><th scope=\"col\">Time (UTC)</th><th scope=\"col\">Who</th><th scope=\"col\">Action</th><th scope=\"col\">Policy version</th><th scope=\"col\">Changes</th></tr></thead><tbody>",
    );
    for e in &entries {
        let changes: Vec<String> = e["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} {} {}", s(&c["op"]), s(&c["what"]), s(&c["id"])))
            .chain(e["detail"].as_str().map(String::from))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time_of(e["at_ms"].as_i64().unwrap_or(0)),
            esc(s(&e["who"])),
            esc(s(&e["action"])),
            e["version"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_default(),
            esc(&changes.join("; "))
        );
    }
    h.push_str("</tbody></table>");
    if entries.len() == 200
        && let Some(last) = entries.last().and_then(|e| e["at_ms"].as_i64())
    {
        let _ = write!(
            h,
            "<p><a href=\"/portal/audit?since={}\">Later changes</a></p>",
            last + 1
        );
    }
    render(StatusCode::OK, "Audit log", Nav::Audit, &sess, None, &h)
}

pub async fn cluster(
    State(st): State<Arc<PortalState>>,
    Extension(sess): Extension<Sess>,
) -> Response {
    let v = match st
        .call(&sess.s.token, Method::GET, "/api/v1/cluster", None, None)
        .await
    {
        Ok(v) => v,
        Err(f) => return failed(&st, &sess, f),
    };
    let members = v["members"].as_array().cloned().unwrap_or_default();
    let sessions: u64 = members.iter().map(|m| u(&m["sessions_active"])).sum();
    let ready = members.iter().filter(|m| m["ready"] == true).count();
    let mut h = format!(
        "<dl class=\"stats\"><div><dt>Nodes ready</dt><dd id=\"nodes-ready\">{ready} of {}</dd></div>\
         <div><dt>Active sessions</dt><dd id=\"sessions\">{}</dd></div>\
         <div><dt>Policy version</dt><dd>{}</dd></div><div><dt>Membership revision</dt><dd>{}</dd></div></dl>\
         <p>Sessions are sharded across the nodes by rendezvous hashing of their ids: each node's shard is the sessions it owns.</p>\
         <table id=\"nodes\"><thead><tr><th scope=\"col\">Node</th><th scope=\"col\">Health</th><th scope=\"col\">Sessions (share)</th><th scope=\"col\">Presence subscriptions</th><th scope=\"col\">Hand-offs in flight</th><th scope=\"col\">Version</th><th scope=\"col\">gRPC address</th></tr></thead><tbody>",
        members.len(),
        num(sessions),
        u(&v["policy_version"]),
        v["revision"].as_i64().unwrap_or(0)
    );
    for m in &members {
        let n = u(&m["sessions_active"]);
        let share = if sessions == 0 {
            0.0
        } else {
            n as f64 * 100.0 / sessions as f64
        };
        let _ = write!(
            h,
            "<tr><th scope=\"row\">{}{}</th><td class=\"{}\">{}</td><td>{} ({share:.0} %)</td><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            esc(s(&m["node_id"])),
            if s(&m["node_id"]) == s(&v["node_id"]) {
                " <span class=\"muted\">(this node)</span>"
            } else {
                ""
            },
            if m["ready"] == true { "allow" } else { "deny" },
            if m["ready"] == true {
                "ready"
            } else {
                "not ready"
            },
            num(n),
            num(u(&m["presence_active"])),
            num(u(&m["handoffs_in_flight"])),
            esc(s(&m["version"])),
            esc(s(&m["grpc_addr"]))
        );
    }
    h.push_str("</tbody></table>");
    render(StatusCode::OK, "Cluster", Nav::Cluster, &sess, None, &h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_form_values_become_the_api_query() {
        let q: HashMap<String, String> = [
            ("from", "2025-11-24T00:00"),
            ("to", "2025-11-24T01:00"),
            ("domain", "b.example"),
            ("type", "error"),
            ("user", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = log_query(&q).unwrap_or_default();
        assert!(
            s.contains("from=1763942400000") && s.contains("to=1763946000000"),
            "{s}"
        );
        assert!(
            s.contains("domain=b.example") && s.contains("type=error") && !s.contains("user="),
            "{s}"
        );
        let mut bad = q.clone();
        bad.insert("from".into(), "yesterday".into());
        assert!(log_query(&bad).is_err_and(|e| e.contains("From")));
        let mut bad = q;
        bad.insert("type".into(), "content".into());
        assert!(log_query(&bad).is_err_and(|e| e.contains("Type")));
    }

    #[test]
    fn forms_become_the_api_json_or_a_clear_message() {
        let f = Form::parse(
            b"id=no-b&from=a.example&to=b.example&action=deny&initiate=either&kinds=im&kinds=files",
        );
        let (id, r) = rule_of(&f).unwrap_or_default();
        assert_eq!(id, "no-b");
        assert_eq!(r["between"], json!(["a.example", "b.example"]));
        assert_eq!(r["kinds"], json!(["im", "files"]));
        assert!(rule_of(&Form::parse(b"from=a&to=b")).is_err());
        let (name, d) = domain_of(&Form::parse(
            b"name=B.Example&platform=http&side=external&per_second=5",
        ))
        .unwrap_or_default();
        assert_eq!(name, "b.example");
        assert_eq!(d["rate_limit"], json!({"per_second": 5}));
        assert_eq!(d["approval"], json!(false));
        for bad in [
            "name=b&per_second=x",
            "name=b&per_second=0",
            "name=b&burst=3",
            "name=",
        ] {
            assert!(domain_of(&Form::parse(bad.as_bytes())).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("alice@contoso.com"), "alice@contoso.com");
        assert_eq!(seg("a/b c?d"), "a%2Fb%20c%3Fd");
        assert_eq!(block_control_id("a+b@x.example"), "block.a.b.x.example");
    }
}
