//! The fuzz target's code under a quick deterministic mutation run, so every test run
//! exercises the parser with hostile input (the coverage-guided run is `cargo fuzz`; see
//! docs/fuzzing.md). A panic fails the test.

use relay_node::edges::http::codec::fuzz_event;

fn seeds() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/http_event");
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

#[test]
fn seeds_are_valid_events() {
    let seeds = seeds();
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
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut valid = 0;
    for i in 0..30_000 {
        let input = mutate(&mut rng, &seeds[i % seeds.len()]);
        if fuzz_event(&input) {
            valid += 1;
        }
    }
    // Mutations must reach deep code, not only the JSON parser.
    assert!(valid > 500, "only {valid} mutated inputs were valid events");
}
