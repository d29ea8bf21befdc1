//! `/healthz`, `/readyz` and `/metrics` on `--http-addr`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuilderLabel {
    pub builder: String,
}

/// How long sessions waited for a slot: 5 ms to 10 minutes (past the longest `--hold-seconds`
/// anyone should set).
const QUEUE_WAIT_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Everything the gateway exports.
pub struct Metrics {
    /// Sessions open now, `state` = `waiting` (held for a slot) or `active` (on a builder).
    pub sessions_open: Family<StateLabel, Gauge>,
    /// Sessions ended, by `outcome`.
    pub sessions: Family<OutcomeLabel, Counter>,
    pub logins_refused: Counter,
    pub queue_wait_seconds: Histogram,
    pub builder_slots_used: Family<BuilderLabel, Gauge>,
    /// The other gateways' sessions on each builder, as their demand reports say.
    pub builder_slots_used_elsewhere: Family<BuilderLabel, Gauge>,
    /// Sessions each builder refused because all its slots were in use (tried on another).
    pub builder_busy: Family<BuilderLabel, Counter>,
    /// Sessions that could not be opened on each builder (tried on another).
    pub builder_unreachable: Family<BuilderLabel, Counter>,
    pub builders: Gauge,
    pub connections: Gauge,
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions_open: Family::default(),
            sessions: Family::default(),
            logins_refused: Counter::default(),
            queue_wait_seconds: Histogram::new(QUEUE_WAIT_BUCKETS),
            builder_slots_used: Family::default(),
            builder_slots_used_elsewhere: Family::default(),
            builder_busy: Family::default(),
            builder_unreachable: Family::default(),
            builders: Gauge::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("nixpool_gateway");
        // Not `sessions`: a gauge of that name would clash with the counter's family
        // (`sessions_total`), and Prometheus refuses a scrape with two TYPE lines for one name.
        r.register(
            "sessions_open",
            "Sessions open now: waiting (held for a builder slot) or active (on a builder)",
            self.sessions_open.clone(),
        );
        r.register(
            "sessions",
            "Sessions ended, by outcome: done, refused_command, hold_timeout, abandoned (the client left while held), key_revoked (its key was removed while it was held)",
            self.sessions.clone(),
        );
        r.register(
            "logins_refused",
            "Logins refused: a key that is not the pool's, the wrong user, or the gateway's own key",
            self.logins_refused.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "How long sessions that got a builder slot waited for it",
            self.queue_wait_seconds.clone(),
        );
        r.register(
            "builder_slots_used",
            "Slots this gateway uses on each builder",
            self.builder_slots_used.clone(),
        );
        r.register(
            "builder_slots_used_elsewhere",
            "Slots the other gateways of the pool use on each builder, as their demand reports say",
            self.builder_slots_used_elsewhere.clone(),
        );
        r.register(
            "builder_busy",
            "Sessions each builder refused because all its slots were in use (the gateways' counts lagged); each went on to another builder or was held",
            self.builder_busy.clone(),
        );
        r.register(
            "builder_unreachable",
            "Sessions that could not be opened on each builder (connection refused or lost, handshake, login or exec failed): each went on to another builder or was held",
            self.builder_unreachable.clone(),
        );
        r.register("builders", "Ready builders this gateway knows", self.builders.clone());
        r.register("connections", "SSH connections open now", self.connections.clone());
        r.register(
            "connections_refused",
            "TCP connections closed at once because --max-connections were open",
            self.connections_refused.clone(),
        );
    }

    pub fn ended(&self, outcome: &'static str) {
        self.sessions.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// What `/readyz` looks at.
#[derive(Debug, Default)]
pub struct Readiness {
    listening: AtomicBool,
    listed: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    /// `listed` is false until the first list of builder pods when builders are discovered.
    pub fn new(listed: bool) -> Self {
        Self {
            listed: AtomicBool::new(listed),
            ..Default::default()
        }
    }
    pub fn listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }
    pub fn listed(&self) {
        self.listed.store(true, Ordering::SeqCst);
    }
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Ready: the SSH listener is bound, the builder pods were listed, and no SIGTERM came.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::SeqCst) {
            Err("draining (SIGTERM)")
        } else if !self.listening.load(Ordering::SeqCst) {
            Err("the SSH listener is not bound yet")
        } else if !self.listed.load(Ordering::SeqCst) {
            Err("the builder pods have not been listed yet")
        } else {
            Ok(())
        }
    }
}

/// What the endpoints serve.
pub struct Http {
    pub readiness: Arc<Readiness>,
    pub registry: Registry,
}

pub fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(http)
}

async fn readyz(State(h): State<Arc<Http>>) -> impl IntoResponse {
    match h.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn metrics(State(h): State<Arc<Http>>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &h.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn ready_only_when_bound_listed_and_not_draining() {
        let r = Readiness::new(false);
        assert!(r.check().is_err());
        r.listening();
        assert_eq!(r.check(), Err("the builder pods have not been listed yet"));
        r.listed();
        assert_eq!(r.check(), Ok(()));
        r.drain();
        assert_eq!(r.check(), Err("draining (SIGTERM)"));
        let fixed = Readiness::new(true);
        fixed.listening();
        assert_eq!(fixed.check(), Ok(()), "static builders need no list");
    }

    #[test]
    fn every_metric_is_exported_once_under_its_name() {
        let m = Metrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.sessions_open.get_or_create(&StateLabel { state: "waiting" }).set(2);
        m.ended("done");
        m.logins_refused.inc();
        m.queue_wait_seconds.observe(0.2);
        m.builder_slots_used
            .get_or_create(&BuilderLabel {
                builder: "pool-0".into(),
            })
            .set(1);
        m.builder_slots_used_elsewhere
            .get_or_create(&BuilderLabel {
                builder: "pool-0".into(),
            })
            .set(2);
        m.builder_busy
            .get_or_create(&BuilderLabel {
                builder: "pool-0".into(),
            })
            .inc();
        m.builder_unreachable
            .get_or_create(&BuilderLabel {
                builder: "pool-0".into(),
            })
            .inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for sample in [
            "nixpool_gateway_sessions_open{state=\"waiting\"} 2",
            "nixpool_gateway_sessions_total{outcome=\"done\"} 1",
            "nixpool_gateway_logins_refused_total 1",
            "nixpool_gateway_queue_wait_seconds_bucket{le=\"0.005\"} 0",
            "nixpool_gateway_queue_wait_seconds_bucket{le=\"600.0\"} 1",
            "nixpool_gateway_builder_slots_used{builder=\"pool-0\"} 1",
            "nixpool_gateway_builder_slots_used_elsewhere{builder=\"pool-0\"} 2",
            "nixpool_gateway_builder_busy_total{builder=\"pool-0\"} 1",
            "nixpool_gateway_builder_unreachable_total{builder=\"pool-0\"} 1",
            "nixpool_gateway_builders 0",
        ] {
            assert!(out.contains(sample), "{sample} missing from\n{out}");
        }
        let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let names: BTreeSet<&str> = types.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(names.len(), types.len(), "a family name twice: {types:?}");
    }
}
