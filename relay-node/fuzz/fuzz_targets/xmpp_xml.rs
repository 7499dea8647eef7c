//! The XMPP edge's streaming XML parser on an untrusted s2s stream, fed in chunks.
//! Run: `cargo fuzz run xmpp_xml` from `relay-node/` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_node::edges::xmpp::xml::fuzz_xml(data));
