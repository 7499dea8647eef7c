//! Stanzas ↔ envelope bodies.
//!
//! In: `message` (body with XEP-0393 styling or XHTML-IM → text; XEP-0308 replace → edit;
//! XEP-0424 retract → delete; XEP-0444 reactions; XEP-0066 out-of-band → file; XEP-0085
//! chat states → typing), `presence` (availability; subscription requests and answers) and
//! `iq` (vcard-temp requests and results). Out: the same, always with a readable fallback
//! body for clients that lack an extension.

use super::element::{Element, Node};
use super::stream::{NS_SERVER, NS_STANZAS};
use fedrelay_proto::v1;
use fedrelay_proto::v1::envelope::Body;

pub const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
pub const NS_CORRECT: &str = "urn:xmpp:message-correct:0";
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
pub const NS_REACTIONS: &str = "urn:xmpp:reactions:0";
pub const NS_OOB: &str = "jabber:x:oob";
pub const NS_SID: &str = "urn:xmpp:sid:0";
pub const NS_RECEIPTS: &str = "urn:xmpp:receipts";
pub const NS_XHTML_IM: &str = "http://jabber.org/protocol/xhtml-im";
pub const NS_XHTML: &str = "http://www.w3.org/1999/xhtml";
pub const NS_VCARD: &str = "vcard-temp";
pub const NS_FALLBACK: &str = "urn:xmpp:fallback:0";
pub const NS_STYLING_HINT: &str = "urn:xmpp:styling:0";

/// A JID, normalised: local part and domain lowercase (the common case of nodeprep and
/// nameprep), resource as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jid {
    pub local: String,
    pub domain: String,
    pub resource: String,
}

impl Jid {
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 3071 {
            return None;
        }
        let (rest, resource) = match s.split_once('/') {
            Some((a, r)) => (a, r),
            None => (s, ""),
        };
        let (local, domain) = match rest.split_once('@') {
            Some((l, d)) => (l, d),
            None => ("", rest),
        };
        let domain = domain.trim_end_matches('.').to_lowercase();
        let bad_local = |c: char| "\"&'/:<>@".contains(c) || c.is_whitespace() || c.is_control();
        if domain.is_empty()
            || domain.len() > 1023
            || local.len() > 1023
            || resource.len() > 1023
            || local.chars().any(bad_local)
            || domain
                .chars()
                .any(|c| !(c.is_alphanumeric() || c == '-' || c == '.'))
            || (s.contains('@') && local.is_empty())
            || (s.contains('/') && resource.is_empty())
        {
            return None;
        }
        Some(Self {
            local: local.to_lowercase(),
            domain,
            resource: resource.to_string(),
        })
    }

    pub fn bare(&self) -> String {
        if self.local.is_empty() {
            self.domain.clone()
        } else {
            format!("{}@{}", self.local, self.domain)
        }
    }
}

/// What an incoming stanza asks the relay to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Meaning {
    /// An envelope body for the recipient; `id` is the sender's id for the stanza.
    Body(Body),
    /// The sender's full current set of reactions to one message (XEP-0444).
    Reactions { target: String, emojis: Vec<String> },
    /// The sender's availability.
    Presence(v1::Presence),
    /// A request for the recipient's vCard.
    ProfileQuery,
    /// An answer to the relay's vCard request.
    Profile(v1::Profile),
    /// A presence probe: the relay answers with the user's presence when it has it.
    Probe,
    /// Nothing the relay carries (an error bounce, a receipt, an unknown iq result…).
    Ignore(&'static str),
    /// An iq the relay does not serve: answered `service-unavailable`.
    UnsupportedIq,
}

/// The id an incoming message is known by: its XEP-0359 origin-id, else its id attribute.
pub fn message_id(m: &Element) -> Option<String> {
    m.get_child("origin-id", NS_SID)
        .and_then(|o| o.get_attr("id"))
        .or_else(|| m.get_attr("id"))
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .map(str::to_string)
}

fn text_of(m: &Element) -> Option<String> {
    m.child_text("body", NS_SERVER)
}

/// Reads a stanza from a remote user.
pub fn meaning(st: &Element) -> Meaning {
    match st.name.as_str() {
        "message" => message(st),
        "presence" => presence(st),
        "iq" => iq(st),
        _ => Meaning::Ignore("unknown stanza"),
    }
}

fn message(m: &Element) -> Meaning {
    let kind = m.get_attr("type").unwrap_or("normal");
    if !matches!(kind, "chat" | "normal") {
        return Meaning::Ignore("message type not relayed");
    }
    if let Some(r) = m.get_child("retract", NS_RETRACT) {
        return match r.get_attr("id") {
            Some(id) => Meaning::Body(Body::Delete(v1::Delete {
                target: Some(native_ref(id)),
            })),
            None => Meaning::Ignore("retraction without an id"),
        };
    }
    if let Some(r) = m.get_child("reactions", NS_REACTIONS) {
        let Some(id) = r.get_attr("id") else {
            return Meaning::Ignore("reactions without an id");
        };
        let mut emojis: Vec<String> = Vec::new();
        for e in r.elements().filter(|e| e.is("reaction", NS_REACTIONS)) {
            let t = e.text_content();
            let t = t.trim();
            if !t.is_empty() && t.chars().count() <= 16 && !emojis.iter().any(|x| x == t) {
                emojis.push(t.to_string());
            }
        }
        return Meaning::Reactions {
            target: id.to_string(),
            emojis,
        };
    }
    let body = text_of(m);
    if let Some(r) = m.get_child("replace", NS_CORRECT)
        && let Some(id) = r.get_attr("id")
    {
        let text = read_text(m, body.as_deref().unwrap_or(""));
        return Meaning::Body(Body::Edit(v1::Edit {
            target: Some(native_ref(id)),
            new_body: Some(text),
        }));
    }
    if let Some(oob) = m.get_child("x", NS_OOB)
        && let Some(url) = oob.child_text("url", NS_OOB)
        && (url.starts_with("https://") || url.starts_with("http://"))
        && body.as_deref().is_none_or(|b| b.trim() == url.trim())
    {
        let url = url.trim().to_string();
        let name = url
            .split(['?', '#'])
            .next()
            .and_then(|p| p.rsplit('/').next())
            .filter(|n| !n.is_empty())
            .unwrap_or("file")
            .to_string();
        return Meaning::Body(Body::File(v1::File {
            name,
            size: 0,
            mime: String::new(),
            url,
        }));
    }
    if let Some(b) = body {
        if b.is_empty() {
            return Meaning::Ignore("empty body");
        }
        return Meaning::Body(Body::Text(read_text(m, &b)));
    }
    for (state, active) in [
        ("composing", true),
        ("paused", false),
        ("active", false),
        ("inactive", false),
        ("gone", false),
    ] {
        if m.get_child(state, NS_CHATSTATES).is_some() {
            return Meaning::Body(Body::Typing(v1::Typing { active }));
        }
    }
    Meaning::Ignore("message without content")
}

fn native_ref(id: &str) -> v1::MessageRef {
    v1::MessageRef {
        relay_msg_id: String::new(),
        native_id: id.to_string(),
    }
}

fn presence(p: &Element) -> Meaning {
    match p.get_attr("type").unwrap_or("") {
        "" | "unavailable" => {
            use v1::presence::Availability as A;
            let availability = if p.get_attr("type") == Some("unavailable") {
                A::Offline
            } else {
                match p.child_text("show", NS_SERVER).as_deref().map(str::trim) {
                    Some("away") | Some("xa") => A::Away,
                    Some("dnd") => A::DoNotDisturb,
                    _ => A::Available,
                }
            };
            let note = p
                .child_text("status", NS_SERVER)
                .unwrap_or_default()
                .chars()
                .take(1024)
                .collect();
            Meaning::Presence(v1::Presence {
                availability: availability as i32,
                note,
            })
        }
        "subscribe" => Meaning::Body(Body::ContactRequest(v1::ContactRequest {
            note: p
                .child_text("status", NS_SERVER)
                .unwrap_or_default()
                .chars()
                .take(1024)
                .collect(),
        })),
        "subscribed" => Meaning::Body(Body::ContactResponse(v1::ContactResponse {
            accepted: true,
        })),
        "unsubscribed" | "unsubscribe" => {
            Meaning::Body(Body::ContactResponse(v1::ContactResponse {
                accepted: false,
            }))
        }
        "probe" => Meaning::Probe,
        _ => Meaning::Ignore("presence type not relayed"),
    }
}

fn iq(q: &Element) -> Meaning {
    let kind = q.get_attr("type").unwrap_or("");
    let vcard = q.get_child("vCard", NS_VCARD);
    match (kind, vcard) {
        ("get", Some(_)) => Meaning::ProfileQuery,
        ("result", Some(v)) => Meaning::Profile(read_vcard(v)),
        ("get" | "set", _) => Meaning::UnsupportedIq,
        _ => Meaning::Ignore("iq result or error"),
    }
}

fn read_vcard(v: &Element) -> v1::Profile {
    let t = |name: &str| v.child_text(name, NS_VCARD).unwrap_or_default();
    let display_name = match t("FN") {
        n if !n.trim().is_empty() => n.trim().to_string(),
        _ => v
            .get_child("N", NS_VCARD)
            .map(|n| {
                let g = n.child_text("GIVEN", NS_VCARD).unwrap_or_default();
                let f = n.child_text("FAMILY", NS_VCARD).unwrap_or_default();
                format!("{} {}", g.trim(), f.trim()).trim().to_string()
            })
            .unwrap_or_default(),
    };
    let email = v
        .elements()
        .filter(|e| e.is("EMAIL", NS_VCARD))
        .find_map(|e| e.child_text("USERID", NS_VCARD))
        .unwrap_or_default();
    let organisation = v
        .get_child("ORG", NS_VCARD)
        .and_then(|o| o.child_text("ORGNAME", NS_VCARD))
        .unwrap_or_default();
    let avatar_url = v
        .get_child("PHOTO", NS_VCARD)
        .and_then(|p| p.child_text("EXTVAL", NS_VCARD))
        .filter(|u| u.starts_with("https://"))
        .unwrap_or_default();
    let cap = |s: String| s.trim().chars().take(256).collect::<String>();
    v1::Profile {
        display_name: cap(display_name),
        email: cap(email),
        title: cap(t("TITLE")),
        organisation: cap(organisation),
        avatar_url: cap(avatar_url),
    }
}

/// The text of a message: XHTML-IM when present, else the body read as XEP-0393 styling.
fn read_text(m: &Element, body: &str) -> v1::Text {
    if let Some(h) = m.get_child("html", NS_XHTML_IM)
        && let Some(b) = h.get_child("body", NS_XHTML)
    {
        let mut runs = Vec::new();
        xhtml_runs(b, Style::default(), "", &mut runs);
        let runs = merge(runs);
        if runs.iter().any(is_styled) {
            return v1::Text {
                plain: body.to_string(),
                rich: runs,
            };
        }
    }
    let runs = styling_runs(body);
    v1::Text {
        plain: body.to_string(),
        rich: if runs.iter().any(is_styled) {
            runs
        } else {
            Vec::new()
        },
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Style {
    bold: bool,
    italic: bool,
    strike: bool,
    code: bool,
}

fn run(text: &str, s: Style, link: &str) -> v1::TextRun {
    v1::TextRun {
        text: text.to_string(),
        bold: s.bold,
        italic: s.italic,
        strike: s.strike,
        code: s.code,
        link: link.to_string(),
    }
}

fn is_styled(r: &v1::TextRun) -> bool {
    r.bold || r.italic || r.strike || r.code || !r.link.is_empty()
}

fn merge(runs: Vec<v1::TextRun>) -> Vec<v1::TextRun> {
    let mut out: Vec<v1::TextRun> = Vec::with_capacity(runs.len());
    for r in runs {
        if r.text.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(l)
                if l.bold == r.bold
                    && l.italic == r.italic
                    && l.strike == r.strike
                    && l.code == r.code
                    && l.link == r.link =>
            {
                l.text.push_str(&r.text);
            }
            _ => out.push(r),
        }
    }
    out
}

fn xhtml_runs(e: &Element, s: Style, link: &str, out: &mut Vec<v1::TextRun>) {
    if out.len() > 1000 {
        return;
    }
    for c in &e.children {
        match c {
            Node::Text(t) => out.push(run(t, s, link)),
            Node::Element(el) if el.ns == NS_XHTML => {
                let mut s2 = s;
                let mut l2 = link.to_string();
                match el.name.as_str() {
                    "strong" | "b" => s2.bold = true,
                    "em" | "i" => s2.italic = true,
                    "del" | "s" | "strike" => s2.strike = true,
                    "code" | "pre" => s2.code = true,
                    "a" => {
                        if let Some(h) = el.get_attr("href")
                            && (h.starts_with("https://")
                                || h.starts_with("http://")
                                || h.starts_with("mailto:"))
                        {
                            l2 = h.to_string();
                        }
                    }
                    "br" => out.push(run("\n", s, link)),
                    "p" if !out.is_empty() => out.push(run("\n", s, link)),
                    _ => {}
                }
                if el.get_attr("style").is_some_and(|st| st.contains("bold")) {
                    s2.bold = true;
                }
                xhtml_runs(el, s2, &l2, out);
            }
            Node::Element(_) => {}
        }
    }
}

/// XEP-0393 span styling, line by line: `*strong*`, `_emphasis_`, `~strike~`, `` `pre` ``;
/// ```` ``` ```` blocks are code. A span opens after a space or line start and closes
/// before a space, punctuation or line end, and never spans lines.
fn styling_runs(body: &str) -> Vec<v1::TextRun> {
    let mut out = Vec::new();
    let mut in_block = false;
    for (i, line) in body.split('\n').enumerate() {
        if i > 0 {
            out.push(run("\n", Style::default(), ""));
        }
        if line.starts_with("```") {
            in_block = !in_block;
            out.push(run(line, Style::default(), ""));
            continue;
        }
        if in_block {
            out.push(run(
                line,
                Style {
                    code: true,
                    ..Style::default()
                },
                "",
            ));
            continue;
        }
        styling_line(line, &mut out);
    }
    merge(out)
}

fn styling_line(line: &str, out: &mut Vec<v1::TextRun>) {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut plain_start = 0;
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        let opens = matches!(c, '*' | '_' | '~' | '`')
            && (i == 0 || chars[i - 1].1.is_whitespace())
            && chars.get(i + 1).is_some_and(|n| !n.1.is_whitespace());
        if opens
            && let Some(j) = (i + 2..chars.len()).find(|&j| {
                chars[j].1 == c
                    && !chars[j - 1].1.is_whitespace()
                    && chars.get(j + 1).is_none_or(|n| !n.1.is_alphanumeric())
            })
        {
            out.push(run(&line[plain_start..pos], Style::default(), ""));
            let inner = &line[chars[i + 1].0..chars[j].0];
            let mut s = Style::default();
            match c {
                '*' => s.bold = true,
                '_' => s.italic = true,
                '~' => s.strike = true,
                _ => s.code = true,
            }
            out.push(run(inner, s, ""));
            plain_start = chars.get(j + 1).map(|n| n.0).unwrap_or(line.len());
            i = j + 1;
            continue;
        }
        i += 1;
    }
    out.push(run(&line[plain_start..], Style::default(), ""));
}

/// Text as an XMPP body: the runs written as XEP-0393 styling (links as `text (url)`).
pub fn render_text(t: &v1::Text) -> String {
    if t.rich.is_empty() {
        return t.plain.clone();
    }
    let mut s = String::new();
    for r in &t.rich {
        let mut piece = r.text.clone();
        // Styling cannot wrap whitespace at its edges; such runs go out plain.
        let wrappable = !piece.trim().is_empty()
            && !piece.starts_with(char::is_whitespace)
            && !piece.ends_with(char::is_whitespace)
            && !piece.contains('\n');
        if wrappable {
            if r.code {
                piece = format!("`{piece}`");
            } else {
                if r.strike {
                    piece = format!("~{piece}~");
                }
                if r.italic {
                    piece = format!("_{piece}_");
                }
                if r.bold {
                    piece = format!("*{piece}*");
                }
            }
        }
        if !r.link.is_empty() && r.link != r.text {
            piece = format!("{piece} ({})", r.link);
        }
        s.push_str(&piece);
    }
    s
}

/// A `<message type='chat'>` from `from` to `to` with the given id.
pub fn chat(from: &str, to: &str, id: &str) -> Element {
    Element::new("message", NS_SERVER)
        .attr("type", "chat")
        .attr("from", from)
        .attr("to", to)
        .attr("id", id)
}

pub fn body(text: &str) -> Element {
    Element::new("body", NS_SERVER).text(text)
}

/// `<origin-id/>`: lets the peer and its clients name the message (XEP-0359).
pub fn origin_id(id: &str) -> Element {
    Element::new("origin-id", NS_SID).attr("id", id)
}

/// A stanza error in reply to `st` (RFC 6120 §8.3): `from`/`to` swapped, same id.
pub fn stanza_error(st: &Element, kind: &str, condition: &str, text: &str) -> Element {
    let mut e = Element::new(st.name.clone(), NS_SERVER)
        .attr("type", "error")
        .attr("from", st.get_attr("to").unwrap_or(""))
        .attr("to", st.get_attr("from").unwrap_or(""))
        .attr("id", st.get_attr("id").unwrap_or(""));
    let mut err = Element::new("error", NS_SERVER)
        .attr("type", kind)
        .child(Element::new(condition, NS_STANZAS));
    if !text.is_empty() {
        err = err.child(
            Element::new("text", NS_STANZAS)
                .attr("xml:lang", "en")
                .text(text),
        );
    }
    e = e.child(err);
    e
}

/// A vCard (vcard-temp) for a profile.
pub fn vcard(p: &v1::Profile) -> Element {
    let field = |n: &str, v: &str| Element::new(n, NS_VCARD).text(v);
    let mut v = Element::new("vCard", NS_VCARD);
    if !p.display_name.is_empty() {
        v = v.child(field("FN", &p.display_name));
    }
    if !p.email.is_empty() {
        v = v.child(
            Element::new("EMAIL", NS_VCARD)
                .child(Element::new("INTERNET", NS_VCARD))
                .child(field("USERID", &p.email)),
        );
    }
    if !p.title.is_empty() {
        v = v.child(field("TITLE", &p.title));
    }
    if !p.organisation.is_empty() {
        v = v.child(Element::new("ORG", NS_VCARD).child(field("ORGNAME", &p.organisation)));
    }
    if !p.avatar_url.is_empty() {
        v = v.child(Element::new("PHOTO", NS_VCARD).child(field("EXTVAL", &p.avatar_url)));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(name: &str) -> Element {
        Element::new(name, NS_SERVER)
    }

    #[test]
    fn jids_are_normalised_and_checked() {
        let j = Jid::parse("Bob@Prosody.Test/Gajim").map(|j| (j.bare(), j.resource));
        assert_eq!(j, Some(("bob@prosody.test".into(), "Gajim".into())));
        assert_eq!(
            Jid::parse("prosody.test").map(|j| j.bare()),
            Some("prosody.test".into())
        );
        for bad in [
            "",
            "@x",
            "a b@x",
            "a@",
            "a@x/",
            "a@x y",
            "a<b@x",
            "a@exa_mple.com",
        ] {
            assert!(Jid::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn messages_map_to_bodies() {
        let m = el("message")
            .attr("type", "chat")
            .attr("id", "m1")
            .child(body("hello *bold* and _it_ plus `x`"))
            .child(Element::new("active", NS_CHATSTATES));
        let Meaning::Body(Body::Text(t)) = meaning(&m) else {
            panic!("not text");
        };
        assert_eq!(t.plain, "hello *bold* and _it_ plus `x`");
        let styled: Vec<_> = t
            .rich
            .iter()
            .filter(|r| is_styled(r))
            .map(|r| r.text.as_str())
            .collect();
        assert_eq!(styled, ["bold", "it", "x"]);
        assert_eq!(render_text(&t), "hello *bold* and _it_ plus `x`");

        let edit = el("message")
            .attr("type", "chat")
            .child(body("fixed"))
            .child(Element::new("replace", NS_CORRECT).attr("id", "m1"));
        assert!(matches!(meaning(&edit), Meaning::Body(Body::Edit(e))
            if e.target.as_ref().map(|t| t.native_id.as_str()) == Some("m1")
            && e.new_body.as_ref().map(|b| b.plain.as_str()) == Some("fixed")));

        let retract = el("message")
            .attr("type", "chat")
            .child(body("fallback"))
            .child(Element::new("retract", NS_RETRACT).attr("id", "m1"));
        assert!(matches!(meaning(&retract), Meaning::Body(Body::Delete(_))));

        let reactions = el("message").attr("type", "chat").child(
            Element::new("reactions", NS_REACTIONS)
                .attr("id", "m1")
                .child(Element::new("reaction", NS_REACTIONS).text("👍"))
                .child(Element::new("reaction", NS_REACTIONS).text("👍"))
                .child(Element::new("reaction", NS_REACTIONS).text("🎉")),
        );
        assert_eq!(
            meaning(&reactions),
            Meaning::Reactions {
                target: "m1".into(),
                emojis: vec!["👍".into(), "🎉".into()]
            }
        );

        let file = el("message")
            .attr("type", "chat")
            .child(body("https://files.example/up/report.pdf"))
            .child(
                Element::new("x", NS_OOB)
                    .child(Element::new("url", NS_OOB).text("https://files.example/up/report.pdf")),
            );
        assert!(matches!(meaning(&file), Meaning::Body(Body::File(f))
            if f.name == "report.pdf" && f.url == "https://files.example/up/report.pdf"));

        let typing = el("message")
            .attr("type", "chat")
            .child(Element::new("composing", NS_CHATSTATES));
        assert_eq!(
            meaning(&typing),
            Meaning::Body(Body::Typing(v1::Typing { active: true }))
        );
        let paused = el("message")
            .attr("type", "chat")
            .child(Element::new("paused", NS_CHATSTATES));
        assert_eq!(
            meaning(&paused),
            Meaning::Body(Body::Typing(v1::Typing { active: false }))
        );

        let groupchat = el("message").attr("type", "groupchat").child(body("x"));
        assert!(matches!(meaning(&groupchat), Meaning::Ignore(_)));
        let error = el("message").attr("type", "error").child(body("x"));
        assert!(matches!(meaning(&error), Meaning::Ignore(_)));
    }

    #[test]
    fn xhtml_im_gives_the_runs() {
        let m = el("message").attr("type", "chat").child(body("a b")).child(
            Element::new("html", NS_XHTML_IM).child(
                Element::new("body", NS_XHTML)
                    .text("a ")
                    .child(Element::new("strong", NS_XHTML).text("b"))
                    .child(
                        Element::new("a", NS_XHTML)
                            .attr("href", "javascript:x")
                            .text("c"),
                    ),
            ),
        );
        let Meaning::Body(Body::Text(t)) = meaning(&m) else {
            panic!("not text");
        };
        assert_eq!(t.rich.len(), 3);
        assert!(t.rich[1].bold);
        assert!(t.rich[2].link.is_empty(), "no javascript: links");
    }

    #[test]
    fn presence_and_subscriptions() {
        let p = el("presence")
            .child(el("show").text("dnd"))
            .child(el("status").text("in a meeting"));
        assert_eq!(
            meaning(&p),
            Meaning::Presence(v1::Presence {
                availability: v1::presence::Availability::DoNotDisturb as i32,
                note: "in a meeting".into()
            })
        );
        let off = el("presence").attr("type", "unavailable");
        assert!(matches!(meaning(&off), Meaning::Presence(p)
            if p.availability == v1::presence::Availability::Offline as i32));
        assert!(matches!(
            meaning(&el("presence").attr("type", "subscribe")),
            Meaning::Body(Body::ContactRequest(_))
        ));
        assert!(matches!(
            meaning(&el("presence").attr("type", "subscribed")),
            Meaning::Body(Body::ContactResponse(v1::ContactResponse {
                accepted: true
            }))
        ));
        assert!(matches!(
            meaning(&el("presence").attr("type", "unsubscribed")),
            Meaning::Body(Body::ContactResponse(v1::ContactResponse {
                accepted: false
            }))
        ));
    }

    #[test]
    fn vcards_both_ways() {
        let p = v1::Profile {
            display_name: "Bob Builder".into(),
            email: "bob@example.org".into(),
            title: "Engineer".into(),
            organisation: "Example".into(),
            avatar_url: String::new(),
        };
        let iq = el("iq").attr("type", "result").child(vcard(&p));
        assert_eq!(meaning(&iq), Meaning::Profile(p));
        let get = el("iq")
            .attr("type", "get")
            .child(Element::new("vCard", NS_VCARD));
        assert_eq!(meaning(&get), Meaning::ProfileQuery);
        let other = el("iq")
            .attr("type", "get")
            .child(Element::new("query", "jabber:iq:version"));
        assert_eq!(meaning(&other), Meaning::UnsupportedIq);
    }

    #[test]
    fn stanza_errors_swap_addresses() {
        let m = el("message")
            .attr("from", "bob@prosody.test/x")
            .attr("to", "carol@gamma.test")
            .attr("id", "m9");
        let e = stanza_error(&m, "cancel", "not-allowed", "no federation");
        assert_eq!(
            e.to_xml(NS_SERVER),
            "<message type='error' from='carol@gamma.test' to='bob@prosody.test/x' id='m9'>\
             <error type='cancel'><not-allowed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>no federation</text>\
             </error></message>"
        );
    }
}
