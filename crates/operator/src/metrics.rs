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
    /// The HTTP method, except that a GET is `GET` (one object), `LIST` or `WATCH`.
    pub verb: String,
    /// The resource's plural name (`deployments`, `secrets`, `events`, …), with `/status` for
    /// the status subresource.
    pub resource: String,
}

impl VerbLabels {
    /// What a request to the API server is, from its method and path.
    pub fn of(method: &str, uri: &::http::Uri) -> Self {
        // /api/v1/namespaces/NS/RESOURCE/NAME/SUB, /apis/GROUP/VERSION/RESOURCE, …
        let mut segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
        let skip = match segments.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => segments.len(),
        };
        segments.drain(..skip.min(segments.len()));
        if segments.first() == Some(&"namespaces") && segments.len() > 2 {
            segments.drain(..2);
        }
        let resource = match segments.as_slice() {
            [] => "other".to_string(),
            [resource, _, sub, ..] => format!("{resource}/{sub}"),
            [resource, ..] => resource.to_string(),
        };
        let watch = uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let verb = match method {
            "GET" if watch => "WATCH",
            "GET" if segments.len() == 1 => "LIST",
            m => m,
        };
        Self {
            verb: verb.to_string(),
            resource,
        }
    }
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<CategoryLabels, Counter>,
    pub duration: Histogram,
    /// API requests sent, by verb and resource: `writes == 0` on a no-op resync is a tested
    /// promise, and so is no `GET` at all.
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

#[cfg(test)]
mod tests {
    use super::VerbLabels;

    fn of(method: &str, uri: &str) -> (String, String) {
        let l = VerbLabels::of(method, &uri.parse().unwrap());
        (l.verb, l.resource)
    }

    #[test]
    fn requests_are_named_by_verb_and_resource() {
        let pair = |v: &str, r: &str| (v.to_string(), r.to_string());
        assert_eq!(
            of("GET", "/apis/apps/v1/namespaces/a/deployments/p"),
            pair("GET", "deployments")
        );
        assert_eq!(
            of("GET", "/api/v1/namespaces/a/secrets/p-host-key"),
            pair("GET", "secrets")
        );
        assert_eq!(
            of("GET", "/api/v1/configmaps?labelSelector=x"),
            pair("LIST", "configmaps")
        );
        assert_eq!(
            of("GET", "/apis/apps/v1/deployments?watch=true&resourceVersion=5"),
            pair("WATCH", "deployments")
        );
        assert_eq!(
            of(
                "PATCH",
                "/apis/nixpool.dev/v1alpha1/namespaces/a/nixbuilderpools/p/status"
            ),
            pair("PATCH", "nixbuilderpools/status")
        );
        assert_eq!(of("POST", "/api/v1/namespaces/a/events"), pair("POST", "events"));
        assert_eq!(of("GET", "/version"), pair("GET", "other"));
    }
}
