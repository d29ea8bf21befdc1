//! The demand report: what this gateway pod tells the operator, as JSON under its pod name in
//! the pool's demand ConfigMap (`--demand-config-map`), written with server-side apply.
//!
//! When: as soon as the report changes, at most once per [`COALESCE`], except that the first
//! write after sessions go from 0 to more goes out at once (it is what scales a pool up from
//! zero); and every [`REFRESH_SECONDS`] while there are sessions, so the operator can tell a live
//! report from a dead gateway's. Nothing is written while nothing changes and there are no
//! sessions. A failed write is logged and tried again [`RETRY`] later.
//!
//! Readers: the operator, which scales the pool by the reports, and the other gateway pods,
//! which count this one's sessions per builder against the builders' slots (`peers`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nixpool_api::demand::{BuilderUse, GatewayReport, REFRESH_SECONDS};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::route::Slots;
use crate::server::{Gateway, now_unix};

/// Changes closer together than this are written together. Short: the other gateways route by
/// this report (see the route module), so its latency is how long two gateways may both count a
/// slot as free.
pub const COALESCE: Duration = Duration::from_millis(25);
/// A failed write is tried again this much later.
pub const RETRY: Duration = Duration::from_secs(1);

/// The report of `waiting` held sessions and the builders in `slots`, written at `at`.
pub fn report(slots: &Slots, waiting: u32, at: i64) -> GatewayReport {
    GatewayReport {
        at,
        waiting,
        active: slots.used(),
        builders: slots
            .ready()
            .map(|(name, b)| {
                let use_ = BuilderUse {
                    used: b.used,
                    idle_since: (b.used == 0).then_some(b.idle_since),
                };
                (name.to_string(), use_)
            })
            .collect(),
    }
}

/// What the writer does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Write,
    /// Write at this instant unless something changes before.
    At(Instant),
    /// Nothing to write until something changes.
    Wait,
}

/// Decides when to write (pure: it is given the report and the time).
#[derive(Debug, Default)]
pub struct Pacer {
    /// The last report written, and when.
    written: Option<(GatewayReport, Instant)>,
    /// When the last write failed, if it did.
    failed_at: Option<Instant>,
}

impl Pacer {
    pub fn next(&self, report: &GatewayReport, now: Instant) -> Next {
        let retry = self.failed_at.map_or(now, |t| t + RETRY);
        let due = match &self.written {
            None => retry,
            Some((last, _)) if last.sessions() == 0 && report.sessions() > 0 => retry,
            Some((last, at)) if !same(last, report) => retry.max(*at + COALESCE),
            Some((_, at)) if report.sessions() > 0 => retry.max(*at + Duration::from_secs(REFRESH_SECONDS as u64)),
            Some(_) => return Next::Wait,
        };
        if due <= now { Next::Write } else { Next::At(due) }
    }

    pub fn wrote(&mut self, report: GatewayReport, at: Instant) {
        self.written = Some((report, at));
        self.failed_at = None;
    }

    pub fn failed(&mut self, at: Instant) {
        self.failed_at = Some(at);
    }
}

/// Equal but for when they were written.
fn same(a: &GatewayReport, b: &GatewayReport) -> bool {
    (a.waiting, a.active, &a.builders) == (b.waiting, b.active, &b.builders)
}

/// The server-side-apply field manager of one gateway pod (Kubernetes allows 128 characters).
pub fn field_manager(pod: &str) -> String {
    format!("nixpool-gateway-{pod}").chars().take(128).collect()
}

/// The apply body: this pod's key of the ConfigMap, and nothing else.
pub fn body(config_map: &str, pod: &str, report: &GatewayReport) -> Result<ConfigMap, serde_json::Error> {
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map.to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(pod.to_string(), serde_json::to_string(report)?)])),
        ..Default::default()
    })
}

/// Writes the report whenever [`Pacer`] says so; never returns.
pub async fn run(gw: Arc<Gateway>, api: Api<ConfigMap>, config_map: String, pod: String) {
    let params = PatchParams::apply(&field_manager(&pod));
    let mut pacer = Pacer::default();
    loop {
        let report = gw.report(now_unix());
        match pacer.next(&report, Instant::now()) {
            Next::Write => {
                let started = Instant::now();
                let result = match body(&config_map, &pod, &report) {
                    Ok(cm) => api
                        .patch(&config_map, &params, &Patch::Apply(&cm))
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match result {
                    Ok(()) => {
                        debug!(
                            config_map,
                            waiting = report.waiting,
                            active = report.active,
                            "demand report written"
                        );
                        pacer.wrote(report, started);
                    }
                    Err(error) => {
                        warn!(config_map, error, "writing the demand report failed; trying again");
                        pacer.failed(Instant::now());
                    }
                }
            }
            Next::At(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = gw.changed.notified() => {}
                }
            }
            Next::Wait => gw.changed.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(waiting: u32, active: u32) -> GatewayReport {
        GatewayReport {
            at: 0,
            waiting,
            active,
            builders: BTreeMap::new(),
        }
    }

    #[test]
    fn the_report_lists_ready_builders_with_idle_times_only_when_unused() {
        let mut s = Slots::default();
        s.replace(
            [
                ("p-a".into(), "10.0.0.1:22".into()),
                ("p-b".into(), "10.0.0.2:22".into()),
            ],
            1,
            100,
        );
        let (taken, _) = s.take().unwrap();
        s.replace(
            [
                ("p-a".into(), "10.0.0.1:22".into()),
                ("p-c".into(), "10.0.0.3:22".into()),
            ],
            1,
            105,
        );
        let r = report(&s, 2, 110);
        assert_eq!((r.at, r.waiting, r.active), (110, 2, 1));
        let names: Vec<&str> = r.builders.keys().map(String::as_str).collect();
        assert_eq!(taken, "p-a");
        assert_eq!(names, ["p-a", "p-c"], "p-b left: not listed");
        assert_eq!(
            r.builders["p-a"],
            BuilderUse {
                used: 1,
                idle_since: None
            }
        );
        assert_eq!(
            r.builders["p-c"],
            BuilderUse {
                used: 0,
                idle_since: Some(105)
            }
        );
    }

    #[test]
    fn writes_are_coalesced_except_the_first_demand_and_refreshed_while_busy() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut p = Pacer::default();
        assert_eq!(p.next(&with(0, 0), t0), Next::Write, "the first report goes out");
        p.wrote(with(0, 0), t0);
        assert_eq!(
            p.next(&with(0, 0), ms(50_000)),
            Next::Wait,
            "idle and unchanged: nothing"
        );

        assert_eq!(p.next(&with(1, 0), ms(10)), Next::Write, "0 → 1 session: at once");
        p.wrote(with(1, 0), ms(10));
        assert_eq!(
            p.next(&with(0, 1), ms(20)),
            Next::At(ms(35)),
            "a change 10 ms later waits for the rest of the 25 ms"
        );
        assert_eq!(p.next(&with(0, 1), ms(35)), Next::Write);
        p.wrote(with(0, 1), ms(35));
        assert_eq!(
            p.next(&with(0, 1), ms(100)),
            Next::At(ms(10_035)),
            "unchanged with sessions: refreshed"
        );
        assert_eq!(p.next(&with(0, 1), ms(10_035)), Next::Write);

        assert_eq!(p.next(&with(0, 0), ms(50)), Next::At(ms(60)), "back to 0 is coalesced");
        assert_eq!(
            p.next(&with(0, 0), ms(70)),
            Next::Write,
            "25 ms after the last write: now"
        );
        p.wrote(with(0, 0), ms(70));
        assert_eq!(
            p.next(&with(0, 0), ms(80_000)),
            Next::Wait,
            "idle and unchanged: nothing"
        );
        assert_eq!(p.next(&with(0, 2), ms(80)), Next::Write, "0 → 2 again: at once");
        p.failed(ms(80));
        assert_eq!(
            p.next(&with(0, 2), ms(100)),
            Next::At(ms(1_080)),
            "a failed write is retried"
        );
        assert_eq!(p.next(&with(0, 2), ms(1_080)), Next::Write);
    }

    #[test]
    fn the_apply_body_names_only_this_pods_key() {
        let cm = body("pool-gateway-demand", "gw-1", &with(1, 2)).unwrap();
        let v = serde_json::to_value(&cm).unwrap();
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "ConfigMap");
        assert_eq!(v["metadata"]["name"], "pool-gateway-demand");
        let data = v["data"].as_object().unwrap();
        assert_eq!(data.len(), 1);
        let r: GatewayReport = serde_json::from_str(data["gw-1"].as_str().unwrap()).unwrap();
        assert_eq!((r.waiting, r.active), (1, 2));
        assert_eq!(field_manager("gw-1"), "nixpool-gateway-gw-1");
        assert_eq!(field_manager(&"x".repeat(300)).len(), 128);
    }
}
