//! The XMPP edge's streaming XML parser: turns the bytes of one inbound XML stream into its
//! stream header, its stanzas (namespace-resolved [`Element`] trees) and its end, under the
//! restrictions of RFC 6120 §11 and with hard limits, for input from untrusted servers.
//!
//! Bytes are fed in whatever chunks the socket delivers. Only the token being read (a tag, a
//! run of text, a CDATA section) stays buffered, and its scan resumes where it stopped, so a
//! large stanza arriving in tiny chunks costs linear time. What the restricted XML profile
//! forbids (comments, processing instructions, DTDs, entities other than the five predefined
//! ones) is refused with `restricted-xml`; a stanza is refused as soon as its buffered bytes
//! reach the limit, without waiting for its end. Any error ends the stream: the parser keeps
//! returning it, and drops what it had buffered.
//!
//! Text and attribute values are normalised as XML 1.0 requires: line ends (`\r\n`, `\r`)
//! become `\n`, and in attribute values literal tabs and line ends become spaces (characters
//! written as references, such as `&#13;`, are kept).

use super::element::{Element, Node, escape_into};
use std::collections::HashMap;

/// The namespace of `<stream:stream>`, `<stream:features>` and `<stream:error>`.
pub const STREAMS_NS: &str = "http://etherx.jabber.org/streams";
/// The namespace the `xml` prefix is bound to without a declaration.
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// The buffer capacity kept while a stream is idle.
const IDLE_BUF_CAPACITY: usize = 16 * 1024;

/// What one stream may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one stanza, from its `<` to the end of its end tag.
    pub max_stanza_bytes: usize,
    /// Element nesting within a stanza (the stanza element itself is depth 1).
    pub max_depth: usize,
    /// Attributes on one element, namespace declarations included.
    pub max_attrs: usize,
    /// Bytes up to the end of the stream header, XML declaration and whitespace included.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Prosody's default for s2s.
            max_stanza_bytes: 524_288,
            max_depth: 32,
            max_attrs: 64,
            max_header_bytes: 4096,
        }
    }
}

/// The opening `<stream:stream ...>` tag.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamHeader {
    /// The root element's local name (always `stream`).
    pub name: String,
    /// The root element's namespace (always [`STREAMS_NS`]).
    pub ns: String,
    /// The default namespace declared on the header (`jabber:server` for s2s), empty if none.
    pub default_ns: String,
    /// The other attributes as written (`to`, `from`, `id`, `version`, `xml:lang`).
    pub attrs: Vec<(String, String)>,
    /// The prefixes the header declares, e.g. `("db", "jabber:server:dialback")`.
    pub prefixes: Vec<(String, String)>,
}

impl StreamHeader {
    /// The value of an attribute, by its name as written.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the parser reads from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StreamOpen(StreamHeader),
    /// A complete child of the stream element.
    Stanza(Element),
    /// `</stream:stream>`.
    StreamClose,
}

/// Why a stream is unacceptable. Each is fatal for the stream (RFC 6120 §4.9).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum XmlError {
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// A construct the XMPP subset of XML does not allow (RFC 6120 §11.1).
    #[error("restricted XML: {0} not allowed")]
    Restricted(&'static str),
    #[error("stanza too big")]
    StanzaTooBig,
    #[error("stream header too big")]
    HeaderTooBig,
    #[error("elements nested too deep")]
    TooDeep,
    #[error("too many attributes on one element")]
    TooManyAttributes,
    /// The root is not `stream` in [`STREAMS_NS`].
    #[error("invalid stream namespace")]
    InvalidNamespace,
    #[error("bad format: {0}")]
    BadFormat(String),
}

impl XmlError {
    /// The stream error condition (RFC 6120 §4.9.3) to send before closing.
    pub fn condition(&self) -> &'static str {
        match self {
            Self::NotWellFormed(_) => "not-well-formed",
            Self::Restricted(_) => "restricted-xml",
            Self::StanzaTooBig | Self::HeaderTooBig | Self::TooDeep | Self::TooManyAttributes => {
                "policy-violation"
            }
            Self::InvalidNamespace => "invalid-namespace",
            Self::BadFormat(_) => "bad-format",
        }
    }

    /// The application-specific condition to add, as (element, namespace).
    pub fn app_condition(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::StanzaTooBig => Some(("stanza-too-big", "urn:xmpp:errors")),
            _ => None,
        }
    }
}

fn nwf(why: &str) -> XmlError {
    XmlError::NotWellFormed(why.to_string())
}

fn utf8(raw: &[u8]) -> Result<&str, XmlError> {
    std::str::from_utf8(raw).map_err(|_| nwf("invalid UTF-8"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing read yet: an XML declaration may come.
    Start,
    /// Before the stream header.
    Prolog,
    /// Inside the stream element.
    Stream,
    /// The header was self-closing: the close is still to be reported.
    ClosePending,
    Closed,
}

enum Step {
    More,
    Again,
    Emit(Event),
}

/// An element whose end tag has not arrived yet.
struct Open {
    el: Element,
    qname: String,
    /// The length of the namespace scope before this element's declarations.
    scope_len: usize,
}

/// The incremental parser of one XML stream. See the module docs.
pub struct Parser {
    limits: Limits,
    buf: Vec<u8>,
    /// Where the unconsumed bytes start in `buf`.
    pos: usize,
    /// How far the token at `pos` has been scanned (relative to `pos`), and the quote that is
    /// open at that point of a tag (0: none).
    scan: usize,
    quote: u8,
    /// Bytes of the current stanza (or, before it, of the header) already consumed.
    used: usize,
    state: State,
    error: Option<XmlError>,
    /// The namespace declarations in scope: the header's, then those of the open elements.
    scope: Scope,
    stack: Vec<Open>,
    /// Character data of the innermost open element not yet stored as a node.
    text: String,
    header_qname: String,
}

impl Parser {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            pos: 0,
            scan: 0,
            quote: 0,
            used: 0,
            state: State::Start,
            error: None,
            scope: Scope::default(),
            stack: Vec::new(),
            text: String::new(),
            header_qname: String::new(),
        }
    }

    /// Appends bytes read from the socket (ignored once the stream has failed).
    pub fn feed(&mut self, data: &[u8]) {
        if self.error.is_some() || data.is_empty() {
            return;
        }
        // Drop consumed bytes once they are at least as many as the kept ones: each byte is
        // moved a bounded number of times.
        if self.pos > 0 && self.pos >= self.buf.len() - self.pos {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next event, `Ok(None)` when more bytes are needed. After an error, the same error.
    pub fn next_event(&mut self) -> Result<Option<Event>, XmlError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let r = self.advance();
        match &r {
            Err(e) => {
                self.error = Some(e.clone());
                self.buf = Vec::new();
                self.pos = 0;
                self.stack.clear();
                self.scope.clear();
                self.text.clear();
            }
            Ok(_) if self.pos == self.buf.len() => {
                // All consumed: drop it now, and give back the room a big stanza needed.
                self.buf.clear();
                self.pos = 0;
                if self.buf.capacity() > IDLE_BUF_CAPACITY {
                    self.buf.shrink_to(IDLE_BUF_CAPACITY);
                }
            }
            Ok(_) => {}
        }
        r
    }

    /// Starts over for a new stream (after STARTTLS or SASL success): everything buffered
    /// and every error is forgotten.
    pub fn reset(&mut self) {
        let limits = self.limits;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        *self = Self::new(limits);
        self.buf = buf;
    }

    /// Bytes fed but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn advance(&mut self) -> Result<Option<Event>, XmlError> {
        loop {
            let step = match self.state {
                State::Start | State::Prolog => self.prolog_step()?,
                State::Stream => self.stream_step()?,
                State::ClosePending => {
                    self.state = State::Closed;
                    Step::Emit(Event::StreamClose)
                }
                State::Closed => {
                    let n = self.ws_len(self.buf.len());
                    self.consume(n);
                    if self.pos < self.buf.len() {
                        return Err(nwf("data after the end of the stream"));
                    }
                    Step::More
                }
            };
            match step {
                Step::More => return Ok(None),
                Step::Emit(e) => return Ok(Some(e)),
                Step::Again => {}
            }
        }
    }

    fn in_prolog(&self) -> bool {
        matches!(self.state, State::Start | State::Prolog)
    }

    fn budget(&self) -> usize {
        if self.in_prolog() {
            self.limits.max_header_bytes
        } else {
            self.limits.max_stanza_bytes
        }
    }

    /// The end of what the current header or stanza may still use in `buf`; bytes beyond it
    /// are not looked at.
    fn limit(&self) -> usize {
        let rest = self.budget().saturating_sub(self.used);
        self.pos.saturating_add(rest).min(self.buf.len())
    }

    /// More bytes are needed: an error instead if the unfinished header or stanza has
    /// already used its whole budget.
    fn more(&self) -> Result<Step, XmlError> {
        let pending = self.buf.len() - self.pos;
        let active = self.in_prolog() || pending > 0 || !self.stack.is_empty();
        if active && self.used.saturating_add(pending) >= self.budget() {
            return Err(if self.in_prolog() {
                XmlError::HeaderTooBig
            } else {
                XmlError::StanzaTooBig
            });
        }
        Ok(Step::More)
    }

    fn consume(&mut self, n: usize) {
        if n == 0 {
            // Nothing read: the scan of the token at `pos` stays valid.
            return;
        }
        self.pos += n;
        self.scan = 0;
        self.quote = 0;
    }

    /// Consumes `n` bytes of the current header or stanza.
    fn consume_counted(&mut self, n: usize) {
        self.consume(n);
        self.used += n;
    }

    fn ws_len(&self, end: usize) -> usize {
        self.buf[self.pos..end]
            .iter()
            .take_while(|&&b| is_ws(b))
            .count()
    }

    /// The end (`>`) of the tag at `pos`, skipping quoted attribute values.
    fn find_tag_end(&mut self) -> Result<Option<usize>, XmlError> {
        let lim = self.limit();
        let mut i = self.pos + self.scan.max(1);
        let mut quote = self.quote;
        while i < lim {
            let b = self.buf[i];
            if quote != 0 {
                if b == quote {
                    quote = 0;
                } else if b == b'<' {
                    return Err(nwf("'<' in an attribute value"));
                }
            } else {
                match b {
                    b'>' => return Ok(Some(i)),
                    b'\'' | b'"' => quote = b,
                    b'<' => return Err(nwf("'<' inside a tag")),
                    _ => {}
                }
            }
            i += 1;
        }
        self.scan = i - self.pos;
        self.quote = quote;
        Ok(None)
    }

    /// Where `needle` starts, searching from `from` bytes into the token at `pos`.
    fn find_seq(&mut self, needle: &[u8], from: usize) -> Option<usize> {
        let lim = self.limit();
        let start = self.pos + self.scan.max(from);
        if start < lim
            && let Some(i) = self.buf[start..lim]
                .windows(needle.len())
                .position(|w| w == needle)
        {
            return Some(start + i);
        }
        self.scan = (lim - self.pos).saturating_sub(needle.len() - 1).max(from);
        None
    }

    fn prolog_step(&mut self) -> Result<Step, XmlError> {
        let n = self.ws_len(self.limit());
        if n > 0 {
            self.consume_counted(n);
            self.state = State::Prolog;
        }
        let avail = &self.buf[self.pos..self.limit()];
        let Some(&b0) = avail.first() else {
            return self.more();
        };
        if b0 != b'<' {
            return Err(nwf("text before the stream header"));
        }
        let Some(&b1) = avail.get(1) else {
            return self.more();
        };
        match b1 {
            b'?' => self.xml_decl(),
            b'!' => match classify_bang(avail) {
                Bang::More => self.more(),
                Bang::Comment => Err(XmlError::Restricted("comment")),
                Bang::Dtd => Err(XmlError::Restricted("DTD")),
                Bang::Cdata | Bang::Bad => Err(nwf("markup before the stream header")),
            },
            b'/' => Err(nwf("end tag before the stream header")),
            _ => self.header(),
        }
    }

    fn xml_decl(&mut self) -> Result<Step, XmlError> {
        const DECL: &[u8] = b"<?xml";
        if self.state != State::Start {
            return Err(XmlError::Restricted("processing instruction"));
        }
        let avail = &self.buf[self.pos..self.limit()];
        if avail.len() < DECL.len() + 1 {
            return if DECL.starts_with(avail) {
                self.more()
            } else {
                Err(XmlError::Restricted("processing instruction"))
            };
        }
        let after = avail[DECL.len()];
        if !avail.starts_with(DECL) || !(is_ws(after) || after == b'?') {
            return Err(XmlError::Restricted("processing instruction"));
        }
        let Some(end) = self.find_seq(b"?>", DECL.len()) else {
            return self.more();
        };
        parse_decl(&self.buf[self.pos + DECL.len()..end])?;
        self.consume_counted(end + 2 - self.pos);
        self.state = State::Prolog;
        Ok(Step::Again)
    }

    fn header(&mut self) -> Result<Step, XmlError> {
        let Some(end) = self.find_tag_end()? else {
            return self.more();
        };
        let raw = utf8(&self.buf[self.pos + 1..end])?;
        let tag = parse_tag(raw, self.limits.max_attrs)?;
        let qname = tag.qname;
        let empty = tag.empty;
        let r = resolve(tag, &mut self.scope)?;
        if r.local != "stream" || r.ns != STREAMS_NS {
            return Err(XmlError::InvalidNamespace);
        }
        let default_ns = self.scope.lookup("").unwrap_or("").to_string();
        let prefixes = self
            .scope
            .declared
            .iter()
            .filter(|p| !p.is_empty())
            .filter_map(|p| Some((p.clone(), self.scope.lookup(p)?.to_string())))
            .collect();
        let header = StreamHeader {
            name: r.local.to_string(),
            ns: r.ns,
            default_ns,
            attrs: r.attrs,
            prefixes,
        };
        self.header_qname = qname.to_string();
        self.consume(end + 1 - self.pos);
        self.used = 0;
        self.state = if empty {
            State::ClosePending
        } else {
            State::Stream
        };
        Ok(Step::Emit(Event::StreamOpen(header)))
    }

    fn stream_step(&mut self) -> Result<Step, XmlError> {
        if self.stack.is_empty() {
            // Between stanzas: whitespace keepalives are skipped, and nothing counts yet.
            let n = self.ws_len(self.buf.len());
            if n > 0 {
                self.consume(n);
            }
            match self.buf.get(self.pos) {
                None => return Ok(Step::More),
                Some(b'<') => self.used = 0,
                Some(_) => return Err(nwf("text outside a stanza")),
            }
        }
        let avail = &self.buf[self.pos..self.limit()];
        let Some(&b0) = avail.first() else {
            return self.more();
        };
        if b0 != b'<' {
            return self.text_token();
        }
        let Some(&b1) = avail.get(1) else {
            return self.more();
        };
        match b1 {
            b'/' => self.end_tag(),
            b'?' => Err(XmlError::Restricted("processing instruction")),
            b'!' => match classify_bang(avail) {
                Bang::More => self.more(),
                Bang::Comment => Err(XmlError::Restricted("comment")),
                Bang::Dtd => Err(XmlError::Restricted("DTD")),
                Bang::Cdata if !self.stack.is_empty() => self.cdata(),
                Bang::Cdata => Err(nwf("CDATA section outside a stanza")),
                Bang::Bad => Err(nwf("malformed markup")),
            },
            _ => self.start_tag(),
        }
    }

    fn text_token(&mut self) -> Result<Step, XmlError> {
        let lim = self.limit();
        let from = (self.pos + self.scan).min(lim);
        let Some(i) = self.buf[from..lim].iter().position(|&b| b == b'<') else {
            self.scan = lim - self.pos;
            return self.more();
        };
        let end = from + i;
        let raw = utf8(&self.buf[self.pos..end])?;
        decode_into(raw, Mode::Text, &mut self.text)?;
        self.consume_counted(end - self.pos);
        Ok(Step::Again)
    }

    fn cdata(&mut self) -> Result<Step, XmlError> {
        let Some(end) = self.find_seq(b"]]>", CDATA.len()) else {
            return self.more();
        };
        let raw = utf8(&self.buf[self.pos + CDATA.len()..end])?;
        decode_into(raw, Mode::Cdata, &mut self.text)?;
        self.consume_counted(end + 3 - self.pos);
        Ok(Step::Again)
    }

    fn start_tag(&mut self) -> Result<Step, XmlError> {
        let Some(end) = self.find_tag_end()? else {
            return self.more();
        };
        if self.stack.len() >= self.limits.max_depth {
            return Err(XmlError::TooDeep);
        }
        let raw = utf8(&self.buf[self.pos + 1..end])?;
        let tag = parse_tag(raw, self.limits.max_attrs)?;
        let qname = tag.qname;
        let empty = tag.empty;
        let scope_len = self.scope.len();
        let r = resolve(tag, &mut self.scope)?;
        let el = Element {
            name: r.local.to_string(),
            ns: r.ns,
            attrs: r.attrs,
            children: Vec::new(),
        };
        let qname = if empty {
            String::new()
        } else {
            qname.to_string()
        };
        if let Some(top) = self.stack.last_mut() {
            flush_text(&mut self.text, &mut top.el);
        }
        self.consume_counted(end + 1 - self.pos);
        if empty {
            self.scope.truncate(scope_len);
            return Ok(self.close(el));
        }
        self.stack.push(Open {
            el,
            qname,
            scope_len,
        });
        Ok(Step::Again)
    }

    fn end_tag(&mut self) -> Result<Step, XmlError> {
        let Some(end) = self.find_tag_end()? else {
            return self.more();
        };
        let raw = utf8(&self.buf[self.pos + 2..end])?;
        let (name, rest) = take_name(raw).ok_or_else(|| nwf("bad end tag"))?;
        if !rest.bytes().all(is_ws) {
            return Err(nwf("bad end tag"));
        }
        let len = end + 1 - self.pos;
        match self.stack.pop() {
            None => {
                if name != self.header_qname {
                    return Err(nwf("end tag without a start tag"));
                }
                self.consume(len);
                self.used = 0;
                self.state = State::Closed;
                Ok(Step::Emit(Event::StreamClose))
            }
            Some(mut open) => {
                if name != open.qname {
                    return Err(nwf("mismatched end tag"));
                }
                flush_text(&mut self.text, &mut open.el);
                self.scope.truncate(open.scope_len);
                self.consume_counted(len);
                Ok(self.close(open.el))
            }
        }
    }

    /// A complete element: a child of the open one, or a stanza.
    fn close(&mut self, el: Element) -> Step {
        match self.stack.last_mut() {
            Some(top) => {
                top.el.children.push(Node::Element(el));
                Step::Again
            }
            None => {
                self.used = 0;
                Step::Emit(Event::Stanza(el))
            }
        }
    }
}

fn flush_text(text: &mut String, el: &mut Element) {
    if !text.is_empty() {
        el.children.push(Node::Text(std::mem::take(text)));
    }
}

const CDATA: &[u8] = b"<![CDATA[";

/// What `<!` starts.
enum Bang {
    More,
    Comment,
    Dtd,
    Cdata,
    Bad,
}

fn classify_bang(avail: &[u8]) -> Bang {
    match avail.get(2) {
        None => Bang::More,
        Some(b'-') => Bang::Comment,
        Some(b) if b.is_ascii_alphabetic() => Bang::Dtd,
        Some(b'[') if avail.len() < CDATA.len() => {
            if CDATA.starts_with(avail) {
                Bang::More
            } else {
                Bang::Bad
            }
        }
        Some(b'[') if avail.starts_with(CDATA) => Bang::Cdata,
        Some(_) => Bang::Bad,
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn is_ws_char(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// XML 1.0 (fifth edition) NameStartChar.
fn is_name_start(c: char) -> bool {
    matches!(c,
        'A'..='Z' | 'a'..='z' | '_' | ':'
        | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
        | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}'
        | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}'
        | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}' | '\u{10000}'..='\u{EFFFF}')
}

/// XML 1.0 (fifth edition) NameChar.
fn is_name_char(c: char) -> bool {
    is_name_start(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// XML 1.0 Char.
fn is_xml_char(c: u32) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

/// A Name at the start of `s`, and the rest.
fn take_name(s: &str) -> Option<(&str, &str)> {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if is_name_start(c) => {}
        _ => return None,
    }
    let end = chars
        .find(|&(_, c)| !is_name_char(c))
        .map_or(s.len(), |(i, _)| i);
    Some(s.split_at(end))
}

fn is_ncname(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c != ':' && is_name_start(c))
        && s.chars().all(|c| c != ':' && is_name_char(c))
}

/// (prefix, local part) of a qualified name.
fn split_qname(name: &str) -> Result<(Option<&str>, &str), XmlError> {
    match name.split_once(':') {
        None => Ok((None, name)),
        Some((p, l)) if is_ncname(p) && is_ncname(l) => Ok((Some(p), l)),
        Some(_) => Err(nwf("bad qualified name")),
    }
}

/// A start tag, split up.
struct Tag<'a> {
    qname: &'a str,
    attrs: Vec<(&'a str, String)>,
    empty: bool,
}

/// Parses what is between `<` and `>` of a start tag.
fn parse_tag(s: &str, max_attrs: usize) -> Result<Tag<'_>, XmlError> {
    let (qname, mut rest) = take_name(s).ok_or_else(|| nwf("bad element name"))?;
    let mut attrs: Vec<(&str, String)> = Vec::new();
    loop {
        let trimmed = rest.trim_start_matches(is_ws_char);
        let spaced = trimmed.len() != rest.len();
        rest = trimmed;
        if rest.is_empty() {
            return Ok(Tag {
                qname,
                attrs,
                empty: false,
            });
        }
        if rest == "/" {
            return Ok(Tag {
                qname,
                attrs,
                empty: true,
            });
        }
        if !spaced {
            return Err(nwf("attributes must be separated by whitespace"));
        }
        let (name, r) = take_name(rest).ok_or_else(|| nwf("bad attribute name"))?;
        let r = r
            .trim_start_matches(is_ws_char)
            .strip_prefix('=')
            .ok_or_else(|| nwf("attribute without a value"))?
            .trim_start_matches(is_ws_char);
        let quote = match r.as_bytes().first() {
            Some(&q @ (b'\'' | b'"')) => q as char,
            _ => return Err(nwf("unquoted attribute value")),
        };
        let r = &r[1..];
        let close = r
            .find(quote)
            .ok_or_else(|| nwf("unterminated attribute value"))?;
        if attrs.len() == max_attrs {
            return Err(XmlError::TooManyAttributes);
        }
        let mut value = String::with_capacity(close);
        decode_into(&r[..close], Mode::Attr, &mut value)?;
        attrs.push((name, value));
        rest = &r[close + 1..];
    }
}

/// An element with its namespaces resolved.
struct Resolved<'a> {
    local: &'a str,
    ns: String,
    attrs: Vec<(String, String)>,
}

/// Namespace prefixes in scope ("" for the default namespace). Lookups cost the same however
/// many declarations a stanza piles up.
#[derive(Default)]
struct Scope {
    /// Prefix → the namespaces it is bound to, innermost last.
    bound: HashMap<String, Vec<String>>,
    /// The declared prefixes in declaration order, to undo them when their element ends.
    declared: Vec<String>,
}

impl Scope {
    fn declare(&mut self, prefix: String, ns: String) {
        self.bound.entry(prefix.clone()).or_default().push(ns);
        self.declared.push(prefix);
    }

    fn lookup(&self, prefix: &str) -> Option<&str> {
        if prefix == "xml" {
            return Some(XML_NS);
        }
        self.bound
            .get(prefix)
            .and_then(|stack| stack.last())
            .map(String::as_str)
    }

    fn len(&self) -> usize {
        self.declared.len()
    }

    /// Undoes the declarations after the first `len`.
    fn truncate(&mut self, len: usize) {
        while self.declared.len() > len {
            let Some(prefix) = self.declared.pop() else {
                break;
            };
            if let Some(stack) = self.bound.get_mut(&prefix) {
                stack.pop();
                // Keep the default's entry (used all the time), not every prefix ever seen.
                if stack.is_empty() && !prefix.is_empty() {
                    self.bound.remove(&prefix);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.bound.clear();
        self.declared.clear();
    }
}

/// Pushes the tag's namespace declarations onto `scope` and resolves its names.
fn resolve<'a>(tag: Tag<'a>, scope: &mut Scope) -> Result<Resolved<'a>, XmlError> {
    for (i, (name, _)) in tag.attrs.iter().enumerate() {
        if tag.attrs[..i].iter().any(|(n, _)| n == name) {
            return Err(nwf("duplicate attribute"));
        }
    }
    let mut attrs = Vec::with_capacity(tag.attrs.len());
    for (name, value) in tag.attrs {
        if name == "xmlns" {
            scope.declare(String::new(), value);
        } else if let Some(prefix) = name.strip_prefix("xmlns:") {
            if !is_ncname(prefix)
                || prefix == "xmlns"
                || (prefix == "xml" && value != XML_NS)
                || value.is_empty()
            {
                return Err(nwf("bad namespace declaration"));
            }
            scope.declare(prefix.to_string(), value);
        } else {
            attrs.push((name.to_string(), value));
        }
    }
    let (prefix, local) = split_qname(tag.qname)?;
    let ns = match prefix {
        Some("xmlns") => return Err(nwf("element with the xmlns prefix")),
        Some(p) => scope
            .lookup(p)
            .ok_or_else(|| nwf("undeclared namespace prefix"))?,
        None => scope.lookup("").unwrap_or(""),
    }
    .to_string();
    // Attribute prefixes must be declared, and two attributes may not have the same
    // namespace and local name.
    let mut qualified: Vec<(&str, &str)> = Vec::new();
    for (name, _) in &attrs {
        if let (Some(p), l) = split_qname(name)? {
            let ns = scope
                .lookup(p)
                .ok_or_else(|| nwf("undeclared namespace prefix"))?;
            if qualified.contains(&(ns, l)) {
                return Err(nwf("duplicate attribute"));
            }
            qualified.push((ns, l));
        }
    }
    Ok(Resolved { local, ns, attrs })
}

/// Checks the pseudo-attributes between `<?xml` and `?>`.
fn parse_decl(raw: &[u8]) -> Result<(), XmlError> {
    let bad = || nwf("malformed XML declaration");
    let mut rest = utf8(raw)?;
    let mut fields = Vec::new();
    loop {
        let t = rest.trim_start_matches(is_ws_char);
        if t.is_empty() {
            break;
        }
        if t.len() == rest.len() {
            return Err(bad());
        }
        let split = t
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(t.len());
        let (name, r) = t.split_at(split);
        let r = r
            .trim_start_matches(is_ws_char)
            .strip_prefix('=')
            .ok_or_else(bad)?
            .trim_start_matches(is_ws_char);
        let quote = match r.as_bytes().first() {
            Some(&q @ (b'\'' | b'"')) => q as char,
            _ => return Err(bad()),
        };
        let r = &r[1..];
        let close = r.find(quote).ok_or_else(bad)?;
        fields.push((name, &r[..close]));
        rest = &r[close + 1..];
    }
    let mut fields = fields.into_iter().peekable();
    match fields.next() {
        Some(("version", v))
            if v.strip_prefix("1.")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) => {}
        _ => return Err(nwf("XML declaration without version 1.x")),
    }
    if let Some((_, enc)) = fields.next_if(|(n, _)| *n == "encoding")
        && !enc.eq_ignore_ascii_case("UTF-8")
    {
        let shown: String = enc.chars().take(40).collect();
        return Err(XmlError::BadFormat(format!(
            "unsupported encoding {shown:?}: XMPP is UTF-8"
        )));
    }
    if fields
        .next_if(|(n, _)| *n == "standalone")
        .is_some_and(|(_, v)| v != "yes" && v != "no")
    {
        return Err(bad());
    }
    match fields.next() {
        None => Ok(()),
        Some(_) => Err(bad()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Text,
    Attr,
    Cdata,
}

/// Appends character data to `out`: references decoded (not in CDATA), line ends normalised,
/// characters XML does not allow refused.
fn decode_into(raw: &str, mode: Mode, out: &mut String) -> Result<(), XmlError> {
    let b = raw.as_bytes();
    out.reserve(raw.len());
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c >= 0x20 && !matches!(c, b'&' | b']' | b'<' | 0xEF) {
            i += 1;
            continue;
        }
        match c {
            b'&' if mode != Mode::Cdata => {
                out.push_str(&raw[last..i]);
                let (ch, len) = parse_ref(&raw[i + 1..])?;
                out.push(ch);
                i += 1 + len;
                last = i;
            }
            b'\r' => {
                out.push_str(&raw[last..i]);
                out.push(if mode == Mode::Attr { ' ' } else { '\n' });
                i += if b.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                last = i;
            }
            b'\n' | b'\t' if mode == Mode::Attr => {
                out.push_str(&raw[last..i]);
                out.push(' ');
                i += 1;
                last = i;
            }
            b'\n' | b'\t' | b'&' => i += 1,
            b']' => {
                if mode == Mode::Text && b[i..].starts_with(b"]]>") {
                    return Err(nwf("']]>' in text"));
                }
                i += 1;
            }
            b'<' => {
                if mode == Mode::Attr {
                    return Err(nwf("'<' in an attribute value"));
                }
                i += 1;
            }
            0xEF => {
                // U+FFFE and U+FFFF are not XML characters.
                if b.get(i + 1) == Some(&0xBF) && matches!(b.get(i + 2), Some(0xBE | 0xBF)) {
                    return Err(nwf("character not allowed in XML"));
                }
                i += 1;
            }
            _ => return Err(nwf("control character not allowed in XML")),
        }
    }
    out.push_str(&raw[last..]);
    Ok(())
}

/// A reference after its `&`: the character and the bytes up to and including `;`.
fn parse_ref(s: &str) -> Result<(char, usize), XmlError> {
    let end = s
        .bytes()
        .position(|b| matches!(b, b';' | b'&' | b'<' | b'\'' | b'"') || is_ws(b))
        .filter(|&e| s.as_bytes()[e] == b';')
        .ok_or_else(|| nwf("'&' not starting a reference"))?;
    let body = &s[..end];
    let ch = match body {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let (digits, radix) = if let Some(h) = body.strip_prefix("#x") {
                (h, 16)
            } else if let Some(d) = body.strip_prefix('#') {
                (d, 10)
            } else if take_name(body).is_some_and(|(_, rest)| rest.is_empty()) {
                return Err(XmlError::Restricted("entity reference"));
            } else {
                return Err(nwf("malformed reference"));
            };
            if digits.is_empty() {
                return Err(nwf("malformed character reference"));
            }
            let mut v: u32 = 0;
            for d in digits.chars() {
                let d = d
                    .to_digit(radix)
                    .ok_or_else(|| nwf("malformed character reference"))?;
                v = v.saturating_mul(radix).saturating_add(d);
            }
            if !is_xml_char(v) {
                return Err(nwf("character reference to a character not allowed in XML"));
            }
            char::from_u32(v).ok_or_else(|| nwf("malformed character reference"))?
        }
    };
    Ok((ch, end + 1))
}

/// The fuzz entry: the first byte picks the chunk size (its low 7 bits, 0 = all at once) and,
/// with its high bit, small limits; the rest is the stream. Checks that the events do not
/// depend on the chunking, that errors stick, that an unfinished stanza never keeps more than
/// its limit buffered, and that every stanza survives serialising and reparsing. Panics on a
/// violation; must never panic otherwise.
pub fn fuzz_xml(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let limits = if sel & 0x80 != 0 {
        Limits {
            max_stanza_bytes: 1024,
            max_depth: 6,
            max_attrs: 8,
            max_header_bytes: 320,
        }
    } else {
        Limits::default()
    };
    let chunk = match usize::from(sel & 0x7f) {
        0 => input.len(),
        n => n,
    };
    let whole = fuzz_run(limits, input, input.len());
    let chunked = fuzz_run(limits, input, chunk);
    assert!(
        chunked == whole,
        "chunks of {chunk} bytes changed the events"
    );
    let mut default_ns = "";
    for ev in &whole.0 {
        match ev {
            Event::StreamOpen(h) => default_ns = &h.default_ns,
            Event::Stanza(el) => check_round_trip(el, default_ns),
            Event::StreamClose => {}
        }
    }
}

type FuzzOutcome = (Vec<Event>, Option<XmlError>);

fn fuzz_run(limits: Limits, input: &[u8], chunk: usize) -> FuzzOutcome {
    let mut p = Parser::new(limits);
    let mut events = Vec::new();
    let ceiling = limits.max_stanza_bytes.max(limits.max_header_bytes);
    for piece in input.chunks(chunk.max(1)) {
        p.feed(piece);
        loop {
            match p.next_event() {
                Ok(Some(e)) => events.push(e),
                Ok(None) => {
                    assert!(p.buffered() < ceiling, "{} bytes buffered", p.buffered());
                    break;
                }
                Err(e) => {
                    assert!(p.next_event() == Err(e.clone()), "error did not stick");
                    p.feed(b"<a/>");
                    assert!(p.buffered() == 0, "buffering after an error");
                    return (events, Some(e));
                }
            }
        }
    }
    (events, None)
}

/// Serialises a parsed stanza and parses it again inside a stream like the one it came from.
fn check_round_trip(el: &Element, default_ns: &str) {
    let xml = el.to_xml(default_ns);
    let mut header = String::from("<stream:stream xmlns='");
    escape_into(&mut header, default_ns, true);
    header.push_str("' xmlns:stream='");
    header.push_str(STREAMS_NS);
    header.push('\'');
    // Attribute names keep their prefixes but the serializer does not declare them.
    let mut prefixes = Vec::new();
    attr_prefixes(el, &mut prefixes);
    for p in prefixes {
        header.push_str(&format!(" xmlns:{p}='urn:fuzz:{p}'"));
    }
    header.push('>');
    let mut p = Parser::new(Limits {
        max_stanza_bytes: usize::MAX,
        max_depth: usize::MAX,
        max_attrs: usize::MAX,
        max_header_bytes: usize::MAX,
    });
    p.feed(header.as_bytes());
    p.feed(xml.as_bytes());
    match (p.next_event(), p.next_event(), p.next_event()) {
        (Ok(Some(Event::StreamOpen(_))), Ok(Some(Event::Stanza(back))), Ok(None)) => {
            // The serializer writes line ends and attribute whitespace as references, so
            // nothing is normalised away.
            assert!(back == *el, "round trip changed the stanza: {xml}");
        }
        other => panic!("serialized stanza does not reparse: {xml}: {other:?}"),
    }
}

fn attr_prefixes<'a>(el: &'a Element, out: &mut Vec<&'a str>) {
    for (name, _) in &el.attrs {
        if let Some((p, _)) = name.split_once(':')
            && p != "xml"
            && p != "stream"
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    for c in el.elements() {
        attr_prefixes(c, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
        xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' \
        to='relay.example' from='xmpp.example.org' id='s2s-1' version='1.0' xml:lang='en'>";

    /// Feeds `chunks` one after another, pulling events after each; stops at an error.
    fn run(chunks: &[&[u8]]) -> (Vec<Event>, Option<XmlError>) {
        let mut p = Parser::new(Limits::default());
        let mut events = Vec::new();
        for c in chunks {
            p.feed(c);
            loop {
                match p.next_event() {
                    Ok(Some(e)) => events.push(e),
                    Ok(None) => break,
                    Err(e) => return (events, Some(e)),
                }
            }
        }
        (events, None)
    }

    fn parse(input: &str) -> (Vec<Event>, Option<XmlError>) {
        run(&[input.as_bytes()])
    }

    /// The error a stream with `body` after the standard header ends with.
    fn error_of(body: &[u8]) -> Option<XmlError> {
        run(&[HEADER.as_bytes(), body]).1
    }

    /// The stanzas of `body` after the standard header, which must all parse.
    fn stanzas(body: &str) -> Result<Vec<Element>, XmlError> {
        let (events, err) = run(&[HEADER.as_bytes(), body.as_bytes()]);
        if let Some(e) = err {
            return Err(e);
        }
        Ok(events
            .into_iter()
            .filter_map(|e| match e {
                Event::Stanza(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    fn one(body: &str) -> Result<Element, Box<dyn std::error::Error>> {
        let mut v = stanzas(body)?;
        if v.len() != 1 {
            return Err(format!("{} stanzas", v.len()).into());
        }
        Ok(v.remove(0))
    }

    fn nwf_of(body: &[u8]) -> bool {
        matches!(error_of(body), Some(XmlError::NotWellFormed(_)))
    }

    const EXCHANGE: &str = "<?xml version='1.0' encoding='UTF-8'?>\
        <stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
        xmlns:db='jabber:server:dialback' to='relay.example' from='xmpp.example.org' \
        version='1.0' xml:lang='en' id='9c5e'>\n\
        <stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>\
        <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>\n\
        <db:result from='xmpp.example.org' to='relay.example'>b4835385f37fe2895af6c196b59097b1</db:result>\n \n\
        <message from='juliet@xmpp.example.org/balcony' to='romeo@relay.example' type='chat' id='m1' xml:lang='en'>\
        <body>Wherefore art thou, Romeo? &lt;3 — héllo 😀</body>\
        <active xmlns='http://jabber.org/protocol/chatstates'/></message>\n\
        </stream:stream>";

    #[test]
    fn a_realistic_s2s_exchange() -> TestResult {
        let (events, err) = parse(EXCHANGE);
        assert_eq!(err, None);
        assert_eq!(events.len(), 5, "{events:?}");
        let Event::StreamOpen(h) = &events[0] else {
            return Err("no header".into());
        };
        assert_eq!((h.name.as_str(), h.ns.as_str()), ("stream", STREAMS_NS));
        assert_eq!(h.default_ns, "jabber:server");
        assert_eq!(h.get("to"), Some("relay.example"));
        assert_eq!(h.get("from"), Some("xmpp.example.org"));
        assert_eq!(h.get("version"), Some("1.0"));
        assert_eq!(h.get("xml:lang"), Some("en"));
        assert_eq!(h.get("id"), Some("9c5e"));
        assert_eq!(h.get("xmlns"), None);
        assert_eq!(
            h.prefixes,
            vec![
                ("stream".to_string(), STREAMS_NS.to_string()),
                ("db".to_string(), "jabber:server:dialback".to_string()),
            ]
        );
        let Event::Stanza(features) = &events[1] else {
            return Err("no features".into());
        };
        assert!(features.is("features", STREAMS_NS));
        let dialback = features
            .get_child("dialback", "urn:xmpp:features:dialback")
            .ok_or("no dialback feature")?;
        assert!(
            dialback
                .get_child("errors", "urn:xmpp:features:dialback")
                .is_some()
        );
        assert!(
            features
                .get_child("starttls", "urn:ietf:params:xml:ns:xmpp-tls")
                .is_some()
        );
        let Event::Stanza(result) = &events[2] else {
            return Err("no db:result".into());
        };
        assert!(result.is("result", "jabber:server:dialback"));
        assert_eq!(result.get_attr("from"), Some("xmpp.example.org"));
        assert_eq!(result.text_content(), "b4835385f37fe2895af6c196b59097b1");
        let Event::Stanza(msg) = &events[3] else {
            return Err("no message".into());
        };
        assert!(msg.is("message", "jabber:server"));
        assert_eq!(msg.get_attr("xml:lang"), Some("en"));
        assert_eq!(msg.attrs.len(), 5);
        assert_eq!(
            msg.child_text("body", "jabber:server").as_deref(),
            Some("Wherefore art thou, Romeo? <3 — héllo 😀")
        );
        let active = msg
            .get_child("active", "http://jabber.org/protocol/chatstates")
            .ok_or("no chat state")?;
        assert!(active.attrs.is_empty(), "xmlns is not an attribute");
        assert_eq!(events[4], Event::StreamClose);
        Ok(())
    }

    #[test]
    fn split_at_every_offset_parses_the_same() {
        let input = EXCHANGE.as_bytes();
        let whole = parse(EXCHANGE);
        assert_eq!(whole.1, None);
        for i in 0..=input.len() {
            assert_eq!(run(&[&input[..i], &input[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes), whole);
        let threes: Vec<&[u8]> = input.chunks(3).collect();
        assert_eq!(run(&threes), whole);
    }

    #[test]
    fn consumed_bytes_are_dropped() {
        let mut p = Parser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert_eq!(p.buffered(), 0);
        p.feed(b"<message><body>hi</bo");
        assert_eq!(p.next_event(), Ok(None));
        assert_eq!(p.buffered(), 4, "only the unfinished tag stays");
        p.feed(b"dy></message> ");
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(_)))));
        assert_eq!(p.next_event(), Ok(None));
        assert_eq!(p.buffered(), 0);
        // The room a big stanza took is given back once it is read.
        p.feed(format!("<message><body>{}</body></message>", "a".repeat(200_000)).as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(_)))));
        assert!(p.buf.capacity() <= IDLE_BUF_CAPACITY);
    }

    #[test]
    fn namespaces_resolve_and_inherit() -> TestResult {
        let m = one(
            "<message xmlns:x='urn:x' x:extra='1'><x:a><b/><c xmlns='urn:c'><d/></c>\
             <e xmlns=''/></x:a><stream:error/><db:verify/></message>",
        )?;
        assert!(m.is("message", "jabber:server"));
        assert_eq!(m.get_attr("x:extra"), Some("1"));
        assert_eq!(m.attrs.len(), 1);
        let a = m.get_child("a", "urn:x").ok_or("a")?;
        assert!(a.get_child("b", "jabber:server").is_some());
        let c = a.get_child("c", "urn:c").ok_or("c")?;
        assert!(c.get_child("d", "urn:c").is_some());
        assert!(a.get_child("e", "").is_some());
        assert!(m.get_child("error", STREAMS_NS).is_some());
        assert!(m.get_child("verify", "jabber:server:dialback").is_some());
        // Declarations end with their element.
        assert!(nwf_of(b"<message><a xmlns:y='urn:y'/><y:b/></message>"));
        Ok(())
    }

    #[test]
    fn declarations_are_undone_when_their_element_ends() -> TestResult {
        // Many prefixes over many levels, used at the bottom: lookups stay cheap, and none of
        // them outlives its element.
        let mut body = String::from("<message>");
        for level in 0..30 {
            let decls: String = (0..60)
                .map(|i| format!(" xmlns:p{level}x{i}='urn:{level}:{i}'"))
                .collect();
            body.push_str(&format!("<l{decls}>"));
        }
        let uses: String = (0..60).map(|i| format!(" p0x{i}:a='{i}'")).collect();
        body.push_str(&format!("<p29x59:leaf{uses}/>"));
        body.push_str(&"</l>".repeat(30));
        body.push_str("</message>");
        let mut p = Parser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.feed(body.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        let Ok(Some(Event::Stanza(m))) = p.next_event() else {
            return Err("no stanza".into());
        };
        let mut el = &m;
        while let Some(c) = el.elements().next() {
            el = c;
        }
        assert!(el.is("leaf", "urn:29:59"));
        assert_eq!(el.get_attr("p0x7:a"), Some("7"));
        assert_eq!(p.scope.len(), 3, "only the header's declarations are left");
        assert_eq!(
            p.scope.bound.len(),
            3,
            "the header's prefixes and the default"
        );
        Ok(())
    }

    #[test]
    fn undeclared_prefixes_and_bad_declarations_are_refused() {
        assert!(nwf_of(b"<foo:message/>"));
        assert!(nwf_of(b"<message foo:bar='1'/>"));
        assert!(nwf_of(b"<message xmlns:p=''/>"));
        assert!(nwf_of(b"<message xmlns:xml='urn:other'/>"));
        assert!(nwf_of(b"<message xmlns:xmlns='urn:x'/>"));
        assert!(nwf_of(b"<xmlns:message/>"));
        assert!(nwf_of(b"<a:b:c xmlns:a='urn:a'/>"));
        assert!(nwf_of(
            b"<message xmlns:a='urn:1' xmlns:b='urn:1' a:x='1' b:x='2'/>"
        ));
        assert_eq!(
            parse("<stream:stream xmlns='jabber:server'>").1,
            Some(nwf("undeclared namespace prefix"))
        );
    }

    #[test]
    fn the_root_must_be_stream_in_the_streams_namespace() {
        for h in [
            "<stream:stream xmlns:stream='urn:wrong'>",
            "<stream:foo xmlns:stream='http://etherx.jabber.org/streams'>",
            "<stream xmlns='jabber:server'>",
        ] {
            let err = parse(h).1;
            assert_eq!(err, Some(XmlError::InvalidNamespace), "{h}");
            assert_eq!(XmlError::InvalidNamespace.condition(), "invalid-namespace");
        }
        // A different prefix is fine, and closes with the same one.
        let (events, err) =
            parse("<s:stream xmlns:s='http://etherx.jabber.org/streams'><a/></s:stream>");
        assert_eq!(err, None);
        assert_eq!(events.len(), 3);
        assert!(matches!(
            parse("<s:stream xmlns:s='http://etherx.jabber.org/streams'></stream:stream>").1,
            Some(XmlError::NotWellFormed(_))
        ));
    }

    #[test]
    fn self_closing_header_opens_and_closes() {
        let (events, err) =
            parse("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>");
        assert_eq!(err, None);
        assert!(matches!(
            events.as_slice(),
            [Event::StreamOpen(_), Event::StreamClose]
        ));
    }

    #[test]
    fn xml_declaration_only_at_the_start_and_only_utf8() {
        for ok in [
            "<?xml version='1.0'?>",
            "<?xml version=\"1.0\" encoding=\"utf-8\" standalone='yes' ?>",
            "",
        ] {
            let s = format!(
                "{ok}<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server'>"
            );
            assert!(matches!(parse(&s), (ref e, None) if e.len() == 1), "{ok}");
        }
        let s = |decl: &str| {
            parse(&format!(
                "{decl}<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"
            ))
            .1
        };
        let err = s("<?xml version='1.0' encoding='ISO-8859-1'?>");
        assert!(matches!(err, Some(XmlError::BadFormat(_))), "{err:?}");
        assert_eq!(err.map(|e| e.condition()), Some("bad-format"));
        assert!(matches!(
            s("<?xml version='2.0'?>"),
            Some(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(s("<?xml?>"), Some(XmlError::NotWellFormed(_))));
        assert!(matches!(
            s("<?xml encoding='UTF-8' version='1.0'?>"),
            Some(XmlError::NotWellFormed(_))
        ));
        assert_eq!(
            s("\n<?xml version='1.0'?>"),
            Some(XmlError::Restricted("processing instruction"))
        );
        assert_eq!(
            s("<?xml version='1.0'?><?xml version='1.0'?>"),
            Some(XmlError::Restricted("processing instruction"))
        );
        assert_eq!(
            s("<?xml-stylesheet href='a'?>"),
            Some(XmlError::Restricted("processing instruction"))
        );
        // A byte order mark is U+FEFF, text before the root.
        assert!(matches!(s("\u{FEFF}"), Some(XmlError::NotWellFormed(_))));
        // UTF-16 is not UTF-8.
        assert!(matches!(
            run(&[b"\xfe\xff\x00<"]).1,
            Some(XmlError::NotWellFormed(_))
        ));
    }

    #[test]
    fn processing_instructions_and_comments_are_restricted() {
        let pi = Some(XmlError::Restricted("processing instruction"));
        let comment = Some(XmlError::Restricted("comment"));
        assert_eq!(error_of(b"<?php echo 1; ?>"), pi);
        assert_eq!(error_of(b"<message><?pi x?></message>"), pi);
        assert_eq!(error_of(b"<!-- hi -->"), comment);
        assert_eq!(error_of(b"<message><!-- hi --></message>"), comment);
        assert_eq!(parse("<!-- hi --><stream:stream>").1, comment);
        assert_eq!(comment.map(|e| e.condition()), Some("restricted-xml"));
        // Known as soon as the markup starts.
        let mut p = Parser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.feed(b"<message><!-");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert_eq!(p.next_event(), Err(XmlError::Restricted("comment")));
    }

    #[test]
    fn billion_laughs_is_restricted() {
        let doc = "<?xml version='1.0'?>\n<!DOCTYPE lolz [\n<!ENTITY lol \"lol\">\n\
            <!ENTITY lol1 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">\n\
            <!ENTITY lol2 \"&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;\">\n]>\n\
            <stream:stream xmlns:stream='http://etherx.jabber.org/streams'><lolz>&lol2;</lolz>";
        assert_eq!(parse(doc).1, Some(XmlError::Restricted("DTD")));
        // Inside the stream too, and the entity alone.
        assert_eq!(
            error_of(b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>]>"),
            Some(XmlError::Restricted("DTD"))
        );
        assert_eq!(
            error_of(b"<message><body>&lol9;</body></message>"),
            Some(XmlError::Restricted("entity reference"))
        );
    }

    #[test]
    fn external_entities_are_restricted() {
        let doc = "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>\
            <stream:stream xmlns:stream='http://etherx.jabber.org/streams'><x>&xxe;</x>";
        assert_eq!(parse(doc).1, Some(XmlError::Restricted("DTD")));
        let e = error_of(b"<message><body>&xxe;</body></message>");
        assert_eq!(e, Some(XmlError::Restricted("entity reference")));
        assert_eq!(
            error_of(b"<message id='&xxe;'/>"),
            Some(XmlError::Restricted("entity reference"))
        );
    }

    #[test]
    fn references_are_decoded_and_checked() -> TestResult {
        let m = one(
            "<message id='&quot;&apos;&lt;&gt;&amp;&#65;'><body>&lt;&gt;&amp;&quot;&apos;\
             &#65;&#x42;&#x1F600;&#0000067;</body></message>",
        )?;
        assert_eq!(m.get_attr("id"), Some("\"'<>&A"));
        assert_eq!(
            m.child_text("body", "jabber:server").as_deref(),
            Some("<>&\"'AB😀C")
        );
        for bad in [
            "&#0;",
            "&#x1;",
            "&#8;",
            "&#xB;",
            "&#x1F;",
            "&#xD800;",
            "&#xDFFF;",
            "&#xFFFE;",
            "&#xFFFF;",
            "&#x110000;",
            "&#99999999999999999999;",
            "&#;",
            "&#x;",
            "&#xG;",
            "&#12a;",
            "& amp;",
            "&amp",
            "a & b",
            "&;",
            "&1a;",
        ] {
            let body = format!("<message><body>{bad}</body></message>");
            assert!(nwf_of(body.as_bytes()), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn cdata_is_text_and_text_pieces_merge() -> TestResult {
        let m =
            one("<message><body>a &amp; <![CDATA[<b>&amp;</b>]]> z<![CDATA[]]></body></message>")?;
        let body = m.get_child("body", "jabber:server").ok_or("body")?;
        assert_eq!(
            body.children,
            vec![Node::Text("a & <b>&amp;</b> z".to_string())]
        );
        let empty = one("<message><body><![CDATA[]]></body></message>")?;
        assert_eq!(
            empty
                .get_child("body", "jabber:server")
                .ok_or("body")?
                .children,
            vec![]
        );
        assert!(nwf_of(b"<![CDATA[x]]>"));
        assert!(nwf_of(b"<message>a]]>b</message>"));
        assert!(nwf_of(b"<message><![CDAT[x]]></message>"));
        Ok(())
    }

    #[test]
    fn whitespace_between_stanzas_is_skipped_text_is_not() -> TestResult {
        let v = stanzas(" \n\t\r <a/> \n <b/>\n")?;
        assert_eq!(v.len(), 2);
        assert!(nwf_of(b"<a/> hello <b/>"));
        assert!(nwf_of(b"&amp;"));
        // Whitespace inside a stanza is content.
        let m = one("<message>\n  <body> </body>\n</message>")?;
        assert_eq!(
            m.children,
            vec![
                Node::Text("\n  ".to_string()),
                Node::Element(Element::new("body", "jabber:server").text(" ")),
                Node::Text("\n".to_string()),
            ]
        );
        Ok(())
    }

    #[test]
    fn line_ends_and_attribute_whitespace_are_normalised() -> TestResult {
        let m =
            one("<message id='a\tb\r\nc\nd&#10;&#9;'><body>1\r\n2\r3\n4&#13;</body></message>")?;
        assert_eq!(m.get_attr("id"), Some("a b c d\n\t"));
        assert_eq!(
            m.child_text("body", "jabber:server").as_deref(),
            Some("1\n2\n3\n4\r")
        );
        Ok(())
    }

    #[test]
    fn invalid_utf8_and_characters_are_refused() {
        for bad in [
            &b"<message><body>\xff</body></message>"[..],
            b"<message><body>\xe2\x82</body></message>",
            b"<message><body>\xc0\x80</body></message>",
            b"<message><body>\xed\xa0\x80</body></message>",
            b"<message><body>\xf4\x90\x80\x80</body></message>",
            b"<message id='\xff'/>",
            b"<m\xffessage/>",
            b"<message><body>\x00</body></message>",
            b"<message><body>\x08</body></message>",
            b"<message><body>\x0b</body></message>",
            b"<message><body>\x0c</body></message>",
            b"<message><body>\x1f</body></message>",
            b"<message id='\x01'/>",
            b"<message><body>\xef\xbf\xbe</body></message>",
            b"<message><body>\xef\xbf\xbf</body></message>",
            b"<message><![CDATA[\x00]]></message>",
            b"<message><![CDATA[\xff]]></message>",
            b"\x00",
        ] {
            assert!(nwf_of(bad), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            XmlError::NotWellFormed(String::new()).condition(),
            "not-well-formed"
        );
        // Tab, line feed, carriage return and U+FFFD are fine.
        assert!(error_of(b"<message>\t\n\r\xef\xbf\xbd</message>").is_none());
    }

    #[test]
    fn malformed_markup_is_refused() {
        for bad in [
            "<message></body>",
            "<message><body></message></body>",
            "<message id='1' id='2'/>",
            "<message xmlns='a' xmlns='b'/>",
            "<message id=1/>",
            "<message id='a<b'/>",
            "<message id='1'type='chat'/>",
            "<message id/>",
            "<message id='1/></message>",
            "<1message/>",
            "<-message/>",
            "<message ='1'/>",
            "<message <body/>",
            "<message/ >",
            "< message/>",
            "</>",
            "</message>",
            "<message></message >x</message>",
            "<message></ message>",
            "<message><!1></message>",
        ] {
            assert!(nwf_of(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_600k_stanza_is_refused_before_its_end() {
        let limits = Limits::default();
        let mut p = Parser::new(limits);
        p.feed(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        p.feed(b"<message><body>");
        let chunk = [b'a'; 4096];
        let mut fed = 15;
        let err = loop {
            assert!(fed < 600 * 1024, "never refused");
            p.feed(&chunk);
            fed += chunk.len();
            match p.next_event() {
                Ok(None) => assert!(p.buffered() < limits.max_stanza_bytes),
                other => break other,
            }
        };
        assert_eq!(err, Err(XmlError::StanzaTooBig));
        assert!(fed >= limits.max_stanza_bytes && fed < limits.max_stanza_bytes + 4096);
        assert_eq!(
            XmlError::StanzaTooBig.app_condition(),
            Some(("stanza-too-big", "urn:xmpp:errors"))
        );
        assert_eq!(XmlError::StanzaTooBig.condition(), "policy-violation");
        // Nothing more is kept, and the error stays.
        p.feed(&chunk);
        assert_eq!(p.buffered(), 0);
        assert_eq!(p.next_event(), Err(XmlError::StanzaTooBig));
    }

    #[test]
    fn the_stanza_limit_is_exact() {
        let limits = Limits {
            max_stanza_bytes: 100,
            ..Limits::default()
        };
        let stanza = |n: usize| format!("<message><body>{}</body></message>", "a".repeat(n - 32));
        for (size, ok) in [(100, true), (101, false)] {
            let s = stanza(size);
            assert_eq!(s.len(), size);
            for chunk in [1, 7, size] {
                let mut p = Parser::new(limits);
                p.feed(HEADER.as_bytes());
                assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
                let mut got = None;
                for c in s.as_bytes().chunks(chunk) {
                    p.feed(c);
                    match p.next_event() {
                        Ok(None) => {}
                        other => {
                            got = Some(other);
                            break;
                        }
                    }
                }
                match got {
                    Some(Ok(Some(Event::Stanza(_)))) => assert!(ok, "{size} accepted"),
                    Some(Err(XmlError::StanzaTooBig)) => assert!(!ok, "{size} refused"),
                    other => panic!("{size}/{chunk}: {other:?}"),
                }
            }
        }
        // A huge tag or CDATA section is cut off the same way.
        let small = |body: &[u8]| {
            let mut p = Parser::new(limits);
            p.feed(HEADER.as_bytes());
            p.feed(body);
            let _ = p.next_event();
            p.next_event()
        };
        let long = "x".repeat(200);
        assert_eq!(
            small(format!("<message id='{long}").as_bytes()),
            Err(XmlError::StanzaTooBig)
        );
        assert_eq!(
            small(format!("<message><![CDATA[{long}").as_bytes()),
            Err(XmlError::StanzaTooBig)
        );
        assert_eq!(
            small(format!("<message>{long}").as_bytes()),
            Err(XmlError::StanzaTooBig)
        );
    }

    #[test]
    fn large_stanzas_in_small_chunks_take_linear_time() -> TestResult {
        let text = "abcdéfgh😀".repeat(15_000);
        let id = "x".repeat(100_000);
        let stanza =
            format!("<message id='{id}'><body>{text}</body><x><![CDATA[{text}]]></x></message>");
        assert!(stanza.len() < Limits::default().max_stanza_bytes);
        let start = std::time::Instant::now();
        for chunk in [1, 4096] {
            let mut input = HEADER.as_bytes().to_vec();
            input.extend_from_slice(stanza.as_bytes());
            let pieces: Vec<&[u8]> = input.chunks(chunk).collect();
            let (events, err) = run(&pieces);
            assert_eq!(err, None);
            let Some(Event::Stanza(m)) = events.get(1) else {
                return Err("no stanza".into());
            };
            assert_eq!(m.child_text("body", "jabber:server"), Some(text.clone()));
            assert_eq!(m.child_text("x", "jabber:server"), Some(text.clone()));
        }
        // Quadratic rescanning would take minutes here.
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        Ok(())
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert_eq!(error_of(deep.as_bytes()), Some(XmlError::TooDeep));
        assert_eq!(XmlError::TooDeep.condition(), "policy-violation");
        // 32 levels are fine, 33 are not (self-closing ones count).
        let ok = format!("{}{}", "<a>".repeat(32), "</a>".repeat(32));
        assert_eq!(error_of(ok.as_bytes()), None);
        let over = format!("{}<b/>{}", "<a>".repeat(32), "</a>".repeat(32));
        assert_eq!(error_of(over.as_bytes()), Some(XmlError::TooDeep));
    }

    #[test]
    fn too_many_attributes_are_refused() {
        let attrs = |n: usize| {
            let a: String = (0..n).map(|i| format!(" a{i}='{i}'")).collect();
            format!("<message{a}/>")
        };
        assert_eq!(error_of(attrs(64).as_bytes()), None);
        assert_eq!(
            error_of(attrs(65).as_bytes()),
            Some(XmlError::TooManyAttributes)
        );
        assert_eq!(XmlError::TooManyAttributes.condition(), "policy-violation");
        assert_eq!(XmlError::TooManyAttributes.app_condition(), None);
    }

    #[test]
    fn a_huge_header_is_refused() {
        let long = "x".repeat(5000);
        let h =
            format!("<stream:stream xmlns:stream='http://etherx.jabber.org/streams' id='{long}'>");
        let (_, err) = run(&h.as_bytes().chunks(100).collect::<Vec<_>>());
        assert_eq!(err, Some(XmlError::HeaderTooBig));
        assert_eq!(XmlError::HeaderTooBig.condition(), "policy-violation");
        // Whitespace before it counts.
        let (_, err) = run(&[" ".repeat(5000).as_bytes()]);
        assert_eq!(err, Some(XmlError::HeaderTooBig));
    }

    #[test]
    fn errors_stick() {
        let mut p = Parser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.feed(b"<message></body>");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        let e = p.next_event();
        assert!(matches!(e, Err(XmlError::NotWellFormed(_))));
        p.feed(b"<message/>");
        assert_eq!(p.buffered(), 0);
        assert_eq!(p.next_event(), e);
        assert_eq!(p.next_event(), e);
    }

    #[test]
    fn close_and_data_after_it() {
        let (events, err) = run(&[HEADER.as_bytes(), b"<a/></stream:stream>\n "]);
        assert_eq!(err, None);
        assert_eq!(events.last(), Some(&Event::StreamClose));
        let (_, err) = run(&[HEADER.as_bytes(), b"</stream:stream><a/>"]);
        assert!(matches!(err, Some(XmlError::NotWellFormed(_))));
        // Before the header, a close is nothing.
        assert!(matches!(
            parse("</stream:stream>").1,
            Some(XmlError::NotWellFormed(_))
        ));
    }

    #[test]
    fn reset_starts_a_new_stream() -> TestResult {
        let mut p = Parser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.feed(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><garbage");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Stanza(_)))));
        assert_eq!(p.next_event(), Ok(None));
        p.reset();
        assert_eq!(p.buffered(), 0);
        // A new header, with its own XML declaration and prefixes.
        p.feed(
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
            xmlns:stream='http://etherx.jabber.org/streams' version='1.0'><db:result/>",
        );
        let Ok(Some(Event::StreamOpen(h))) = p.next_event() else {
            return Err("no new header".into());
        };
        assert!(h.prefixes.iter().all(|(p, _)| p != "db"));
        assert!(matches!(p.next_event(), Err(XmlError::NotWellFormed(_))));
        // Reset also forgets an error.
        p.reset();
        p.feed(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        Ok(())
    }

    #[test]
    fn parsed_stanzas_round_trip() -> TestResult {
        let (events, err) = parse(EXCHANGE);
        assert_eq!(err, None);
        let m = one(
            "<message to='a@b' id='x&apos;&quot;&lt;'><body>1 &lt; 2 &amp; 3 > 2 ]]&gt; \
             'q' \"r\"</body><x:y xmlns:x='urn:x' xml:lang='de'><z>é</z></x:y><e xmlns=''/></message>",
        )?;
        for el in events
            .iter()
            .filter_map(|e| match e {
                Event::Stanza(s) => Some(s),
                _ => None,
            })
            .chain([&m])
        {
            let xml = el.to_xml("jabber:server");
            let back = one(&xml)?;
            assert_eq!(&back, el, "{xml}");
            check_round_trip(el, "jabber:server");
        }
        Ok(())
    }

    #[test]
    fn fuzz_entry_handles_odd_inputs() {
        fuzz_xml(b"");
        fuzz_xml(b"\x00");
        fuzz_xml(b"\x01<");
        let mut exchange = vec![3u8];
        exchange.extend_from_slice(EXCHANGE.as_bytes());
        fuzz_xml(&exchange);
        exchange[0] = 0x81;
        fuzz_xml(&exchange);
        let mut attrs = vec![0u8];
        attrs.extend_from_slice(HEADER.as_bytes());
        attrs.extend_from_slice(
            b"<m a='&#13;&#10;x\ty' xmlns:p='u\nv' p:q='1'><p:n>&#13;\r\n</p:n></m>",
        );
        fuzz_xml(&attrs);
    }
}
