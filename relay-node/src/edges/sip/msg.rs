//! SIP messages (RFC 3261 §7, §20, §25): a strict parser that takes hostile input, the
//! typed views of the headers the edge relies on, and the serializer.
//!
//! [`parse`] reads one whole message (a UDP datagram, or one frame cut by [`frame`] from a
//! TCP/TLS stream). It splits the start line, the headers (unfolding continuation lines) and
//! the body, and checks what no element can do without: a known SIP version, a well-formed
//! start line, `Content-Length` agreeing with the body. [`Message::check`] then checks the
//! grammar of the headers the edge reads (Via, From, To, Call-ID, CSeq, Max-Forwards,
//! Content-Length, Content-Type, Expires…), so a message that parsed but breaks the grammar
//! can still be answered with a 400 carrying its own Via/From/To/Call-ID/CSeq.
//!
//! Line ends must be CRLF (RFC 3261 §7): a bare CR or LF before the body is refused rather
//! than taken as a line end, so no element can split the headers differently from this
//! parser. Continuation lines (CRLF then SP or HTAB) are joined with one space.

use std::net::{Ipv4Addr, Ipv6Addr};
use thiserror::Error;

/// Size limits for one message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message, headers and body, in bytes.
    pub max_message_bytes: usize,
    /// The most header fields in one message.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65_535,
            max_headers: 128,
        }
    }
}

/// Why bytes are not a SIP message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// Over [`Limits::max_message_bytes`] or [`Limits::max_headers`].
    #[error("message too large: {0}")]
    TooLarge(&'static str),
    /// Not a SIP message at all, or one whose framing cannot be trusted.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Why a parsed message breaks the grammar of a header the edge relies on (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct SyntaxError(pub String);

/// A message's first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// `METHOD uri SIP/2.0`; the method as received (methods are case-sensitive).
    Request { method: String, uri: String },
    /// `SIP/2.0 code reason`.
    Response { code: u16, reason: String },
}

/// One SIP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: Start,
    /// Header fields in order: the name as received (full or compact form), the value with
    /// line folding replaced by a space and surrounding whitespace trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What [`frame`] found at the start of a stream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole message yet.
    Need,
    /// A keepalive (RFC 5626 CRLF or CRLFCRLF) of this many bytes, to skip.
    Keepalive(usize),
    /// A whole message of this many bytes (headers and `Content-Length` body).
    Message(usize),
}

/// Cuts the first message off a TCP/TLS stream buffer. On a stream `Content-Length` is
/// mandatory (RFC 3261 §18.3); a header block over the limit, or a declared length over it,
/// is an error (the connection is then closed).
///
/// CRLF before a start line is a keepalive (RFC 5626 §3.5.1, RFC 3261 §7.5): a leading
/// CRLFCRLF is reported as `Keepalive(4)` (a ping), any other leading CRLF as `Keepalive(2)`
/// (a pong), and a lone CRLF CR waits for the next byte. When this returns
/// `Message(n)`, [`parse`] accepts the first `n` bytes. Each call scans the buffer from its
/// start, at most [`Limits::max_message_bytes`] of it.
pub fn frame(buf: &[u8], limits: &Limits) -> Result<Frame, ParseError> {
    match buf {
        [b'\r', b'\n', b'\r', b'\n', ..] => return Ok(Frame::Keepalive(4)),
        [b'\r', b'\n', b'\r'] | [b'\r'] => return Ok(Frame::Need),
        [b'\r', b'\n', ..] => return Ok(Frame::Keepalive(2)),
        _ => {}
    }
    let window = &buf[..buf.len().min(limits.max_message_bytes)];
    // A stream that does not start with a start line is refused as soon as its first line
    // is in, not once the limit is reached.
    if let Some(eol) = window.windows(2).position(|w| w == b"\r\n") {
        parse_start(&window[..eol])?;
    }
    let Some(end) = find_head_end(window) else {
        return if buf.len() >= limits.max_message_bytes {
            Err(ParseError::TooLarge("header block"))
        } else {
            Ok(Frame::Need)
        };
    };
    let head = split_head(&buf[..end], limits)?;
    let declared = match content_lengths(&head.headers).as_slice() {
        [v] => match content_length(v) {
            Some(n) => n,
            None => return Err(malformed("invalid Content-Length")),
        },
        [] => return Err(malformed("no Content-Length on a stream")),
        _ => return Err(malformed("several Content-Length fields")),
    };
    let total = (end + 4)
        .checked_add(declared)
        .filter(|&t| t <= limits.max_message_bytes)
        .ok_or(ParseError::TooLarge("declared Content-Length"))?;
    Ok(if buf.len() >= total {
        Frame::Message(total)
    } else {
        Frame::Need
    })
}

/// Parses one whole message. On a datagram a missing `Content-Length` means the body runs
/// to the end; bytes after the declared length are discarded (RFC 3261 §18.3); a declared
/// length longer than what arrived is an error.
///
/// Line ends in the start line and the headers must be CRLF: a bare CR or LF there is an
/// error, so that no other element can see a header boundary this parser does not. Header
/// values must be UTF-8. A `Content-Length` that is not a number, or that appears more than
/// once, leaves the body running to the end of the datagram and fails [`Message::check`], so
/// the request can still be answered with a 400.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Message, ParseError> {
    if bytes.len() > limits.max_message_bytes {
        return Err(ParseError::TooLarge("message"));
    }
    let end = find_head_end(bytes).ok_or_else(|| malformed("no empty line after the headers"))?;
    let head = split_head(&bytes[..end], limits)?;
    let start = parse_start(head.start)?;
    let rest = &bytes[end + 4..];
    let body = match content_lengths(&head.headers).as_slice() {
        [v] => match content_length(v) {
            Some(n) => rest
                .get(..n)
                .ok_or_else(|| malformed("Content-Length larger than the body"))?,
            None => rest,
        },
        _ => rest,
    };
    Ok(Message {
        start,
        headers: head.headers,
        body: body.to_vec(),
    })
}

fn malformed(why: &str) -> ParseError {
    ParseError::Malformed(why.to_string())
}

/// The offset of the first CRLFCRLF.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// A message's start line and header fields.
struct Head<'a> {
    start: &'a [u8],
    headers: Vec<(String, String)>,
}

/// Splits the bytes before the empty line into the start line and the unfolded header fields.
fn split_head<'a>(head: &'a [u8], limits: &Limits) -> Result<Head<'a>, ParseError> {
    let count = head.iter().filter(|&&b| b == b'\n').count();
    let mut start: &[u8] = &[];
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut current: Option<(&[u8], Vec<u8>)> = None;
    for (i, raw) in head.split(|&b| b == b'\n').enumerate() {
        // Every line but the last one was cut at a LF that must follow a CR.
        let line = if i < count {
            raw.strip_suffix(b"\r")
                .ok_or_else(|| malformed("bare LF in the header block"))?
        } else {
            raw
        };
        if line.contains(&b'\r') {
            return Err(malformed("bare CR in the header block"));
        }
        if i == 0 {
            start = line;
            continue;
        }
        if line.first().is_some_and(|&b| is_ws(b)) {
            let Some((_, value)) = current.as_mut() else {
                return Err(malformed("continuation line before the first header"));
            };
            let piece = trim_ws_bytes(line);
            if !piece.is_empty() {
                if !value.is_empty() {
                    value.push(b' ');
                }
                value.extend_from_slice(piece);
            }
            continue;
        }
        if let Some(field) = current.take() {
            push_field(&mut headers, field, limits)?;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed("header line without a colon"))?;
        // Only SP/HTAB may stand between the name and the colon (HCOLON).
        let name = trim_ws_bytes(&line[..colon]);
        if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) {
            return Err(malformed("header name is not a token"));
        }
        current = Some((name, trim_ws_bytes(&line[colon + 1..]).to_vec()));
    }
    if let Some(field) = current.take() {
        push_field(&mut headers, field, limits)?;
    }
    Ok(Head { start, headers })
}

fn push_field(
    headers: &mut Vec<(String, String)>,
    (name, value): (&[u8], Vec<u8>),
    limits: &Limits,
) -> Result<(), ParseError> {
    if headers.len() >= limits.max_headers {
        return Err(ParseError::TooLarge("header fields"));
    }
    let name = String::from_utf8(name.to_vec()).map_err(|_| malformed("header name"))?;
    let value = String::from_utf8(value).map_err(|_| malformed("header value is not UTF-8"))?;
    headers.push((name, value));
    Ok(())
}

/// `Method SP Request-URI SP SIP/2.0` or `SIP/2.0 SP 3DIGIT SP Reason-Phrase`.
fn parse_start(line: &[u8]) -> Result<Start, ParseError> {
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        let rest = match line.get(..8) {
            Some(v) if v.eq_ignore_ascii_case(b"SIP/2.0 ") => &line[8..],
            _ => return Err(malformed("unsupported SIP version")),
        };
        let digits = rest.get(..3).filter(|d| d.iter().all(u8::is_ascii_digit));
        let Some(digits) = digits else {
            return Err(malformed("status code is not 3 digits"));
        };
        let code = digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&code) {
            return Err(malformed("status code out of range"));
        }
        // The SP before an empty reason phrase is required by the grammar; its absence is
        // tolerated since the phrase is empty either way.
        let reason = match rest.get(3) {
            None => &[][..],
            Some(b' ') => &rest[4..],
            Some(_) => return Err(malformed("status code is not 3 digits")),
        };
        let reason = std::str::from_utf8(reason).map_err(|_| malformed("reason phrase"))?;
        if reason.chars().any(|c| c.is_control() && c != '\t') {
            return Err(malformed("control character in the reason phrase"));
        }
        return Ok(Start::Response {
            code,
            reason: reason.to_string(),
        });
    }
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(uri), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("start line is not METHOD SP URI SP SIP/2.0"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token_byte(b)) {
        return Err(malformed("method is not a token"));
    }
    if uri.is_empty() || !uri.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return Err(malformed(
            "Request-URI is empty or holds whitespace or controls",
        ));
    }
    if !version.eq_ignore_ascii_case(b"SIP/2.0") {
        return Err(malformed("unsupported SIP version or stray whitespace"));
    }
    // Tokens and printable ASCII are UTF-8.
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(Start::Request {
        method: text(method),
        uri: text(uri),
    })
}

/// The values of every Content-Length field.
fn content_lengths(headers: &[(String, String)]) -> Vec<&str> {
    headers
        .iter()
        .filter(|(n, _)| names_match(n, "content-length"))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A Content-Length value: `1*DIGIT`, saturating at `usize::MAX`; `None` when not digits.
fn content_length(v: &str) -> Option<usize> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.bytes().fold(0usize, |n, d| {
        n.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

/// Compact forms and the full names they stand for, lowercase.
const COMPACT: &[(&str, &str)] = &[
    ("i", "call-id"),
    ("m", "contact"),
    ("e", "content-encoding"),
    ("l", "content-length"),
    ("c", "content-type"),
    ("f", "from"),
    ("s", "subject"),
    ("k", "supported"),
    ("t", "to"),
    ("v", "via"),
    ("o", "event"),
    ("u", "allow-events"),
    ("r", "refer-to"),
    ("b", "referred-by"),
    ("x", "session-expires"),
    ("a", "accept-contact"),
    ("j", "reject-contact"),
    ("d", "request-disposition"),
    ("y", "identity"),
];

/// The compact form of a header name, if it has one (RFC 3261 §7.3.3 and later RFCs:
/// `i` Call-ID, `m` Contact, `e` Content-Encoding, `l` Content-Length, `c` Content-Type,
/// `f` From, `s` Subject, `k` Supported, `t` To, `v` Via, `o` Event, `u` Allow-Events,
/// `r` Refer-To, `b` Referred-By, `x` Session-Expires, `a` Accept-Contact, `j` Reject-Contact,
/// `d` Request-Disposition, `y` Identity).
///
/// Names match case-insensitively; a compact form given as `name` is returned lowercased.
pub fn compact_form(name: &str) -> Option<&'static str> {
    COMPACT
        .iter()
        .find(|(c, full)| full.eq_ignore_ascii_case(name) || c.eq_ignore_ascii_case(name))
        .map(|(c, _)| *c)
}

/// The full name a compact form stands for, or `name` itself.
fn full_name(name: &str) -> &str {
    if name.len() == 1
        && let Some((_, full)) = COMPACT.iter().find(|(c, _)| c.eq_ignore_ascii_case(name))
    {
        return full;
    }
    name
}

/// Whether two header names denote the same header.
fn names_match(a: &str, b: &str) -> bool {
    full_name(a).eq_ignore_ascii_case(full_name(b))
}

impl Message {
    /// A request with no headers yet.
    pub fn request(method: &str, uri: &str) -> Self {
        Self {
            start: Start::Request {
                method: method.into(),
                uri: uri.into(),
            },
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, Start::Request { .. })
    }

    /// The request's method, or `None` for a response.
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            Start::Request { method, .. } => Some(method),
            Start::Response { .. } => None,
        }
    }

    /// The response's status code, or `None` for a request.
    pub fn code(&self) -> Option<u16> {
        match &self.start {
            Start::Response { code, .. } => Some(*code),
            Start::Request { .. } => None,
        }
    }

    /// The request URI as received, or `None` for a response.
    pub fn uri(&self) -> Option<&str> {
        match &self.start {
            Start::Request { uri, .. } => Some(uri),
            Start::Response { .. } => None,
        }
    }

    /// The first value of a header, matched case-insensitively by full or compact name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| names_match(n, name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header field with this name (full or compact), in order, each value whole (not
    /// split at commas).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| names_match(n, name))
            .map(|(_, v)| v.as_str())
    }

    /// Every element of a comma-separated list header (Via, Contact, Route, Require,
    /// Supported, Allow…) over all its fields, in order.
    ///
    /// Commas inside quoted strings and angle brackets do not split; elements are trimmed
    /// and empty ones left out.
    pub fn list<'a>(&'a self, name: &'a str) -> Vec<&'a str> {
        self.header_values(name)
            .flat_map(split_list)
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// Appends a header field.
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.headers.push((name.to_string(), value.into()));
    }

    /// Removes every field with this name (full or compact).
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !names_match(n, name));
    }

    /// The message on the wire: start line, headers as stored except `Content-Length`, which
    /// is written last from the body's length, then the body.
    ///
    /// A CR or LF in the start line or in a header (which [`parse`] never yields) is written
    /// as a space, so no value can add lines of its own.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.body.len()
                + 64
                + self
                    .headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 4)
                    .sum::<usize>(),
        );
        match &self.start {
            Start::Request { method, uri } => {
                push_line_text(&mut out, method);
                out.push(b' ');
                push_line_text(&mut out, uri);
                out.extend_from_slice(b" SIP/2.0\r\n");
            }
            Start::Response { code, reason } => {
                out.extend_from_slice(format!("SIP/2.0 {code:03} ").as_bytes());
                push_line_text(&mut out, reason);
                out.extend_from_slice(b"\r\n");
            }
        }
        for (name, value) in &self.headers {
            if names_match(name, "content-length") {
                continue;
            }
            push_line_text(&mut out, name);
            out.extend_from_slice(b": ");
            push_line_text(&mut out, value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Checks the grammar of the headers the edge reads: exactly one well-formed Call-ID,
    /// CSeq (number < 2^31, method matching a request's method), From and To (name-addr or
    /// addr-spec), at least one Via (`SIP/2.0/<transport> host[:port]`, params), at most one
    /// Content-Length, Max-Forwards and Expires (digits), a well-formed Content-Type.
    ///
    /// Also: a request's Request-URI is a URI (a SIP or SIPS one without headers, RFC 3261
    /// §19.1.5), no Via `branch` is the bare magic cookie `z9hG4bK`, Max-Forwards is at most
    /// 255, every Contact is `*` alone or a name-addr/addr-spec, and a Date is an RFC 1123
    /// date in GMT (RFC 3261 §20.17).
    pub fn check(&self) -> Result<(), SyntaxError> {
        fn bad<T>(why: impl Into<String>) -> Result<T, SyntaxError> {
            Err(SyntaxError(why.into()))
        }
        if let Start::Request { uri, .. } = &self.start {
            match Uri::parse(uri) {
                None => return bad("malformed Request-URI"),
                Some(u) if u.is_sip() && !u.headers.is_empty() => {
                    return bad("headers in the Request-URI");
                }
                Some(_) => {}
            }
        }
        let call_id = self.exactly_one("Call-ID")?;
        if !valid_call_id(call_id) {
            return bad("malformed Call-ID");
        }
        let Some(cseq) = CSeq::parse(self.exactly_one("CSeq")?) else {
            return bad("malformed CSeq");
        };
        if cseq.seq >= 1 << 31 {
            return bad("CSeq number out of range");
        }
        if let Some(method) = self.method()
            && cseq.method != method
        {
            return bad("CSeq method does not match the request method");
        }
        for name in ["From", "To"] {
            if NameAddr::parse(self.exactly_one(name)?).is_none() {
                return bad(format!("malformed {name}"));
            }
        }
        let mut vias = 0;
        for value in self.header_values("via") {
            for item in split_list(value) {
                match Via::parse(item) {
                    None => return bad("malformed Via"),
                    Some(v) if v.branch() == Some(BRANCH_COOKIE) => {
                        return bad("Via branch is only the magic cookie");
                    }
                    Some(_) => vias += 1,
                }
            }
        }
        if vias == 0 {
            return bad("no Via");
        }
        if let Some(v) = self.at_most_one("Content-Length")?
            && content_length(v).is_none()
        {
            return bad("malformed Content-Length");
        }
        if let Some(v) = self.at_most_one("Max-Forwards")?
            && content_length(v).is_none_or(|n| n > 255)
        {
            return bad("malformed Max-Forwards");
        }
        if let Some(v) = self.at_most_one("Expires")?
            && content_length(v).is_none()
        {
            return bad("malformed Expires");
        }
        if let Some(v) = self.at_most_one("Content-Type")?
            && ContentType::parse(v).is_none()
        {
            return bad("malformed Content-Type");
        }
        if let Some(v) = self.at_most_one("Date")?
            && !valid_sip_date(v)
        {
            return bad("malformed Date");
        }
        let contacts: Vec<&str> = self.header_values("contact").flat_map(split_list).collect();
        if contacts.len() != 1 || contacts.first() != Some(&"*") {
            for c in contacts {
                if NameAddr::parse(c).is_none() {
                    return bad("malformed Contact");
                }
            }
        }
        Ok(())
    }

    /// The value of a header that must appear exactly once.
    fn exactly_one(&self, name: &str) -> Result<&str, SyntaxError> {
        match self.at_most_one(name)? {
            Some(v) => Ok(v),
            None => Err(SyntaxError(format!("missing {name}"))),
        }
    }

    /// The value of a header that may appear at most once.
    fn at_most_one(&self, name: &str) -> Result<Option<&str>, SyntaxError> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| names_match(n, name))
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(SyntaxError(format!("several {name} fields")));
        }
        Ok(first)
    }

    pub fn call_id(&self) -> Option<&str> {
        self.header("call-id")
    }

    pub fn cseq(&self) -> Option<CSeq> {
        self.header("cseq").and_then(CSeq::parse)
    }

    /// The Via headers, topmost first; unparsable ones are left out.
    pub fn vias(&self) -> Vec<Via> {
        self.list("via")
            .into_iter()
            .filter_map(Via::parse)
            .collect()
    }

    pub fn from(&self) -> Option<NameAddr> {
        self.header("from").and_then(NameAddr::parse)
    }

    pub fn to(&self) -> Option<NameAddr> {
        self.header("to").and_then(NameAddr::parse)
    }

    pub fn content_type(&self) -> Option<ContentType> {
        self.header("content-type").and_then(ContentType::parse)
    }

    /// A response to this request: its Via headers, From, To (with `to_tag` added when the
    /// To has none and one is given), Call-ID and CSeq, with the standard reason phrase when
    /// `reason` is empty.
    ///
    /// Every Via field is copied whole, in order; of the others the first field is copied.
    /// A To that does not parse is copied as it is, without a tag.
    pub fn response(&self, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
        let reason = if reason.is_empty() {
            reason_phrase(code)
        } else {
            reason
        };
        let mut r = Message {
            start: Start::Response {
                code,
                reason: reason.to_string(),
            },
            headers: Vec::new(),
            body: Vec::new(),
        };
        for v in self.header_values("via") {
            r.push("Via", v);
        }
        if let Some(v) = self.header("from") {
            r.push("From", v);
        }
        if let Some(v) = self.header("to") {
            let tagged = match (to_tag, NameAddr::parse(v)) {
                (Some(tag), Some(na)) if na.tag().is_none() => format!("{v};tag={tag}"),
                _ => v.to_string(),
            };
            r.push("To", tagged);
        }
        if let Some(v) = self.header("call-id") {
            r.push("Call-ID", v);
        }
        if let Some(v) = self.header("cseq") {
            r.push("CSeq", v);
        }
        r
    }
}

/// The RFC 3261 branch magic cookie.
const BRANCH_COOKIE: &str = "z9hG4bK";

/// Appends text to a start line or header line, with CR and LF written as spaces.
fn push_line_text(out: &mut Vec<u8>, s: &str) {
    out.extend(
        s.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
}

/// Splits a list value at the commas outside quoted strings and angle brackets; elements
/// trimmed, empty ones kept.
fn split_list(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped, mut angle) = (0, false, false, false);
    for (i, b) in v.bytes().enumerate() {
        if quoted {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = false;
            }
            continue;
        }
        match b {
            b'"' => quoted = true,
            b'<' => angle = true,
            b'>' => angle = false,
            b',' if !angle => {
                out.push(trim_ws(&v[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(trim_ws(&v[start..]));
    out
}

/// `callid = word [ "@" word ]` (RFC 3261 §25.1).
fn valid_call_id(v: &str) -> bool {
    fn word(w: &str) -> bool {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~()<>:\\\"/[]?{}".contains(&b))
    }
    match v.split_once('@') {
        Some((a, b)) => word(a) && word(b),
        None => word(v),
    }
}

/// `rfc1123-date` in GMT: `Sat, 13 Nov 2010 23:29:00 GMT` (RFC 3261 §20.17, §25.1).
fn valid_sip_date(v: &str) -> bool {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = v.as_bytes();
    let at = |r: std::ops::Range<usize>| b.get(r).unwrap_or_default();
    let num = |r: std::ops::Range<usize>, max: u32| {
        let d = at(r);
        !d.is_empty()
            && d.iter().all(u8::is_ascii_digit)
            && d.iter().fold(0u32, |n, c| n * 10 + u32::from(c - b'0')) <= max
    };
    let word = |r: std::ops::Range<usize>, set: &[&str]| {
        let w = at(r);
        set.iter().any(|s| s.as_bytes().eq_ignore_ascii_case(w))
    };
    b.len() == 29
        && word(0..3, &DAYS)
        && at(3..5) == b", "
        && num(5..7, 31)
        && at(7..8) == b" "
        && word(8..11, &MONTHS)
        && at(11..12) == b" "
        && num(12..16, 9999)
        && at(16..17) == b" "
        && num(17..19, 23)
        && at(19..20) == b":"
        && num(20..22, 59)
        && at(22..23) == b":"
        && num(23..25, 60)
        && at(25..26) == b" "
        && at(26..29).eq_ignore_ascii_case(b"GMT")
}

/// The standard reason phrase of a status code (RFC 3261 §21 and the extensions the edge
/// uses: 202, 415, 416, 420, 423, 429, 481, 482, 483, 489, 494…).
///
/// An unknown code gets the generic phrase of its class.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        199 => "Early Dialog Terminated",
        200 => "OK",
        202 => "Accepted",
        204 => "No Notification",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        412 => "Conditional Request Failed",
        413 => "Request Entity Too Large",
        414 => "Request-URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        417 => "Unknown Resource-Priority",
        420 => "Bad Extension",
        421 => "Extension Required",
        422 => "Session Interval Too Small",
        423 => "Interval Too Brief",
        428 => "Use Identity Header",
        429 => "Provide Referrer Identity",
        430 => "Flow Failed",
        433 => "Anonymity Disallowed",
        436 => "Bad Identity Info",
        437 => "Unsupported Credential",
        438 => "Invalid Identity Header",
        439 => "First Hop Lacks Outbound Support",
        440 => "Max-Breadth Exceeded",
        469 => "Bad Info Package",
        470 => "Consent Needed",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        485 => "Ambiguous",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        493 => "Undecipherable",
        494 => "Security Agreement Required",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        580 => "Precondition Failure",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        607 => "Unwanted",
        608 => "Rejected",
        _ => match code / 100 {
            1 => "Provisional",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            6 => "Global Failure",
            _ => "Unknown",
        },
    }
}

/// `CSeq: 4711 INVITE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: String,
}

impl CSeq {
    /// `1*DIGIT LWS Method`; `None` when the number does not fit in 32 bits.
    pub fn parse(v: &str) -> Option<Self> {
        let s = trim_ws(v);
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let seq = s[..digits].bytes().try_fold(0u32, |n, d| {
            n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })?;
        let rest = &s[digits..];
        let method = trim_start_ws(rest);
        if method.len() == rest.len() || !is_token(method) {
            return None;
        }
        Some(Self {
            seq,
            method: method.to_string(),
        })
    }
}

/// A header parameter: `;name=value` or `;name`. Names are lowercased; values as received
/// (quotes removed from quoted strings).
pub type Params = Vec<(String, Option<String>)>;

/// The value of a parameter, if present with a value.
pub fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_deref())
}

/// Whether a parameter is present (with or without a value).
pub fn has_param(params: &Params, name: &str) -> bool {
    params.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// `*( SEMI generic-param )` with `generic-param = token [ EQUAL gen-value ]` and
/// `gen-value = token / host / quoted-string`; whitespace allowed around `;` and `=`.
fn parse_params(mut s: &str) -> Option<Params> {
    let mut out = Params::new();
    loop {
        s = trim_start_ws(s);
        if s.is_empty() {
            return Some(out);
        }
        s = trim_start_ws(s.strip_prefix(';')?);
        let n = s.bytes().take_while(|&b| is_token_byte(b)).count();
        if n == 0 {
            return None;
        }
        let name = s[..n].to_ascii_lowercase();
        s = trim_start_ws(&s[n..]);
        let value = match s.strip_prefix('=') {
            None => None,
            Some(r) => {
                let r = trim_start_ws(r);
                if r.starts_with('"') {
                    let (v, rest) = parse_quoted(r)?;
                    s = rest;
                    Some(v)
                } else {
                    let n = r.bytes().take_while(|&b| is_bare_value_byte(b)).count();
                    if n == 0 {
                        return None;
                    }
                    s = &r[n..];
                    Some(r[..n].to_string())
                }
            }
        };
        out.push((name, value));
    }
}

/// Writes `;name[=value]` for each parameter, quoting values that are not a token or host.
fn write_params(out: &mut String, params: &Params) {
    for (name, value) in params {
        out.push(';');
        out.push_str(name);
        if let Some(v) = value {
            out.push('=');
            if !v.is_empty() && v.bytes().all(is_bare_value_byte) {
                out.push_str(v);
            } else {
                push_quoted(out, v);
            }
        }
    }
}

/// A quoted string (RFC 3261 §25.1) at the start of `s`: its content with quoted-pairs
/// resolved, and what follows the closing quote.
pub(super) fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &body[i + 1..])),
            '\\' => {
                // quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
                let (_, e) = chars.next()?;
                if !e.is_ascii() || e == '\r' || e == '\n' {
                    return None;
                }
                out.push(e);
            }
            c if c.is_ascii_control() && c != '\t' => return None,
            c => out.push(c),
        }
    }
    None
}

/// Writes `s` as a quoted string, escaping `"`, `\` and control characters.
pub(super) fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '\r' | '\n' => out.push(' '),
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii_control() && c != '\t' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One Via value: `SIP/2.0/UDP host:port;branch=z9hG4bK…;received=…;rport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// `UDP`, `TCP`, `TLS`… uppercased.
    pub transport: String,
    /// The sent-by host (brackets kept for IPv6), lowercased.
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
}

impl Via {
    /// `SIP/2.0/<transport> LWS host [: port] *( ; via-params )` (RFC 3261 §20.42), with
    /// whitespace allowed around `/`, `:`, `;` and `=`. `branch` must be a token, `received`
    /// an IP address, `ttl` 0-255, `maddr` a host and `rport` (RFC 3581) empty or a port.
    pub fn parse(v: &str) -> Option<Self> {
        let s = trim_ws(v);
        let (name, s) = take_token(s)?;
        let (version, s) = take_token(expect_sep(s, '/')?)?;
        let (transport, s) = take_token(expect_sep(s, '/')?)?;
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return None;
        }
        let after = trim_start_ws(s);
        if after.len() == s.len() {
            return None;
        }
        let s = after;
        let host_len = if s.starts_with('[') {
            s.find(']')? + 1
        } else {
            s.bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
                .count()
        };
        let host = &s[..host_len];
        if !valid_host(host) {
            return None;
        }
        let mut s = trim_start_ws(&s[host_len..]);
        let mut port = None;
        if let Some(r) = s.strip_prefix(':') {
            let r = trim_start_ws(r);
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            port = Some(parse_port(&r[..n])?);
            s = &r[n..];
        }
        let params = parse_params(s)?;
        for (name, value) in &params {
            let ok = match (name.as_str(), value.as_deref()) {
                ("branch", Some(v)) => is_token(v),
                ("received", Some(v)) => valid_ip(v),
                ("ttl", Some(v)) => content_length(v).is_some_and(|n| v.len() <= 3 && n <= 255),
                ("maddr", Some(v)) => valid_host(v),
                ("rport", Some(v)) => parse_port(v).is_some(),
                ("rport", None) => true,
                ("branch" | "received" | "ttl" | "maddr", None) => false,
                _ => true,
            };
            if !ok {
                return None;
            }
        }
        Some(Self {
            transport: transport.to_ascii_uppercase(),
            host: host.to_ascii_lowercase(),
            port,
            params,
        })
    }

    pub fn branch(&self) -> Option<&str> {
        param(&self.params, "branch")
    }

    /// Serializes as `SIP/2.0/T host[:port];params`.
    pub fn to_string_value(&self) -> String {
        let mut out = format!("SIP/2.0/{} {}", self.transport, self.host);
        if let Some(p) = self.port {
            out.push_str(&format!(":{p}"));
        }
        write_params(&mut out, &self.params);
        out
    }
}

/// A SIP or SIPS URI (RFC 3261 §19.1), or any other scheme's absolute URI with only
/// `scheme` and `opaque` set.
///
/// For a SIP or SIPS URI, parameter names are lowercased and parameter names and values,
/// like the user, password and headers, have their %-escapes decoded (so `;%6C%72` is the
/// `lr` parameter); [`Display`](std::fmt::Display) escapes them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// Lowercased: `sip`, `sips`, `tel`, `im`, `pres`…
    pub scheme: String,
    /// The userinfo's user part with %-escapes decoded.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Lowercased; brackets kept for IPv6 references.
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
    /// `?name=value&…`, escapes decoded.
    pub headers: Vec<(String, String)>,
    /// For schemes other than sip/sips: everything after `scheme:`.
    pub opaque: Option<String>,
}

impl Uri {
    /// Parses a URI with no surrounding whitespace. A SIP or SIPS URI must follow the
    /// RFC 3261 grammar (escapes that decode to text other than UTF-8 are refused); any
    /// other scheme needs a non-empty opaque part of URI characters.
    pub fn parse(s: &str) -> Option<Self> {
        let (scheme, rest) = s.split_once(':')?;
        let sb = scheme.as_bytes();
        if !sb.first()?.is_ascii_alphabetic()
            || !sb
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "sip" || scheme == "sips" {
            return parse_sip_uri(scheme, rest);
        }
        if rest.is_empty() || !valid_escaped(rest, is_uric) {
            return None;
        }
        Some(Self {
            scheme,
            user: None,
            password: None,
            host: String::new(),
            port: None,
            params: Params::new(),
            headers: Vec::new(),
            opaque: Some(rest.to_string()),
        })
    }

    /// Whether this is a `sip:` or `sips:` URI.
    pub fn is_sip(&self) -> bool {
        self.scheme == "sip" || self.scheme == "sips"
    }

    /// `sip:user@host` (the user %-escaped where needed), no port, params or headers.
    ///
    /// A SIPS URI gives the same `sip:` address of record; a URI of another scheme is
    /// returned whole.
    pub fn address_of_record(&self) -> String {
        if !self.is_sip() {
            return self.to_string();
        }
        let mut out = String::from("sip:");
        if let Some(user) = &self.user {
            push_escaped(&mut out, user, is_user_char);
            out.push('@');
        }
        out.push_str(&self.host);
        out
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = format!("{}:", self.scheme);
        match &self.opaque {
            Some(opaque) if !self.is_sip() => out.push_str(opaque),
            _ => {
                if let Some(user) = &self.user {
                    push_escaped(&mut out, user, is_user_char);
                    if let Some(password) = &self.password {
                        out.push(':');
                        push_escaped(&mut out, password, is_password_char);
                    }
                    out.push('@');
                }
                out.push_str(&self.host);
                if let Some(p) = self.port {
                    out.push_str(&format!(":{p}"));
                }
                for (name, value) in &self.params {
                    out.push(';');
                    push_escaped(&mut out, name, is_paramchar);
                    if let Some(v) = value {
                        out.push('=');
                        push_escaped(&mut out, v, is_paramchar);
                    }
                }
                for (i, (name, value)) in self.headers.iter().enumerate() {
                    out.push(if i == 0 { '?' } else { '&' });
                    push_escaped(&mut out, name, is_hnvchar);
                    out.push('=');
                    push_escaped(&mut out, value, is_hnvchar);
                }
            }
        }
        f.write_str(&out)
    }
}

/// The part of a SIP or SIPS URI after `sip:`.
fn parse_sip_uri(scheme: String, rest: &str) -> Option<Uri> {
    // No character after the userinfo may be an unescaped `@`, so the first one ends it.
    let (userinfo, hostpart) = match rest.split_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (u, p) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            if u.is_empty() || !valid_escaped(u, is_user_char) {
                return None;
            }
            let password = match p {
                Some(p) if valid_escaped(p, is_password_char) => Some(pct_decode(p)?),
                Some(_) => return None,
                None => None,
            };
            (Some(pct_decode(u)?), password)
        }
    };
    let host_end = hostpart.find([';', '?']).unwrap_or(hostpart.len());
    let (host, port) = parse_hostport(&hostpart[..host_end])?;
    let mut tail = &hostpart[host_end..];
    let mut params = Params::new();
    if let Some(p) = tail.strip_prefix(';') {
        let end = p.find('?').unwrap_or(p.len());
        for item in p[..end].split(';') {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item, None),
            };
            let ok = |s: &str| !s.is_empty() && valid_escaped(s, is_paramchar);
            if !ok(name) || value.is_some_and(|v| !ok(v)) {
                return None;
            }
            let value = match value {
                Some(v) => Some(pct_decode(v)?),
                None => None,
            };
            params.push((pct_decode(name)?.to_ascii_lowercase(), value));
        }
        tail = &p[end..];
    }
    let mut headers = Vec::new();
    if let Some(h) = tail.strip_prefix('?') {
        for item in h.split('&') {
            let (name, value) = item.split_once('=')?;
            if name.is_empty()
                || !valid_escaped(name, is_hnvchar)
                || !valid_escaped(value, is_hnvchar)
            {
                return None;
            }
            headers.push((pct_decode(name)?, pct_decode(value)?));
        }
    }
    Some(Uri {
        scheme,
        user,
        password,
        host,
        port,
        params,
        headers,
        opaque: None,
    })
}

/// `host [ ":" port ]`, the host validated and lowercased.
fn parse_hostport(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if s.starts_with('[') {
        let close = s.find(']')?;
        (&s[..=close], &s[close + 1..])
    } else {
        match s.find(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        }
    };
    let port = if port.is_empty() {
        None
    } else {
        Some(parse_port(port.strip_prefix(':')?)?)
    };
    if !valid_host(host) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// `1*DIGIT` that fits a port number.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.bytes().try_fold(0u16, |n, d| {
        n.checked_mul(10)?.checked_add(u16::from(d - b'0'))
    })
}

/// `hostname / IPv4address / IPv6reference` (RFC 3261 §25.1).
fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok();
    }
    if h.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return h.parse::<Ipv4Addr>().is_ok();
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    if name.is_empty() {
        return false;
    }
    let label_ok = |l: &[u8]| {
        matches!((l.first(), l.last()), (Some(f), Some(e)) if f.is_ascii_alphanumeric() && e.is_ascii_alphanumeric())
            && l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
    };
    let mut labels = name.split('.').map(str::as_bytes).peekable();
    while let Some(label) = labels.next() {
        if !label_ok(label) {
            return false;
        }
        if labels.peek().is_none() && !label.first().is_some_and(u8::is_ascii_alphabetic) {
            return false;
        }
    }
    true
}

/// An IPv4 address, or an IPv6 address with or without brackets (RFC 5118 §4.5).
fn valid_ip(v: &str) -> bool {
    let inner = v
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(v);
    v.parse::<Ipv4Addr>().is_ok() || inner.parse::<Ipv6Addr>().is_ok()
}

/// A From/To/Contact/Route value: `"Display" <uri>;params` or `uri;params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// The display name: a quoted string's content (quoted-pairs resolved) or the tokens
    /// before `<` as received.
    pub display: Option<String>,
    pub uri: Uri,
    pub params: Params,
}

impl NameAddr {
    /// `( name-addr / addr-spec ) *( SEMI generic-param )` (RFC 3261 §20.10, §25.1). In the
    /// addr-spec form the URI ends at the first `;` or whitespace (what follows are header
    /// parameters), and may not hold `?` or `,`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = trim_ws(s);
        let (display, rest) = if s.starts_with('"') {
            let (d, rest) = parse_quoted(s)?;
            (Some(d), trim_start_ws(rest))
        } else {
            let i = s
                .bytes()
                .position(|b| !(is_token_byte(b) || is_ws(b)))
                .unwrap_or(s.len());
            if s.as_bytes().get(i) != Some(&b'<') {
                let end = s.find([';', ' ', '\t']).unwrap_or(s.len());
                let addr = &s[..end];
                if addr.contains(['?', ',']) {
                    return None;
                }
                return Some(Self {
                    display: None,
                    uri: Uri::parse(addr)?,
                    params: parse_params(&s[end..])?,
                });
            }
            let d = trim_ws(&s[..i]);
            ((!d.is_empty()).then(|| d.to_string()), &s[i..])
        };
        let inner = rest.strip_prefix('<')?;
        let close = inner.find('>')?;
        Some(Self {
            display,
            uri: Uri::parse(&inner[..close])?,
            params: parse_params(&inner[close + 1..])?,
        })
    }

    pub fn tag(&self) -> Option<&str> {
        param(&self.params, "tag")
    }

    /// Serializes as `"Display" <uri>;params` (always with angle brackets).
    pub fn to_string_value(&self) -> String {
        let mut out = String::new();
        if let Some(d) = &self.display {
            push_quoted(&mut out, d);
            out.push(' ');
        }
        out.push('<');
        out.push_str(&self.uri.to_string());
        out.push('>');
        write_params(&mut out, &self.params);
        out
    }
}

/// `type/subtype;params`, type and subtype lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentType {
    pub mime: String,
    pub params: Params,
}

impl ContentType {
    /// `m-type SLASH m-subtype *( SEMI m-parameter )`, every parameter with a value.
    pub fn parse(v: &str) -> Option<Self> {
        let (ty, s) = take_token(trim_ws(v))?;
        let (sub, s) = take_token(expect_sep(s, '/')?)?;
        let params = parse_params(s)?;
        if params.iter().any(|(_, v)| v.is_none()) {
            return None;
        }
        Some(Self {
            mime: format!("{}/{}", ty.to_ascii_lowercase(), sub.to_ascii_lowercase()),
            params,
        })
    }
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ws(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

fn trim_start_ws(s: &str) -> &str {
    s.trim_start_matches([' ', '\t'])
}

fn trim_ws_bytes(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| !is_ws(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|&c| !is_ws(c)).map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// RFC 3261 token characters: alphanumerics and `-.!%*_+`'~`.
pub(super) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

/// A bare `gen-value`: a token or a host (IPv6 references included).
fn is_bare_value_byte(b: u8) -> bool {
    is_token_byte(b) || b"[]:".contains(&b)
}

/// The token at the start of `s` and what follows it.
fn take_token(s: &str) -> Option<(&str, &str)> {
    let n = s.bytes().take_while(|&b| is_token_byte(b)).count();
    (n > 0).then(|| (&s[..n], &s[n..]))
}

/// `SWS sep SWS` at the start of `s`; what follows.
fn expect_sep(s: &str, sep: char) -> Option<&str> {
    Some(trim_start_ws(trim_start_ws(s).strip_prefix(sep)?))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b)
}

fn is_user_char(b: u8) -> bool {
    is_unreserved(b) || b"&=+$,;?/".contains(&b)
}

fn is_password_char(b: u8) -> bool {
    is_unreserved(b) || b"&=+$,".contains(&b)
}

fn is_paramchar(b: u8) -> bool {
    is_unreserved(b) || b"[]/:&+$".contains(&b)
}

fn is_hnvchar(b: u8) -> bool {
    is_unreserved(b) || b"[]/?:+$".contains(&b)
}

fn is_uric(b: u8) -> bool {
    is_unreserved(b) || b";/?:@&=+$,".contains(&b)
}

/// Whether every byte is `allowed` or part of a `%HH` escape.
fn valid_escaped(s: &str, allowed: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (b.get(i + 1), b.get(i + 2)) {
                (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => i += 3,
                _ => return false,
            }
        } else if allowed(b[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Decodes `%HH` escapes (already validated); `None` when the result is not UTF-8.
fn pct_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Appends `s`, %-escaping every byte that is not `allowed` (and every `%`).
fn push_escaped(out: &mut String, s: &str, allowed: fn(u8) -> bool) {
    for b in s.bytes() {
        if b != b'%' && b.is_ascii() && allowed(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The fuzz target's entry point: parse, check, frame, typed views and serialize whatever
/// the bytes are; must never panic.
///
/// The bytes are cut into frames as a stream would be (each frame must then parse), parsed
/// whole as a datagram, and parsed under small limits. Every message that parses is
/// checked, its typed views read and serialized back (Via, name-addr and URI values must
/// parse back equal), and it must survive `to_bytes` and `parse` unchanged but for its
/// `Content-Length` fields. Authorization and challenge headers, and the bytes themselves,
/// go through the digest parsers.
pub fn fuzz_sip(data: &[u8]) {
    let limits = Limits::default();
    let mut buf = data;
    loop {
        match frame(buf, &limits) {
            Ok(Frame::Keepalive(n)) => {
                assert!(n == 2 || n == 4, "keepalive of {n} bytes");
                buf = &buf[n..];
            }
            Ok(Frame::Message(n)) => {
                assert!(n > 4 && n <= buf.len(), "frame of {n} bytes");
                assert_eq!(frame(&buf[..n], &limits), Ok(Frame::Message(n)));
                assert_eq!(frame(&buf[..n - 1], &limits), Ok(Frame::Need));
                match parse(&buf[..n], &limits) {
                    Ok(m) => fuzz_message(&m),
                    Err(e) => panic!("a framed message did not parse: {e}"),
                }
                buf = &buf[n..];
            }
            Ok(Frame::Need) => {
                assert!(
                    buf.len() < limits.max_message_bytes,
                    "waiting past the limit"
                );
                break;
            }
            Err(_) => break,
        }
    }
    if let Ok(m) = parse(data, &limits) {
        fuzz_message(&m);
    }
    let small = Limits {
        max_message_bytes: 512,
        max_headers: 6,
    };
    let _ = frame(data, &small);
    if let Ok(m) = parse(data, &small) {
        assert!(m.headers.len() <= small.max_headers, "header limit ignored");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = super::digest::parse_credentials(text, true);
        let _ = super::digest::pick_challenge(&[text], true);
        let _ = (Uri::parse(text), NameAddr::parse(text), Via::parse(text));
        let _ = (CSeq::parse(text), ContentType::parse(text));
    }
}

/// Everything the edge may do with a parsed message, with the serializers' round trips.
fn fuzz_message(m: &Message) {
    let checked = m.check();
    let _ = (
        m.call_id(),
        m.cseq(),
        m.content_type(),
        m.method(),
        m.code(),
    );
    let _ = (m.list("route"), m.list("supported"), m.list("require"));
    for via in m.vias() {
        assert_eq!(Via::parse(&via.to_string_value()).as_ref(), Some(&via));
        let _ = via.branch();
    }
    let addrs = m
        .from()
        .into_iter()
        .chain(m.to())
        .chain(m.list("contact").into_iter().filter_map(NameAddr::parse));
    for na in addrs {
        assert_eq!(NameAddr::parse(&na.to_string_value()).as_ref(), Some(&na));
        fuzz_uri(&na.uri);
        let _ = na.tag();
    }
    if let Some(u) = m.uri().and_then(Uri::parse) {
        fuzz_uri(&u);
    }
    for name in ["authorization", "proxy-authorization"] {
        for v in m.header_values(name) {
            let _ = super::digest::parse_credentials(v, false);
        }
    }
    for name in ["www-authenticate", "proxy-authenticate"] {
        let values: Vec<&str> = m.header_values(name).collect();
        let _ = super::digest::pick_challenge(&values, false);
    }

    let unlimited = Limits {
        max_message_bytes: usize::MAX,
        max_headers: usize::MAX,
    };
    let bytes = m.to_bytes();
    assert_eq!(frame(&bytes, &unlimited), Ok(Frame::Message(bytes.len())));
    let again = match parse(&bytes, &unlimited) {
        Ok(again) => again,
        Err(e) => panic!("a serialized message did not parse: {e}"),
    };
    let length = m.body.len().to_string();
    assert_eq!(
        again.header_values("content-length").collect::<Vec<_>>(),
        [length.as_str()]
    );
    let (mut a, mut b) = (again.clone(), m.clone());
    a.remove("content-length");
    b.remove("content-length");
    assert_eq!(a, b, "the message changed through to_bytes and parse");
    if checked.is_ok() {
        assert_eq!(again.check(), Ok(()));
    }

    if m.is_request() {
        let r = m.response(400, "", Some("fz1"));
        match parse(&r.to_bytes(), &unlimited) {
            Ok(p) => {
                assert_eq!(p.code(), Some(400));
                assert_eq!(p.list("via"), m.list("via"));
            }
            Err(e) => panic!("a response did not parse: {e}"),
        }
    }
}

fn fuzz_uri(u: &Uri) {
    assert_eq!(Uri::parse(&u.to_string()).as_ref(), Some(u));
    let aor = u.address_of_record();
    if u.is_sip() {
        assert!(Uri::parse(&aor).is_some(), "address of record {aor:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sip-rfc4475");

    fn corpus(name: &str) -> Result<Vec<u8>, std::io::Error> {
        std::fs::read(format!("{CORPUS}/{name}.dat"))
    }

    fn msg(text: &str) -> Result<Message, ParseError> {
        parse(text.as_bytes(), &Limits::default())
    }

    /// What the parser must make of an RFC 4475 message.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want {
        /// parse() and check() accept it.
        Ok,
        /// parse() refuses it.
        Parse,
        /// parse() accepts it and check() refuses it with an error containing this text.
        Check(&'static str),
    }

    /// Every file of the corpus: RFC 4475 §3.1.1 valid, §3.1.2 invalid, §3.2.1, §3.3
    /// application-layer, §3.4.1 backward compatibility, and test.dat.
    const TABLE: &[(&str, Want)] = &[
        // 3.1.1: valid.
        ("wsinv", Want::Ok),
        ("intmeth", Want::Ok),
        ("esc01", Want::Ok),
        ("escnull", Want::Ok),
        ("esc02", Want::Ok),
        ("lwsdisp", Want::Ok),
        ("longreq", Want::Ok),
        ("dblreq", Want::Ok),
        ("semiuri", Want::Ok),
        ("transports", Want::Ok),
        ("mpart01", Want::Ok),
        ("unreason", Want::Ok),
        ("noreason", Want::Ok),
        // 3.1.2: invalid.
        ("badinv01", Want::Check("Via")),
        ("clerr", Want::Parse),
        ("ncl", Want::Check("Content-Length")),
        ("scalar02", Want::Check("CSeq")),
        ("scalarlg", Want::Check("CSeq")),
        ("quotbal", Want::Check("To")),
        ("ltgtruri", Want::Check("Request-URI")),
        ("lwsruri", Want::Parse),
        ("lwsstart", Want::Parse),
        ("trws", Want::Parse),
        ("escruri", Want::Check("headers in the Request-URI")),
        ("baddate", Want::Check("Date")),
        ("regbadct", Want::Check("Contact")),
        ("badaspec", Want::Check("To")),
        // The file has no empty line after its headers.
        ("baddn", Want::Parse),
        ("badvers", Want::Parse),
        ("mismatch01", Want::Check("CSeq method")),
        ("mismatch02", Want::Check("CSeq method")),
        ("bigcode", Want::Parse),
        // 3.2.1: transport.
        ("badbranch", Want::Check("magic cookie")),
        // 3.3: application-layer semantics; those missing or repeating a header the edge
        // needs exactly once are answered 400 from check().
        ("insuf", Want::Check("missing Call-ID")),
        ("unkscm", Want::Ok),
        ("novelsc", Want::Ok),
        ("unksm2", Want::Ok),
        ("bext01", Want::Ok),
        ("invut", Want::Ok),
        ("regaut01", Want::Ok),
        ("multi01", Want::Check("several Call-ID")),
        ("mcl01", Want::Check("several Content-Length")),
        ("bcast", Want::Ok),
        ("zeromf", Want::Ok),
        ("cparam01", Want::Ok),
        ("cparam02", Want::Ok),
        ("regescrt", Want::Ok),
        ("sdp01", Want::Ok),
        // 3.4.1: backward compatibility.
        ("inv2543", Want::Ok),
        // Not in the RFC: no SIP version on the request line.
        ("test", Want::Parse),
    ];

    #[test]
    fn rfc4475_corpus_is_classified() -> TestResult {
        let mut files: Vec<String> = std::fs::read_dir(CORPUS)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".dat").map(str::to_string)
            })
            .collect();
        files.sort();
        let mut listed: Vec<String> = TABLE.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(files, listed, "the table must cover the corpus exactly");
        for (name, want) in TABLE {
            let bytes = corpus(name)?;
            let parsed = parse(&bytes, &Limits::default());
            match (want, &parsed) {
                (Want::Parse, Err(_)) => {}
                (Want::Ok, Ok(m)) => assert_eq!(m.check(), Ok(()), "{name}"),
                (Want::Check(why), Ok(m)) => match m.check() {
                    Err(SyntaxError(e)) => assert!(e.contains(why), "{name}: {e}"),
                    Ok(()) => panic!("{name}: check() accepted it"),
                },
                _ => panic!("{name}: wanted {want:?}, parse gave {parsed:?}"),
            }
            fuzz_sip(&bytes);
        }
        Ok(())
    }

    #[test]
    fn corpus_round_trips_through_to_bytes() -> TestResult {
        let unlimited = Limits {
            max_message_bytes: usize::MAX,
            max_headers: usize::MAX,
        };
        for (name, _) in TABLE {
            let Ok(m) = parse(&corpus(name)?, &Limits::default()) else {
                continue;
            };
            let again = parse(&m.to_bytes(), &unlimited)?;
            let (mut a, mut b) = (again.clone(), m.clone());
            a.remove("content-length");
            b.remove("content-length");
            assert_eq!(a, b, "{name}");
            assert_eq!(
                again.header("content-length"),
                Some(m.body.len().to_string().as_str())
            );
        }
        Ok(())
    }

    #[test]
    fn wsinv_folding_and_whitespace() -> TestResult {
        let m = parse(&corpus("wsinv")?, &Limits::default())?;
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(
            m.header("to"),
            Some("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n")
        );
        assert_eq!(m.header("cseq"), Some("0009 INVITE"));
        assert_eq!(
            m.cseq(),
            Some(CSeq {
                seq: 9,
                method: "INVITE".into()
            })
        );
        assert_eq!(
            m.header("NewFangledHeader"),
            Some("newfangled value continued newfangled value")
        );
        assert_eq!(m.header("subject"), Some(""));
        assert_eq!(m.header("max-forwards"), Some("0068"));
        let vias = m.vias();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[0].transport, "UDP");
        assert_eq!(vias[0].host, "192.0.2.2");
        assert_eq!(vias[0].branch(), Some("390skdjuw"));
        assert_eq!(vias[1].transport, "TCP");
        assert_eq!(vias[1].host, "spindle.example.com");
        assert_eq!(vias[1].branch(), Some("z9hG4bK9ikj8"));
        assert_eq!(vias[2].host, "192.168.255.111");
        assert_eq!(vias[2].branch(), Some("z9hG4bK30239"));
        let to = m.to().ok_or("to")?;
        assert_eq!(to.tag(), Some("1918181833n"));
        assert_eq!(to.uri.user.as_deref(), Some("vivekg"));
        let from = m.from().ok_or("from")?;
        assert_eq!(from.display.as_deref(), Some("J Rosenberg \\\""));
        assert_eq!(from.tag(), Some("98asjd8"));
        let contact = NameAddr::parse(m.header("m").ok_or("contact")?).ok_or("contact")?;
        assert_eq!(contact.display.as_deref(), Some("Quoted string \"\""));
        assert_eq!(param(&contact.params, "newparam"), Some("newvalue"));
        assert!(has_param(&contact.params, "secondparam"));
        assert_eq!(param(&contact.params, "q"), Some("0.33"));
        assert_eq!(m.body.len(), 150);
        Ok(())
    }

    #[test]
    fn compact_forms() -> TestResult {
        let m = msg("MESSAGE sip:bob@example.org SIP/2.0\r\n\
            v: SIP/2.0/TCP client.example.com:5061;branch=z9hG4bK74b\r\n\
            f: <sip:alice@example.com>;tag=1\r\n\
            t: <sip:bob@example.org>\r\n\
            i: abc@client\r\n\
            CSeq: 1 MESSAGE\r\n\
            m: <sip:alice@client.example.com>\r\n\
            c: text/plain;charset=UTF-8\r\n\
            k: path, gruu\r\n\
            o: presence\r\n\
            L: 5\r\n\r\nhello")?;
        assert_eq!(m.check(), Ok(()));
        assert_eq!(m.call_id(), Some("abc@client"));
        assert_eq!(m.header("Via"), m.header("v"));
        assert_eq!(
            m.from().and_then(|f| f.tag().map(str::to_string)),
            Some("1".into())
        );
        assert_eq!(m.to().map(|t| t.uri.host), Some("example.org".into()));
        assert_eq!(m.list("Supported"), ["path", "gruu"]);
        assert_eq!(m.header("event"), Some("presence"));
        assert_eq!(m.header("CONTACT"), Some("<sip:alice@client.example.com>"));
        let ct = m.content_type().ok_or("content type")?;
        assert_eq!(ct.mime, "text/plain");
        assert_eq!(param(&ct.params, "charset"), Some("UTF-8"));
        assert_eq!(m.body, b"hello");
        assert_eq!(compact_form("Call-ID"), Some("i"));
        assert_eq!(compact_form("content-length"), Some("l"));
        assert_eq!(compact_form("V"), Some("v"));
        assert_eq!(compact_form("Identity"), Some("y"));
        assert_eq!(compact_form("Max-Forwards"), None);
        let mut m = m;
        m.remove("Content-Type");
        assert_eq!(m.header("c"), None);
        Ok(())
    }

    #[test]
    fn escapes_in_uris() -> TestResult {
        let m = parse(&corpus("esc01")?, &Limits::default())?;
        let ruri = Uri::parse(m.uri().ok_or("uri")?).ok_or("ruri")?;
        assert_eq!(ruri.user.as_deref(), Some("sips:user@example.com"));
        assert_eq!(ruri.host, "example.net");
        assert_eq!(
            ruri.to_string(),
            "sip:sips%3Auser%40example.com@example.net"
        );
        assert_eq!(
            ruri.address_of_record(),
            "sip:sips%3Auser%40example.com@example.net"
        );
        assert_eq!(m.to().and_then(|t| t.uri.user), Some("user".into()));
        assert_eq!(
            m.from().and_then(|f| f.uri.user),
            Some("I have spaces".into())
        );
        let contact = NameAddr::parse(m.header("contact").ok_or("contact")?).ok_or("contact")?;
        assert_eq!(contact.uri.user.as_deref(), Some("caller"));
        assert!(has_param(&contact.uri.params, "lr"));
        assert_eq!(param(&contact.uri.params, "name"), Some("value%41"));

        let semi = parse(&corpus("semiuri")?, &Limits::default())?;
        let ruri = Uri::parse(semi.uri().ok_or("uri")?).ok_or("ruri")?;
        assert_eq!(ruri.user.as_deref(), Some("user;par=u@example.net"));
        assert_eq!(ruri.host, "example.com");
        assert!(ruri.params.is_empty());

        let null = parse(&corpus("escnull")?, &Limits::default())?;
        assert_eq!(
            null.to().and_then(|t| t.uri.user),
            Some("null-\0-null".into())
        );
        // Escapes that do not decode to UTF-8 are refused.
        assert_eq!(Uri::parse("sip:%ff@example.com"), None);
        assert_eq!(Uri::parse("sip:a%4@example.com"), None);
        Ok(())
    }

    #[test]
    fn uri_grammar() {
        let u =
            Uri::parse("SIPS:Alice:secret@Example.COM:5061;Transport=TLS;lr?Subject=hi%20there&x=")
                .unwrap_or_else(|| panic!("parse"));
        assert_eq!(u.scheme, "sips");
        assert_eq!(u.user.as_deref(), Some("Alice"));
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.host, "example.com");
        assert_eq!(u.port, Some(5061));
        assert_eq!(param(&u.params, "transport"), Some("TLS"));
        assert!(has_param(&u.params, "lr"));
        assert_eq!(
            u.headers,
            [
                ("Subject".into(), "hi there".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(u.address_of_record(), "sip:Alice@example.com");
        assert_eq!(Uri::parse(&u.to_string()), Some(u));

        let tel = Uri::parse("tel:+1-201-555-0123").unwrap_or_else(|| panic!("tel"));
        assert_eq!(tel.opaque.as_deref(), Some("+1-201-555-0123"));
        assert!(!tel.is_sip());
        assert_eq!(tel.to_string(), "tel:+1-201-555-0123");
        assert!(Uri::parse("soap.beep://192.0.2.103:3002").is_some());

        for bad in [
            "",
            "sip:",
            "sip:@example.com",
            "<sip:a@example.com>",
            "sip:a@example.com:99999",
            "sip:a@example.com:",
            "sip:a@-bad.example.com",
            "sip:a@example.123",
            "sip:a@[::1",
            "sip:a@[zz::1]",
            "sip:a@example.com;;lr",
            "sip:a@example.com;=x",
            "sip:a@example.com?x",
            "sip:a b@example.com",
            "sip:a@example.com; lr",
            "1sip:x",
            "nobody:",
        ] {
            assert_eq!(Uri::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ipv6_hosts() -> TestResult {
        let u = Uri::parse("sip:alice@[2001:DB8::10]:5070;maddr=[2001:db8::1]").ok_or("uri")?;
        assert_eq!(u.host, "[2001:db8::10]");
        assert_eq!(u.port, Some(5070));
        assert_eq!(param(&u.params, "maddr"), Some("[2001:db8::1]"));
        assert_eq!(Uri::parse(&u.to_string()), Some(u));
        let via = Via::parse("SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bKas3-111;received=2001:db8::9:255;rport=5060")
            .ok_or("via")?;
        assert_eq!(via.host, "[2001:db8::9:1]");
        assert_eq!(via.port, Some(5060));
        assert_eq!(param(&via.params, "received"), Some("2001:db8::9:255"));
        assert_eq!(Via::parse(&via.to_string_value()), Some(via));
        assert!(Via::parse("SIP/2.0/UDP [2001:db8::9:1;branch=z9hG4bKx").is_none());
        assert!(Via::parse("SIP/2.0/UDP 2001:db8::9:1;branch=z9hG4bKx").is_none());
        let na = NameAddr::parse("<sip:[::1]>;tag=x").ok_or("name-addr")?;
        assert_eq!(na.uri.host, "[::1]");
        Ok(())
    }

    #[test]
    fn via_grammar() -> TestResult {
        let via = Via::parse(
            "SIP / 2.0 / tcp  Host.Example.com : 5060 ; branch = z9hG4bKa ; rport ; ttl=16",
        )
        .ok_or("via")?;
        assert_eq!(via.transport, "TCP");
        assert_eq!(via.host, "host.example.com");
        assert_eq!(via.port, Some(5060));
        assert_eq!(via.branch(), Some("z9hG4bKa"));
        assert!(has_param(&via.params, "rport"));
        assert_eq!(
            via.to_string_value(),
            "SIP/2.0/TCP host.example.com:5060;branch=z9hG4bKa;rport;ttl=16"
        );
        for bad in [
            "SIP/2.0/UDP",
            "SIP/2.0/UDPhost",
            "SIP/3.0/UDP host",
            "HTTP/2.0/UDP host",
            "SIP/2.0/UDP host;branch",
            "SIP/2.0/UDP host;received=example.com",
            "SIP/2.0/UDP host;ttl=256",
            "SIP/2.0/UDP host;;",
            "SIP/2.0/UDP host:70000",
            "SIP/2.0/UDP host extra",
        ] {
            assert_eq!(Via::parse(bad), None, "{bad}");
        }
        Ok(())
    }

    #[test]
    fn name_addr_grammar() -> TestResult {
        let na = NameAddr::parse(r#""A \"quoted\" \\ name" <sip:a@example.com;lr>;tag=x;q="0.5""#)
            .ok_or("name-addr")?;
        assert_eq!(na.display.as_deref(), Some(r#"A "quoted" \ name"#));
        assert!(has_param(&na.uri.params, "lr"));
        assert_eq!(na.tag(), Some("x"));
        assert_eq!(param(&na.params, "q"), Some("0.5"));
        assert_eq!(
            na.to_string_value(),
            r#""A \"quoted\" \\ name" <sip:a@example.com;lr>;tag=x;q=0.5"#
        );
        assert_eq!(NameAddr::parse(&na.to_string_value()), Some(na));

        let bare = NameAddr::parse("sip:a@example.com;tag=1").ok_or("addr-spec")?;
        assert!(bare.uri.params.is_empty());
        assert_eq!(bare.tag(), Some("1"));
        assert_eq!(bare.display, None);

        let tokens = NameAddr::parse("Alice  Smith <sip:a@example.com>").ok_or("tokens")?;
        assert_eq!(tokens.display.as_deref(), Some("Alice  Smith"));
        let glued = NameAddr::parse("caller<sip:caller@example.com>").ok_or("glued")?;
        assert_eq!(glued.display.as_deref(), Some("caller"));

        for bad in [
            "\"unterminated <sip:a@example.com>",
            "Bell, Alexander <sip:a@example.com>",
            "< sip:a@example.com >",
            "<sip:a@example.com",
            "sip:a@example.com?Route=x",
            "<sip:a@example.com>;;",
            "<sip:a@example.com>;tag=",
            "<sip:a@example.com> junk",
            "\"bad \r\" <sip:a@example.com>",
        ] {
            assert_eq!(NameAddr::parse(bad), None, "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn list_splitting() -> TestResult {
        let m = msg("OPTIONS sip:a@example.com SIP/2.0\r\n\
            Contact: \"Doe, John\" <sip:j@example.com;x=a,b>, <sip:k@example.com>;q=\"1,0\"\r\n\
            Contact: sip:l@example.com\r\n\
            Supported: timer,, path ,\r\n\
            Unbalanced: \"a, b\r\n\r\n")?;
        assert_eq!(
            m.list("contact"),
            [
                "\"Doe, John\" <sip:j@example.com;x=a,b>",
                "<sip:k@example.com>;q=\"1,0\"",
                "sip:l@example.com"
            ]
        );
        assert_eq!(m.list("supported"), ["timer", "path"]);
        assert_eq!(m.list("unbalanced"), ["\"a, b"]);
        assert_eq!(m.list("absent"), Vec::<&str>::new());
        Ok(())
    }

    #[test]
    fn start_lines() {
        let ok = |s: &str| msg(&format!("{s}\r\nContent-Length: 0\r\n\r\n"));
        assert!(matches!(
            ok("SIP/2.0 100 ").map(|m| m.start),
            Ok(Start::Response { code: 100, ref reason }) if reason.is_empty()
        ));
        assert!(matches!(
            ok("SIP/2.0 180").map(|m| m.start),
            Ok(Start::Response { code: 180, ref reason }) if reason.is_empty()
        ));
        assert!(matches!(
            ok("sip/2.0 486 Busy  Here").map(|m| m.start),
            Ok(Start::Response { code: 486, ref reason }) if reason == "Busy  Here"
        ));
        for bad in [
            "SIP/2.0 099 Low",
            "SIP/2.0 700 High",
            "SIP/2.0 20 OK",
            "SIP/2.0 2000 OK",
            "SIP/2.0 4294967301 big",
            "SIP/2.0 200 O\u{1}K",
            "SIP/2.1 200 OK",
            "SIP/2.0  200 OK",
            "INVITE sip:a@example.com SIP/2.1",
            "INVITE sip:a@example.com",
            "INVITE  sip:a@example.com SIP/2.0",
            "INVITE sip:a@example.com  SIP/2.0",
            "INVITE sip:a@example.com SIP/2.0 ",
            "INVITE sip:a@example.com\tSIP/2.0",
            "INV(ITE sip:a@example.com SIP/2.0",
            " INVITE sip:a@example.com SIP/2.0",
            "",
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn line_ends_and_limits() {
        let base = "OPTIONS sip:a@example.com SIP/2.0\r\nCall-ID: x\r\n";
        assert!(msg(&format!("{base}\r\n")).is_ok());
        // Bare LF or CR in the header block.
        assert!(msg("OPTIONS sip:a@example.com SIP/2.0\nCall-ID: x\r\n\r\n").is_err());
        assert!(msg("OPTIONS sip:a@example.com SIP/2.0\r\nCall-ID: x\ry: z\r\n\r\n").is_err());
        assert!(msg("OPTIONS sip:a@example.com SIP/2.0\n\n").is_err());
        // Header syntax.
        assert!(msg(&format!("{base}No colon here\r\n\r\n")).is_err());
        assert!(msg(&format!("{base}Bad Name: x\r\n\r\n")).is_err());
        assert!(msg(&format!("{base}: x\r\n\r\n")).is_err());
        assert!(msg("OPTIONS sip:a@example.com SIP/2.0\r\n folded: x\r\n\r\n").is_err());
        assert!(
            parse(
                b"OPTIONS sip:a@example.com SIP/2.0\r\nX: \xff\r\n\r\n",
                &Limits::default()
            )
            .is_err()
        );
        // Body bytes are opaque.
        let m = msg(&format!("{base}l: 3\r\n\r\n\n\r\0")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.body, b"\n\r\0");
        // Limits.
        let small = Limits {
            max_message_bytes: 50,
            max_headers: 2,
        };
        let three = format!("{base}A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(
            parse(three.as_bytes(), &small),
            Err(ParseError::TooLarge("message"))
        );
        let small = Limits {
            max_message_bytes: 1000,
            max_headers: 2,
        };
        assert_eq!(
            parse(three.as_bytes(), &small),
            Err(ParseError::TooLarge("header fields"))
        );
    }

    #[test]
    fn datagram_content_length() -> TestResult {
        let head = "MESSAGE sip:a@example.com SIP/2.0\r\n";
        // Missing: the body runs to the end.
        assert_eq!(msg(&format!("{head}\r\nhello"))?.body, b"hello");
        // Extra bytes are discarded.
        assert_eq!(
            msg(&format!("{head}Content-Length: 2\r\n\r\nhello"))?.body,
            b"he"
        );
        // Longer than what arrived, or beyond any size.
        assert!(msg(&format!("{head}Content-Length: 6\r\n\r\nhello")).is_err());
        assert!(
            msg(&format!(
                "{head}Content-Length: 99999999999999999999999\r\n\r\nhi"
            ))
            .is_err()
        );
        // Not a number, or repeated: parsed, refused by check().
        for cl in ["l: -1\r\n", "l: 1x\r\n", "l: 2\r\nl: 2\r\n", "l:\r\n"] {
            let m = msg(&format!("{head}{cl}\r\nhi"))?;
            assert_eq!(m.body, b"hi");
            let e = m.check().err().ok_or("check")?;
            assert!(
                e.0.contains("Content-Length") || e.0.contains("missing"),
                "{e}"
            );
        }
        Ok(())
    }

    const STREAM_MSG: &str = "MESSAGE sip:a@example.com SIP/2.0\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn frame_partial_input() {
        let l = Limits::default();
        let whole = STREAM_MSG.as_bytes();
        for n in 0..whole.len() {
            assert_eq!(frame(&whole[..n], &l), Ok(Frame::Need), "{n} bytes");
        }
        assert_eq!(frame(whole, &l), Ok(Frame::Message(whole.len())));
    }

    #[test]
    fn frame_keepalives() {
        let l = Limits::default();
        assert_eq!(frame(b"\r\n\r\n", &l), Ok(Frame::Keepalive(4)));
        assert_eq!(frame(b"\r\n\r\nINVITE", &l), Ok(Frame::Keepalive(4)));
        assert_eq!(frame(b"\r\n", &l), Ok(Frame::Keepalive(2)));
        assert_eq!(frame(b"\r\nINVITE", &l), Ok(Frame::Keepalive(2)));
        assert_eq!(frame(b"\r\n\rX", &l), Ok(Frame::Keepalive(2)));
        assert_eq!(frame(b"\r\n\r", &l), Ok(Frame::Need));
        assert_eq!(frame(b"\r", &l), Ok(Frame::Need));
        assert_eq!(frame(b"", &l), Ok(Frame::Need));
        let mut buf = b"\r\n\r\n".to_vec();
        buf.extend_from_slice(STREAM_MSG.as_bytes());
        assert_eq!(frame(&buf, &l), Ok(Frame::Keepalive(4)));
        assert_eq!(frame(&buf[4..], &l), Ok(Frame::Message(STREAM_MSG.len())));
    }

    #[test]
    fn frame_back_to_back_and_split_bodies() -> TestResult {
        let l = Limits::default();
        let second = "SIP/2.0 200 OK\r\nl: 0\r\n\r\n";
        let stream = format!("{STREAM_MSG}\r\n{second}{STREAM_MSG}");
        // Fed in every chunk size, the stream gives the same frames.
        for chunk in 1..=stream.len() {
            let mut buf: Vec<u8> = Vec::new();
            let mut got: Vec<Vec<u8>> = Vec::new();
            for piece in stream.as_bytes().chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match frame(&buf, &l)? {
                        Frame::Need => break,
                        Frame::Keepalive(n) => {
                            buf.drain(..n);
                        }
                        Frame::Message(n) => got.push(buf.drain(..n).collect()),
                    }
                }
            }
            assert!(buf.is_empty(), "chunk {chunk}: {} bytes left", buf.len());
            assert_eq!(
                got,
                [
                    STREAM_MSG.as_bytes(),
                    second.as_bytes(),
                    STREAM_MSG.as_bytes()
                ],
                "chunk {chunk}"
            );
            for m in &got {
                parse(m, &l)?;
            }
        }
        Ok(())
    }

    #[test]
    fn frame_refuses_what_is_not_sip_early() {
        let l = Limits::default();
        assert!(frame(b"GET / HTTP/1.1\r\nHost: x", &l).is_err());
        assert!(frame(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", &l).is_err());
        assert!(frame(b"INVITE sip:a@example.com SIP/2.0\nVia: x\r\n", &l).is_err());
        assert_eq!(
            frame(b"INVITE sip:a@example.com SIP/2.0\r\nVia", &l),
            Ok(Frame::Need)
        );
        assert_eq!(frame(b"GET / HTTP/1.1", &l), Ok(Frame::Need));
    }

    #[test]
    fn frame_errors() {
        let l = Limits {
            max_message_bytes: 100,
            max_headers: 8,
        };
        let head = "MESSAGE sip:a@example.com SIP/2.0\r\n";
        assert!(
            frame(format!("{head}\r\n").as_bytes(), &l).is_err(),
            "no length"
        );
        assert!(frame(format!("{head}l: -5\r\n\r\n").as_bytes(), &l).is_err());
        assert!(frame(format!("{head}l: 1\r\nl: 1\r\n\r\nx").as_bytes(), &l).is_err());
        assert!(frame(b"SIP/7.0 200 OK\r\nl: 0\r\n\r\n", &l).is_err());
        assert_eq!(
            frame(format!("{head}l: 57\r\n\r\n").as_bytes(), &l),
            Err(ParseError::TooLarge("declared Content-Length"))
        );
        assert_eq!(
            frame(
                format!("{head}l: 99999999999999999999999999\r\n\r\n").as_bytes(),
                &l
            ),
            Err(ParseError::TooLarge("declared Content-Length"))
        );
        assert_eq!(
            frame(format!("{head}l: 56\r\n\r\n").as_bytes(), &l),
            Ok(Frame::Need)
        );
        let endless = format!("{head}X: {}", "a".repeat(100));
        assert_eq!(
            frame(endless.as_bytes(), &l),
            Err(ParseError::TooLarge("header block"))
        );
        assert_eq!(frame(&endless.as_bytes()[..99], &l), Ok(Frame::Need));
    }

    #[test]
    fn to_bytes_writes_content_length_last() -> TestResult {
        let mut m = Message::request("MESSAGE", "sip:bob@example.org");
        m.push("Via", "SIP/2.0/TLS relay.example.com;branch=z9hG4bK1");
        m.push("l", "99");
        m.push("Call-ID", "a\r\nInjected: yes");
        m.body = b"hi".to_vec();
        let text = String::from_utf8(m.to_bytes())?;
        assert_eq!(
            text,
            "MESSAGE sip:bob@example.org SIP/2.0\r\n\
             Via: SIP/2.0/TLS relay.example.com;branch=z9hG4bK1\r\n\
             Call-ID: a  Injected: yes\r\n\
             Content-Length: 2\r\n\r\nhi"
        );
        let again = msg(&text)?;
        assert_eq!(again.header("injected"), None);
        Ok(())
    }

    #[test]
    fn response_copies_the_request() -> TestResult {
        let m = parse(&corpus("longreq")?, &Limits::default())?;
        let r = m.response(486, "", Some("srv1"));
        assert_eq!(r.code(), Some(486));
        assert!(matches!(&r.start, Start::Response { reason, .. } if reason == "Busy Here"));
        assert_eq!(r.list("via"), m.list("via"));
        assert_eq!(r.vias().len(), 34);
        assert_eq!(r.header("from"), m.header("from"));
        assert_eq!(r.header("call-id"), m.header("call-id"));
        assert_eq!(r.header("cseq"), m.header("cseq"));
        assert_eq!(
            r.to().and_then(|t| t.tag().map(str::to_string)),
            Some("srv1".into())
        );
        assert_eq!(r.header("contact"), None);
        let again = parse(&r.to_bytes(), &Limits::default())?;
        assert_eq!(again.check(), Ok(()));

        // A To that already has a tag keeps it; a custom reason is used as given.
        let tagged = parse(&corpus("lwsdisp")?, &Limits::default())?;
        let mut tagged = tagged;
        tagged.remove("to");
        tagged.push("To", "<sip:user@example.com>;tag=abc");
        let r = tagged.response(200, "Fine", Some("other"));
        assert_eq!(
            r.to().and_then(|t| t.tag().map(str::to_string)),
            Some("abc".into())
        );
        assert!(matches!(&r.start, Start::Response { reason, .. } if reason == "Fine"));
        let r = tagged.response(100, "", None);
        assert!(matches!(&r.start, Start::Response { reason, .. } if reason == "Trying"));
        Ok(())
    }

    #[test]
    fn check_rules() -> TestResult {
        let base = |extra: &str| {
            format!(
                "MESSAGE sip:bob@example.org SIP/2.0\r\n\
                 Via: SIP/2.0/TCP h.example.com;branch=z9hG4bKx\r\n\
                 From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.org>\r\n\
                 Call-ID: c1\r\nCSeq: 2 MESSAGE\r\n{extra}Content-Length: 0\r\n\r\n"
            )
        };
        assert_eq!(msg(&base(""))?.check(), Ok(()));
        for (extra, why) in [
            ("Max-Forwards: 256\r\n", "Max-Forwards"),
            (
                "Max-Forwards: 7\r\nMax-Forwards: 7\r\n",
                "several Max-Forwards",
            ),
            ("Expires: soon\r\n", "Expires"),
            ("Content-Type: text\r\n", "Content-Type"),
            ("Contact: *, <sip:x@example.com>\r\n", "Contact"),
            ("Date: Sat, 13 Nov 2010 23:29:00 PST\r\n", "Date"),
            ("Call-ID: c2\r\n", "several Call-ID"),
            ("Via: SIP/2.0/UDP h2;branch=z9hG4bK\r\n", "magic cookie"),
            ("v: SIP/2.0/UDP h2;branch=z9hG4bKy,\r\n", "Via"),
        ] {
            let e = msg(&base(extra))?.check().err().ok_or(extra)?;
            assert!(e.0.contains(why), "{extra}: {e}");
        }
        for extra in [
            "Max-Forwards: 0\r\n",
            "Expires: 99999999999999999999\r\n",
            "Contact: *\r\n",
            "Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n",
            "Content-Type: application/pidf+xml;charset=\"utf-8\"\r\n",
        ] {
            assert_eq!(msg(&base(extra))?.check(), Ok(()), "{extra}");
        }
        let big_cseq = base("").replace("CSeq: 2", "CSeq: 2147483648");
        assert!(msg(&big_cseq)?.check().is_err());
        let no_via = base("").replace("Via: SIP/2.0/TCP h.example.com;branch=z9hG4bKx\r\n", "");
        assert_eq!(msg(&no_via)?.check(), Err(SyntaxError("no Via".into())));
        Ok(())
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(202), "Accepted");
        assert_eq!(reason_phrase(415), "Unsupported Media Type");
        assert_eq!(reason_phrase(416), "Unsupported URI Scheme");
        assert_eq!(reason_phrase(420), "Bad Extension");
        assert_eq!(reason_phrase(423), "Interval Too Brief");
        assert_eq!(reason_phrase(481), "Call/Transaction Does Not Exist");
        assert_eq!(reason_phrase(482), "Loop Detected");
        assert_eq!(reason_phrase(483), "Too Many Hops");
        assert_eq!(reason_phrase(489), "Bad Event");
        assert_eq!(reason_phrase(494), "Security Agreement Required");
        assert_eq!(reason_phrase(499), "Client Error");
        assert_eq!(reason_phrase(42), "Unknown");
    }

    #[test]
    fn fuzz_entry_survives_odd_input() {
        for input in [
            &b""[..],
            b"\r\n\r\n\r\n",
            b"SIP/2.0 200 OK\r\nl: 0\r\n\r\nSIP/2.0 200 OK\r\nl: 99999\r\n\r\n",
            b"INVITE sip:a@[::1 SIP/2.0\r\nv: SIP/2.0/UDP [::1\r\n\r\n",
            b"MESSAGE sip:a@b SIP/2.0\r\nTo: \"\\\xc3\xa9\" <sip:x@y>\r\n\r\n",
            b"Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"sip:x\", response=\"00\"",
        ] {
            fuzz_sip(input);
        }
    }
}
