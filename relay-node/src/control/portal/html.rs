//! HTML building blocks of the portal's pages: escaping, the page frame and form fields.
//! Every value that comes from data goes through [`esc`].

use super::session::Session;
use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values (the Teams edge's
/// rendering too).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query parameter value.
pub fn qv(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The portal's pages, for the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Policy,
    Users,
    Approvals,
    Log,
    Audit,
    Cluster,
    None,
}

const PAGES: &[(Nav, &str, &str, &[&str])] = &[
    (Nav::Overview, "/portal/", "Overview", &["admin", "auditor"]),
    (
        Nav::Policy,
        "/portal/policy",
        "Domains and rules",
        &["admin", "domain-admin"],
    ),
    (
        Nav::Users,
        "/portal/users",
        "Users",
        &["admin", "domain-admin"],
    ),
    (
        Nav::Approvals,
        "/portal/approvals",
        "Approvals",
        &["admin", "domain-admin"],
    ),
    (
        Nav::Log,
        "/portal/log",
        "Metadata log",
        &["admin", "auditor"],
    ),
    (
        Nav::Audit,
        "/portal/audit",
        "Audit log",
        &["admin", "auditor"],
    ),
    (
        Nav::Cluster,
        "/portal/cluster",
        "Cluster",
        &["admin", "auditor"],
    ),
];

/// The first page a role may see.
pub fn home_of(role: &str) -> &'static str {
    PAGES
        .iter()
        .find(|p| p.3.contains(&role))
        .map_or("/portal/", |p| p.1)
}

/// A notice above the page's content.
pub enum Notice {
    Ok(String),
    Error(String),
}

/// A whole page: the frame (navigation, who is signed in, sign-out) around `body`.
pub fn page(
    title: &str,
    nav: Nav,
    session: Option<&Session>,
    notice: Option<&Notice>,
    body: &str,
) -> String {
    let mut h = String::with_capacity(body.len() + 2048);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · fedrelay</title>\
         <link rel=\"stylesheet\" href=\"/portal/assets/portal.css\">\
         <script src=\"/portal/assets/portal.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header class=\"top\"><span class=\"brand\">fedrelay</span>",
        esc(title)
    );
    if let Some(s) = session {
        h.push_str("<nav aria-label=\"Pages\"><ul>");
        for (n, href, label, roles) in PAGES {
            if !roles.contains(&s.role.as_str()) {
                continue;
            }
            let current = if *n == nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(h, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        let _ = write!(
            h,
            "</ul></nav><div class=\"who\"><span id=\"who\">{} <span class=\"role\">({})</span></span>\
             <form method=\"post\" action=\"/portal/logout\">{}\
             <button type=\"submit\" id=\"logout\">Sign out</button></form></div>",
            esc(&s.name),
            esc(&s.role),
            csrf_field(s)
        );
    }
    let _ = write!(
        h,
        "</header><main id=\"main\" tabindex=\"-1\"><h1>{}</h1>",
        esc(title)
    );
    match notice {
        Some(Notice::Ok(m)) => {
            let _ = write!(h, "<p class=\"notice ok\" role=\"status\">{}</p>", esc(m));
        }
        Some(Notice::Error(m)) => {
            let _ = write!(
                h,
                "<p class=\"notice error\" role=\"alert\" id=\"error\">{}</p>",
                esc(m)
            );
        }
        None => {}
    }
    h.push_str(body);
    h.push_str("</main></body></html>");
    h
}

/// The hidden field every form of a session carries.
pub fn csrf_field(s: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"_csrf\" value=\"{}\">",
        esc(&s.csrf)
    )
}

/// A labelled text input.
pub fn text_input(id: &str, label: &str, value: &str, extra: &str) -> String {
    format!(
        "<div class=\"field\"><label for=\"{id}\">{}</label>\
         <input type=\"text\" id=\"{id}\" name=\"{id}\" value=\"{}\" {extra}></div>",
        esc(label),
        esc(value)
    )
}

/// A labelled select; `options` are (value, label).
pub fn select(id: &str, label: &str, options: &[(String, String)], selected: &str) -> String {
    let mut h = format!(
        "<div class=\"field\"><label for=\"{id}\">{}</label><select id=\"{id}\" name=\"{id}\">",
        esc(label)
    );
    for (v, l) in options {
        let sel = if v == selected { " selected" } else { "" };
        let _ = write!(h, "<option value=\"{}\"{sel}>{}</option>", esc(v), esc(l));
    }
    h.push_str("</select></div>");
    h
}

/// A small form of one button posting `fields` (besides the CSRF token) to `action`. The
/// label's first word is shown; the rest (what it applies to) is for screen readers.
pub fn button_form(
    s: &Session,
    action: &str,
    fields: &[(&str, &str)],
    label: &str,
    class: &str,
    confirm: Option<&str>,
) -> String {
    let mut h = format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\"{}>{}",
        esc(action),
        confirm
            .map(|c| format!(" data-confirm=\"{}\"", esc(c)))
            .unwrap_or_default(),
        csrf_field(s)
    );
    for (k, v) in fields {
        let _ = write!(
            h,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(k),
            esc(v)
        );
    }
    // The verb shows; what it applies to is there for screen readers (rows already show it).
    let (verb, object) = label.split_once(' ').unwrap_or((label, ""));
    let _ = write!(
        h,
        "<button type=\"submit\" class=\"{}\">{}{}</button></form>",
        esc(class),
        esc(verb),
        if object.is_empty() {
            String::new()
        } else {
            format!("<span class=\"sr\"> {}</span>", esc(object))
        }
    );
    h
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix milliseconds.
pub fn time_of(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}:{:02}",
        crate::control::metadata::day_of(ms),
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `YYYY-MM-DDTHH:MM` (UTC), the value of a `datetime-local` input.
pub fn input_time_of(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{}T{:02}:{:02}",
        crate::control::metadata::day_of(ms),
        secs / 3600,
        secs / 60 % 60
    )
}

/// Unix milliseconds of a `datetime-local` value (`YYYY-MM-DDTHH:MM[:SS]`, taken as UTC).
pub fn parse_input_time(s: &str) -> Option<i64> {
    let (day, time) = s.trim().split_once('T')?;
    let days = crate::control::logstore::parse_day(day)?;
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let m: i64 = t.next()?.parse().ok()?;
    let sec: i64 = match t.next() {
        Some(x) => x.parse().ok()?,
        None => 0,
    };
    if t.next().is_some()
        || !(0..24).contains(&h)
        || !(0..60).contains(&m)
        || !(0..60).contains(&sec)
    {
        return None;
    }
    Some(days * 86_400_000 + (h * 3600 + m * 60 + sec) * 1000)
}

/// Thousands separated by a thin space: `12 345`.
pub fn num(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

/// The fields of a submitted form (`application/x-www-form-urlencoded`), in order.
#[derive(Debug, Clone, Default)]
pub struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn parse(body: &[u8]) -> Self {
        Form(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`, trimmed; empty when absent.
    pub fn get(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn times_round_trip_through_inputs() {
        let ms = 1_763_950_000_000;
        let shown = input_time_of(ms);
        assert_eq!(shown, "2025-11-24T02:06");
        assert_eq!(parse_input_time(&shown), Some(ms - ms % 60_000));
        assert_eq!(time_of(ms), "2025-11-24 02:06:40");
        for bad in [
            "",
            "2025-11-24",
            "2025-13-01T00:00",
            "2025-11-24T24:00",
            "x T y",
            "2025-11-24T01:02:03:04",
        ] {
            assert_eq!(parse_input_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(1000), "1\u{202f}000");
        assert_eq!(num(1_234_567), "1\u{202f}234\u{202f}567");
    }

    #[test]
    fn forms_keep_repeated_fields() {
        let f = Form::parse(b"a=1&k=im&k=files&n=+x%20y+");
        assert_eq!(f.get("a"), "1");
        assert_eq!(f.all("k"), vec!["im", "files"]);
        assert_eq!(f.get("n"), "x y");
        assert_eq!(f.get("missing"), "");
        assert!(f.has("k") && !f.has("z"));
    }
}
