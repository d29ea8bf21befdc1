//! Which builders exist: with `--builders-selector`, a watch on the pool's builder pods. A pod
//! is a builder while it has an IP, is not being deleted, and is Ready. Each change goes to
//! [`Gateway::set_builders`] at once, which wakes held sessions: a session held because the pool
//! had no builder starts as soon as the first one is Ready (scale from zero).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

use crate::server::Gateway;

/// The builder a pod is, `(name, address)`, if it takes sessions now.
pub fn ready_builder(pod: &Pod, port: u16) -> Option<(String, String)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let name = pod.metadata.name.clone()?;
    let status = pod.status.as_ref()?;
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then(|| (name, SocketAddr::new(ip, port).to_string()))
}

/// Watches the pods matching `selector` and keeps the gateway's builders up to date; never
/// returns. Errors are logged and the watch is retried with backoff.
pub async fn run(gw: Arc<Gateway>, api: Api<Pod>, selector: String, port: u16) {
    loop {
        let mut events =
            std::pin::pin!(watcher(api.clone(), watcher::Config::default().labels(&selector)).default_backoff());
        // Ready builders by pod name, and the ones of a (re)list in progress.
        let mut ready: BTreeMap<String, String> = BTreeMap::new();
        let mut listing: BTreeMap<String, String> = BTreeMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some((name, address)) = ready_builder(&pod, port) {
                        listing.insert(name, address);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    ready = std::mem::take(&mut listing);
                    gw.set_builders(ready.clone());
                    gw.ready.listed();
                }
                Ok(watcher::Event::Apply(pod)) => {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    match ready_builder(&pod, port) {
                        Some((name, address)) => ready.insert(name, address),
                        None => ready.remove(&name),
                    };
                    gw.set_builders(ready.clone());
                }
                Ok(watcher::Event::Delete(pod)) => {
                    ready.remove(&pod.metadata.name.clone().unwrap_or_default());
                    gw.set_builders(ready.clone());
                }
                Err(e) => warn!(selector, error = %e, "watching the builder pods failed; retrying"),
            }
        }
        info!(selector, "the watch on builder pods ended; starting it again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: &str) -> Pod {
        serde_json::from_str(json).unwrap()
    }

    const READY: &str = r#"{"metadata": {"name": "pool-0"},
        "status": {"podIP": "10.244.1.5", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}}"#;

    #[test]
    fn only_a_ready_pod_with_an_ip_that_is_not_terminating_is_a_builder() {
        assert_eq!(
            ready_builder(&pod(READY), 22),
            Some(("pool-0".into(), "10.244.1.5:22".into()))
        );
        let not_ready = READY.replace(r#""Ready", "status": "True""#, r#""Ready", "status": "False""#);
        assert_eq!(ready_builder(&pod(&not_ready), 22), None);
        let no_ip = READY.replace(r#""podIP": "10.244.1.5", "#, "");
        assert_eq!(ready_builder(&pod(&no_ip), 22), None);
        let terminating = READY.replace(
            r#"{"name": "pool-0"}"#,
            r#"{"name": "pool-0", "deletionTimestamp": "2025-01-01T00:00:00Z"}"#,
        );
        assert_eq!(ready_builder(&pod(&terminating), 22), None);
        let no_conditions = r#"{"metadata": {"name": "pool-0"}, "status": {"podIP": "10.244.1.5"}}"#;
        assert_eq!(ready_builder(&pod(no_conditions), 22), None);
        let v6 = READY.replace("10.244.1.5", "fd00::5");
        assert_eq!(ready_builder(&pod(&v6), 2222).unwrap().1, "[fd00::5]:2222");
    }
}
