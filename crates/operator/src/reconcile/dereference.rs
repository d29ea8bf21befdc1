//! The read stage: everything a valid pool names, read once per reconcile and handed on as one
//! [`Dereferenced`]: its host key (read, or generated and stored once), its team keys, the cache
//! Secrets it may mount, the gateway's key, and the names of what is missing or not opted in.
//!
//! Objects a pool names are used only if their owner labelled them `nixpool.dev/use=true`.
//! Secrets are read by name, never listed or watched; opted-in team-key ConfigMaps come from the
//! watched store, so an unchanged pool reads none of them.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};
use nixpool_api::v1alpha1::{AuthorizedKeysRef, SecretKeyRef};
use nixpool_api::{NixBuilderPool, names, paths};
use tracing::info;

use super::{apply, build};
use crate::authorized_keys::{AuthorizedKeys, BadKey, Origin};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::hostkey::HostKey;

/// How often Secrets a pool names are read again while they matter (Secrets are never watched).
pub const SECRET_POLL: Duration = Duration::from_secs(30);

/// How often a pool's deprecated team-key Secrets are read again: a key removed there must stop
/// working within 10 s (docs/reliability.md, section 6), valid spec or not. One GET per named
/// Secret each time; team-key ConfigMaps are watched and cost nothing.
pub const TEAM_KEY_SECRET_POLL: Duration = Duration::from_secs(5);

/// What the objects a pool names gave.
pub struct Dereferenced {
    pub host_key: HostKeyState,
    /// Inline keys, team keys and, with a gateway, the gateway's key; with the lines skipped.
    pub authorized_keys: AuthorizedKeys,
    /// The pool as built: a cache Secret that is not opted in is left out of the pod (its push
    /// then goes without that token or key); a missing one stays (the pods wait for it).
    pub usable_pool: NixBuilderPool,
    /// Whether this reconcile generated the gateway's key (a new pool, or a deleted Secret).
    pub gateway_key_generated: bool,
    /// `kind/name` (as `kubectl label` takes it) of each named object that does not exist, and
    /// `kind/name (key k)` of a key a team-key object lacks.
    pub missing: Vec<String>,
    /// `kind/name` of each named object its owner did not opt in.
    pub refused: Vec<String>,
}

/// The pool's SSH host key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyState {
    /// The public half of the key in its Secret: the user's, or the one the operator made before.
    Existing(String),
    /// The public half of a key this reconcile generated and stored in a new Secret.
    Generated(String),
    /// The user's Secret (`spec.ssh.hostKeySecret`) is missing or not opted in; `missing` or
    /// `refused` names it.
    Missing,
}

impl HostKeyState {
    /// The public half, `ssh-ed25519 AAAA...`, if there is a key.
    pub fn public(&self) -> Option<&str> {
        match self {
            HostKeyState::Existing(k) | HostKeyState::Generated(k) => Some(k),
            HostKeyState::Missing => None,
        }
    }
}

impl Dereferenced {
    /// When the named Secrets must be read again, if soon: Secrets are never watched, so nothing
    /// else says when they change. A pool that names Secrets that are missing or not opted in
    /// looks at them again every [`SECRET_POLL`]; one still on the deprecated team-key Secrets,
    /// every [`TEAM_KEY_SECRET_POLL`], so that a revoked key leaves within 10 s.
    pub fn poll_again(&self, pool: &NixBuilderPool) -> Option<Duration> {
        let unusable = !(self.missing.is_empty() && self.refused.is_empty());
        let team_key_secrets = !pool.spec.ssh.authorized_keys_secrets.is_empty();
        [
            unusable.then_some(SECRET_POLL),
            team_key_secrets.then_some(TEAM_KEY_SECRET_POLL),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Reads what the pool names, in this order: host key, team keys, cache Secrets, gateway key.
pub async fn dereference(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<Dereferenced> {
    let mut reader = Reader::new(ctx, pool, ns);
    let host_key = reader.host_key().await?;
    let mut authorized_keys = reader.authorized_keys().await?;
    let usable_pool = reader.with_usable_cache_secrets().await?;

    // The gateway logs in to the builders with a key of its own, which only builders trust.
    let mut gateway_key_generated = false;
    if pool.spec.effective_gateway().is_some() {
        let key = generated_key(
            ctx,
            pool,
            ns,
            &names::gateway_key_secret(&pool.name_any()),
            paths::GATEWAY_KEY_FILE,
            build::gateway_key_secret,
            "the gateway",
        )
        .await?;
        gateway_key_generated = key.generated;
        trust_gateway_key(&mut authorized_keys, &key.public);
    }
    let Reader { missing, refused, .. } = reader;
    Ok(Dereferenced {
        host_key,
        authorized_keys,
        usable_pool,
        gateway_key_generated,
        missing,
        refused,
    })
}

/// The keys the pool's sources give now, generating nothing: its inline and team keys, and the
/// gateway's key if the pool has a gateway and that key exists. What a pool with an invalid spec
/// still trusts.
pub async fn keys_given(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<AuthorizedKeys> {
    let mut given = Reader::new(ctx, pool, ns).authorized_keys().await?;
    if pool.spec.effective_gateway().is_some() {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let secret = names::gateway_key_secret(&pool.name_any());
        if let Ok(Some(key)) = read_key_secret(&api, pool, &secret, paths::GATEWAY_KEY_FILE, "the gateway").await {
            trust_gateway_key(&mut given, &key);
        }
    }
    Ok(given)
}

fn trust_gateway_key(keys: &mut AuthorizedKeys, public: &str) {
    keys.add(&format!("{public} nixpool-gateway"), || {
        Origin("the gateway's key".into())
    });
}

/// Whether the pool is gone from the API server (or is another pool under its name) while the
/// pool watch has not said so yet: after an API server restart it may relist seconds after the
/// children's watches. A pool that has had a status and whose child the stores lack is asked
/// for, once; without this, each child the garbage collector deleted woke a reconcile of the
/// deleted pool that created it again (docs/reliability.md, section 2).
pub async fn gone(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<bool> {
    let name = pool.name_any();
    let lacks_a_child = ctx.stores().is_some_and(|s| {
        s.lacks::<Deployment>(ns, &names::workload(&name))
            || s.lacks::<Service>(ns, &names::workload(&name))
            || s.lacks::<ConfigMap>(ns, &names::authorized_keys(&name))
            || s.lacks::<ConfigMap>(ns, &names::config_map(&name))
    });
    if pool.status.is_none() || !lacks_a_child {
        return Ok(false);
    }
    let api: Api<NixBuilderPool> = Api::namespaced(ctx.client.clone(), ns);
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        kind: "NixBuilderPool".into(),
        name: name.clone(),
        source,
    })?;
    Ok(live.is_none_or(|p| p.metadata.uid != pool.metadata.uid || p.metadata.deletion_timestamp.is_some()))
}

/// Reads the objects one pool names, in its namespace, and notes those it cannot use.
struct Reader<'a> {
    ctx: &'a Context,
    pool: &'a NixBuilderPool,
    ns: &'a str,
    missing: Vec<String>,
    refused: Vec<String>,
}

/// What reading an object a pool names found.
enum Named<K> {
    Usable(K),
    Missing,
    NotOptedIn,
}

impl<'a> Reader<'a> {
    fn new(ctx: &'a Context, pool: &'a NixBuilderPool, ns: &'a str) -> Self {
        Self {
            ctx,
            pool,
            ns,
            missing: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// The pool's host key: from the user's Secret, from the Secret the operator made, or
    /// freshly generated and stored exactly once (create, never overwrite).
    async fn host_key(&mut self) -> Result<HostKeyState> {
        let (name, key) = build::host_key_ref(self.pool);
        if self.pool.spec.ssh.host_key_secret.is_none() {
            let own = generated_key(
                self.ctx,
                self.pool,
                self.ns,
                &name,
                &key,
                build::host_key_secret,
                "the pool's host key (clients must then re-pin)",
            )
            .await?;
            return Ok(if own.generated {
                HostKeyState::Generated(own.public)
            } else {
                HostKeyState::Existing(own.public)
            });
        }
        let Named::Usable(secret) = self.named::<Secret>(&name).await? else {
            return Ok(HostKeyState::Missing);
        };
        let data = secret.data.as_ref().and_then(|d| d.get(&key)).ok_or_else(|| {
            Error::HostKey(format!(
                "Secret {name} has no key {key:?}; put the OpenSSH private host key there"
            ))
        })?;
        let parsed = HostKey::parse(&data.0).map_err(|e| Error::HostKey(format!("Secret {name} key {key}: {e}")))?;
        Ok(HostKeyState::Existing(parsed.public))
    }

    /// Inline keys plus every line of the referenced team-key ConfigMaps and Secrets.
    async fn authorized_keys(&mut self) -> Result<AuthorizedKeys> {
        let ssh = &self.pool.spec.ssh;
        let mut keys = AuthorizedKeys::default();
        for (i, line) in ssh.authorized_keys.iter().enumerate() {
            keys.add(line, || Origin(format!("spec.ssh.authorizedKeys[{i}]")));
        }
        for r in &ssh.authorized_keys_config_maps {
            // An opted-in one is in the team-key store; any other is read, to say why it is not used.
            let cm = match self.ctx.stores().and_then(|s| s.team_config_map(self.ns, &r.name)) {
                Some(cm) => Named::Usable(cm.as_ref().clone()),
                None => self.named::<ConfigMap>(&r.name).await?,
            };
            if let Named::Usable(cm) = cm {
                let data = cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, Some(v)));
                self.add_team_keys(&mut keys, "ConfigMap", r, data.collect());
            }
        }
        for r in &ssh.authorized_keys_secrets {
            if let Named::Usable(secret) = self.named::<Secret>(&r.name).await? {
                let data = secret.data.unwrap_or_default().into_iter();
                let text = data.map(|(k, v)| (k, String::from_utf8(v.0).ok()));
                self.add_team_keys(&mut keys, "Secret", r, text.collect());
            }
        }
        Ok(keys)
    }

    /// The keys of one team-key ConfigMap or Secret (`None`: a value that is not UTF-8 text).
    fn add_team_keys(
        &mut self,
        keys: &mut AuthorizedKeys,
        kind: &str,
        r: &AuthorizedKeysRef,
        data: BTreeMap<String, Option<String>>,
    ) {
        if let Some(k) = &r.key
            && !data.contains_key(k)
        {
            self.missing
                .push(format!("{}/{} (key {k})", kind.to_lowercase(), r.name));
        }
        let source = format!("{kind} {}", r.name);
        for (k, text) in data
            .iter()
            .filter(|(k, _)| r.key.as_ref().is_none_or(|want| want == *k))
        {
            match text {
                Some(text) => keys.add_text(text, &source, k),
                None => keys.bad.push(BadKey {
                    origin: Origin(format!("{source} key {k}")),
                    reason: "not UTF-8 text; store authorized_keys lines".into(),
                }),
            }
        }
    }

    /// The pool with its cache Secrets that are not opted in left out (see
    /// [`Dereferenced::usable_pool`]).
    async fn with_usable_cache_secrets(&mut self) -> Result<NixBuilderPool> {
        let mut usable = self.pool.clone();
        let cache = &mut usable.spec.cache;
        let refs: [Option<&mut Option<SecretKeyRef>>; 3] = [
            cache.attic.as_mut().map(|a| &mut a.token_secret),
            cache.cachix.as_mut().map(|c| &mut c.token_secret),
            cache.store.as_mut().map(|s| &mut s.signing_key_secret),
        ];
        for slot in refs.into_iter().flatten() {
            let Some(r) = slot.as_ref() else { continue };
            // A missing one stays mounted: the kubelet starts the pods once it exists.
            if let Named::NotOptedIn = self.named::<Secret>(&r.name).await? {
                *slot = None;
            }
        }
        Ok(usable)
    }

    /// Reads an object the pool names, by name (Secrets are never listed or watched), and notes
    /// it as missing or not opted in.
    async fn named<K>(&mut self, name: &str) -> Result<Named<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        let kind = K::kind(&()).to_string();
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), self.ns);
        let found = api.get_opt(name).await.map_err(|source| Error::Read {
            kind: kind.clone(),
            name: name.to_string(),
            source,
        })?;
        let tag = format!("{}/{name}", kind.to_lowercase());
        Ok(match found {
            None => {
                self.missing.push(tag);
                Named::Missing
            }
            Some(o) if !opted_in(o.meta()) => {
                self.refused.push(tag);
                Named::NotOptedIn
            }
            Some(o) => Named::Usable(o),
        })
    }
}

/// Whether an object's owner let pools use it (`nixpool.dev/use: "true"`).
fn opted_in(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(nixpool_api::labels::USE))
        .is_some_and(|v| v == "true")
}

/// The public half of a key the operator keeps in a Secret of its own.
struct OwnKey {
    public: String,
    /// Whether this reconcile generated it.
    generated: bool,
}

/// A key pair the operator generates for a pool and keeps in a Secret of its own (the host key,
/// the gateway's key): read from that Secret, or generated and stored exactly once (create,
/// never overwrite). A Secret under that name the pool did not make is not adopted. An unchanged
/// pool's key comes from memory ([`crate::cache::Keys`]).
async fn generated_key(
    ctx: &Context,
    pool: &NixBuilderPool,
    ns: &str,
    name: &str,
    file: &str,
    secret_of: fn(&NixBuilderPool, &HostKey) -> Secret,
    what: &str,
) -> Result<OwnKey> {
    let uid = pool.metadata.uid.as_deref().unwrap_or_default();
    let generation = pool.metadata.generation;
    if let Some(public) = ctx.keys.get(ns, name, uid, generation) {
        return Ok(OwnKey {
            public,
            generated: false,
        });
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    // A pool that has never had a status has no key yet, unless a reconcile before a restart
    // made it: try to create the Secret first (409 means it exists, and it is read), which saves
    // a new pool's read.
    if pool.status.is_none()
        && let Some(public) = create_key_secret(&api, pool, name, secret_of).await?
    {
        ctx.keys.remember(ns, name, uid, generation, &public);
        return Ok(OwnKey {
            public,
            generated: true,
        });
    }
    let read = || read_key_secret(&api, pool, name, file, what);
    let (public, generated) = match read().await? {
        Some(public) => (public, false),
        None => match create_key_secret(&api, pool, name, secret_of).await? {
            Some(public) => (public, true),
            // Another writer created it between the read and the create: take its key.
            None => (
                read().await?.ok_or_else(|| {
                    Error::HostKey(format!(
                        "Secret {name} came and went while the operator read it; it is read again at the next reconcile"
                    ))
                })?,
                false,
            ),
        },
    };
    ctx.keys.remember(ns, name, uid, generation, &public);
    Ok(OwnKey { public, generated })
}

/// The public half of the key in the pool's own key Secret, or `None` if there is no such
/// Secret. A Secret under that name the pool did not make is not adopted.
async fn read_key_secret(
    api: &Api<Secret>,
    pool: &NixBuilderPool,
    name: &str,
    file: &str,
    what: &str,
) -> Result<Option<String>> {
    let existing = api.get_opt(name).await.map_err(|source| Error::Read {
        kind: "Secret".into(),
        name: name.to_string(),
        source,
    })?;
    let Some(secret) = existing else {
        return Ok(None);
    };
    if !apply::controlled_by(&secret.metadata, pool.metadata.uid.as_deref()) {
        return Err(Error::NotOwned {
            kind: "Secret".into(),
            name: name.to_string(),
        });
    }
    let data = secret.data.as_ref().and_then(|d| d.get(file)).ok_or_else(|| {
        Error::HostKey(format!(
            "Secret {name} has no key {file:?}; delete the Secret to have a new key generated for {what}"
        ))
    })?;
    let key = HostKey::parse(&data.0).map_err(|e| Error::HostKey(format!("Secret {name} key {file}: {e}")))?;
    Ok(Some(key.public))
}

/// Generates a key and stores it in a new Secret: create, not apply, so that a Secret that
/// already exists (another writer got there first) is never replaced. Returns the public half,
/// or `None` if the Secret exists.
async fn create_key_secret(
    api: &Api<Secret>,
    pool: &NixBuilderPool,
    name: &str,
    secret_of: fn(&NixBuilderPool, &HostKey) -> Secret,
) -> Result<Option<String>> {
    let key = HostKey::generate();
    let pp = PostParams {
        field_manager: Some(nixpool_api::FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&pp, &build::with_applied_hash(secret_of(pool, &key))).await {
        Ok(_) => {
            info!(public = %key.public, secret = name, "generated a key");
            Ok(Some(key.public))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(source) => Err(Error::Apply {
            kind: "Secret".into(),
            name: name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ssh: serde_json::Value) -> NixBuilderPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
            "metadata": {"name": "b", "namespace": "ci"},
            "spec": {"ssh": ssh}
        }))
        .unwrap()
    }

    fn found(pool: &NixBuilderPool, missing: &[&str], refused: &[&str]) -> Dereferenced {
        Dereferenced {
            host_key: HostKeyState::Missing,
            authorized_keys: AuthorizedKeys::default(),
            usable_pool: pool.clone(),
            gateway_key_generated: false,
            missing: missing.iter().map(|s| s.to_string()).collect(),
            refused: refused.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn named_secrets_are_read_again_while_they_matter() {
        let plain = pool(serde_json::json!({}));
        assert_eq!(found(&plain, &[], &[]).poll_again(&plain), None, "all usable");
        assert_eq!(found(&plain, &["secret/x"], &[]).poll_again(&plain), Some(SECRET_POLL));
        assert_eq!(found(&plain, &[], &["secret/x"]).poll_again(&plain), Some(SECRET_POLL));
        let deprecated = pool(serde_json::json!({"authorizedKeysSecrets": [{"name": "team"}]}));
        assert_eq!(
            found(&deprecated, &[], &[]).poll_again(&deprecated),
            Some(TEAM_KEY_SECRET_POLL)
        );
        assert_eq!(
            found(&deprecated, &["secret/x"], &[]).poll_again(&deprecated),
            Some(TEAM_KEY_SECRET_POLL),
            "the sooner of the two"
        );
    }

    #[test]
    fn only_a_key_there_is_has_a_public_half() {
        assert_eq!(HostKeyState::Existing("k".into()).public(), Some("k"));
        assert_eq!(HostKeyState::Generated("k".into()).public(), Some("k"));
        assert_eq!(HostKeyState::Missing.public(), None);
    }
}
