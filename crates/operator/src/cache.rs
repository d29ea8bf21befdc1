//! What the operator keeps in memory of the objects it reads, so that an unchanged pool costs
//! no API request:
//! - reflector stores of the children it watches anyway (Deployments, Services, ConfigMaps,
//!   ServiceAccounts, Roles, RoleBindings and PodDisruptionBudgets with its managed-by label) and of the team-key ConfigMaps pools may
//!   use (opted in by label), fed by the same watches that wake the controller, so a store is
//!   up to date before the reconcile its change triggers;
//! - the public halves of the keys it generated (host key, gateway key), remembered per pool
//!   generation, because Secrets are never listed or watched (see docs/security.md).
//!
//! Every object is cached without its `managedFields`, which the operator never reads; the
//! largest kinds (Deployments, Services, ConfigMaps) as [`Compact`] copies.
//!
//! A cache is a shortcut, never the truth: a miss, or a cached child that differs from what the
//! pool wants, is read from the API server before anything is written.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read as _;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flate2::read::DeflateDecoder;
use flate2::{Compress, Compression, FlushCompress, Status};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::reflector::{ObjectRef, Store};
use nixpool_api::NixBuilderPool;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How long a generated key is taken from memory before its Secret is read again, while the
/// pool's spec stays the same (a deleted key Secret is then re-created within this time, or at
/// the pool's next change).
pub const KEY_RECHECK: Duration = Duration::from_secs(3600);

/// The stores, set once the controller's watches exist.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Compact<Deployment>>,
    pub services: Store<Compact<Service>>,
    /// ConfigMaps the operator manages (agent config, authorized keys, gateway demand).
    pub config_maps: Store<Compact<ConfigMap>>,
    /// Team-key ConfigMaps opted in with `nixpool.dev/use=true`.
    pub team_config_maps: Store<ConfigMap>,
    /// A gateway's ServiceAccount, Role and RoleBinding.
    pub service_accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
    /// Only where the server serves policy/v1.
    pub pdbs: Option<Store<PodDisruptionBudget>>,
}

/// A kind of child the operator applies, and its store if it keeps one.
pub trait Cached: Resource<DynamicType = ()> + Clone + Sized + 'static {
    /// What its store keeps of each object: the object, or a [`Compact`] copy.
    type Kept: Resource<DynamicType = ()> + Clone + 'static;
    fn store(stores: &Stores) -> Option<&Store<Self::Kept>>;
    fn from_kept(kept: &Self::Kept) -> Self;
}

macro_rules! cached {
    ($($kind:ty => |$s:ident| $store:expr),* $(,)?) => {$(
        impl Cached for $kind {
            type Kept = Self;
            fn store($s: &Stores) -> Option<&Store<Self>> {
                $store
            }
            fn from_kept(kept: &Self) -> Self {
                kept.clone()
            }
        }
    )*};
}

macro_rules! cached_compact {
    ($($kind:ty => |$s:ident| $store:expr),* $(,)?) => {$(
        impl Cached for $kind {
            type Kept = Compact<Self>;
            fn store($s: &Stores) -> Option<&Store<Compact<Self>>> {
                $store
            }
            fn from_kept(kept: &Compact<Self>) -> Self {
                kept.object()
            }
        }
    )*};
}

cached_compact! {
    Deployment => |s| Some(&s.deployments),
    Service => |s| Some(&s.services),
    ConfigMap => |s| Some(&s.config_maps),
}

cached! {
    PodDisruptionBudget => |s| s.pdbs.as_ref(),
    ServiceAccount => |s| Some(&s.service_accounts),
    Role => |s| Some(&s.roles),
    RoleBinding => |s| Some(&s.role_bindings),
}

impl Stores {
    /// The cached child `ns/name`, if the store has it.
    pub fn get<K: Cached>(&self, ns: &str, name: &str) -> Option<K> {
        let kept = K::store(self)?.get(&ObjectRef::new(name).within(ns))?;
        Some(K::from_kept(&kept))
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

/// A watched object kept as the few metadata fields the controller and the store look up (name,
/// namespace, uid, resourceVersion, ownerReferences) and the [`PackedJson`] of all the rest,
/// decoded again only when a reconcile reads the object. At 3000 pools (heaptrack) a
/// k8s-openapi Deployment took about 26 KB of heap and a fully decoded `ObjectMeta` alone about
/// 2.2 KB of each cached child (labels and annotations are a map node and two strings each);
/// the same fields as JSON take a few hundred bytes.
#[derive(Clone, Debug)]
pub struct Compact<K> {
    metadata: ObjectMeta,
    /// The object without the fields kept in `metadata` (nor its managedFields).
    rest: PackedJson,
    kind: PhantomData<fn() -> K>,
}

impl<K: Resource + Serialize + DeserializeOwned> Compact<K> {
    pub fn new(mut object: K) -> Self {
        let metadata = take_identity(object.meta_mut());
        Compact {
            metadata,
            rest: PackedJson::of(&object),
            kind: PhantomData,
        }
    }

    /// The object, decoded again.
    pub fn object(&self) -> K {
        let mut object: K = self.rest.decode();
        restore_identity(object.meta_mut(), &self.metadata);
        object
    }
}

impl<'de, K: Resource + Serialize + DeserializeOwned> Deserialize<'de> for Compact<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        K::deserialize(deserializer).map(Compact::new)
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Compact<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A pool as the controller keeps it in its store: like [`Compact`], the few metadata fields
/// the controller looks up and the packed JSON of the rest, plus the team-key ConfigMaps it names (to
/// find the pools a ConfigMap's change concerns without decoding every pool). A decoded pool
/// took about 3.8 KB of heap in the store (heaptrack, 3000 pools); each reconcile decodes its
/// pool again, which costs microseconds.
#[derive(Clone, Debug)]
pub struct KeptPool {
    metadata: ObjectMeta,
    /// Names of `spec.ssh.authorizedKeysConfigMaps`.
    config_maps: Arc<[String]>,
    /// The pool without the fields kept in `metadata`; or why it does not decode.
    rest: Result<PackedJson, Arc<InvalidObject>>,
}

impl KeptPool {
    /// The pool, decoded again; or why the API server's copy does not decode (an object stored
    /// before a CRD change, for example).
    pub fn pool(&self) -> Result<NixBuilderPool, &InvalidObject> {
        let rest = self.rest.as_ref().map_err(|invalid| &**invalid)?;
        let mut pool: NixBuilderPool = rest.decode();
        restore_identity(&mut pool.metadata, &self.metadata);
        Ok(pool)
    }

    /// Whether it names the team-key ConfigMap `name` (in its own namespace).
    pub fn names_config_map(&self, name: &str) -> bool {
        self.config_maps.iter().any(|n| n == name)
    }
}

impl<'de> Deserialize<'de> for KeptPool {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let DeserializeGuard(guarded) = DeserializeGuard::<NixBuilderPool>::deserialize(deserializer)?;
        Ok(match guarded {
            Ok(mut pool) => {
                let metadata = take_identity(&mut pool.metadata);
                let config_maps = pool
                    .spec
                    .ssh
                    .authorized_keys_config_maps
                    .iter()
                    .map(|r| r.name.clone())
                    .collect();
                KeptPool {
                    metadata,
                    config_maps,
                    rest: Ok(PackedJson::of(&pool)),
                }
            }
            Err(mut invalid) => {
                invalid.metadata.managed_fields = None;
                KeptPool {
                    metadata: invalid.metadata.clone(),
                    config_maps: Arc::new([]),
                    rest: Err(Arc::new(invalid)),
                }
            }
        })
    }
}

impl Resource for KeptPool {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        NixBuilderPool::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        NixBuilderPool::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        NixBuilderPool::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        NixBuilderPool::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// An object's JSON, deflated: a kept object is read far less often than it is held, and
/// deflate at level 1 takes a rendered Deployment's JSON from 2527 to 1036 bytes
/// (docs/benchmarks.md has what it saves at 1000 and 10,000 pools).
#[derive(Clone, Debug)]
struct PackedJson(Arc<[u8]>);

thread_local! {
    /// A deflate state of a few hundred KB, made once per thread rather than once per object.
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
}

impl PackedJson {
    fn of<T: Serialize>(value: &T) -> Self {
        let json = serde_json::to_vec(value).expect("Kubernetes objects serialize");
        let packed = DEFLATE.with_borrow_mut(|deflate| {
            deflate.reset();
            // Deflate adds at most a few bytes per 16 KB block to what does not shrink.
            let mut packed = Vec::with_capacity(json.len() + json.len() / 64 + 64);
            loop {
                let read = usize::try_from(deflate.total_in()).expect("fits in memory");
                let status = deflate
                    .compress_vec(&json[read..], &mut packed, FlushCompress::Finish)
                    .expect("deflating into memory does not fail");
                if status == Status::StreamEnd {
                    return packed;
                }
                packed.reserve(packed.capacity());
            }
        });
        PackedJson(packed.into())
    }

    fn decode<T: DeserializeOwned>(&self) -> T {
        let mut json = Vec::new();
        DeflateDecoder::new(&*self.0)
            .read_to_end(&mut json)
            .expect("what this process deflated inflates");
        serde_json::from_slice(&json).expect("JSON this process packed decodes")
    }
}

/// Moves out of `meta` what a kept copy keeps decoded (name, namespace, uid, resourceVersion,
/// ownerReferences) and drops its managedFields, which the operator never reads.
fn take_identity(meta: &mut ObjectMeta) -> ObjectMeta {
    meta.managed_fields = None;
    ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        owner_references: meta.owner_references.take(),
        ..ObjectMeta::default()
    }
}

/// Puts back into a decoded copy what [`take_identity`] took out.
fn restore_identity(meta: &mut ObjectMeta, kept: &ObjectMeta) {
    let kept = kept.clone();
    meta.name = kept.name;
    meta.namespace = kept.namespace;
    meta.uid = kept.uid;
    meta.resource_version = kept.resource_version;
    meta.owner_references = kept.owner_references;
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

/// How long a pool's status waits at most for the Deployment controller to observe a Deployment
/// the operator wrote. Short: a longer wait (60 s) made 1000 new pools converge in 147 s instead
/// of 88 s in the pools bench and saved no write there.
pub const STATUS_WAIT: Duration = Duration::from_secs(5);

/// When the operator last wrote each Deployment, by `(uid, generation)`, so that the pool's
/// status can wait until the Deployment controller has observed that generation (see
/// `reconcile`). Forgotten after [`STATUS_WAIT`]; after a restart nothing waits.
#[derive(Default)]
pub struct Rollouts(Mutex<HashMap<(String, i64), Instant>>);

impl Rollouts {
    /// Remembers that `d` was just written.
    pub fn written(&self, d: &Deployment) {
        let (Some(uid), Some(generation)) = (d.metadata.uid.clone(), d.metadata.generation) else {
            return;
        };
        let mut written = self.0.lock().expect("the rollout memo is never poisoned");
        written.retain(|_, at| at.elapsed() < STATUS_WAIT);
        written.insert((uid, generation), Instant::now());
    }

    /// How much longer the status waits for `d`: while the operator wrote its current generation
    /// less than [`STATUS_WAIT`] ago and its controller has not observed it. A Deployment just
    /// created (generation 1) also waits until its controller reports its pods created
    /// (`updatedReplicas`), so that a new pool's status is written once, not once for the
    /// Deployment and once more for its pods a few milliseconds later. A changed Deployment
    /// does not wait for its rollout, which takes as long as its pods take to be ready.
    pub fn wait_for(&self, d: &Deployment) -> Option<Duration> {
        let status = d.status.as_ref();
        let observed = status.and_then(|s| s.observed_generation);
        let pods_created = || {
            let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            status.and_then(|s| s.updated_replicas).unwrap_or(0) >= wanted
        };
        if observed >= d.metadata.generation && (d.metadata.generation != Some(1) || pods_created()) {
            return None;
        }
        let key = (d.metadata.uid.clone()?, d.metadata.generation?);
        let written = self.0.lock().expect("the rollout memo is never poisoned");
        STATUS_WAIT
            .checked_sub(written.get(&key)?.elapsed())
            .filter(|left| !left.is_zero())
    }
}

/// The status the operator last wrote to each pool (by uid), as a hash, with the resourceVersion
/// of the pool it was computed from. The pools' store may still hold that older copy when the
/// next reconcile runs (the write's own watch event comes later); that copy is then known to be
/// stale, and a status equal to the one written is not written again. Entries go once the store
/// has a newer copy of the pool, or after a minute.
#[derive(Default)]
pub struct Statuses(Mutex<HashMap<String, WrittenStatus>>);

struct WrittenStatus {
    from_version: String,
    hash: String,
    at: Instant,
}

impl Statuses {
    /// Whether `status_hash` is what was last written to the pool `uid`, whose copy at hand
    /// (`version`) is the one that status was computed from.
    pub fn already_written(&self, uid: &str, version: &str, status_hash: &str) -> bool {
        let mut written = self.0.lock().expect("the status memo is never poisoned");
        match written.get(uid) {
            Some(w) if w.from_version == version => w.hash == status_hash,
            Some(_) => {
                // The store has caught up: its copy is the truth again.
                written.remove(uid);
                false
            }
            None => false,
        }
    }

    pub fn remember(&self, uid: &str, version: &str, status_hash: &str) {
        let mut written = self.0.lock().expect("the status memo is never poisoned");
        written.retain(|_, w| w.at.elapsed() < Duration::from_secs(60));
        written.insert(
            uid.into(),
            WrittenStatus {
                from_version: version.into(),
                hash: status_hash.into(),
                at: Instant::now(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(generation: i64, observed: Option<i64>) -> Deployment {
        with_pods(generation, observed, 2, 2)
    }

    fn with_pods(generation: i64, observed: Option<i64>, replicas: i32, updated: i32) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "uid": "u", "generation": generation},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"observedGeneration": observed, "updatedReplicas": updated},
        }))
        .unwrap()
    }

    #[test]
    fn a_new_deployment_is_waited_for_until_its_pods_are_created_a_changed_one_is_not() {
        let rollouts = Rollouts::default();
        rollouts.written(&with_pods(1, None, 2, 0));
        assert!(rollouts.wait_for(&with_pods(1, None, 2, 0)).is_some(), "not observed");
        assert!(
            rollouts.wait_for(&with_pods(1, Some(1), 2, 0)).is_some(),
            "observed, its pods not created yet"
        );
        assert!(
            rollouts.wait_for(&with_pods(1, Some(1), 2, 1)).is_some(),
            "one of two pods"
        );
        assert_eq!(rollouts.wait_for(&with_pods(1, Some(1), 2, 2)), None, "pods created");
        assert_eq!(rollouts.wait_for(&with_pods(1, Some(1), 0, 0)), None, "no pods wanted");
        rollouts.written(&with_pods(2, Some(1), 2, 2));
        assert_eq!(
            rollouts.wait_for(&with_pods(2, Some(2), 2, 0)),
            None,
            "a changed Deployment waits only until observed, not for its rollout"
        );
    }

    #[test]
    fn a_compact_copy_gives_back_the_object_without_its_managed_fields() {
        let live: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "d", "namespace": "ns", "uid": "u", "generation": 3, "resourceVersion": "7",
                "labels": {"app": "x"}, "annotations": {"nixpool.dev/applied-hash": "h"},
                "ownerReferences": [{"apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool", "name": "p", "uid": "pu", "controller": true}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
            },
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "x"}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "i:1", "resources": {"limits": {"memory": "1Gi"}}}]}}},
            "status": {"observedGeneration": 3, "updatedReplicas": 2},
        }))
        .unwrap();
        let kept: Compact<Deployment> = serde_json::from_value(serde_json::to_value(&live).unwrap()).unwrap();
        assert_eq!(kept.meta().uid.as_deref(), Some("u"));
        assert_eq!(kept.meta().managed_fields, None);
        assert_eq!(
            kept.meta().owner_references.as_ref().map(Vec::len),
            Some(1),
            "the controller maps by it"
        );
        assert_eq!(kept.meta().labels, None, "kept as JSON, not decoded");
        let mut expected = live.clone();
        expected.metadata.managed_fields = None;
        assert_eq!(kept.object(), expected);
        assert_eq!(<Compact<Deployment> as Resource>::plural(&()), "deployments");
        assert_eq!(<Compact<Deployment> as Resource>::api_version(&()), "apps/v1");
    }

    #[test]
    fn packed_json_gives_back_what_it_packed_and_shrinks_a_children_sized_object() {
        // A ConfigMap of 256 KB of hex noise: many deflate blocks, shrinking only to about half.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: String = (0..256 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from_digit((x % 16) as u32, 16).unwrap()
            })
            .collect();
        let big = ConfigMap {
            data: Some([("noise".to_string(), noise)].into()),
            ..ConfigMap::default()
        };
        assert_eq!(PackedJson::of(&big).decode::<ConfigMap>(), big);
        // A builder Deployment as the operator renders it: its JSON shrinks to under a half.
        let rendered = crate::render::render(
            include_str!("../../../examples/minimal.yaml"),
            &"ghcr.io/nixpool/nixpool-builder:0.1.0".into(),
            true,
        )
        .unwrap();
        let deployment: Deployment = serde_norway::Deserializer::from_str(&rendered)
            .map(|doc| serde_norway::Value::deserialize(doc).unwrap())
            .find(|doc| doc.get("kind").and_then(|k| k.as_str()) == Some("Deployment"))
            .map(|doc| serde_norway::from_value(doc).unwrap())
            .unwrap();
        let json = serde_json::to_vec(&deployment).unwrap();
        let packed = PackedJson::of(&deployment);
        assert!(
            packed.0.len() * 2 < json.len(),
            "{} of {} bytes",
            packed.0.len(),
            json.len()
        );
        assert_eq!(packed.decode::<Deployment>(), deployment);
    }

    #[test]
    fn a_kept_pool_gives_back_the_pool_and_knows_its_team_config_maps() {
        let json = serde_json::json!({
            "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 2, "resourceVersion": "9",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"replicas": 3, "ssh": {"authorizedKeysConfigMaps": [{"name": "team"}]}},
            "status": {"observedGeneration": 1},
        });
        let kept: KeptPool = serde_json::from_value(json.clone()).unwrap();
        let mut expected: NixBuilderPool = serde_json::from_value(json).unwrap();
        expected.metadata.managed_fields = None;
        assert_eq!(kept.pool().unwrap(), expected);
        assert_eq!(kept.meta().name.as_deref(), Some("p"));
        assert_eq!(kept.meta().generation, None, "kept as JSON, not decoded");
        assert!(kept.names_config_map("team"));
        assert!(!kept.names_config_map("other"));
    }

    #[test]
    fn a_pool_that_does_not_decode_is_kept_with_its_error_and_metadata() {
        let kept: KeptPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
            "metadata": {"name": "p", "namespace": "ns", "generation": 4},
            "spec": {"replicas": "many"},
        }))
        .unwrap();
        let invalid = kept.pool().unwrap_err();
        assert!(invalid.error.contains("\"many\""), "{}", invalid.error);
        assert_eq!(invalid.metadata.generation, Some(4));
        assert_eq!(kept.meta().name.as_deref(), Some("p"));
    }

    #[test]
    fn a_status_is_not_written_twice_from_the_same_stale_copy_of_its_pool() {
        let statuses = Statuses::default();
        assert!(!statuses.already_written("u", "10", "h1"));
        statuses.remember("u", "10", "h1");
        assert!(statuses.already_written("u", "10", "h1"), "same copy, same status");
        assert!(!statuses.already_written("u", "10", "h2"), "same copy, another status");
        assert!(!statuses.already_written("u", "11", "h1"), "a newer copy is the truth");
        assert!(
            !statuses.already_written("u", "10", "h1"),
            "forgotten once a newer copy came"
        );
    }

    #[test]
    fn a_status_waits_only_for_a_generation_written_here_and_not_yet_observed() {
        let rollouts = Rollouts::default();
        assert_eq!(
            rollouts.wait_for(&deployment(2, Some(1))),
            None,
            "not written by this operator"
        );
        rollouts.written(&deployment(2, Some(1)));
        let left = rollouts
            .wait_for(&deployment(2, Some(1)))
            .expect("written, not observed");
        assert!(
            left <= STATUS_WAIT && left > STATUS_WAIT - Duration::from_secs(1),
            "{left:?}"
        );
        assert_eq!(rollouts.wait_for(&deployment(2, Some(2))), None, "observed");
        assert_eq!(
            rollouts.wait_for(&deployment(3, Some(2))),
            None,
            "a generation written elsewhere"
        );
        assert!(rollouts.wait_for(&deployment(2, None)).is_some(), "never observed yet");
    }

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
