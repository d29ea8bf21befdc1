//! Issue 14, goal 1 (docs/reliability.md, section 1): the operator killed with SIGKILL at random
//! moments while pools are created, scaled and deleted, and restarted each time. Every pool
//! converges every time, no host key is regenerated, no child is orphaned and nothing is
//! rewritten once converged. 5 kills in CI, 50 with `NIXPOOL_LONG=1`; `NIXPOOL_SEED` replays a
//! run.

mod common;
mod fleet;

use std::time::{Duration, Instant};

use common::*;
use fleet::{Fleet, assert_unchanged};

const POOLS: usize = 20;
/// Far more than a converging restart takes (a few seconds); a wedged pool fails the run.
const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn the_operator_killed_at_random_moments_always_converges_and_rewrites_nothing() {
    let cp = control_plane();
    let ns = cp.namespace("kills").await.unwrap();
    let client = cp.client().await.unwrap();
    let seed = fleet::seed();
    let kills = fleet::rounds(5, 50);
    let mut fleet = Fleet::new(&client, &ns, seed);
    let mut op = Operator::start(cp, &ns);
    for _ in 0..POOLS {
        fleet.create().await;
    }
    // The first kill lands while the 20 pools are being created.
    let mut converge_times = Vec::new();
    let mut before = None;
    for round in 1..=kills {
        let mut changes = Vec::new();
        if round > 1 {
            for _ in 0..fleet.rng.usize(0..=2) {
                changes.push(fleet.change(POOLS - 1).await);
            }
        }
        let after_ms = fleet.rng.u64(0..3000);
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        op.kill();
        let killed = Instant::now();
        op = Operator::start(cp, &ns);
        let when = format!(
            "kill {round}/{kills} (seed {seed}, {after_ms} ms after [{}])",
            changes.join(", ")
        );
        let took = fleet.wait_converged(CONVERGE, &when).await;
        let since_kill = killed.elapsed();
        let now = fleet.snapshot().await;
        let compared = before.as_ref().map_or(0, |b| assert_unchanged(b, &now, &when));
        eprintln!(
            "{when}: converged {:.1} s after the restart; {} pools, {compared} host keys unchanged",
            took.as_secs_f64(),
            now.host_keys.len()
        );
        converge_times.push(since_kill);
        // A restart after convergence must not write either: the same snapshot after the new
        // operator has looked at every pool.
        before = Some(now);
    }
    // The last operator, left to run, rewrites nothing either.
    op.settle(Duration::from_secs(3)).await;
    assert_unchanged(before.as_ref().unwrap(), &fleet.snapshot().await, "after the last kill");
    fleet.wait_converged(CONVERGE, "after the last kill").await;
    converge_times.sort();
    eprintln!(
        "{kills}/{kills} kills converged; after a restart: median {:.1} s, max {:.1} s",
        converge_times[converge_times.len() / 2].as_secs_f64(),
        converge_times[converge_times.len() - 1].as_secs_f64()
    );
}
