//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `up` or `down`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<CategoryLabels, Counter>,
    pub duration: Histogram,
    /// API requests sent, by HTTP method: `writes == 0` on a no-op resync is a tested promise.
    pub api_requests: Family<VerbLabels, Counter>,
    pub leader: Gauge,
    /// Autoscaler decisions that changed a pool's builder count.
    pub scale_decisions: Family<DirectionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nixpool_operator");
        let reconciles = Counter::default();
        let failures = Family::<CategoryLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let api_requests = Family::<VerbLabels, Counter>::default();
        let leader = Gauge::default();
        let scale_decisions = Family::<DirectionLabels, Counter>::default();
        registry.register("reconciles", "Reconciles of NixBuilderPools", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles by category", failures.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            duration.clone(),
        );
        registry.register(
            "api_requests",
            "Kubernetes API requests sent, by HTTP method",
            api_requests.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        registry.register(
            "scale_decisions",
            "Autoscaler decisions that changed a pool's builder count, by direction",
            scale_decisions.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            api_requests,
            leader,
            scale_decisions,
        }
    }
}

impl Metrics {
    pub fn failure(&self, category: &str) {
        self.failures
            .get_or_create(&CategoryLabels {
                category: category.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String cannot fail");
        out
    }
}
