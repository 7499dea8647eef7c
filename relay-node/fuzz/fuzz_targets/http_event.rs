//! The HTTP edge's handling of an untrusted event body (and signature headers).
//! Run: `cargo fuzz run http_event` from `relay-node/` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = relay_node::edges::http::codec::fuzz_event(data);
});
