//! The builder harness lives in `nixpool_testenv::builder` (builderctl's tests use it too).
#![allow(unused_imports, dead_code)]

pub use nixpool_testenv::builder::*;

/// This package's agent binary.
pub const AGENT: &str = env!("CARGO_BIN_EXE_nixpool-agent");
