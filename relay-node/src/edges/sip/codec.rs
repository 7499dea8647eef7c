//! SIP bodies ↔ envelope bodies: `text/plain`, `text/html` and `multipart/alternative` ↔
//! text (RFC 3428), `application/im-iscomposing+xml` ↔ typing (RFC 3994), PIDF ↔ presence
//! (RFC 3863, with the RPID activities and note of RFC 4480).
//!
//! XML bodies go through the same hardened parser as XMPP streams: no DTDs, entities or
//! processing instructions, bounded size and depth.

use crate::edges::teams::html;
use crate::edges::xmpp::element::{Element, escape};
use crate::edges::xmpp::xml::{Event, Limits, Parser};
use fedrelay_proto::v1;
use v1::presence::Availability as A;

pub const NS_PIDF: &str = "urn:ietf:params:xml:ns:pidf";
pub const NS_RPID: &str = "urn:ietf:params:xml:ns:pidf:rpid";
pub const NS_DM: &str = "urn:ietf:params:xml:ns:pidf:data-model";
pub const NS_ISCOMPOSING: &str = "urn:ietf:params:xml:ns:im-iscomposing";
pub const CT_PIDF: &str = "application/pidf+xml";
pub const CT_ISCOMPOSING: &str = "application/im-iscomposing+xml";

/// The types a `MESSAGE` body may have (sent in `Accept` and with 415).
pub const ACCEPT_IM: &str =
    "text/plain, text/html, multipart/alternative, application/im-iscomposing+xml";

/// What a MESSAGE body means.
#[derive(Debug, Clone, PartialEq)]
pub enum ImBody {
    Text(v1::Text),
    Typing(bool),
}

/// Why a body cannot be relayed (answered 415 or 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    Unsupported(String),
    Malformed(String),
}

/// Reads an XML document body into its root element.
pub fn parse_xml(body: &[u8]) -> Option<Element> {
    let mut doc = std::str::from_utf8(body)
        .ok()?
        .trim_start_matches('\u{feff}')
        .trim();
    if doc.starts_with("<?xml") {
        doc = &doc[doc.find("?>")? + 2..];
    }
    let mut p = Parser::new(Limits {
        max_stanza_bytes: 65_536,
        max_depth: 16,
        ..Limits::default()
    });
    p.feed(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    p.feed(doc.as_bytes());
    loop {
        match p.next_event() {
            Ok(Some(Event::Stanza(e))) => return Some(e),
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

/// The IM content of a MESSAGE body of type `mime` (lowercase `type/subtype`).
pub fn im_body(
    mime: &str,
    params: &[(String, Option<String>)],
    body: &[u8],
) -> Result<ImBody, BodyError> {
    let text = || {
        std::str::from_utf8(body).map_err(|_| BodyError::Malformed("the body is not UTF-8".into()))
    };
    match mime {
        "text/plain" => Ok(ImBody::Text(v1::Text {
            plain: text()?.to_string(),
            rich: Vec::new(),
        })),
        "text/html" => Ok(ImBody::Text(html::to_text(text()?))),
        "application/im-iscomposing+xml" => {
            let el = parse_xml(body)
                .filter(|e| e.is("isComposing", NS_ISCOMPOSING))
                .ok_or_else(|| BodyError::Malformed("not an isComposing document".into()))?;
            let state = el.child_text("state", NS_ISCOMPOSING).unwrap_or_default();
            Ok(ImBody::Typing(state.trim() == "active"))
        }
        "multipart/alternative" | "multipart/mixed" => {
            let boundary = params
                .iter()
                .find(|(n, _)| n == "boundary")
                .and_then(|(_, v)| v.clone())
                .ok_or_else(|| BodyError::Malformed("multipart without a boundary".into()))?;
            let parts = multipart(body, &boundary)
                .ok_or_else(|| BodyError::Malformed("multipart body not well-formed".into()))?;
            // The richest alternative the relay reads: HTML, then plain text.
            for want in ["text/html", "text/plain"] {
                if let Some((ct, b)) = parts.iter().find(|(ct, _)| ct.mime == want) {
                    return im_body(&ct.mime, &ct.params, b);
                }
            }
            Err(BodyError::Unsupported(
                "no text/plain or text/html alternative".into(),
            ))
        }
        other => Err(BodyError::Unsupported(other.to_string())),
    }
}

/// The parts of a MIME multipart body (RFC 2046): each part's Content-Type (default
/// `text/plain`) and body. Parts may be binary (a signature, say).
fn multipart(body: &[u8], boundary: &str) -> Option<Vec<(super::msg::ContentType, Vec<u8>)>> {
    if boundary.is_empty() || boundary.len() > 70 {
        return None;
    }
    let delim = format!("--{boundary}").into_bytes();
    let find = |from: usize| {
        body.get(from..)?
            .windows(delim.len())
            .position(|w| w == delim.as_slice())
            .map(|p| p + from)
    };
    let mut out = Vec::new();
    let mut at = find(0)?;
    loop {
        let after = at + delim.len();
        if body.get(after..after + 2) == Some(b"--") {
            return Some(out);
        }
        let start = after
            + if body.get(after..after + 2) == Some(b"\r\n") {
                2
            } else {
                1
            };
        let next = find(start)?;
        // The CRLF before the next delimiter belongs to it.
        let mut part = body.get(start..next)?;
        part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let (head, content) = match part.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => (&part[..i], &part[i + 4..]),
            None => (&b""[..], part.strip_prefix(b"\r\n").unwrap_or(part)),
        };
        let mut ct = super::msg::ContentType {
            mime: "text/plain".into(),
            params: Vec::new(),
        };
        for line in std::str::from_utf8(head).ok()?.split("\r\n") {
            if let Some((n, v)) = line.split_once(':')
                && n.trim().eq_ignore_ascii_case("content-type")
            {
                ct = super::msg::ContentType::parse(v.trim())?;
            }
        }
        out.push((ct, content.to_vec()));
        if out.len() > 16 {
            return None;
        }
        at = next;
    }
}

/// The first message Skype for Business carries in an INVITE's `Ms-Text-Format` header:
/// `text/plain; charset=UTF-8; msgr=…; ms-body=<base64>`.
pub fn ms_text_format(v: &str) -> Option<v1::Text> {
    use base64::Engine;
    let mut parts = v.split(';');
    let mime = parts.next()?.trim().to_ascii_lowercase();
    let b64 = parts
        .find_map(|p| p.trim().strip_prefix("ms-body="))?
        .trim_matches('"');
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    match im_body(&mime, &[], &raw).ok()? {
        ImBody::Text(t) if !t.plain.is_empty() => Some(t),
        _ => None,
    }
}

/// A MESSAGE body for text: HTML when it is styled, else plain text. (content type, body)
pub fn text_body(t: &v1::Text) -> (&'static str, String) {
    if t.rich.is_empty() {
        ("text/plain;charset=UTF-8", t.plain.clone())
    } else {
        ("text/html;charset=UTF-8", html::from_text(t))
    }
}

/// An isComposing document (RFC 3994): `active` with a 60 s refresh, or `idle`.
pub fn is_composing(active: bool) -> String {
    let state = if active { "active" } else { "idle" };
    let refresh = if active { "<refresh>60</refresh>" } else { "" };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<isComposing xmlns=\"{NS_ISCOMPOSING}\"><state>{state}</state><contenttype>text/plain</contenttype>{refresh}</isComposing>"
    )
}

/// Reads a PIDF document: `open`/`closed`, RPID activities (away, busy, on-the-phone…)
/// and the first note.
pub fn parse_pidf(body: &[u8]) -> Option<v1::Presence> {
    let root = parse_xml(body).filter(|e| e.is("presence", NS_PIDF))?;
    let mut open = false;
    let mut any_tuple = false;
    let mut note = String::new();
    for t in root.elements().filter(|e| e.is("tuple", NS_PIDF)) {
        any_tuple = true;
        if let Some(b) = t
            .get_child("status", NS_PIDF)
            .and_then(|s| s.child_text("basic", NS_PIDF))
            && b.trim() == "open"
        {
            open = true;
        }
        if note.is_empty()
            && let Some(n) = t.child_text("note", NS_PIDF)
        {
            note = n.trim().to_string();
        }
    }
    if note.is_empty()
        && let Some(n) = root.child_text("note", NS_PIDF)
    {
        note = n.trim().to_string();
    }
    // RPID activities, on a dm:person (RFC 4479/4480) or directly under the root.
    let mut activities: Vec<String> = Vec::new();
    let mut collect = |e: &Element| {
        if let Some(a) = e.get_child("activities", NS_RPID) {
            activities.extend(a.elements().map(|x| x.name.clone()));
        }
    };
    collect(&root);
    for p in root.elements().filter(|e| e.is("person", NS_DM)) {
        collect(p);
        if note.is_empty()
            && let Some(n) = p.child_text("note", NS_DM)
        {
            note = n.trim().to_string();
        }
    }
    let availability = if !open && any_tuple {
        A::Offline
    } else if activities.iter().any(|a| {
        matches!(
            a.as_str(),
            "busy" | "on-the-phone" | "meeting" | "appointment" | "performance" | "presentation"
        )
    }) {
        A::Busy
    } else if activities.iter().any(|a| {
        matches!(
            a.as_str(),
            "away" | "vacation" | "sleeping" | "lunch" | "travel"
        )
    }) {
        A::Away
    } else if activities.iter().any(|a| a == "permanent-absence") {
        A::Offline
    } else {
        A::Available
    };
    Some(v1::Presence {
        availability: availability as i32,
        note,
    })
}

/// A PIDF document for `entity` (`sip:user@domain`), with an RPID activity for away and
/// busy so SIMPLE clients show more than online/offline.
pub fn pidf(entity: &str, p: &v1::Presence) -> String {
    let a = A::try_from(p.availability).unwrap_or(A::Available);
    let basic = if a == A::Offline { "closed" } else { "open" };
    let activity = match a {
        A::Away => "<rp:away/>",
        A::Busy => "<rp:busy/>",
        A::DoNotDisturb => "<rp:busy/>",
        _ => "",
    };
    let note = if p.note.is_empty() {
        String::new()
    } else {
        format!("<note>{}</note>", escape(&p.note))
    };
    let person = if activity.is_empty() {
        String::new()
    } else {
        format!("<dm:person id=\"p\"><rp:activities>{activity}</rp:activities></dm:person>")
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<presence xmlns=\"{NS_PIDF}\" xmlns:dm=\"{NS_DM}\" xmlns:rp=\"{NS_RPID}\" entity=\"{}\"><tuple id=\"t\"><status><basic>{basic}</basic></status>{note}</tuple>{person}</presence>",
        escape(entity)
    )
}

/// Whether an `Accept` header value allows PIDF (an absent header means PIDF, RFC 3856 §6.6).
pub fn accepts_pidf(accept: Option<&str>) -> bool {
    match accept {
        None => true,
        Some(a) => a.split(',').any(|t| {
            let t = t
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            t == CT_PIDF || t == "application/*" || t == "*/*"
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidf_round_trips_availability_and_note() {
        for (a, note) in [
            (A::Available, ""),
            (A::Away, "at lunch"),
            (A::Busy, "in a <meeting> & more"),
            (A::Offline, ""),
        ] {
            let p = v1::Presence {
                availability: a as i32,
                note: note.into(),
            };
            let doc = pidf("sip:bob@sip.test", &p);
            assert_eq!(parse_pidf(doc.as_bytes()), Some(p), "{doc}");
        }
        // Do-not-disturb has no RPID activity of its own; it reads back as busy.
        let dnd = pidf(
            "sip:a@b",
            &v1::Presence {
                availability: A::DoNotDisturb as i32,
                note: String::new(),
            },
        );
        assert_eq!(
            parse_pidf(dnd.as_bytes()).map(|p| p.availability),
            Some(A::Busy as i32)
        );
    }

    #[test]
    fn rfc_3863_minimal_document_and_hostile_xml() {
        let doc = b"<?xml version='1.0' encoding='UTF-8'?><presence xmlns='urn:ietf:params:xml:ns:pidf' entity='pres:bob@ex'><tuple id='t'><status><basic>open</basic></status></tuple></presence>";
        assert_eq!(
            parse_pidf(doc).map(|p| p.availability),
            Some(A::Available as i32)
        );
        let closed = b"<presence xmlns='urn:ietf:params:xml:ns:pidf' entity='pres:bob@ex'><tuple id='t'><status><basic>closed</basic></status><note>gone home</note></tuple></presence>";
        assert_eq!(
            parse_pidf(closed),
            Some(v1::Presence {
                availability: A::Offline as i32,
                note: "gone home".into()
            })
        );
        let bomb = b"<?xml version='1.0'?><!DOCTYPE p [<!ENTITY a 'aaaa'>]><presence xmlns='urn:ietf:params:xml:ns:pidf'>&a;</presence>";
        assert_eq!(parse_pidf(bomb), None);
        assert_eq!(parse_pidf(b"<presence xmlns='other'/>"), None);
        assert_eq!(parse_pidf(b"\xff\xfe"), None);
    }

    #[test]
    fn im_bodies() {
        assert_eq!(
            im_body("text/plain", &[], "héllo".as_bytes()),
            Ok(ImBody::Text(v1::Text {
                plain: "héllo".into(),
                rich: vec![]
            }))
        );
        let Ok(ImBody::Text(t)) = im_body("text/html", &[], b"<b>bold</b> move") else {
            panic!("html not read");
        };
        assert_eq!(t.plain, "bold move");
        assert!(t.rich.iter().any(|r| r.bold && r.text == "bold"));
        assert_eq!(
            im_body(CT_ISCOMPOSING, &[], is_composing(true).as_bytes()),
            Ok(ImBody::Typing(true))
        );
        assert_eq!(
            im_body(CT_ISCOMPOSING, &[], is_composing(false).as_bytes()),
            Ok(ImBody::Typing(false))
        );
        let mp = b"preamble\r\n--XyZ\r\nContent-Type: text/plain\r\n\r\nplain one\r\n--XyZ\r\nContent-Type: text/html\r\n\r\n<i>rich</i> one\r\n--XyZ--\r\n";
        let params = vec![("boundary".to_string(), Some("XyZ".to_string()))];
        let Ok(ImBody::Text(t)) = im_body("multipart/alternative", &params, mp) else {
            panic!("multipart not read");
        };
        assert_eq!(t.plain, "rich one");
        assert!(matches!(
            im_body("image/png", &[], b"x"),
            Err(BodyError::Unsupported(_))
        ));
        assert!(matches!(
            im_body("text/plain", &[], b"\xff"),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            im_body("multipart/alternative", &[], mp),
            Err(BodyError::Malformed(_))
        ));
        // Plain text stays plain; styled text goes as HTML.
        let (ct, b) = text_body(&v1::Text {
            plain: "a < b".into(),
            rich: vec![],
        });
        assert_eq!((ct, b.as_str()), ("text/plain;charset=UTF-8", "a < b"));
        assert!(accepts_pidf(None));
        assert!(accepts_pidf(Some("application/pidf+xml, text/xml")));
        assert!(!accepts_pidf(Some(
            "application/msrtc-event-categories+xml"
        )));
    }
}
