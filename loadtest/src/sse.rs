//! An incremental Server-Sent Events parser (the `text/event-stream` format of the WHATWG
//! spec): feed it the body in chunks split anywhere, get back complete events.
//!
//! Lines end with `\n`, `\r\n` or `\r`; `:` lines are comments; `id:`, `event:` and `data:`
//! fields (one optional space after the colon is dropped); several `data:` lines join with
//! `\n`; a blank line dispatches the event. An event with no `data` is not dispatched.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` of this event, if it had one.
    pub id: Option<String>,
    /// The `event:` name, `message` when absent.
    pub event: String,
    /// The joined `data:` lines.
    pub data: String,
}

/// Incremental parser state.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a leading `\n` of the next chunk belongs to it.
    skip_lf: bool,
    /// Still at the very start of the stream (a UTF-8 BOM may be skipped).
    started: bool,
    id: Option<String>,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// The last `id:` seen in the stream (what `Last-Event-ID` should carry on reconnect).
    last_id: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last event id seen, to send as `Last-Event-ID` when reconnecting.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Forgets a partly received line and event (after the connection dropped), keeping the
    /// last event id.
    pub fn reset_connection(&mut self) {
        self.line.clear();
        self.skip_lf = false;
        self.started = false;
        self.clear_event();
    }

    /// Feeds a chunk, returning the events it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.started && !chunk.is_empty() {
            // Strip a BOM only if it arrives whole at the start; good enough for a harness.
            if let Some(rest) = chunk.strip_prefix(b"\xEF\xBB\xBF") {
                chunk = rest;
            }
            self.started = true;
        }
        if self.skip_lf {
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
                self.skip_lf = false;
            } else if !chunk.is_empty() {
                self.skip_lf = false;
            }
        }
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&chunk[..pos]);
            let is_cr = chunk[pos] == b'\r';
            chunk = &chunk[pos + 1..];
            if is_cr {
                if let Some(rest) = chunk.strip_prefix(b"\n") {
                    chunk = rest;
                } else if chunk.is_empty() {
                    self.skip_lf = true;
                }
            }
            let line = std::mem::take(&mut self.line);
            if let Some(ev) = self.process_line(&line) {
                out.push(ev);
            }
        }
        self.line.extend_from_slice(chunk);
        out
    }

    fn clear_event(&mut self) {
        self.id = None;
        self.event = None;
        self.data.clear();
        self.has_data = false;
    }

    fn process_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            if !self.has_data {
                self.clear_event();
                return None;
            }
            let ev = SseEvent {
                id: self.id.take(),
                event: self.event.take().unwrap_or_else(|| "message".to_owned()),
                data: std::mem::take(&mut self.data),
            };
            self.has_data = false;
            return Some(ev);
        }
        if line[0] == b':' {
            return None;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.event = Some(value.into_owned()),
            b"id" if !value.contains('\0') => {
                self.id = Some(value.to_string());
                self.last_id = Some(value.into_owned());
            }
            _ => {} // `retry` and unknown fields are ignored.
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": hello\n\
        id: 1732350000123-0\n\
        event: message\n\
        data: {\"session_id\": \"a\", \"seq\": 7}\n\
        \n\
        :keepalive\n\
        \n\
        id: 1732350000124-0\n\
        data: line1\n\
        data:line2\n\
        retry: 100\n\
        \n\
        event: ping\n\
        \n\
        data\n\
        \n";

    fn expected() -> Vec<SseEvent> {
        vec![
            SseEvent {
                id: Some("1732350000123-0".into()),
                event: "message".into(),
                data: "{\"session_id\": \"a\", \"seq\": 7}".into(),
            },
            SseEvent {
                id: Some("1732350000124-0".into()),
                event: "message".into(),
                data: "line1\nline2".into(),
            },
            SseEvent {
                id: None,
                event: "message".into(),
                data: String::new(),
            },
        ]
    }

    fn feed_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, SseParser) {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &c in cuts {
            out.extend(p.push(&input[start..c]));
            start = c;
        }
        out.extend(p.push(&input[start..]));
        (out, p)
    }

    #[test]
    fn whole_stream() {
        let (ev, p) = feed_in_pieces(STREAM.as_bytes(), &[]);
        assert_eq!(ev, expected());
        assert_eq!(p.last_id(), Some("1732350000124-0"));
    }

    #[test]
    fn every_single_and_double_split_point() {
        for sep in ["\n", "\r\n", "\r"] {
            let input = STREAM.replace('\n', sep);
            let bytes = input.as_bytes();
            for a in 0..=bytes.len() {
                let (ev, _) = feed_in_pieces(bytes, &[a]);
                assert_eq!(ev, expected(), "sep {sep:?} cut at {a}");
            }
            for a in (0..=bytes.len()).step_by(3) {
                for b in a..=bytes.len() {
                    let (ev, _) = feed_in_pieces(bytes, &[a, b]);
                    assert_eq!(ev, expected(), "sep {sep:?} cuts at {a},{b}");
                }
            }
        }
    }

    #[test]
    fn byte_by_byte_with_crlf() {
        let input = STREAM.replace('\n', "\r\n");
        let cuts: Vec<usize> = (1..input.len()).collect();
        let (ev, _) = feed_in_pieces(input.as_bytes(), &cuts);
        assert_eq!(ev, expected());
    }

    #[test]
    fn incomplete_event_is_held_and_reset_drops_it() {
        let mut p = SseParser::new();
        assert!(p.push(b"id: 5\ndata: x\n").is_empty());
        assert_eq!(p.last_id(), Some("5"));
        p.reset_connection();
        let ev = p.push(b"\ndata: y\n\n");
        assert_eq!(
            ev,
            vec![SseEvent {
                id: None,
                event: "message".into(),
                data: "y".into()
            }]
        );
        assert_eq!(p.last_id(), Some("5"));
    }

    #[test]
    fn bom_and_utf8_split() {
        let input = "\u{feff}data: héllo\n\n".as_bytes();
        // Cut inside the two-byte 'é'.
        let cut = input.iter().position(|&b| b == 0xC3).map(|p| p + 1);
        let (ev, _) = feed_in_pieces(input, &[cut.unwrap_or(0)]);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data, "héllo");
    }

    #[test]
    fn id_with_nul_is_ignored() {
        let mut p = SseParser::new();
        let ev = p.push(b"id: a\0b\ndata: z\n\n");
        assert_eq!(ev[0].id, None);
        assert_eq!(p.last_id(), None);
    }
}
