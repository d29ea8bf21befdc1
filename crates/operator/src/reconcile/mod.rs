//! The controller: watches pools and everything they own or reference, and runs the reconcile
//! pipeline for one pool at a time: `validate → dereference → scale → build → apply → status`,
//! then the Events. Each stage is a file of its own; this one holds the wiring, `reconcile` (the
//! order of the stages, and what a failure reports) and `error_policy`.

pub mod apply;
pub mod autoscale;
pub mod build;
mod dereference;
mod events;
mod invalid_spec;
mod scale;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use nixpool_api::{NixBuilderPool, labels};
use tracing::{debug, info, instrument, warn};

use self::invalid_spec::report_undecodable;
use crate::cache::{Compact, KeptPool, Stores};
use crate::context::Context;
use crate::error::{Error, Result};

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
        ctx.reset_backoff(&pool_key(&guard));
    }
    result
}

/// The pipeline for one pool that decodes: validate, read what it names, decide the builder
/// count, build, apply, then the status and the Events.
async fn reconcile_pool(pool: &NixBuilderPool, ctx: &Context) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let valid = match validate::validate(pool, &ctx.images) {
        Ok(v) => v,
        Err(invalid) => return invalid_spec::refuse(ctx, pool, &ns, &invalid).await,
    };
    if dereference::gone(ctx, pool, &ns).await? {
        debug!("the pool is gone; its watch has not said so yet");
        return Ok(Action::await_change());
    }
    let refs = dereference::dereference(ctx, pool, &ns).await?;
    let scaling = scale::scaling(ctx, pool, &ns).await?;

    let children = build::build(
        &refs.usable_pool,
        &build::BuildInputs {
            valid: &valid,
            authorized_keys: &refs.authorized_keys,
            with_pdb: ctx.with_pdb,
            builder_replicas: scaling.builders,
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
    if !applied.changed.is_empty() {
        info!(changed = ?applied.changed, "applied");
    }

    let seen = status::Observed {
        deployment: &applied.deployment,
        gateway: applied.gateway.as_ref(),
        desired_builders: scaling.builders,
        service: &applied.service,
        host_public_key: refs.host_key.public(),
        bad_keys: &refs.authorized_keys.bad,
        missing_secrets: &refs.missing,
        refused_secrets: &refs.refused,
    };
    let new_status = status::compute(pool, &seen, ctx.now());
    let news = events::reconciled(&events::Reconciled {
        pool,
        status: &new_status,
        host_key: &refs.host_key,
        gateway_key_generated: refs.gateway_key_generated,
        changed: &applied.changed,
        scaling: &scaling,
    });
    // What the status must remember (a scale decision, news of bad keys) is written at once.
    let write_now = scaling.change().is_some() || events::bad_authorized_keys(pool, &new_status).is_some();
    let status_wait = status::write_unless_rollout_pending(ctx, pool, new_status, &applied, write_now).await?;
    scale::record(ctx, &scaling);
    events::publish(ctx, pool, news).await;

    let mut next = ctx.resync;
    if let Some(poll) = refs.poll_again(pool) {
        next = next.min(poll);
    }
    // The gateways write their reports when demand changes (which wakes this controller through
    // the ConfigMap watch); only a builder's idle time running out needs a timer.
    if let Some(due) = scaling.decision.and_then(|d| d.recheck) {
        next = next.min(due);
    }
    if let Some(wait) = status_wait {
        next = next.min(wait);
    }
    Ok(Action::requeue(next))
}

/// A failure the user can act on (the server refused a child or a read, the host key is
/// unusable) goes into the status (Ready=False, Degraded, and Stalled or Reconciling) and an
/// Event, once per change, as well as the log.
async fn report_failure(pool: &NixBuilderPool, error: &Error, ctx: &Context) {
    let status = status::failed(
        pool,
        error.category(),
        &error.to_string(),
        error.needs_a_person(),
        ctx.now(),
    );
    let Some(news) = events::failure(pool, &status, error) else {
        return;
    };
    if let Err(e) = status::patch(ctx, pool, status).await {
        warn!(error = %e, "cannot report the failure in status");
    }
    events::publish(ctx, pool, [news]).await;
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
