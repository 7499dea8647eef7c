//! Teams' HTML ⇄ the relay's neutral rich text.
//!
//! Inbound, a small tolerant reader: it keeps bold, italic, strike, code and links, turns
//! blocks and `<br>` into line breaks, drops the quoted part of a reply and anything inside
//! `<script>`/`<style>`, and decodes character references. It never fails and never
//! recurses; malformed markup degrades to text. Outbound, everything is escaped and only
//! http(s)/mailto links are written.

use fedrelay_proto::v1;

const MAX_RUNS: usize = 512;

#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Style {
    bold: bool,
    italic: bool,
    strike: bool,
    code: bool,
}

#[derive(Default)]
struct Counts {
    bold: u32,
    italic: u32,
    strike: u32,
    code: u32,
}

impl Counts {
    fn style(&self) -> Style {
        Style {
            bold: self.bold > 0,
            italic: self.italic > 0,
            strike: self.strike > 0,
            code: self.code > 0,
        }
    }
}

struct Builder {
    runs: Vec<(Style, String, String)>,
}

impl Builder {
    fn push(&mut self, style: Style, link: &str, text: &str) {
        if text.is_empty() {
            return;
        }
        let full = self.runs.len() >= MAX_RUNS;
        if let Some((s, l, t)) = self.runs.last_mut()
            && (*s == style && l == link || full)
        {
            t.push_str(text);
            return;
        }
        self.runs.push((style, link.to_string(), text.to_string()));
    }

    fn ends_with_newline(&self) -> bool {
        self.runs.last().is_none_or(|(_, _, t)| t.ends_with('\n'))
    }
}

struct Tag<'a> {
    name: String,
    closing: bool,
    raw: &'a str,
}

fn parse_tag(raw: &str) -> Tag<'_> {
    let inner = raw.trim();
    let (closing, inner) = match inner.strip_prefix('/') {
        Some(r) => (true, r),
        None => (false, inner),
    };
    let name: String = inner
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    Tag { name, closing, raw }
}

/// The value of attribute `name` in a tag's raw text (quoted with " or ').
fn attr(raw: &str, name: &str) -> Option<String> {
    let lower = raw.to_ascii_lowercase();
    let mut from = 0;
    while let Some(pos) = lower[from..].find(name) {
        let at = from + pos;
        from = at + name.len();
        let before_ok = at == 0
            || lower[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_whitespace());
        let rest = raw[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let rest = rest[1..].trim_start();
        let quote = rest.chars().next()?;
        if quote == '"' || quote == '\'' {
            let body = &rest[1..];
            let end = body.find(quote)?;
            return Some(decode_entities(&body[..end]));
        }
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(rest.len());
        return Some(decode_entities(&rest[..end]));
    }
    None
}

/// Decodes the character references Teams and browsers write.
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        // Bytes, not a str slice: the 12th byte may fall inside a character.
        let end = rest.bytes().take(12).position(|b| b == b';');
        let decoded = end.and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(h) => u32::from_str_radix(h, 16).ok()?,
                        None => num.parse::<u32>().ok()?,
                    };
                    char::from_u32(code).filter(|c| *c != '\0')
                }
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Reads Teams HTML into neutral text. `rich` is empty when nothing is styled.
pub fn to_text(html: &str) -> v1::Text {
    let mut b = Builder { runs: Vec::new() };
    let mut counts = Counts::default();
    let mut links: Vec<String> = Vec::new();
    // Inside a quoted reply, a script or a style: the depth of such elements.
    let mut skip: Vec<String> = Vec::new();
    let mut rest = html;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            if skip.is_empty() {
                let link = links.last().map(String::as_str).unwrap_or("");
                b.push(counts.style(), link, &decode_entities(rest));
            }
            break;
        };
        if lt > 0 && skip.is_empty() {
            let link = links.last().map(String::as_str).unwrap_or("");
            b.push(counts.style(), link, &decode_entities(&rest[..lt]));
        }
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            // An unclosed `<`: the rest is text.
            if skip.is_empty() {
                let link = links.last().map(String::as_str).unwrap_or("");
                b.push(counts.style(), link, &decode_entities(rest));
            }
            break;
        };
        let tag = parse_tag(&rest[1..gt]);
        rest = &rest[gt + 1..];
        if let Some(top) = skip.last() {
            if tag.name == *top {
                if tag.closing {
                    skip.pop();
                } else if !tag.raw.ends_with('/') {
                    skip.push(tag.name);
                }
            }
            continue;
        }
        let style = counts.style();
        let open = !tag.closing;
        let adjust = |n: &mut u32| {
            if open {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
        };
        match tag.name.as_str() {
            "b" | "strong" => adjust(&mut counts.bold),
            "i" | "em" => adjust(&mut counts.italic),
            "s" | "strike" | "del" => adjust(&mut counts.strike),
            "code" | "pre" => adjust(&mut counts.code),
            "a" if open => links.push(
                attr(tag.raw, "href")
                    .filter(|h| safe_link(h))
                    .unwrap_or_default(),
            ),
            "a" => {
                links.pop();
            }
            "br" => b.push(style, "", "\n"),
            "p" | "div" | "li" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
                if !b.ends_with_newline() =>
            {
                b.push(style, "", "\n");
            }
            "blockquote" if open && is_reply_quote(tag.raw) => skip.push(tag.name),
            "script" | "style" | "template" if open => skip.push(tag.name),
            _ => {}
        }
    }
    finish(b.runs)
}

fn is_reply_quote(raw: &str) -> bool {
    attr(raw, "itemtype").is_some_and(|t| t.ends_with("/Reply")) || attr(raw, "itemid").is_some()
}

/// The `itemid` of a quoted reply (`<blockquote itemtype="http://schema.skype.com/Reply"
/// itemid="…">`).
pub fn quoted_item_id(html: &str) -> Option<String> {
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        rest = &rest[lt + 1..];
        let gt = rest.find('>')?;
        let tag = parse_tag(&rest[..gt]);
        if tag.name == "blockquote" && !tag.closing && is_reply_quote(tag.raw) {
            return attr(tag.raw, "itemid").filter(|s| !s.is_empty() && s.len() <= 256);
        }
        rest = &rest[gt..];
    }
    None
}

fn finish(runs: Vec<(Style, String, String)>) -> v1::Text {
    let mut runs: Vec<(Style, String, String)> = runs;
    // Trim outer whitespace, and blank lines the block tags left.
    while let Some((_, _, t)) = runs.first_mut() {
        let trimmed = t.trim_start().to_string();
        if trimmed.is_empty() {
            runs.remove(0);
        } else {
            *t = trimmed;
            break;
        }
    }
    while let Some((_, _, t)) = runs.last_mut() {
        let trimmed = t.trim_end().to_string();
        if trimmed.is_empty() {
            runs.pop();
        } else {
            *t = trimmed;
            break;
        }
    }
    let plain: String = runs.iter().map(|(_, _, t)| t.as_str()).collect();
    let styled = runs
        .iter()
        .any(|(s, l, _)| *s != Style::default() || !l.is_empty());
    let rich = if styled {
        runs.into_iter()
            .map(|(s, link, text)| v1::TextRun {
                text,
                bold: s.bold,
                italic: s.italic,
                strike: s.strike,
                code: s.code,
                link,
            })
            .collect()
    } else {
        Vec::new()
    };
    v1::Text { plain, rich }
}

fn safe_link(l: &str) -> bool {
    l.starts_with("https://") || l.starts_with("http://") || l.starts_with("mailto:")
}

/// Escapes text for HTML, line breaks as `<br/>`.
pub fn escape(s: &str) -> String {
    crate::control::portal::esc(&s.replace('\r', "")).replace('\n', "<br/>")
}

/// Renders neutral text as Teams HTML.
pub fn from_text(t: &v1::Text) -> String {
    if t.rich.is_empty() {
        return escape(&t.plain);
    }
    let mut out = String::new();
    for r in &t.rich {
        let mut s = escape(&r.text);
        if r.code {
            s = format!("<code>{s}</code>");
        }
        if r.strike {
            s = format!("<s>{s}</s>");
        }
        if r.italic {
            s = format!("<i>{s}</i>");
        }
        if r.bold {
            s = format!("<b>{s}</b>");
        }
        if !r.link.is_empty() && safe_link(&r.link) {
            s = format!("<a href=\"{}\">{s}</a>", escape(&r.link));
        }
        out.push_str(&s);
    }
    out
}

/// Removes the `<at>…</at>` mentions of the bot (by its display name) from a message text,
/// leaving other mentions as their names. Returns the text and whether the bot was mentioned.
pub fn strip_mentions(text: &str, bot_names: &[&str]) -> (String, bool) {
    let mut mentioned = false;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(open) = lower.find("<at") else {
            out.push_str(rest);
            break;
        };
        let Some(gt) = lower[open..].find('>').map(|g| open + g) else {
            out.push_str(rest);
            break;
        };
        let Some(close) = lower[gt..].find("</at>").map(|c| gt + c) else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..open]);
        let name = decode_entities(&rest[gt + 1..close]);
        if bot_names
            .iter()
            .any(|b| b.eq_ignore_ascii_case(name.trim()))
        {
            mentioned = true;
        } else {
            out.push_str(&escape(&name));
        }
        rest = &rest[close + 5..];
    }
    (out, mentioned)
}

/// The whole of [`to_text`], [`quoted_item_id`] and [`strip_mentions`] on arbitrary input,
/// for the fuzz target: none may panic.
pub fn fuzz(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let t = to_text(&s);
    let _ = from_text(&t);
    let _ = quoted_item_id(&s);
    let _ = strip_mentions(&s, &["fedrelay"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_links_and_blocks() {
        let t = to_text(
            "<p>Hi <b>Bob</b>, see <a href=\"https://x.example/a?b=1&amp;c=2\">this</a></p><div>next&nbsp;line &lt;ok&gt;</div>",
        );
        assert_eq!(t.plain, "Hi Bob, see this\nnext line <ok>");
        assert!(t.rich.iter().any(|r| r.bold && r.text == "Bob"));
        assert!(
            t.rich
                .iter()
                .any(|r| r.link == "https://x.example/a?b=1&c=2" && r.text == "this")
        );
    }

    #[test]
    fn plain_text_has_no_runs_and_unsafe_links_are_dropped() {
        let t = to_text("just text");
        assert_eq!(t.plain, "just text");
        assert!(t.rich.is_empty());
        let t = to_text("<a href=\"javascript:alert(1)\">x</a>");
        assert_eq!(t.plain, "x");
        assert!(t.rich.is_empty());
    }

    #[test]
    fn quoted_reply_is_dropped_and_its_id_found() {
        let html = "<blockquote itemscope=\"\" itemtype=\"http://schema.skype.com/Reply\" itemid=\"1700000000001\"><strong>fedrelay</strong><p>old <b>text</b></p></blockquote><p>my answer</p>";
        assert_eq!(quoted_item_id(html).as_deref(), Some("1700000000001"));
        assert_eq!(to_text(html).plain, "my answer");
    }

    #[test]
    fn scripts_and_broken_markup_degrade_to_text() {
        assert_eq!(to_text("a<script>evil()</script>b").plain, "ab");
        assert_eq!(to_text("a < b and <b").plain, "a < b and <b");
        assert_eq!(to_text("&#x1F600; &#0; &bogus;").plain, "😀 &#0; &bogus;");
        assert_eq!(to_text("</b></i>x").plain, "x");
    }

    #[test]
    fn rendering_escapes_everything() {
        let t = v1::Text {
            plain: "<script>&".into(),
            rich: vec![],
        };
        assert_eq!(from_text(&t), "&lt;script&gt;&amp;");
        let t = to_text("<b>bold</b> <a href=\"https://e.example/\">l\"ink</a>");
        assert_eq!(
            from_text(&t),
            "<b>bold</b> <a href=\"https://e.example/\">l&quot;ink</a>"
        );
    }

    #[test]
    fn bot_mentions_are_stripped() {
        let (text, mentioned) =
            strip_mentions("<at>fedrelay</at> invite bob@b.example", &["fedrelay"]);
        assert_eq!(text.trim(), "invite bob@b.example");
        assert!(mentioned);
        assert_eq!(
            strip_mentions("hi <at>Alice</at>", &["fedrelay"]),
            ("hi Alice".to_string(), false)
        );
    }
}
