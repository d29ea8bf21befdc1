//! How many builders a pool with `spec.autoscaling` should run: pure, from the gateways'
//! demand reports, the number the operator asked for last time, and the clock.
//!
//! - Up at once: every session (waiting or running) needs a slot, so `ceil(sessions / maxJobs)`
//!   builders.
//! - Down only by builders that every gateway has seen without a session for `idleSeconds`, and
//!   never below the builders that are busy or were busy more recently.
//! - Always within `minReplicas..=maxReplicas`.

use std::collections::BTreeMap;
use std::time::Duration;

use nixpool_api::demand::GatewayReport;
use nixpool_api::v1alpha1::AutoscalingSpec;

/// The decision for one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Builders to run.
    pub replicas: i32,
    /// Sessions the gateways hold or run.
    pub sessions: u32,
    /// Of those, waiting for a slot.
    pub waiting: u32,
    /// Builders (pod names) idle for `idleSeconds`: the ones a scale-down should remove first.
    pub idle: Vec<String>,
    /// Builders with sessions, or idle for less than `idleSeconds`: keep these.
    pub busy: Vec<String>,
    /// When to look again, for the next builder that will have been idle long enough.
    pub recheck: Option<Duration>,
}

/// Parses the reports in the demand ConfigMap's data. A value that does not parse is skipped
/// (and named, for a log line): one broken gateway report must not stop the pool from scaling.
pub fn parse_reports(data: &BTreeMap<String, String>) -> (Vec<GatewayReport>, Vec<String>) {
    let mut reports = Vec::new();
    let mut bad = Vec::new();
    for (gateway, text) in data {
        match serde_json::from_str::<GatewayReport>(text) {
            Ok(r) => reports.push(r),
            Err(_) => bad.push(gateway.clone()),
        }
    }
    (reports, bad)
}

pub fn decide(spec: &AutoscalingSpec, max_jobs: i32, current: i32, reports: &[GatewayReport], now: i64) -> Decision {
    let live: Vec<&GatewayReport> = reports.iter().filter(|r| r.is_live(now)).collect();
    let sessions: u32 = live.iter().map(|r| r.sessions()).sum();
    let waiting: u32 = live.iter().map(|r| r.waiting).sum();
    let per_builder = max_jobs.max(1) as u32;
    let needed = sessions.div_ceil(per_builder) as i32;

    // A builder is idle only if no gateway has a session on it; its idle time is the shortest
    // any gateway reports.
    let mut builders: BTreeMap<&str, Option<i64>> = BTreeMap::new();
    for r in &live {
        for (name, u) in &r.builders {
            let since = if u.used > 0 { None } else { u.idle_since.or(Some(now)) };
            let entry = builders.entry(name.as_str()).or_insert(since);
            *entry = match (*entry, since) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }
    let idle_after = i64::from(spec.idle_seconds.max(0));
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    let mut recheck: Option<i64> = None;
    for (name, since) in builders {
        match since {
            Some(s) if now - s >= idle_after => idle.push(name.to_string()),
            Some(s) => {
                busy.push(name.to_string());
                let due = s + idle_after - now;
                recheck = Some(recheck.map_or(due, |r| r.min(due)));
            }
            None => busy.push(name.to_string()),
        }
    }

    let target = if needed > current {
        needed
    } else if idle.is_empty() {
        current
    } else {
        // `current - idle` alone would count builders already on their way out twice, in the
        // reconciles before their pods are gone from the reports.
        needed
            .max(current - idle.len() as i32)
            .max(busy.len() as i32)
            .min(current)
    };
    let replicas = target.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    Decision {
        replicas,
        sessions,
        waiting,
        idle,
        busy,
        recheck: recheck.map(|s| Duration::from_secs(s.max(1) as u64)),
    }
}

#[cfg(test)]
mod tests {
    use nixpool_api::demand::{BuilderUse, STALE_SECONDS};
    use proptest::prelude::*;

    use super::*;

    fn spec(min: i32, max: i32, idle: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            min_replicas: min,
            max_replicas: max,
            idle_seconds: idle,
        }
    }

    fn report(at: i64, waiting: u32, active: u32, builders: &[(&str, u32, Option<i64>)]) -> GatewayReport {
        GatewayReport {
            at,
            waiting,
            active,
            builders: builders
                .iter()
                .map(|(n, used, since)| {
                    (
                        n.to_string(),
                        BuilderUse {
                            used: *used,
                            idle_since: *since,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_held_session_scales_a_pool_up_from_zero() {
        let d = decide(&spec(0, 4, 60), 2, 0, &[report(100, 1, 0, &[])], 100);
        assert_eq!(d.replicas, 1);
        assert_eq!((d.sessions, d.waiting), (1, 1));
        let d = decide(
            &spec(0, 4, 60),
            2,
            1,
            &[report(100, 3, 2, &[]), report(100, 0, 0, &[])],
            100,
        );
        assert_eq!(d.replicas, 3, "5 sessions on maxJobs 2");
        let d = decide(&spec(0, 2, 60), 1, 0, &[report(100, 9, 0, &[])], 100);
        assert_eq!(d.replicas, 2, "never above maxReplicas");
    }

    #[test]
    fn only_builders_idle_for_idle_seconds_go_and_busy_ones_stay() {
        let now = 1000;
        let r = report(
            now,
            0,
            1,
            &[("a", 1, None), ("b", 0, Some(now - 100)), ("c", 0, Some(now - 10))],
        );
        let d = decide(&spec(0, 4, 60), 1, 3, &[r], now);
        assert_eq!(d.replicas, 2, "b goes; a runs a build; c was busy 10 s ago");
        assert_eq!(d.idle, ["b"]);
        assert_eq!(d.busy, ["a", "c"]);
        assert_eq!(
            d.recheck,
            Some(Duration::from_secs(50)),
            "c is idle long enough in 50 s"
        );
    }

    #[test]
    fn a_builder_one_gateway_uses_is_busy_whatever_the_other_says() {
        let now = 1000;
        let g1 = report(now, 0, 1, &[("a", 1, None)]);
        let g2 = report(now, 0, 0, &[("a", 0, Some(0))]);
        let d = decide(&spec(0, 4, 60), 1, 1, &[g1, g2], now);
        assert_eq!(d.replicas, 1);
        assert_eq!(d.busy, ["a"]);
    }

    #[test]
    fn builders_already_removed_are_not_removed_twice() {
        // The operator asked for 1 of 3; the two idle pods are still in the report.
        let now = 1000;
        let r = report(now, 0, 1, &[("a", 1, None), ("b", 0, Some(0)), ("c", 0, Some(0))]);
        let d = decide(&spec(0, 4, 60), 1, 1, &[r], now);
        assert_eq!(d.replicas, 1);
    }

    #[test]
    fn a_gone_gateways_sessions_stop_counting() {
        let r = report(100, 4, 0, &[]);
        let d = decide(&spec(0, 4, 60), 1, 0, std::slice::from_ref(&r), 100 + STALE_SECONDS + 1);
        assert_eq!(d.replicas, 0);
    }

    #[test]
    fn min_replicas_holds_when_idle() {
        let now = 1000;
        let r = report(now, 0, 0, &[("a", 0, Some(0)), ("b", 0, Some(0))]);
        assert_eq!(decide(&spec(1, 4, 60), 1, 2, &[r], now).replicas, 1);
    }

    #[test]
    fn reports_that_do_not_parse_are_named_and_skipped() {
        let data = BTreeMap::from([
            (
                "gw-1".to_string(),
                serde_json::to_string(&report(1, 1, 0, &[])).unwrap(),
            ),
            ("gw-2".to_string(), "{not json".to_string()),
        ]);
        let (reports, bad) = parse_reports(&data);
        assert_eq!(reports.len(), 1);
        assert_eq!(bad, ["gw-2"]);
    }

    proptest! {
        /// Within bounds; enough slots for every session (up to maxReplicas); never below the
        /// builders with a session; a scale-down only when some builder is idle long enough.
        #[test]
        fn decisions_keep_their_promises(
            min in 0i32..4, extra in 0i32..6, max_jobs in 1i32..5, current in 0i32..10,
            waiting in 0u32..12, active in 0u32..12,
            uses in proptest::collection::vec((0u32..3, 0i64..200), 0..8),
        ) {
            let now = 1000;
            let s = spec(min, min + extra.max(1), 60);
            let builders: Vec<(String, u32, Option<i64>)> = uses
                .iter()
                .enumerate()
                .map(|(i, (used, ago))| (format!("b{i}"), *used, (*used == 0).then_some(now - ago)))
                .collect();
            let refs: Vec<(&str, u32, Option<i64>)> =
                builders.iter().map(|(n, u, s)| (n.as_str(), *u, *s)).collect();
            let d = decide(&s, max_jobs, current, &[report(now, waiting, active, &refs)], now);
            prop_assert!(d.replicas >= s.min_replicas && d.replicas <= s.max_replicas);
            let needed = (waiting + active).div_ceil(max_jobs as u32) as i32;
            prop_assert!(d.replicas >= needed.min(s.max_replicas));
            let with_sessions = builders.iter().filter(|b| b.1 > 0).count() as i32;
            // Below the bounds' clamp, only idle builders make it go down.
            if d.replicas < current.min(s.max_replicas) {
                prop_assert!(!d.idle.is_empty());
                prop_assert!(d.replicas >= with_sessions.min(s.max_replicas).max(s.min_replicas).min(current));
            }
        }
    }
}
