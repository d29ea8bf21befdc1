//! A key holder attacks a builder (real sshd and Nix 2.8's nix-daemon, through the agent's gate):
//! hostile client settings sent by a worker-protocol client and by Nix's CLI, build hooks, a GC
//! root over nix.conf, an unsigned upload. Each fails or does no harm, shown by a uid or a file.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn a_key_holder_builds_in_the_sandbox_and_gets_nothing_more() {
    let mut b = Builder::new(&config("attack"));
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    nixpool_testenv::attack::run_all(&b);
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));
}
