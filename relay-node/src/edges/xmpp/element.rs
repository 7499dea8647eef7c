//! XML elements as the XMPP edge handles them: a namespace-resolved tree (one stanza), built
//! by the parser (`xml`) or by hand, and written back out with the escaping XML needs.

use std::fmt::Write as _;

/// A child of an element: another element or character data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// One element with its resolved namespace. Attribute names are as written, without
/// namespace resolution (`xml:lang` stays `xml:lang`); namespace declarations are not kept
/// as attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub name: String,
    pub ns: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

impl Element {
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder: sets an attribute (an empty value is left out).
    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.set_attr(name, value);
        }
        self
    }

    /// Builder: appends a child element.
    pub fn child(mut self, c: Element) -> Self {
        self.children.push(Node::Element(c));
        self
    }

    /// Builder: appends character data.
    pub fn text(mut self, t: impl Into<String>) -> Self {
        let t = t.into();
        if !t.is_empty() {
            self.children.push(Node::Text(t));
        }
        self
    }

    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.attrs.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value,
            None => self.attrs.push((name.to_string(), value)),
        }
    }

    pub fn get_attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The first child element named `name` in `ns`.
    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// The child elements, in order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|c| match c {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The character data directly inside this element.
    pub fn text_content(&self) -> String {
        let mut s = String::new();
        for c in &self.children {
            if let Node::Text(t) = c {
                s.push_str(t);
            }
        }
        s
    }

    /// The text of the child `name` in `ns`, if there is one.
    pub fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        self.get_child(name, ns).map(Element::text_content)
    }

    /// The element as XML, declaring its namespace where it differs from `parent_ns`.
    pub fn write(&self, out: &mut String, parent_ns: &str) {
        out.push('<');
        out.push_str(&self.name);
        if self.ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(out, &self.ns, true);
            out.push('\'');
        }
        for (n, v) in &self.attrs {
            let _ = write!(out, " {n}='");
            escape_into(out, v, true);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for c in &self.children {
            match c {
                Node::Element(e) => e.write(out, &self.ns),
                Node::Text(t) => escape_into(out, t, false),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }

    /// The element as XML inside a stream whose default namespace is `stream_ns`.
    pub fn to_xml(&self, stream_ns: &str) -> String {
        let mut s = String::with_capacity(256);
        self.write(&mut s, stream_ns);
        s
    }
}

/// Escapes text (`attr`: for a single-quoted attribute value).
pub fn escape_into(out: &mut String, s: &str, attr: bool) {
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' if attr => out.push_str("&apos;"),
            '"' if attr => out.push_str("&quot;"),
            // Whitespace a parser would normalise: kept as references so it survives.
            '\t' if attr => out.push_str("&#9;"),
            '\n' if attr => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            // Characters XML 1.0 cannot carry at all are dropped, never sent.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            '\u{FFFE}' | '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s, true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_namespaces_only_where_they_change_and_escapes() {
        let e = Element::new("message", "jabber:server")
            .attr("to", "a@b")
            .attr("id", "x'<")
            .child(Element::new("body", "jabber:server").text("1 < 2 & \u{1} 'q'"))
            .child(Element::new(
                "active",
                "http://jabber.org/protocol/chatstates",
            ));
        assert_eq!(
            e.to_xml("jabber:server"),
            "<message to='a@b' id='x&apos;&lt;'><body>1 &lt; 2 &amp;  'q'</body>\
             <active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        );
        assert_eq!(
            e.child_text("body", "jabber:server").as_deref(),
            Some("1 < 2 & \u{1} 'q'")
        );
        assert!(
            e.get_child("active", "http://jabber.org/protocol/chatstates")
                .is_some()
        );
        assert!(e.get_child("active", "jabber:server").is_none());
    }
}
