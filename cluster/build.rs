//! No code generation here: the build script exists so that its build-dependency,
//! `protoc-bin-vendored`, is part of the build graph — cargo then brings that crate's
//! `protoc` binary into its registry before etcd-client's build script runs it (through
//! `tools/protoc`, see `.cargo/config.toml`), and nobody needs a system `protoc`.
fn main() {}
