//! A pool whose spec is refused: by validation, or because its stored form does not even
//! decode. Its status says why (Ready=False/InvalidSpec, Stalled) and one Warning Event says it
//! once; no child is created, changed or generated, except that revocations still reach the
//! authorized keys.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use nixpool_api::conditions::REASON_INVALID_SPEC;
use nixpool_api::{NixBuilderPool, names, paths};
use tracing::{info, warn};

use super::dereference::{self, TEAM_KEY_SECRET_POLL};
use super::validate::InvalidSpec;
use super::{apply, build, events, status};
use crate::authorized_keys::AuthorizedKeys;
use crate::context::Context;
use crate::error::{Error, Result};

/// Reports a spec validation refused, narrows the authorized keys, and waits for the spec to
/// change.
pub async fn refuse(ctx: &Context, pool: &NixBuilderPool, ns: &str, invalid: &InvalidSpec) -> Result<Action> {
    ctx.metrics.failure(REASON_INVALID_SPEC);
    warn!(problems = %invalid, "invalid spec; children left as they are");
    let problems = invalid.to_string();
    let status = status::invalid(pool, &problems, ctx.now());
    let news = events::invalid_spec(pool, &status, &problems);
    status::patch(ctx, pool, status).await?;
    events::publish(ctx, pool, news).await;
    narrow_authorized_keys(ctx, pool, ns).await?;
    // Deprecated team-key Secrets are never watched: they are read again soon.
    Ok(if pool.spec.ssh.authorized_keys_secrets.is_empty() {
        Action::await_change()
    } else {
        Action::requeue(TEAM_KEY_SECRET_POLL)
    })
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
    let given = dereference::keys_given(ctx, pool, ns).await?;
    let narrowed = nixpool_api::rules::narrowed_authorized_keys(&trusted, &given.render());
    if narrowed == trusted {
        return Ok(());
    }
    let removed = trusted.lines().count() - narrowed.lines().count();
    let mut kept = AuthorizedKeys::default();
    kept.add_text(&narrowed, "the narrowed authorized keys", paths::AUTHORIZED_KEYS_FILE);
    let desired = build::authorized_keys(pool, &kept);
    let mut changed = Vec::new();
    apply::apply_if_changed(ctx, ns, desired, &mut changed).await?;
    info!(
        removed,
        "spec invalid: removed keys their sources no longer give from the authorized keys"
    );
    events::publish(ctx, pool, [events::keys_revoked(removed, &name)]).await;
    Ok(())
}

/// A pool whose stored form does not even decode (e.g. written before a schema change): say
/// so in its status, without touching anything else.
pub async fn report_undecodable(invalid: &InvalidObject, ctx: &Context) -> Result<()> {
    ctx.metrics.failure(REASON_INVALID_SPEC);
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let ns = invalid.metadata.namespace.clone().unwrap_or_default();
    warn!(%name, error = %invalid.error, "pool does not decode");
    let body = status::undecodable(&invalid.error, invalid.metadata.generation, ctx.now());
    let api: Api<NixBuilderPool> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &kube::api::PatchParams::apply(nixpool_api::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Status { name, source })?;
    Ok(())
}
