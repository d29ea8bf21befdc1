//! Shared pieces of the operator's tests: `nixpool_testenv::harness` with this package's binary.

#![allow(dead_code)]

use nixpool_testenv::ControlPlane;
pub use nixpool_testenv::harness::*;

pub const OPERATOR: &str = env!("CARGO_BIN_EXE_nixpool-operator");

pub trait OperatorHere {
    fn start(cp: &ControlPlane, ns: &str) -> Operator;
    fn start_named(cp: &ControlPlane, ns: &str, name: &str) -> Operator;
    fn start_with(cp: &ControlPlane, ns: &str, name: &str, extra: &[&str]) -> Operator;
    fn spawn_here(kubeconfig: &std::path::Path, log_prefix: &std::path::Path, args: &[&str]) -> Operator;
}

impl OperatorHere for Operator {
    fn start(cp: &ControlPlane, ns: &str) -> Operator {
        Self::start_named(cp, ns, "op")
    }

    fn start_named(cp: &ControlPlane, ns: &str, name: &str) -> Operator {
        Self::start_with(cp, ns, name, &["--resync-seconds", "3600"])
    }

    fn start_with(cp: &ControlPlane, ns: &str, name: &str, extra: &[&str]) -> Operator {
        Operator::start_in(OPERATOR.as_ref(), cp, ns, name, extra)
    }

    fn spawn_here(kubeconfig: &std::path::Path, log_prefix: &std::path::Path, args: &[&str]) -> Operator {
        Operator::spawn(OPERATOR.as_ref(), kubeconfig, log_prefix, args)
    }
}
