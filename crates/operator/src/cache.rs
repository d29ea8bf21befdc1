//! What the operator keeps in memory of the objects it reads, so that an unchanged pool costs
//! no API request:
//! - reflector stores of the children it watches anyway (Deployments, Services, ConfigMaps and
//!   PodDisruptionBudgets with its managed-by label) and of the team-key ConfigMaps pools may
//!   use (opted in by label), fed by the same watches that wake the controller, so a store is
//!   up to date before the reconcile its change triggers;
//! - the public halves of the keys it generated (host key, gateway key), remembered per pool
//!   generation, because Secrets are never listed or watched (see docs/security.md).
//!
//! Every object is cached without its `managedFields`, which the operator never reads.
//!
//! A cache is a shortcut, never the truth: a miss, or a cached child that differs from what the
//! pool wants, is read from the API server before anything is written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};

/// How long a generated key is taken from memory before its Secret is read again, while the
/// pool's spec stays the same (a deleted key Secret is then re-created within this time, or at
/// the pool's next change).
pub const KEY_RECHECK: Duration = Duration::from_secs(3600);

/// The stores, set once the controller's watches exist.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    /// ConfigMaps the operator manages (agent config, authorized keys, gateway demand).
    pub config_maps: Store<ConfigMap>,
    /// Team-key ConfigMaps opted in with `nixpool.dev/use=true`.
    pub team_config_maps: Store<ConfigMap>,
    /// Only where the server serves policy/v1.
    pub pdbs: Option<Store<PodDisruptionBudget>>,
}

/// A kind of child the operator applies, and its store if it keeps one.
pub trait Cached: Resource<DynamicType = ()> + Clone + Sized + 'static {
    fn store(stores: &Stores) -> Option<&Store<Self>>;
}

macro_rules! cached {
    ($($kind:ty => |$s:ident| $store:expr),* $(,)?) => {$(
        impl Cached for $kind {
            fn store($s: &Stores) -> Option<&Store<Self>> {
                $store
            }
        }
    )*};
}

cached! {
    Deployment => |s| Some(&s.deployments),
    Service => |s| Some(&s.services),
    ConfigMap => |s| Some(&s.config_maps),
    PodDisruptionBudget => |s| s.pdbs.as_ref(),
    // Not watched (the operator has no list or watch right on them): always read.
    ServiceAccount => |_s| None,
    Role => |_s| None,
    RoleBinding => |_s| None,
}

impl Stores {
    /// The cached child `ns/name`, if the store has it.
    pub fn get<K: Cached>(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        K::store(self)?.get(&ObjectRef::new(name).within(ns))
    }

    /// Whether `ns/name` surely does not exist: its store has finished its first list and does
    /// not hold it. False without a store, or before that list is done.
    pub fn lacks<K: Cached>(&self, ns: &str, name: &str) -> bool {
        K::store(self).is_some_and(|store| {
            futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
                && store.get(&ObjectRef::new(name).within(ns)).is_none()
        })
    }

    /// The opted-in team-key ConfigMap `ns/name`, if the store has it.
    pub fn team_config_map(&self, ns: &str, name: &str) -> Option<Arc<ConfigMap>> {
        self.team_config_maps.get(&ObjectRef::new(name).within(ns))
    }
}

/// A key the operator generated, as last read from (or written to) its Secret.
#[derive(Clone)]
struct KnownKey {
    public: String,
    generation: Option<i64>,
    read: Instant,
}

/// The public halves of generated keys, by `(namespace, Secret name, pool uid)`.
#[derive(Default)]
pub struct Keys(Mutex<HashMap<(String, String, String), KnownKey>>);

impl Keys {
    /// The public key remembered for this Secret of this pool, while the pool's generation is
    /// the one it was read at and for at most [`KEY_RECHECK`].
    pub fn get(&self, ns: &str, secret: &str, pool_uid: &str, generation: Option<i64>) -> Option<String> {
        let keys = self.0.lock().expect("the key cache is never poisoned");
        let known = keys.get(&(ns.into(), secret.into(), pool_uid.into()))?;
        (known.generation == generation && known.read.elapsed() < KEY_RECHECK).then(|| known.public.clone())
    }

    /// Remembers a key just read or written; drops the ones too old to be used (those of pools
    /// that are gone, too).
    pub fn remember(&self, ns: &str, secret: &str, pool_uid: &str, generation: Option<i64>, public: &str) {
        let known = KnownKey {
            public: public.into(),
            generation,
            read: Instant::now(),
        };
        let mut keys = self.0.lock().expect("the key cache is never poisoned");
        keys.retain(|_, k| k.read.elapsed() < KEY_RECHECK);
        keys.insert((ns.into(), secret.into(), pool_uid.into()), known);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_key_holds_for_its_pool_and_generation_only() {
        let keys = Keys::default();
        keys.remember("ns", "p-host-key", "uid-1", Some(3), "ssh-ed25519 AAAA");
        assert_eq!(
            keys.get("ns", "p-host-key", "uid-1", Some(3)).as_deref(),
            Some("ssh-ed25519 AAAA")
        );
        assert_eq!(
            keys.get("ns", "p-host-key", "uid-1", Some(4)),
            None,
            "a new generation reads again"
        );
        assert_eq!(
            keys.get("ns", "p-host-key", "uid-2", Some(3)),
            None,
            "a pool of the same name is another pool"
        );
        assert_eq!(keys.get("other", "p-host-key", "uid-1", Some(3)), None);
    }
}
