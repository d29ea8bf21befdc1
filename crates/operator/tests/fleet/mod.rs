//! A fleet of pools for the reliability tests (docs/reliability.md, sections 1 and 2): pools
//! created, scaled and deleted at random from a seeded RNG, a check that every pool has
//! converged and no child is orphaned, and a snapshot of what must never be rewritten.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use nixpool_api::{NixBuilderPool, labels, names};
use sha2::{Digest, Sha256};

/// The seed: `NIXPOOL_SEED` to replay a run, else one from the clock. Printed either way.
pub fn seed() -> u64 {
    let seed = match std::env::var("NIXPOOL_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("NIXPOOL_SEED={s:?} is not a number; give the seed a run printed")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_nanos() as u64,
    };
    eprintln!("seed {seed} (replay with NIXPOOL_SEED={seed})");
    seed
}

/// How many rounds: `short` in CI, `long` with `NIXPOOL_LONG=1`.
pub fn rounds(short: usize, long: usize) -> usize {
    if std::env::var("NIXPOOL_LONG").is_ok_and(|v| v == "1") {
        long
    } else {
        short
    }
}

pub struct Fleet {
    pub ns: String,
    pub pools: Api<NixBuilderPool>,
    deployments: Api<Deployment>,
    services: Api<Service>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    pub rng: fastrand::Rng,
    next: usize,
}

/// What must not change for a pool that lives on: its host key (Secret uid and a digest of its
/// data) and the resourceVersion of every Secret, ConfigMap and Service it owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Pool uid → (host-key Secret uid, SHA-256 of its data).
    pub host_keys: BTreeMap<String, (String, String)>,
    /// Pool uid → `Kind/name` → resourceVersion.
    pub versions: BTreeMap<String, BTreeMap<String, String>>,
}

impl Fleet {
    pub fn new(client: &kube::Client, ns: &str, seed: u64) -> Fleet {
        Fleet {
            ns: ns.to_string(),
            pools: Api::namespaced(client.clone(), ns),
            deployments: Api::namespaced(client.clone(), ns),
            services: Api::namespaced(client.clone(), ns),
            config_maps: Api::namespaced(client.clone(), ns),
            secrets: Api::namespaced(client.clone(), ns),
            rng: fastrand::Rng::with_seed(seed),
            next: 0,
        }
    }

    /// Creates a new pool (minimal.yaml under a new name, 1 to 3 replicas); returns its name.
    pub async fn create(&mut self) -> String {
        let mut pool: NixBuilderPool =
            serde_norway::from_str(include_str!("../../../../examples/minimal.yaml")).expect("the example parses");
        let name = format!("p{:03}", self.next);
        self.next += 1;
        pool.metadata.name = Some(name.clone());
        pool.spec.replicas = self.rng.i32(1..=3);
        self.pools
            .create(&PostParams::default(), &pool)
            .await
            .unwrap_or_else(|e| panic!("create pool {name}: {e}"));
        name
    }

    async fn names(&self) -> Vec<String> {
        let list = self.pools.list(&ListParams::default()).await.expect("list pools");
        list.items.iter().map(|p| p.name_any()).collect()
    }

    /// One random change: create a pool, delete one, or change one's replicas. Says which.
    /// A delete that would leave fewer than `keep` pools is a create instead.
    pub async fn change(&mut self, keep: usize) -> String {
        let names = self.names().await;
        match self.rng.u8(0..3) {
            0 => format!("created {}", self.create().await),
            1 if names.len() <= keep => format!("created {}", self.create().await),
            _ if names.is_empty() => format!("created {}", self.create().await),
            1 => {
                let name = &names[self.rng.usize(..names.len())];
                self.pools
                    .delete(name, &DeleteParams::default())
                    .await
                    .unwrap_or_else(|e| panic!("delete pool {name}: {e}"));
                format!("deleted {name}")
            }
            _ => {
                let name = &names[self.rng.usize(..names.len())];
                let replicas = self.rng.i32(1..=3);
                let patch = serde_json::json!({"spec": {"replicas": replicas}});
                self.pools
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap_or_else(|e| panic!("scale pool {name}: {e}"));
                format!("scaled {name} to {replicas}")
            }
        }
    }

    /// `Ok` once every pool has a status for its generation, each of its children exists,
    /// carries its controller reference and says what the spec says, and every child in the
    /// namespace belongs to a pool that exists (the garbage collector has removed the children
    /// of deleted pools). Otherwise, the first thing that is not there yet.
    pub async fn converged(&self) -> Result<(), String> {
        let lp = ListParams::default();
        let pools = self
            .pools
            .list(&lp)
            .await
            .map_err(|e| format!("list pools: {e}"))?
            .items;
        let managed = ListParams::default().labels(labels::MANAGED_SELECTOR);
        let deployments = self.deployments.list(&managed).await.map_err(|e| e.to_string())?.items;
        let services = self.services.list(&managed).await.map_err(|e| e.to_string())?.items;
        let config_maps = self.config_maps.list(&managed).await.map_err(|e| e.to_string())?.items;
        let secrets = self.secrets.list(&managed).await.map_err(|e| e.to_string())?.items;
        let uids: BTreeSet<String> = pools.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let children = deployments
            .iter()
            .map(|o| ("Deployment", &o.metadata))
            .chain(services.iter().map(|o| ("Service", &o.metadata)))
            .chain(config_maps.iter().map(|o| ("ConfigMap", &o.metadata)))
            .chain(secrets.iter().map(|o| ("Secret", &o.metadata)));
        let mut owned: BTreeMap<(String, &str, String), ()> = BTreeMap::new();
        for (kind, meta) in children {
            let owner = controller_uid(meta).ok_or_else(|| format!("{kind}/{} has no controller", name(meta)))?;
            if !uids.contains(&owner) {
                return Err(format!("{kind}/{} is orphaned (its pool {owner} is gone)", name(meta)));
            }
            owned.insert((owner, kind, name(meta)), ());
        }
        for pool in &pools {
            let name = pool.name_any();
            let uid = pool.metadata.uid.clone().unwrap_or_default();
            let status = pool
                .status
                .as_ref()
                .ok_or_else(|| format!("pool {name} has no status"))?;
            if status.observed_generation != pool.metadata.generation {
                return Err(format!(
                    "pool {name}: status not for generation {:?}",
                    pool.metadata.generation
                ));
            }
            if status.host_public_key.is_none() {
                return Err(format!("pool {name}: no host key in status"));
            }
            for (kind, child) in [
                ("Deployment", names::workload(&name)),
                ("Service", names::workload(&name)),
                ("ConfigMap", names::authorized_keys(&name)),
                ("ConfigMap", names::config_map(&name)),
                ("Secret", names::host_key_secret(&name)),
            ] {
                if !owned.contains_key(&(uid.clone(), kind, child.clone())) {
                    return Err(format!("pool {name}: no {kind}/{child} of its own"));
                }
            }
            let deployment = deployments
                .iter()
                .find(|d| d.name_any() == name)
                .expect("checked above");
            let replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
            if replicas != Some(pool.spec.replicas) {
                return Err(format!(
                    "pool {name}: Deployment has {replicas:?} replicas, the spec {}",
                    pool.spec.replicas
                ));
            }
            for type_ in ["Stalled", "Degraded"] {
                let stuck = status.condition(type_).filter(|c| c.status == "True");
                if let Some(c) = stuck {
                    return Err(format!("pool {name}: {type_}: {} ({})", c.reason, c.message));
                }
            }
        }
        Ok(())
    }

    /// Waits until [`Fleet::converged`]; returns how long that took. Panics after `timeout`
    /// with what was still missing.
    pub async fn wait_converged(&self, timeout: Duration, when: &str) -> Duration {
        let started = Instant::now();
        let mut last;
        loop {
            match self.converged().await {
                Ok(()) => return started.elapsed(),
                Err(e) => last = e,
            }
            assert!(
                started.elapsed() < timeout,
                "{when}: not converged after {timeout:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn snapshot(&self) -> Snapshot {
        let managed = ListParams::default().labels(labels::MANAGED_SELECTOR);
        let mut snap = Snapshot::default();
        let mut note = |kind: &str, meta: &ObjectMeta| {
            if let Some(owner) = controller_uid(meta) {
                snap.versions.entry(owner).or_default().insert(
                    format!("{kind}/{}", name(meta)),
                    meta.resource_version.clone().unwrap_or_default(),
                );
            }
        };
        for o in self.services.list(&managed).await.expect("list Services").items {
            note("Service", &o.metadata);
        }
        for o in self.config_maps.list(&managed).await.expect("list ConfigMaps").items {
            note("ConfigMap", &o.metadata);
        }
        let secrets = self.secrets.list(&managed).await.expect("list Secrets").items;
        for o in &secrets {
            note("Secret", &o.metadata);
        }
        for s in secrets.iter().filter(|s| s.name_any().ends_with("-host-key")) {
            let Some(owner) = controller_uid(&s.metadata) else {
                continue;
            };
            // Only a digest: the private key is never printed.
            let data = serde_json::to_vec(&s.data).expect("Secret data serializes");
            let digest: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
            snap.host_keys
                .insert(owner, (s.metadata.uid.clone().unwrap_or_default(), digest));
        }
        snap
    }
}

/// Checks that every pool in both snapshots kept its host key and had none of its Secrets,
/// ConfigMaps or Services rewritten. Returns how many pools were compared.
pub fn assert_unchanged(before: &Snapshot, after: &Snapshot, when: &str) -> usize {
    let mut compared = 0;
    for (pool, key) in &before.host_keys {
        if let Some(now) = after.host_keys.get(pool) {
            assert_eq!(now, key, "{when}: the host key of pool {pool} was regenerated");
            compared += 1;
        }
    }
    for (pool, versions) in &before.versions {
        if let Some(now) = after.versions.get(pool) {
            assert_eq!(now, versions, "{when}: a child of pool {pool} was rewritten");
        }
    }
    compared
}

fn controller_uid(meta: &ObjectMeta) -> Option<String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "NixBuilderPool")
        .map(|o| o.uid.clone())
}

fn name(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}
