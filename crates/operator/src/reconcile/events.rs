//! Which Events are news, decided in pure code from what the pool said before and what the
//! reconcile found and did; and the one loop that publishes them.
//!
//! A new pool gets one `Created` Event that says everything its creation did; later, each key
//! generated (a deleted key Secret), each change applied, each scaling and each new problem is
//! an Event of its own. What the pool's status already says, in the same words, is not news.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use nixpool_api::conditions::{DEGRADED, READY, REASON_BAD_AUTHORIZED_KEYS, REASON_INVALID_SPEC};
use nixpool_api::{NixBuilderPool, NixBuilderPoolStatus};
use tracing::warn;

use super::build;
use super::dereference::HostKeyState;
use super::scale::Scaling;
use crate::context::Context;
use crate::error::Error;

/// Longest note an Event gets, in bytes; a longer one is cut and ends in `…`.
const MAX_NOTE: usize = 1000;

/// One Event to publish about a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct News {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

impl News {
    fn normal(reason: &'static str, action: &'static str, note: String) -> Self {
        Self::new(EventType::Normal, reason, action, note)
    }

    fn warning(reason: &'static str, action: &'static str, note: String) -> Self {
        Self::new(EventType::Warning, reason, action, note)
    }

    fn new(type_: EventType, reason: &'static str, action: &'static str, note: String) -> Self {
        Self {
            type_,
            reason,
            action,
            note: truncate(note, MAX_NOTE),
        }
    }
}

/// What one reconcile of a valid pool found and did.
pub struct Reconciled<'a> {
    /// The pool as the reconcile found it: its status is the one before.
    pub pool: &'a NixBuilderPool,
    /// The status the reconcile computed.
    pub status: &'a NixBuilderPoolStatus,
    pub host_key: &'a HostKeyState,
    pub gateway_key_generated: bool,
    /// `Kind/name` of each child created, updated or removed.
    pub changed: &'a [String],
    pub scaling: &'a Scaling,
}

/// The news of one reconcile of a valid pool, in the order they are published.
pub fn reconciled(r: &Reconciled<'_>) -> Vec<News> {
    let generated_host_key = match r.host_key {
        HostKeyState::Generated(public) => Some(public),
        HostKeyState::Existing(_) | HostKeyState::Missing => None,
    };
    let host_key_note = generated_host_key.map(|public| {
        format!(
            "generated the pool's ed25519 host key {public} (Secret {})",
            build::host_key_ref(r.pool).0
        )
    });
    let gateway_key_note = r
        .gateway_key_generated
        .then(|| "generated the gateway's ed25519 key; builders trust it, clients cannot log in with it".to_string());
    let applied_note = (!r.changed.is_empty()).then(|| format!("applied {}", r.changed.join(", ")));

    let mut news = Vec::new();
    if r.pool.status.is_none() && generated_host_key.is_some() {
        let notes: Vec<String> = [host_key_note, gateway_key_note, applied_note]
            .into_iter()
            .flatten()
            .collect();
        news.push(News::normal("Created", "Create", notes.join("; ")));
    } else {
        for (reason, action, note) in [
            ("HostKeyGenerated", "Create", host_key_note),
            ("GatewayKeyGenerated", "Create", gateway_key_note),
            ("Applied", "Apply", applied_note),
        ] {
            news.extend(note.map(|note| News::normal(reason, action, note)));
        }
    }
    news.extend(scaled(r.pool, r.scaling));
    news.extend(bad_authorized_keys(r.pool, r.status));
    news
}

/// The autoscaler changed the builder count: `ScaledUp` with the sessions that need them, or
/// `ScaledDown` with the builders that were idle.
fn scaled(pool: &NixBuilderPool, scaling: &Scaling) -> Option<News> {
    let d = scaling.change()?;
    let from = scaling.asked_before;
    let (reason, why) = if d.replicas > from {
        (
            "ScaledUp",
            format!("{} sessions ({} waiting) need them", d.sessions, d.waiting),
        )
    } else {
        let who = if d.idle.len() == 1 {
            "1 builder was"
        } else {
            "builders were"
        };
        let idle_seconds = pool.spec.autoscaling.as_ref().map_or(0, |a| a.idle_seconds);
        (
            "ScaledDown",
            format!("{who} idle for {idle_seconds} s: {}", d.idle.join(", ")),
        )
    };
    Some(News::normal(
        reason,
        "Scale",
        format!("builders {from} → {}: {why}", d.replicas),
    ))
}

/// Bad authorized-key lines, when the status names them in words the pool did not already
/// report.
pub fn bad_authorized_keys(pool: &NixBuilderPool, status: &NixBuilderPoolStatus) -> Option<News> {
    let degraded = status.condition(DEGRADED)?;
    let new = degraded.reason == REASON_BAD_AUTHORIZED_KEYS
        && message(before(pool, DEGRADED)) != Some(degraded.message.as_str());
    new.then(|| News::warning(REASON_BAD_AUTHORIZED_KEYS, "Validate", degraded.message.clone()))
}

/// A refused spec (`problems`, as validation words them), unless the pool already reports this
/// very refusal.
pub fn invalid_spec(pool: &NixBuilderPool, status: &NixBuilderPoolStatus, problems: &str) -> Option<News> {
    let was = before(pool, READY);
    let new =
        was.map(|c| c.reason.as_str()) != Some(REASON_INVALID_SPEC) || message(was) != message(status.condition(READY));
    new.then(|| News::warning(REASON_INVALID_SPEC, "Validate", problems.to_string()))
}

/// Keys removed from the authorized-keys ConfigMap `config_map` while the spec is invalid.
pub fn keys_revoked(removed: usize, config_map: &str) -> News {
    News::normal(
        "KeysRevoked",
        "Apply",
        format!(
            "the spec is invalid, so only revocations are applied: removed {removed} key(s) their sources no longer give from ConfigMap {config_map}"
        ),
    )
}

/// A failed reconcile whose failure status (`status`) differs from what the pool reports.
pub fn failure(pool: &NixBuilderPool, status: &NixBuilderPoolStatus, error: &Error) -> Option<News> {
    (pool.status.as_ref() != Some(status)).then(|| News::warning(error.category(), "Reconcile", error.to_string()))
}

fn before<'a>(pool: &'a NixBuilderPool, type_: &str) -> Option<&'a Condition> {
    pool.status.as_ref()?.condition(type_)
}

fn message(condition: Option<&Condition>) -> Option<&str> {
    condition.map(|c| c.message.as_str())
}

/// Publishes each Event, in order, about the pool. One that cannot be published is logged: an
/// Event is never worth failing a reconcile for.
pub async fn publish(ctx: &Context, pool: &NixBuilderPool, news: impl IntoIterator<Item = News>) {
    for News {
        type_,
        reason,
        action,
        note,
    } in news
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder_for(type_).publish(&event, &pool.object_ref(&())).await {
            warn!(error = %e, "cannot publish an Event");
        }
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

#[cfg(test)]
mod tests;
