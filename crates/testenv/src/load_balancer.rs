//! The test stand-in for a cloud load-balancer controller (test tooling only, like MetalLB in a
//! bare-metal cluster): it gives every `LoadBalancer` Service an address from the test node's
//! range and publishes it as `status.loadBalancer.ingress`. It carries no traffic: kube-proxy on
//! the node routes the published address to the Service's ready pods, as it does in clusters
//! whose load balancer delivers to the node.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};

use crate::ControlPlane;

/// The addresses it hands out: inside the node's bridge network, outside the pods' range.
const FIRST: u8 = 16;
const LAST: u8 = 254;

/// The address with index `i` (`10.244.0.16` and on).
fn address(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, i)
}

/// Hands out addresses in turn and reuses one only after every other was used, so a deleted
/// Service's address is not at once another's (a test checks that a deleted pool's address
/// stops answering).
#[derive(Default)]
struct Addresses {
    next: usize,
    by_service: HashMap<String, Ipv4Addr>,
}

impl Addresses {
    fn for_service(&mut self, uid: &str) -> Ipv4Addr {
        if let Some(a) = self.by_service.get(uid) {
            return *a;
        }
        let in_use: Vec<Ipv4Addr> = self.by_service.values().copied().collect();
        let span = usize::from(LAST - FIRST) + 1;
        let chosen = (0..span)
            .map(|k| address(FIRST + ((self.next + k) % span) as u8))
            .find(|a| !in_use.contains(a))
            .unwrap_or_else(|| address(FIRST));
        self.next = (usize::from(chosen.octets()[3] - FIRST) + 1) % span;
        self.by_service.insert(uid.to_string(), chosen);
        chosen
    }

    fn release(&mut self, uid: &str) {
        self.by_service.remove(uid);
    }
}

/// Starts the publisher on a thread of its own (its own runtime: tests each have theirs), for
/// every namespace of `cp`, for the life of the process.
pub fn start(cp: &'static ControlPlane) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name("test-load-balancer".into())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    if let Err(e) = publish(cp).await {
                        tracing::warn!("test load-balancer publisher: {e:#}; restarting");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            })
        })?;
    Ok(())
}

async fn publish(cp: &ControlPlane) -> anyhow::Result<()> {
    let client = cp.client().await?;
    let services: Api<Service> = Api::all(client.clone());
    let mut addresses = Addresses::default();
    let mut events = watcher::watcher(services, watcher::Config::default()).boxed();
    while let Some(event) = events.next().await {
        let svc = match event? {
            Event::Apply(s) | Event::InitApply(s) => s,
            Event::Delete(s) => {
                addresses.release(s.metadata.uid.as_deref().unwrap_or_default());
                continue;
            }
            Event::Init | Event::InitDone => continue,
        };
        let is_lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
        let published = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .is_some_and(|i| !i.is_empty());
        let (Some(ns), Some(name), Some(uid)) = (
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
            svc.metadata.uid.as_deref(),
        ) else {
            continue;
        };
        if !is_lb || published {
            continue;
        }
        let ip = addresses.for_service(uid);
        let api: Api<Service> = Api::namespaced(client.clone(), ns);
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!("test load balancer: {ns}/{name} at {ip}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_not_reused_while_others_are_free() {
        let mut a = Addresses::default();
        let first = a.for_service("a");
        assert_eq!(first, address(16));
        assert_eq!(a.for_service("a"), first, "one Service keeps its address");
        a.release("a");
        assert_eq!(a.for_service("b"), address(17), "a released address waits its turn");
    }

    #[test]
    fn addresses_wrap_and_skip_those_in_use() {
        let mut a = Addresses::default();
        for i in 0..(LAST - FIRST + 1) {
            a.for_service(&format!("s{i}"));
        }
        a.release("s3");
        assert_eq!(a.for_service("new"), address(FIRST + 3));
    }
}
