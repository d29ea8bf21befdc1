//! The other gateway pods of the pool: what they run on each builder, so that this one counts
//! their sessions against the builders' slots (see the route module).
//!
//! Each gateway writes its [`GatewayReport`] under its pod name in the demand ConfigMap
//! (`demand`). This module watches that ConfigMap, and with `--gateways-selector` the gateway
//! pods too, and gives [`Gateway::set_elsewhere`] the sum of the others' `used` per builder and
//! this gateway's rank among the live gateways. A report counts when it is not this gateway's,
//! parses, is live ([`GatewayReport::is_live`]) and, once the gateway pods are listed, when its
//! key is a live gateway pod.
//!
//! It also removes the keys of gateway pods that are gone (not a live gateway pod, and a report
//! older than [`STALE_SECONDS`] or unreadable), at most every [`PRUNE_EVERY`]: otherwise each
//! gateway pod ever created would leave a key behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::{self, BoxStream};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use nixpool_api::demand::{GatewayReport, STALE_SECONDS};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::server::{Gateway, now_unix};

/// Reports turn stale without a watch event: the sums are computed again this often.
pub const RECOUNT: Duration = Duration::from_secs(5);
/// Dead gateways' keys are removed at most this often.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The name of a pod that is a live gateway: not being deleted, and not finished. Ready is not
/// required: a gateway that is starting may already write its report.
pub fn live_gateway(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    pod.metadata.name.clone()
}

/// What the watches have seen (pure: fed their events, asked with a time).
#[derive(Debug, Default)]
pub struct Peers {
    /// The demand ConfigMap's data, once it has been listed.
    reports: BTreeMap<String, String>,
    /// Data of a (re)list in progress.
    reports_listing: BTreeMap<String, String>,
    /// The live gateway pods, once listed (always `None` without `--gateways-selector`).
    gateways: Option<BTreeSet<String>>,
    /// Live gateway pods of a (re)list in progress.
    gateways_listing: BTreeSet<String>,
}

impl Peers {
    pub fn on_config_map(&mut self, event: watcher::Event<ConfigMap>) {
        let data = |cm: ConfigMap| cm.data.unwrap_or_default();
        match event {
            watcher::Event::Init => self.reports_listing.clear(),
            watcher::Event::InitApply(cm) => self.reports_listing = data(cm),
            watcher::Event::InitDone => self.reports = std::mem::take(&mut self.reports_listing),
            watcher::Event::Apply(cm) => self.reports = data(cm),
            watcher::Event::Delete(_) => self.reports.clear(),
        }
    }

    pub fn on_gateway_pod(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.gateways_listing.clear(),
            watcher::Event::InitApply(pod) => self.gateways_listing.extend(live_gateway(&pod)),
            watcher::Event::InitDone => self.gateways = Some(std::mem::take(&mut self.gateways_listing)),
            watcher::Event::Apply(pod) => {
                let gateways = self.gateways.get_or_insert_default();
                match live_gateway(&pod) {
                    Some(name) => gateways.insert(name),
                    None => gateways.remove(pod.metadata.name.as_deref().unwrap_or_default()),
                };
            }
            watcher::Event::Delete(pod) => {
                if let (Some(gateways), Some(name)) = (self.gateways.as_mut(), pod.metadata.name.as_deref()) {
                    gateways.remove(name);
                }
            }
        }
    }

    /// The other gateways' sessions per builder at `now`, as their counted reports say.
    pub fn elsewhere(&self, own: &str, now: i64) -> BTreeMap<String, u32> {
        let mut sum: BTreeMap<String, u32> = BTreeMap::new();
        for (key, text) in &self.reports {
            if key == own || self.gateways.as_ref().is_some_and(|g| !g.contains(key)) {
                continue;
            }
            let report = match serde_json::from_str::<GatewayReport>(text) {
                Ok(r) => r,
                Err(e) => {
                    debug!(key, error = %e, "a demand report that does not parse; not counted");
                    continue;
                }
            };
            if !report.is_live(now) {
                continue;
            }
            for (builder, use_) in report.builders {
                if use_.used > 0 {
                    *sum.entry(builder).or_default() += use_.used;
                }
            }
        }
        sum
    }

    /// This gateway's index among the live gateway pods sorted by name (itself included); 0
    /// while they are not known.
    pub fn rank(&self, own: &str) -> usize {
        self.gateways
            .as_ref()
            .map_or(0, |g| g.iter().filter(|n| n.as_str() < own).count())
    }

    /// The keys of gateways that are gone at `now`: not a live gateway pod, and a report older
    /// than [`STALE_SECONDS`] or unreadable. None until the gateway pods are listed.
    pub fn gone(&self, own: &str, now: i64) -> Vec<String> {
        let Some(gateways) = &self.gateways else {
            return Vec::new();
        };
        self.reports
            .iter()
            .filter(|(key, _)| key.as_str() != own && !gateways.contains(key.as_str()))
            .filter(|(_, text)| {
                serde_json::from_str::<GatewayReport>(text).map_or(true, |r| now - r.at > STALE_SECONDS)
            })
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// The JSON merge patch that removes `keys` from a ConfigMap's data.
pub fn removal(keys: &[String]) -> serde_json::Value {
    use serde_json::{Map, Value};
    let data: Map<String, Value> = keys.iter().map(|k| (k.clone(), Value::Null)).collect();
    Value::Object(Map::from_iter([("data".to_string(), Value::Object(data))]))
}

/// What one of the watches said (boxed: a Pod is large).
enum Seen {
    ConfigMap(Box<Result<watcher::Event<ConfigMap>, watcher::Error>>),
    GatewayPod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
}

/// Watches the demand ConfigMap `config_map` (and, with `gateways`, the gateway pods matching
/// that selector) and keeps the gateway's count of the others' sessions up to date; never
/// returns. Errors are logged and the watches retried with backoff.
pub async fn run(
    gw: Arc<Gateway>,
    cms: Api<ConfigMap>,
    config_map: String,
    gateways: Option<(Api<Pod>, String)>,
    own: String,
) {
    let mut peers = Peers::default();
    let mut pruned: Option<Instant> = None;
    loop {
        let reports = watcher(
            cms.clone(),
            watcher::Config::default().fields(&format!("metadata.name={config_map}")),
        )
        .default_backoff()
        .map(|e| Seen::ConfigMap(Box::new(e)))
        .boxed();
        let pods: BoxStream<'_, Seen> = match &gateways {
            Some((api, selector)) => watcher(api.clone(), watcher::Config::default().labels(selector))
                .default_backoff()
                .map(|e| Seen::GatewayPod(Box::new(e)))
                .boxed(),
            None => stream::pending().boxed(),
        };
        let mut events = stream::select(reports, pods);
        let mut recount = tokio::time::interval(RECOUNT);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Seen::ConfigMap(e)) => match *e {
                        Ok(e) => peers.on_config_map(e),
                        Err(e) => warn!(config_map, error = %e, "watching the demand ConfigMap failed; retrying"),
                    },
                    Some(Seen::GatewayPod(e)) => match *e {
                        Ok(e) => peers.on_gateway_pod(e),
                        Err(e) => warn!(error = %e, "watching the gateway pods failed; retrying"),
                    },
                    None => break,
                },
                _ = recount.tick() => {}
            }
            let now = now_unix();
            gw.set_elsewhere(peers.elsewhere(&own, now), peers.rank(&own));
            if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                let gone = peers.gone(&own, now);
                if !gone.is_empty() {
                    pruned = Some(Instant::now());
                    prune(&cms, &config_map, &gone).await;
                }
            }
        }
        info!(config_map, "the watch on the demand ConfigMap ended; starting it again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Removes the keys `gone` from the demand ConfigMap.
async fn prune(cms: &Api<ConfigMap>, config_map: &str, gone: &[String]) {
    match cms
        .patch(config_map, &PatchParams::default(), &Patch::Merge(removal(gone)))
        .await
    {
        Ok(_) => info!(config_map, removed = ?gone, "removed the demand reports of gateway pods that are gone"),
        Err(e) => {
            warn!(config_map, removed = ?gone, error = %e, "removing the demand reports of gone gateway pods failed; trying again later")
        }
    }
}

#[cfg(test)]
mod tests {
    use nixpool_api::demand::BuilderUse;

    use super::*;

    fn report(at: i64, used: &[(&str, u32)]) -> String {
        let r = GatewayReport {
            at,
            waiting: 0,
            active: used.iter().map(|(_, n)| n).sum(),
            builders: used
                .iter()
                .map(|(b, n)| {
                    let u = BuilderUse {
                        used: *n,
                        idle_since: (*n == 0).then_some(0),
                    };
                    (b.to_string(), u)
                })
                .collect(),
        };
        serde_json::to_string(&r).unwrap()
    }

    fn config_map(data: &[(&str, String)]) -> ConfigMap {
        ConfigMap {
            data: Some(data.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
            ..Default::default()
        }
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn named(name: &str) -> Pod {
        pod(serde_json::json!({"metadata": {"name": name}}))
    }

    fn listed(p: &mut Peers, pods: Vec<Pod>) {
        p.on_gateway_pod(watcher::Event::Init);
        for pod in pods {
            p.on_gateway_pod(watcher::Event::InitApply(pod));
        }
        p.on_gateway_pod(watcher::Event::InitDone);
    }

    #[test]
    fn the_others_live_reports_are_summed_per_builder() {
        let now = 1_000;
        let mut p = Peers::default();
        p.on_config_map(watcher::Event::Init);
        p.on_config_map(watcher::Event::InitApply(config_map(&[
            ("gw-0", report(now, &[("a", 2)])),
            ("gw-1", report(now - 5, &[("a", 1), ("b", 0)])),
            ("gw-2", report(now - 1, &[("a", 1), ("c", 2)])),
            ("gw-stale", report(now - STALE_SECONDS - 1, &[("b", 1)])),
            ("gw-junk", "not json".into()),
        ])));
        assert!(p.elsewhere("gw-0", now).is_empty(), "nothing before the list is done");
        p.on_config_map(watcher::Event::InitDone);
        assert_eq!(
            p.elsewhere("gw-0", now),
            BTreeMap::from([("a".into(), 2), ("c".into(), 2)]),
            "its own, a stale and an unreadable report do not count"
        );
        assert_eq!(p.rank("gw-0"), 0, "gateway pods not listed: rank 0");

        // The gateway pods are listed: gw-2 is gone, so only gw-1 counts.
        let terminating = pod(serde_json::json!({"metadata": {
            "name": "gw-2", "deletionTimestamp": "2025-01-01T00:00:00Z"}}));
        listed(&mut p, vec![named("gw-0"), named("gw-1"), terminating]);
        assert_eq!(p.elsewhere("gw-0", now), BTreeMap::from([("a".into(), 1)]));
        assert_eq!((p.rank("gw-0"), p.rank("gw-1")), (0, 1));

        // gw-1's session on a ended: its next report says so.
        p.on_config_map(watcher::Event::Apply(config_map(&[
            ("gw-0", report(now, &[("a", 2)])),
            ("gw-1", report(now, &[("a", 0)])),
        ])));
        assert!(p.elsewhere("gw-0", now).is_empty());
        p.on_config_map(watcher::Event::Delete(config_map(&[])));
        assert!(p.elsewhere("gw-0", now).is_empty());
    }

    #[test]
    fn gateway_pods_come_and_go_and_rank_by_name() {
        let mut p = Peers::default();
        listed(&mut p, vec![named("gw-b")]);
        assert_eq!(p.rank("gw-c"), 1, "itself included, even before its pod is seen");
        p.on_gateway_pod(watcher::Event::Apply(named("gw-a")));
        assert_eq!((p.rank("gw-a"), p.rank("gw-b"), p.rank("gw-c")), (0, 1, 2));
        let failed = pod(serde_json::json!({"metadata": {"name": "gw-a"}, "status": {"phase": "Failed"}}));
        assert_eq!(live_gateway(&failed), None);
        p.on_gateway_pod(watcher::Event::Apply(failed));
        assert_eq!(p.rank("gw-b"), 0, "a failed pod is not a gateway");
        p.on_gateway_pod(watcher::Event::Delete(named("gw-b")));
        assert_eq!(p.rank("gw-c"), 0);
        let pending = pod(serde_json::json!({"metadata": {"name": "gw-d"}, "status": {"phase": "Pending"}}));
        assert_eq!(live_gateway(&pending).as_deref(), Some("gw-d"), "Ready is not required");
    }

    #[test]
    fn only_keys_of_gone_gateways_with_old_or_unreadable_reports_are_removed() {
        let now = 10_000;
        let mut p = Peers::default();
        p.on_config_map(watcher::Event::Apply(config_map(&[
            ("gw-me", report(now - 1_000, &[])),
            ("gw-live", report(now - 1_000, &[("a", 0)])),
            ("gw-dead-idle", report(now - STALE_SECONDS - 1, &[("a", 0)])),
            ("gw-dead-busy", report(now - 1_000, &[("a", 1)])),
            ("gw-new", report(now - STALE_SECONDS, &[("a", 1)])),
            ("junk", "{".into()),
        ])));
        assert!(
            p.gone("gw-me", now).is_empty(),
            "gateway pods not listed: nothing removed"
        );
        listed(&mut p, vec![named("gw-live")]);
        assert_eq!(p.gone("gw-me", now), ["gw-dead-busy", "gw-dead-idle", "junk"]);
        assert_eq!(
            removal(&p.gone("gw-me", now)),
            serde_json::json!({"data": {"gw-dead-busy": null, "gw-dead-idle": null, "junk": null}})
        );
    }
}
