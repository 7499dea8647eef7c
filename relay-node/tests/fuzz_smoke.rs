//! The fuzz targets' code under a quick deterministic mutation run, so every test run
//! exercises the parsers with hostile input (the coverage-guided run is `cargo fuzz`; see
//! docs/fuzzing.md). A panic fails the test.

use relay_node::edges::http::codec::fuzz_event;
use relay_node::edges::sip::msg::{self as sip_msg, fuzz_sip};
use relay_node::edges::teams::{html, inbound::fuzz_activity};
use relay_node::edges::xmpp::xml::{Event, Limits, Parser, fuzz_xml};

/// The seed corpus of a fuzz target (`fuzz/corpus/<target>`), sorted.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The seed corpus of a fuzz target with the file names, sorted by name.
fn named_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let data = std::fs::read(e.path()).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), data))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\\u0000",
    b"\\ud800",
    b"\xff",
    b"\xf0\x9f",
    b"@",
    b"\n",
    b"\"\"",
    b"{\"text\":\"x\"}",
    b"\"extra\":1,",
    b"<",
    b">",
    b"</",
    b"<at>",
    b"&amp;",
    b"&#x",
    b"<blockquote itemid=",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        let pos = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let p = pos.min(v.len() - 1);
                v[p] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(pos..pos, t.iter().copied());
            }
            2 => v.truncate(pos),
            3 if !v.is_empty() => {
                let end = (pos + rng.below(16)).min(v.len());
                v.drain(pos.min(end)..end);
            }
            _ => {
                let chunk: Vec<u8> = v[pos.min(v.len())..].iter().take(32).copied().collect();
                v.splice(pos..pos, chunk);
            }
        }
    }
    v
}

/// Runs `check` on 30,000 deterministic mutations of the seeds; returns how many it accepted.
fn mutation_run(seeds: &[Vec<u8>], check: impl Fn(&[u8]) -> bool) -> usize {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..30_000)
        .filter(|i| check(&mutate(&mut rng, &seeds[i % seeds.len()])))
        .count()
}

#[test]
fn seeds_are_valid_events() {
    let seeds = seeds("http_event");
    assert!(seeds.len() >= 9, "corpus missing");
    for s in &seeds {
        assert!(
            fuzz_event(s),
            "seed rejected: {}",
            String::from_utf8_lossy(s)
        );
    }
}

#[test]
fn mutated_events_never_panic() {
    let valid = mutation_run(&seeds("http_event"), fuzz_event);
    // Mutations must reach deep code, not only the JSON parser.
    assert!(valid > 500, "only {valid} mutated inputs were valid events");
}

#[test]
fn teams_seeds_are_valid_activities() {
    let seeds = seeds("teams_activity");
    assert!(seeds.len() >= 10, "corpus missing");
    for s in &seeds {
        assert!(
            fuzz_activity(s),
            "seed rejected: {}",
            String::from_utf8_lossy(s)
        );
    }
}

#[test]
fn mutated_teams_activities_never_panic() {
    let valid = mutation_run(&seeds("teams_activity"), |input| {
        html::fuzz(input);
        fuzz_activity(input)
    });
    // Mutations must reach the HTML reader and the commands, not only the JSON parser.
    assert!(
        valid > 2_000,
        "only {valid} mutated inputs were valid activities"
    );
}

/// What the XMPP parser makes of an `xmpp_xml` fuzz input (first byte: chunk size and, with
/// its high bit, the small limits `fuzz_xml` uses): the stanzas read, and whether it failed.
fn xmpp_outcome(input: &[u8]) -> (usize, bool) {
    let Some((&sel, stream)) = input.split_first() else {
        return (0, false);
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
    let mut p = Parser::new(limits);
    p.feed(stream);
    let mut stanzas = 0;
    loop {
        match p.next_event() {
            Ok(Some(Event::Stanza(_))) => stanzas += 1,
            Ok(Some(_)) => {}
            Ok(None) => return (stanzas, false),
            Err(_) => return (stanzas, true),
        }
    }
}

#[test]
fn xmpp_seeds_are_valid_streams_or_refused() {
    let seeds = named_seeds("xmpp_xml");
    assert!(seeds.len() >= 15, "corpus missing");
    for (name, s) in &seeds {
        fuzz_xml(s);
        let (stanzas, failed) = xmpp_outcome(s);
        if name.starts_with("hostile_") {
            assert!(failed, "hostile seed accepted: {name}");
        } else {
            assert!(!failed && stanzas > 0, "seed rejected: {name}");
        }
    }
}

#[test]
fn mutated_xmpp_streams_never_panic() {
    let valid = mutation_run(&seeds("xmpp_xml"), |input| {
        fuzz_xml(input);
        xmpp_outcome(input).0 > 0
    });
    // Mutations must get stanzas through the parser, not only fail on the header.
    assert!(valid > 4_000, "only {valid} mutated inputs gave stanzas");
}

/// Tokens that reach the SIP parser's corners: line ends and folding, separators, quoting,
/// escapes, IPv6 brackets, compact headers, Content-Length values and digest parameters.
const SIP_TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n ",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"=",
    b"\"",
    b"\\",
    b"<",
    b">",
    b"@",
    b"%",
    b"%00",
    b"%4",
    b"%ff",
    b"[",
    b"]",
    b"?",
    b"\xff",
    b"\xc3\xa9",
    b"SIP/2.0",
    b"SIP/2.0 200 OK\r\n",
    b"sip:",
    b"sips:a@[2001:db8::1]:5061",
    b";tag=",
    b";branch=z9hG4bK",
    b";lr",
    b"z9hG4bK",
    b"v: SIP/2.0/TCP h.example.com;branch=z9hG4bKm\r\n",
    b"i: x@y\r\n",
    b"CSeq: 1 MESSAGE\r\n",
    b"l: 0\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n",
    b"l: 18446744073709551616\r\n",
    b"Max-Forwards: 256\r\n",
    b"Contact: *\r\n",
    b"Digest ",
    b"realm=\"r\", nonce=\"n\", ",
    b"algorithm=SHA-256",
    b"qop=\"auth\"",
];

/// One to five random edits of a SIP seed: a bit flip, a SIP token inserted, a cut, a
/// deletion or a repeated run.
fn sip_mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        let pos = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let p = pos.min(v.len() - 1);
                v[p] ^= 1 << rng.below(8);
            }
            1 | 2 => {
                let t = SIP_TOKENS[rng.below(SIP_TOKENS.len())];
                v.splice(pos..pos, t.iter().copied());
            }
            3 if rng.below(4) == 0 => v.truncate(pos),
            4 if !v.is_empty() => {
                let end = (pos + rng.below(16)).min(v.len());
                v.drain(pos.min(end)..end);
            }
            _ => {
                let chunk: Vec<u8> = v[pos.min(v.len())..].iter().take(32).copied().collect();
                v.splice(pos..pos, chunk);
            }
        }
    }
    v
}

/// The messages `frame` cuts off a stream holding `input`, each parsed and checked.
fn sip_stream(input: &[u8]) -> Vec<Result<(), String>> {
    let limits = sip_msg::Limits::default();
    let mut buf = input;
    let mut out = Vec::new();
    loop {
        match sip_msg::frame(buf, &limits) {
            Ok(sip_msg::Frame::Keepalive(n)) => buf = &buf[n..],
            Ok(sip_msg::Frame::Message(n)) => {
                out.push(
                    sip_msg::parse(&buf[..n], &limits)
                        .map_err(|e| e.to_string())
                        .and_then(|m| m.check().map_err(|e| e.to_string())),
                );
                buf = &buf[n..];
            }
            Ok(sip_msg::Frame::Need) | Err(_) => return out,
        }
    }
}

#[test]
fn sip_seeds_are_valid_messages_or_torture_tests() {
    let seeds = named_seeds("sip_msg");
    // The 50 RFC 4475 messages and the valid_* seeds.
    assert!(seeds.len() >= 58, "corpus missing");
    let limits = sip_msg::Limits::default();
    for (name, s) in &seeds {
        fuzz_sip(s);
        if name == "valid_stream.sip" {
            let frames = sip_stream(s);
            assert_eq!(frames.len(), 3, "{name}");
            assert!(frames.iter().all(Result::is_ok), "{name}: {frames:?}");
        } else if name.starts_with("valid_") {
            match sip_msg::parse(s, &limits) {
                Ok(m) => assert_eq!(m.check(), Ok(()), "{name}"),
                Err(e) => panic!("seed rejected: {name}: {e}"),
            }
            assert_eq!(
                sip_msg::frame(s, &limits),
                Ok(sip_msg::Frame::Message(s.len())),
                "{name}"
            );
        }
    }
}

#[test]
fn mutated_sip_messages_never_panic() {
    let seeds = seeds("sip_msg");
    let limits = sip_msg::Limits::default();
    let mut rng = Rng(0x5eed_5195_2f1a_0d17);
    let (mut parsed, mut checked) = (0, 0);
    for i in 0..30_000 {
        let input = sip_mutate(&mut rng, &seeds[i % seeds.len()]);
        fuzz_sip(&input);
        if let Ok(m) = sip_msg::parse(&input, &limits) {
            parsed += 1;
            if m.check().is_ok() {
                checked += 1;
            }
        }
    }
    // Mutations must get past the parser into the header checks and the round trips.
    assert!(parsed > 8_000, "only {parsed} mutated inputs parsed");
    assert!(
        checked > 2_000,
        "only {checked} mutated inputs passed check()"
    );
}
