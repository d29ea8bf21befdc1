//! The controller: watches pools and everything they own or reference, and runs the reconcile
//! pipeline `validate → build → apply → status` for one pool at a time.

pub mod apply;
pub mod autoscale;
pub mod build;
mod scale;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams};
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use nixpool_api::conditions::{DEGRADED, READY, REASON_BAD_AUTHORIZED_KEYS, REASON_INVALID_SPEC, RECONCILING, STALLED};
use nixpool_api::v1alpha1::SecretKeyRef;
use nixpool_api::{NixBuilderPool, labels, names, paths};
use tracing::{debug, info, instrument, warn};

use crate::cache::{Compact, KeptPool, Stores};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::hostkey::HostKey;
use crate::keys::AuthorizedKeys;

/// Runs the controller, reconciling at most `concurrency` pools at once, until `shutdown`
/// resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    concurrency: u16,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels(labels::MANAGED_SELECTOR);
    let (pools, pool_events) = cached_watch(api::<KeptPool>(&client, &namespace), watcher::Config::default());
    let (deployments, deployment_events) = cached_watch(api::<Compact<Deployment>>(&client, &namespace), owned.clone());
    let (services, service_events) = cached_watch(api::<Compact<Service>>(&client, &namespace), owned.clone());
    let (config_maps, config_map_events) = cached_watch(api::<Compact<ConfigMap>>(&client, &namespace), owned.clone());
    // Team-key ConfigMaps are watched by the opt-in label, so the operator caches only those;
    // it has no list or watch right on Secrets at all (a pool's Secrets are read by name).
    let opted_in = watcher::Config::default().labels(&format!("{}=true", labels::USE));
    let (team_config_maps, team_events) = cached_watch(api::<ConfigMap>(&client, &namespace), opted_in);
    let mut controller = Controller::for_stream(pool_events, pools.clone())
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(config_map_events);
    // A gateway's identity and rights: watched too, so an unchanged pool with a gateway reads
    // nothing.
    let (service_accounts, service_account_events) =
        cached_watch(api::<ServiceAccount>(&client, &namespace), owned.clone());
    let (roles, role_events) = cached_watch(api::<Role>(&client, &namespace), owned.clone());
    let (role_bindings, role_binding_events) = cached_watch(api::<RoleBinding>(&client, &namespace), owned.clone());
    controller = controller
        .owns_stream(service_account_events)
        .owns_stream(role_events)
        .owns_stream(role_binding_events);
    let mut pdbs = None;
    if ctx.with_pdb {
        let (store, events) = cached_watch(api::<PodDisruptionBudget>(&client, &namespace), owned);
        controller = controller.owns_stream(events);
        pdbs = Some(store);
    }
    let _ = ctx.stores.set(Stores {
        deployments,
        services,
        config_maps,
        team_config_maps,
        service_accounts,
        roles,
        role_bindings,
        pdbs,
    });
    controller
        .watches_stream(team_events, move |cm| pools_naming_config_map(&pools, &cm))
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // Already logged, with its category, by error_policy.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // A child's event for a pool that was deleted: nothing to do.
                Err(kube::runtime::controller::Error::ObjectNotFound(pool)) => {
                    debug!(%pool, "event for a pool that is gone")
                }
                // A watch that fails (RBAC, a removed CRD) retries with backoff; say why.
                Err(e) => warn!(error = %e, "watching failed; retrying"),
                Ok(_) => {}
            }
        })
        .await;
}

/// A watch that keeps its objects in a store (without their managedFields) before it passes
/// each one on, so a reconcile it wakes reads a store that has the change already.
///
/// Its errors are logged and retried here, with its own backoff, and never passed on: the
/// controller merges every watch into one stream behind one backoff of its own, so each error
/// of any watch (after an API server restart, each watch fails once on its too old
/// resourceVersion) delayed the events of all of them, up to a minute at a time, for as long
/// as errors kept coming (docs/reliability.md, section 2).
fn cached_watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .backoff(watch_backoff())
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
        .filter_map(|event| async move {
            match event {
                Ok(object) => Some(Ok(object)),
                Err(e) => {
                    warn!(kind = %K::kind(&()), error = %e, "watching failed; retrying");
                    None
                }
            }
        });
    (store, events)
}

/// How a watch retries after an error: from 0.8 s doubling to 5 s, back to 0.8 s after a
/// minute without errors. kube's default goes up to 30 s: after a 30 s API server outage every
/// watch then waited about 30 s to reconnect, failed once more on its now too old
/// resourceVersion, and waited 30 s again before it listed, so the pools changed meanwhile waited
/// over a minute (docs/reliability.md, section 2). The operator's ten or so watches retrying
/// every 5 s cost a struggling server little.
fn watch_backoff() -> kube::runtime::utils::ResetTimerBackoff<watcher::ExponentialBackoff> {
    let retries = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(800))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(retries.into(), Duration::from_secs(60))
}

/// The pools that name a team-key ConfigMap.
fn pools_naming_config_map(pools: &Store<KeptPool>, cm: &ConfigMap) -> Vec<ObjectRef<KeptPool>> {
    let ns = cm.namespace();
    let name = cm.name_any();
    pools
        .state()
        .into_iter()
        .filter(|pool| pool.namespace() == ns && pool.names_config_map(&name))
        .map(|pool| ObjectRef::from_obj(pool.as_ref()))
        .collect()
}

#[instrument(skip_all, fields(pool = %guard.name_any(), ns = guard.namespace().unwrap_or_default()))]
async fn reconcile(guard: Arc<KeptPool>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = match guard.pool() {
        Ok(pool) => match reconcile_pool(&pool, &ctx).await {
            Err(e @ (Error::Apply { .. } | Error::HostKey(_) | Error::NotOwned { .. })) => {
                report_failure(&pool, &e, &ctx).await;
                Err(e)
            }
            // A read the API server refuses (RBAC) needs a person; a timeout is only retried.
            Err(e @ Error::Read { .. }) if e.needs_a_person() => {
                report_failure(&pool, &e, &ctx).await;
                Err(e)
            }
            other => other,
        },
        Err(invalid) => report_undecodable(invalid, &ctx).await.map(|()| Action::await_change()),
    };
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.succeeded(&pool_key(&guard));
    }
    result
}

async fn reconcile_pool(pool: &NixBuilderPool, ctx: &Context) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let valid = match validate::validate(pool, &ctx.images) {
        Ok(v) => v,
        Err(invalid) => {
            ctx.metrics.failure(REASON_INVALID_SPEC);
            warn!(problems = %invalid, "invalid spec; children left as they are");
            let status = status::invalid(pool, &invalid.to_string(), ctx.now());
            let newly = status_reason(pool, READY) != Some(REASON_INVALID_SPEC)
                || condition_message(pool, READY) != condition_message_of(&status, READY);
            status::patch(ctx, pool, status).await?;
            if newly {
                publish(
                    ctx,
                    pool,
                    EventType::Warning,
                    REASON_INVALID_SPEC,
                    "Validate",
                    invalid.to_string(),
                )
                .await;
            }
            narrow_authorized_keys(ctx, pool, &ns).await?;
            // Deprecated team-key Secrets are never watched: they are read again soon.
            return Ok(if pool.spec.ssh.authorized_keys_secrets.is_empty() {
                Action::await_change()
            } else {
                Action::requeue(TEAM_KEY_SECRET_POLL)
            });
        }
    };

    if gone(ctx, pool, &ns).await? {
        debug!("the pool is gone; its watch has not said so yet");
        return Ok(Action::await_change());
    }

    let mut missing = Vec::new();
    let mut refused = Vec::new();
    let (host_key, generated) = host_key(ctx, pool, &ns, &mut missing, &mut refused).await?;
    let mut authorized = authorized_keys(ctx, pool, &ns, &mut missing, &mut refused).await?;
    let usable = with_usable_cache_secrets(ctx, pool, &ns, &mut missing, &mut refused).await?;

    // The gateway logs in to the builders with a key of its own, which only builders trust.
    let mut gateway_key_generated = false;
    if pool.spec.effective_gateway().is_some() {
        let (key, generated) = generated_key(
            ctx,
            pool,
            &ns,
            &names::gateway_key_secret(&pool.name_any()),
            paths::GATEWAY_KEY_FILE,
            build::gateway_key_secret,
            "the gateway",
        )
        .await?;
        gateway_key_generated = generated;
        authorized.add(&format!("{key} nixpool-gateway"), || {
            crate::keys::Origin("the gateway's key".into())
        });
    }
    // With autoscaling the operator owns the builder count; it starts from what it asked for
    // last time. A new pool starts at minReplicas; a pool that turns autoscaling on keeps its
    // builders until they are idle.
    let asked_before = match (&pool.status, &pool.spec.autoscaling) {
        (Some(s), _) if s.desired_replicas.is_some() => s.desired_replicas.unwrap_or_default(),
        (None, Some(a)) => a.min_replicas,
        _ => pool.spec.replicas,
    };
    let decision = match &pool.spec.autoscaling {
        Some(a) => {
            let reports = scale::demand(ctx, pool, &ns).await?;
            Some(autoscale::decide(
                a,
                pool.spec.max_jobs,
                asked_before,
                &reports,
                ctx.now().as_second(),
            ))
        }
        None => None,
    };
    let builder_replicas = decision.as_ref().map_or(pool.spec.replicas, |d| d.replicas);
    if let Some(d) = decision.as_ref().filter(|d| d.replicas < asked_before) {
        scale::prefer_idle(ctx, &ns, d).await;
    }

    let children = build::build(
        &usable,
        &build::Inputs {
            valid: &valid,
            authorized_keys: &authorized,
            with_pdb: ctx.with_pdb,
            builder_replicas,
        },
    );
    let mut applied = apply::apply(ctx, &ns, children).await?;
    // A gateway the spec dropped is removed in the first reconcile of the new spec (an error
    // here skips the status write, so the next reconcile tries again); an unchanged pool spends
    // no read on it.
    let spec_changed = pool.status.as_ref().and_then(|s| s.observed_generation) != pool.metadata.generation;
    if applied.gateway.is_none() && spec_changed {
        applied.changed.extend(scale::remove_gateway(ctx, pool, &ns).await?);
    }

    let seen = status::Observed {
        deployment: &applied.deployment,
        gateway: applied.gateway.as_ref(),
        desired_builders: builder_replicas,
        service: &applied.service,
        host_public_key: host_key.as_deref(),
        bad_keys: &authorized.bad,
        missing_secrets: &missing,
        refused_secrets: &refused,
    };
    let new_status = status::compute(pool, &seen, ctx.now());
    let bad_keys_news = new_status.conditions.iter().any(|c| {
        c.type_ == DEGRADED
            && c.reason == REASON_BAD_AUTHORIZED_KEYS
            && condition_message(pool, DEGRADED) != Some(c.message.as_str())
    });
    let degraded_message = condition_message_of(&new_status, DEGRADED)
        .unwrap_or_default()
        .to_string();
    let scaled = decision.as_ref().is_some_and(|d| d.replicas != asked_before);
    // A Deployment written just now still reports on the spec before it; its controller catches
    // up within milliseconds, and that watch event brings the pool back here. The status is
    // written then, once, rather than now and again then (other children's events may bring
    // the pool back before that: they wait too). What the status must remember (a scale
    // decision, news of bad keys) is written at once; a Deployment controller that does not
    // catch up holds the status back for STATUS_WAIT at most.
    let status_wait = std::iter::once(&applied.deployment)
        .chain(applied.gateway.as_ref())
        .filter_map(|d| ctx.rollouts.wait_for(d))
        .max()
        .filter(|_| !scaled && !bad_keys_news);
    if status_wait.is_some() {
        debug!("status waits for the Deployment controller to observe what was applied");
    } else {
        status::patch(ctx, pool, new_status).await?;
    }

    // A new pool gets one Event that says everything its creation did; later, each key
    // generated (a deleted key Secret) and each change is an Event of its own.
    let host_key_news = generated.then(|| {
        format!(
            "generated the pool's ed25519 host key {} (Secret {})",
            host_key.as_deref().unwrap_or("?"),
            build::host_key_ref(pool).0
        )
    });
    let gateway_key_news = gateway_key_generated
        .then(|| "generated the gateway's ed25519 key; builders trust it, clients cannot log in with it".to_string());
    let applied_news = (!applied.changed.is_empty()).then(|| format!("applied {}", applied.changed.join(", ")));
    if !applied.changed.is_empty() {
        info!(changed = ?applied.changed, "applied");
    }
    if pool.status.is_none() && generated {
        let news: Vec<String> = [host_key_news, gateway_key_news, applied_news]
            .into_iter()
            .flatten()
            .collect();
        publish(ctx, pool, EventType::Normal, "Created", "Create", news.join("; ")).await;
    } else {
        for (reason, action, news) in [
            ("HostKeyGenerated", "Create", host_key_news),
            ("GatewayKeyGenerated", "Create", gateway_key_news),
            ("Applied", "Apply", applied_news),
        ] {
            if let Some(note) = news {
                publish(ctx, pool, EventType::Normal, reason, action, note).await;
            }
        }
    }
    if let Some(d) = decision.as_ref().filter(|d| d.replicas != asked_before) {
        let (reason, direction) = if d.replicas > asked_before {
            ("ScaledUp", "up")
        } else {
            ("ScaledDown", "down")
        };
        let why = if d.replicas > asked_before {
            format!("{} sessions ({} waiting) need them", d.sessions, d.waiting)
        } else {
            format!(
                "{} idle for {} s: {}",
                if d.idle.len() == 1 {
                    "1 builder was"
                } else {
                    "builders were"
                },
                pool.spec.autoscaling.as_ref().map_or(0, |a| a.idle_seconds),
                d.idle.join(", ")
            )
        };
        info!(
            from = asked_before,
            to = d.replicas,
            sessions = d.sessions,
            waiting = d.waiting,
            "{reason}"
        );
        ctx.metrics
            .scale_decisions
            .get_or_create(&crate::metrics::DirectionLabels {
                direction: direction.into(),
            })
            .inc();
        publish(
            ctx,
            pool,
            EventType::Normal,
            reason,
            "Scale",
            format!("builders {asked_before} → {}: {why}", d.replicas),
        )
        .await;
    }
    if bad_keys_news {
        publish(
            ctx,
            pool,
            EventType::Warning,
            REASON_BAD_AUTHORIZED_KEYS,
            "Validate",
            degraded_message,
        )
        .await;
    }
    // Secrets are read by name, never watched: a pool that names Secrets that are missing or not
    // opted in looks at them again every 30 s; one still on the deprecated team-key Secrets,
    // every 5 s, so that a revoked key leaves within 10 s.
    let mut next = ctx.resync;
    if !(missing.is_empty() && refused.is_empty()) {
        next = next.min(SECRET_POLL);
    }
    if !pool.spec.ssh.authorized_keys_secrets.is_empty() {
        next = next.min(TEAM_KEY_SECRET_POLL);
    }
    // The gateways write their reports when demand changes (which wakes this controller through
    // the ConfigMap watch); only a builder's idle time running out needs a timer.
    if let Some(due) = decision.and_then(|d| d.recheck) {
        next = next.min(due);
    }
    if let Some(wait) = status_wait {
        next = next.min(wait);
    }
    Ok(Action::requeue(next))
}

/// Whether the pool is gone from the API server (or is another pool under its name) while the
/// pool watch has not said so yet: after an API server restart it may relist seconds after the
/// children's watches. A pool that has had a status and whose child the stores lack is asked
/// for, once; without this, each child the garbage collector deleted woke a reconcile of the
/// deleted pool that created it again (docs/reliability.md, section 2).
async fn gone(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<bool> {
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

/// While the spec is invalid, revocations still flow: the pool's authorized-keys ConfigMap, if
/// it has one, keeps only the keys the spec's sources still give
/// ([`nixpool_api::rules::narrowed_authorized_keys`]). No other child is touched, and nothing
/// is created or generated.
async fn narrow_authorized_keys(ctx: &Context, pool: &NixBuilderPool, ns: &str) -> Result<()> {
    let name = names::authorized_keys(&pool.name_any());
    let live = match ctx.stores().and_then(|s| s.get::<ConfigMap>(ns, &name)) {
        Some(cm) => Some(cm),
        None => Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
            .get_opt(&name)
            .await
            .map_err(|source| Error::Read {
                kind: "ConfigMap".into(),
                name: name.clone(),
                source,
            })?,
    };
    let Some(live) = live.filter(|cm| apply::controlled_by(&cm.metadata, pool.metadata.uid.as_deref())) else {
        return Ok(());
    };
    let trusted = live
        .data
        .as_ref()
        .and_then(|d| d.get(paths::AUTHORIZED_KEYS_FILE))
        .cloned()
        .unwrap_or_default();
    let (mut missing, mut refused) = (Vec::new(), Vec::new());
    let mut given = authorized_keys(ctx, pool, ns, &mut missing, &mut refused).await?;
    // The gateway's key, if the pool has a gateway and its key exists (none is generated here).
    if pool.spec.effective_gateway().is_some() {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let secret = names::gateway_key_secret(&pool.name_any());
        if let Ok(Some(key)) = read_key_secret(&api, pool, &secret, paths::GATEWAY_KEY_FILE, "the gateway").await {
            given.add(&format!("{key} nixpool-gateway"), || {
                crate::keys::Origin("the gateway's key".into())
            });
        }
    }
    let narrowed = nixpool_api::rules::narrowed_authorized_keys(&trusted, &given.render());
    if narrowed == trusted {
        return Ok(());
    }
    let removed = trusted.lines().count() - narrowed.lines().count();
    let mut kept = AuthorizedKeys::default();
    kept.add_text(&narrowed, "the narrowed authorized keys", paths::AUTHORIZED_KEYS_FILE);
    let desired = build::authorized_keys(pool, &kept);
    let mut changed = Vec::new();
    apply::ensure(ctx, ns, desired, &mut changed).await?;
    info!(
        removed,
        "spec invalid: removed keys their sources no longer give from the authorized keys"
    );
    publish(
        ctx,
        pool,
        EventType::Normal,
        "KeysRevoked",
        "Apply",
        format!(
            "the spec is invalid, so only revocations are applied: removed {removed} key(s) their sources no longer give from ConfigMap {name}"
        ),
    )
    .await;
    Ok(())
}

/// How often Secrets a pool names are read again while they matter (Secrets are never watched).
pub const SECRET_POLL: Duration = Duration::from_secs(30);

/// How often a pool's deprecated team-key Secrets are read again: a key removed there must stop
/// working within 10 s (docs/reliability.md, section 6), valid spec or not. One GET per named
/// Secret each time; team-key ConfigMaps are watched and cost nothing.
pub const TEAM_KEY_SECRET_POLL: Duration = Duration::from_secs(5);

/// The pool as built: a cache Secret that is not opted in is left out of the pod (its push then
/// goes without that token or key); a missing one stays (the pods wait for it). Both are
/// reported.
async fn with_usable_cache_secrets(
    ctx: &Context,
    pool: &NixBuilderPool,
    ns: &str,
    missing: &mut Vec<String>,
    refused: &mut Vec<String>,
) -> Result<NixBuilderPool> {
    let mut usable = pool.clone();
    let cache = &mut usable.spec.cache;
    let refs: [Option<&mut Option<SecretKeyRef>>; 3] = [
        cache.attic.as_mut().map(|a| &mut a.token_secret),
        cache.cachix.as_mut().map(|c| &mut c.token_secret),
        cache.store.as_mut().map(|s| &mut s.signing_key_secret),
    ];
    for slot in refs.into_iter().flatten() {
        let Some(r) = slot.as_ref() else { continue };
        // A missing one stays mounted: the kubelet starts the pods once it exists.
        if let Named::NotOptedIn = named::<Secret>(ctx, ns, &r.name, missing, refused).await? {
            *slot = None;
        }
    }
    Ok(usable)
}

fn status_reason<'a>(pool: &'a NixBuilderPool, type_: &str) -> Option<&'a str> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

fn condition_message<'a>(pool: &'a NixBuilderPool, type_: &str) -> Option<&'a str> {
    condition_message_of(pool.status.as_ref()?, type_)
}

fn condition_message_of<'a>(status: &'a nixpool_api::NixBuilderPoolStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.as_str())
}

/// The public half of the pool's host key: from the user's Secret, from the Secret the operator
/// made, or freshly generated and stored exactly once (create, never overwrite). Returns whether
/// it was generated.
async fn host_key(
    ctx: &Context,
    pool: &NixBuilderPool,
    ns: &str,
    missing: &mut Vec<String>,
    refused: &mut Vec<String>,
) -> Result<(Option<String>, bool)> {
    let (name, key) = build::host_key_ref(pool);
    if pool.spec.ssh.host_key_secret.is_none() {
        let (k, generated) = generated_key(
            ctx,
            pool,
            ns,
            &name,
            &key,
            build::host_key_secret,
            "the pool's host key (clients must then re-pin)",
        )
        .await?;
        return Ok((Some(k), generated));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = api.get_opt(&name).await.map_err(|source| Error::Read {
        kind: "Secret".into(),
        name: name.clone(),
        source,
    })?;
    match existing {
        Some(secret) if !opted_in(&secret.metadata) => {
            refused.push(format!("secret/{name}"));
            Ok((None, false))
        }
        Some(secret) => {
            let data = secret.data.as_ref().and_then(|d| d.get(&key)).ok_or_else(|| {
                Error::HostKey(format!(
                    "Secret {name} has no key {key:?}; put the OpenSSH private host key there"
                ))
            })?;
            let parsed =
                HostKey::parse(&data.0).map_err(|e| Error::HostKey(format!("Secret {name} key {key}: {e}")))?;
            Ok((Some(parsed.public), false))
        }
        None => {
            missing.push(format!("secret/{name}"));
            Ok((None, false))
        }
    }
}

/// A key pair the operator generates for a pool and keeps in a Secret of its own (the host key,
/// the gateway's key): read from that Secret, or generated and stored exactly once (create,
/// never overwrite). A Secret under that name the pool did not make is not adopted. Returns the
/// public half, and whether the key was generated. An unchanged pool's key comes from memory
/// ([`crate::cache::Keys`]).
async fn generated_key(
    ctx: &Context,
    pool: &NixBuilderPool,
    ns: &str,
    name: &str,
    file: &str,
    secret_of: fn(&NixBuilderPool, &HostKey) -> Secret,
    what: &str,
) -> Result<(String, bool)> {
    let uid = pool.metadata.uid.as_deref().unwrap_or_default();
    let generation = pool.metadata.generation;
    if let Some(public) = ctx.keys.get(ns, name, uid, generation) {
        return Ok((public, false));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    // A pool that has never had a status has no key yet, unless a reconcile before a restart
    // made it: try to create the Secret first (409 means it exists, and it is read), which saves
    // a new pool's read.
    if pool.status.is_none()
        && let Some(public) = create_key_secret(&api, pool, name, secret_of).await?
    {
        ctx.keys.remember(ns, name, uid, generation, &public);
        return Ok((public, true));
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
    Ok((public, generated))
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
    match api.create(&pp, &build::stamp(secret_of(pool, &key))).await {
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

/// What reading an object a pool names found.
enum Named<K> {
    Usable(K),
    Missing,
    NotOptedIn,
}

/// Reads an object a pool names, by name (Secrets are never listed or watched), and notes it as
/// missing or not opted in (`kind/name`, as `kubectl label` takes it).
async fn named<K>(
    ctx: &Context,
    ns: &str,
    name: &str,
    missing: &mut Vec<String>,
    refused: &mut Vec<String>,
) -> Result<Named<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let found = api.get_opt(name).await.map_err(|source| Error::Read {
        kind: kind.clone(),
        name: name.to_string(),
        source,
    })?;
    let tag = format!("{}/{name}", kind.to_lowercase());
    Ok(match found {
        None => {
            missing.push(tag);
            Named::Missing
        }
        Some(o) if !opted_in(o.meta()) => {
            refused.push(tag);
            Named::NotOptedIn
        }
        Some(o) => Named::Usable(o),
    })
}

/// The keys of one team-key ConfigMap or Secret (`None`: a value that is not UTF-8 text).
fn add_team_keys(
    keys: &mut AuthorizedKeys,
    missing: &mut Vec<String>,
    kind: &str,
    r: &nixpool_api::v1alpha1::AuthorizedKeysRef,
    data: std::collections::BTreeMap<String, Option<String>>,
) {
    if let Some(k) = &r.key
        && !data.contains_key(k)
    {
        missing.push(format!("{}/{} (key {k})", kind.to_lowercase(), r.name));
    }
    let source = format!("{kind} {}", r.name);
    for (k, text) in data
        .iter()
        .filter(|(k, _)| r.key.as_ref().is_none_or(|want| want == *k))
    {
        match text {
            Some(text) => keys.add_text(text, &source, k),
            None => keys.bad.push(crate::keys::BadKey {
                origin: crate::keys::Origin(format!("{source} key {k}")),
                reason: "not UTF-8 text; store authorized_keys lines".into(),
            }),
        }
    }
}

/// Whether an object's owner let pools use it (`nixpool.dev/use: "true"`).
fn opted_in(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(nixpool_api::labels::USE))
        .is_some_and(|v| v == "true")
}

/// Inline keys plus every line of the referenced Secrets.
async fn authorized_keys(
    ctx: &Context,
    pool: &NixBuilderPool,
    ns: &str,
    missing: &mut Vec<String>,
    refused: &mut Vec<String>,
) -> Result<AuthorizedKeys> {
    let mut keys = AuthorizedKeys::default();
    for (i, line) in pool.spec.ssh.authorized_keys.iter().enumerate() {
        keys.add(line, || crate::keys::Origin(format!("spec.ssh.authorizedKeys[{i}]")));
    }
    for r in &pool.spec.ssh.authorized_keys_config_maps {
        // An opted-in one is in the team-key store; any other is read, to say why it is not used.
        let cm = match ctx.stores().and_then(|s| s.team_config_map(ns, &r.name)) {
            Some(cm) => Named::Usable(cm.as_ref().clone()),
            None => named::<ConfigMap>(ctx, ns, &r.name, missing, refused).await?,
        };
        if let Named::Usable(cm) = cm {
            let data = cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, Some(v)));
            add_team_keys(&mut keys, missing, "ConfigMap", r, data.collect());
        }
    }
    for r in &pool.spec.ssh.authorized_keys_secrets {
        if let Named::Usable(secret) = named::<Secret>(ctx, ns, &r.name, missing, refused).await? {
            let data = secret.data.unwrap_or_default().into_iter();
            let text = data.map(|(k, v)| (k, String::from_utf8(v.0).ok()));
            add_team_keys(&mut keys, missing, "Secret", r, text.collect());
        }
    }
    Ok(keys)
}

/// A failure the user can act on (the server refused a child or a read, the host key is
/// unusable) goes into the status (Ready=False, Degraded, and Stalled or Reconciling) and an
/// Event, once per change, as well as the log.
async fn report_failure(pool: &NixBuilderPool, error: &Error, ctx: &Context) {
    let message = error.to_string();
    let status = status::failed(pool, error.category(), &message, error.needs_a_person(), ctx.now());
    if pool.status.as_ref() == Some(&status) {
        return;
    }
    if let Err(e) = status::patch(ctx, pool, status).await {
        warn!(error = %e, "cannot report the failure in status");
    }
    publish(ctx, pool, EventType::Warning, error.category(), "Reconcile", message).await;
}

/// A pool whose stored form does not even decode (e.g. written before a schema change): say
/// so in its status, without touching anything else.
async fn report_undecodable(invalid: &InvalidObject, ctx: &Context) -> Result<()> {
    ctx.metrics.failure(REASON_INVALID_SPEC);
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let ns = invalid.metadata.namespace.clone().unwrap_or_default();
    warn!(%name, error = %invalid.error, "pool does not decode");
    let api: Api<NixBuilderPool> = Api::namespaced(ctx.client.clone(), &ns);
    let message = format!(
        "the pool does not match the NixBuilderPool schema: {}; fix the spec",
        invalid.error
    );
    let (generation, now) = (invalid.metadata.generation, ctx.now().to_string());
    let conditions = [
        (READY, "False", message.as_str()),
        (RECONCILING, "False", "waiting for a spec that decodes"),
        (STALLED, "True", message.as_str()),
    ]
    .map(|(type_, status, message)| {
        serde_json::json!({
            "type": type_, "status": status, "reason": REASON_INVALID_SPEC, "message": message,
            "lastTransitionTime": now, "observedGeneration": generation,
        })
    });
    let body = serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPool",
        "status": {"observedGeneration": generation, "conditions": conditions},
    });
    api.patch_status(
        &name,
        &kube::api::PatchParams::apply(nixpool_api::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Status { name, source })?;
    Ok(())
}

fn pool_key(guard: &KeptPool) -> String {
    format!("{}/{}", guard.namespace().unwrap_or_default(), guard.name_any())
}

fn error_policy(guard: Arc<KeptPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(error.category());
    let delay = ctx.backoff(&pool_key(&guard));
    warn!(pool = %guard.name_any(), category = error.category(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn publish(ctx: &Context, pool: &NixBuilderPool, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder_for(type_).publish(&event, &pool.object_ref(&())).await {
        warn!(error = %e, "cannot publish an Event");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}
