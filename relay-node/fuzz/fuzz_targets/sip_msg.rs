//! The SIP edge's message parser on untrusted datagrams and stream bytes: framing, parsing,
//! header checks, typed views, serialization round trips and digest credentials.
//! Run: `cargo fuzz run sip_msg` from `relay-node/` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_node::edges::sip::msg::fuzz_sip(data));
