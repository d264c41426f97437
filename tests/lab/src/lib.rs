//! The mesh lab, one library for `cargo xtask lab` and the tests: Docker
//! engines in network namespaces ([`engine`]), an underlay bridge joining
//! them ([`underlay`]), the images they run ([`image`]) and the agent run
//! as a container exactly as on a real host ([`agent`]).
//!
//! Errors are `anyhow` (this is tooling: a person reads them); the tests
//! wrap the calls in panics with context.

pub mod agent;
pub mod cmd;
pub mod demo;
pub mod engine;
pub mod image;
pub mod underlay;
pub mod vagrant;
pub mod whoami;

/// A random 32-byte cluster key as 64 hex digits.
pub fn random_key() -> anyhow::Result<String> {
    let mut k = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut k)?;
    Ok(k.iter().map(|b| format!("{b:02x}")).collect())
}
