//! The Teams edge's handling of an untrusted Bot Framework activity body, and its HTML reader
//! and writer on the same bytes.
//! Run: `cargo fuzz run teams_activity` from `relay-node/` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = relay_node::edges::teams::inbound::fuzz_activity(data);
    relay_node::edges::teams::html::fuzz(data);
});
