//! The SSH Service and the PodDisruptionBudget.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use nixpool_api::v1alpha1::ServiceType;
use nixpool_api::{NixBuilderPool, names, ports};

use super::{gateway_selector_labels, meta, selector_labels};

pub fn service(pool: &NixBuilderPool) -> Service {
    let s = &pool.spec.service;
    let mut metadata = meta(pool, names::workload(&pool.name_any()), "ssh");
    if !s.annotations.is_empty() {
        metadata.annotations = Some(s.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(s.type_.as_str().into()),
            // With a gateway, clients reach it, and it reaches the builders.
            selector: Some(if pool.spec.effective_gateway().is_some() {
                gateway_selector_labels(pool)
            } else {
                selector_labels(pool)
            }),
            ports: Some(vec![ServicePort {
                name: Some(ports::SSH_NAME.into()),
                port: s.port,
                target_port: Some(IntOrString::String(ports::SSH_NAME.into())),
                protocol: Some("TCP".into()),
                node_port: if s.type_ == ServiceType::ClusterIP {
                    None
                } else {
                    s.node_port
                },
                ..ServicePort::default()
            }]),
            load_balancer_source_ranges: (s.type_ == ServiceType::LoadBalancer
                && !s.load_balancer_source_ranges.is_empty())
            .then(|| s.load_balancer_source_ranges.clone()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Voluntary disruptions (node drains) take one builder at a time; each drains its builds.
pub fn pdb(pool: &NixBuilderPool) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(pool, names::workload(&pool.name_any()), "builder"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(pool)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
