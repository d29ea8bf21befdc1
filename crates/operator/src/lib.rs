//! nixpool-operator: reconciles NixBuilderPool resources into pools of Nix remote builders.
//!
//! The binary (`main.rs`) is `Cli::parse().run()`. The library exists so integration tests can
//! call the pure stages directly, e.g. `reconcile::validate::validate` against the same corpus of
//! specs the API server must refuse.

pub mod authorized_keys;
mod cache;
pub mod cli;
mod context;
mod crd_reference;
mod error;
mod hostkey;
mod http;
mod leader;
mod metrics;
pub mod reconcile;
mod render;
mod telemetry;
