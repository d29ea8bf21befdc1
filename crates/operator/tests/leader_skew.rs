//! Two operator processes whose wall clocks are 12 s apart (reliability scenario 3 of
//! docs/reliability.md). The Lease's `renewTime` is written by the leader's clock, so a standby
//! that judged expiry by it would take a renewed Lease 3 s after a renewal when its own clock runs
//! 12 s ahead: two leaders. `leader.rs` judges expiry by the standby's monotonic clock since it
//! last saw the record change, so neither direction of skew gives a split brain. `faketime`
//! (libfaketime) moves one process's wall clock.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nixpool_api::NixBuilderPool;

const MIN: Duration = Duration::from_secs(60);

/// A script that runs this package's `nixpool-operator` with its wall clock `offset_seconds`
/// away, through libfaketime preloaded (the `faketime` command would fork, and the test must be
/// able to kill the operator itself); its monotonic clock is left alone.
fn operator_with_clock(dir: &Path, offset_seconds: i64) -> PathBuf {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    assert!(
        lib.is_file(),
        "{} is missing: apt-get install faketime (hack/setup.sh does)",
        lib.display()
    );
    let script = dir.join(format!("nixpool-operator-clock{offset_seconds:+}"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nLD_PRELOAD={} FAKETIME='{offset_seconds:+}s' FAKETIME_DONT_FAKE_MONOTONIC=1 exec '{OPERATOR}' \"$@\"\n",
            lib.display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    script
}

/// How far ahead of this process's clock the Lease's `renewTime` is, in seconds: the skew of
/// the replica that last renewed it, less the time since (at most a 2 s renew interval).
async fn renew_time_ahead(leases: &Api<Lease>, name: &str) -> f64 {
    let lease = leases.get(name).await.unwrap();
    let renewed = lease.spec.unwrap().renew_time.unwrap().0;
    (renewed - jiff::Timestamp::now()).total(jiff::Unit::Second).unwrap()
}

async fn leads(op: &Operator) -> bool {
    op.counter("nixpool_operator_leader", "").await == 1.0
}

#[tokio::test]
async fn replicas_whose_clocks_are_12_s_apart_never_lead_at_once() {
    let cp = control_plane();
    let ns = cp.namespace("skew").await.unwrap();
    let client = cp.client().await.unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("skew-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    run(cp
        .kubectl()
        .args(["apply", "-n", &ns, "-f", &format!("{REPO}/examples/minimal.yaml")]));
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);

    // The standby's clock 12 s ahead of the leader's (a naive standby sees every renewal as 12 s
    // old), then the leader's 12 s ahead (a naive standby sees renewals from the future).
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    for (round, (leader_clock, standby_clock)) in [(0, 12), (12, 0)].into_iter().enumerate() {
        let lease = format!("skew-{round}");
        let args = ["--resync-seconds", "3600", "--lease-name", &lease];
        let mut leader = Operator::start_in(
            &operator_with_clock(&dir, leader_clock),
            cp,
            &ns,
            &format!("leader-{round}"),
            &args,
        );
        eventually(MIN, "the first replica leads", || async {
            leads(&leader).await.then_some(())
        })
        .await;
        observed(&pools, "builders").await;
        let ahead = renew_time_ahead(&leases, &lease).await;
        assert!(
            (ahead - leader_clock as f64).abs() < 3.0,
            "round {round}: the leader's clock is {ahead:.1} s ahead, not {leader_clock} s: is libfaketime working?"
        );
        let standby = Operator::start_in(
            &operator_with_clock(&dir, standby_clock),
            cp,
            &ns,
            &format!("standby-{round}"),
            &args,
        );
        eventually(MIN, "the second replica stands by", || async {
            standby
                .log_text()
                .contains("another replica leads; standing by")
                .then_some(())
        })
        .await;

        // 20 s, more than the 15 s lease (a naive standby whose clock is 12 s ahead would take
        // the Lease 3 s after a renewal): sampled every 250 ms, never two leaders.
        let watched = Instant::now();
        let mut samples = 0;
        while watched.elapsed() < Duration::from_secs(20) {
            let (l, s) = (leads(&leader).await, leads(&standby).await);
            assert!(
                l,
                "round {round}: the leader ({leader_clock:+} s) lost the Lease it renews"
            );
            assert!(
                !s,
                "round {round}: the standby ({standby_clock:+} s) took a Lease the leader ({leader_clock:+} s) renews: two leaders\n{}",
                standby.log_text()
            );
            samples += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let watched = watched.elapsed();
        assert_eq!(standby.writes().await, 0.0, "round {round}: the standby wrote");
        assert_eq!(standby.reconciles().await, 0.0, "round {round}: the standby reconciled");

        // The leader killed outright (it gives nothing up): the standby takes over once the
        // record has not changed for the lease's 15 s by its own clock, and then writes.
        let killed = Instant::now();
        leader.kill();
        eventually(Duration::from_secs(40), "the standby leads", || async {
            leads(&standby).await.then_some(())
        })
        .await;
        let took = killed.elapsed();
        assert!(
            took >= Duration::from_secs(12),
            "round {round}: the standby took over {took:?} after the leader died, before its last renewal (at most 2 s before) could expire"
        );
        let patch = serde_json::json!({"spec": {"replicas": 3 + round}});
        pools
            .patch("builders", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        eventually(MIN, "the new leader writes", || async {
            (standby.writes().await > 0.0).then_some(())
        })
        .await;
        let ahead = renew_time_ahead(&leases, &lease).await;
        assert!(
            (ahead - standby_clock as f64).abs() < 3.0,
            "round {round}: the new leader's clock is {ahead:.1} s ahead, not {standby_clock} s: is libfaketime working?"
        );
        eprintln!(
            "leader clock {leader_clock:+} s, standby clock {standby_clock:+} s: {samples} samples over {watched:?}, never two leaders; standby took over {took:?} after the leader was killed"
        );
    }
}
