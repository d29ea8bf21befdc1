//! The Helm chart: lint, schema, the rendered objects against the Kubernetes 1.32 schemas, and its
//! RBAC proven on a real control plane: the operator reconciles with exactly the chart's
//! permissions, and without any one of them it fails.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Api;
use nixpool_api::NixBuilderPool;
use nixpool_testenv::{ControlPlane, helm, need_tool};

const RELEASE: &str = "t";
const RELEASE_NS: &str = "nixpool-system";

fn chart() -> String {
    format!("{REPO}/charts/nixpool")
}

fn helm_template(extra: &[&str]) -> String {
    let helm = helm().unwrap_or_else(|e| panic!("{e:#}"));
    run(Command::new(helm)
        .args(["template", RELEASE, &chart(), "-n", RELEASE_NS, "--include-crds"])
        .args(extra))
}

fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &serde_yaml::Value) -> &str {
    v.get("kind").and_then(|k| k.as_str()).unwrap_or_default()
}

#[test]
fn the_chart_lints_and_its_values_schema_refuses_bad_values() {
    let helm = helm().unwrap_or_else(|e| panic!("{e:#}"));
    run(Command::new(&helm).args(["lint", "--strict", &chart()]));
    let out = Command::new(&helm)
        .args(["template", RELEASE, &chart(), "--set", "logFormat=xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("logFormat must be one of the following"));
}

#[test]
fn the_charts_crd_is_the_generated_one() {
    let chart_crd =
        std::fs::read_to_string(format!("{REPO}/charts/nixpool/crds/nixbuilderpools.nixpool.dev.yaml")).unwrap();
    let crd = std::fs::read_to_string(format!("{REPO}/crds/nixbuilderpools.nixpool.dev.yaml")).unwrap();
    assert!(
        chart_crd == crd,
        "charts/nixpool/crds/ is out of date: cp crds/nixbuilderpools.nixpool.dev.yaml charts/nixpool/crds/"
    );
}

#[test]
fn rendered_objects_are_valid_kubernetes_1_32() {
    need_tool("kubernetes-validate", "pip install kubernetes-validate").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("default", vec![]),
        (
            "namespaced",
            vec![
                "--set",
                "watchNamespace=ci",
                "--set",
                "networkPolicy.enabled=true",
                "--set",
                "serviceMonitor.enabled=true",
            ],
        ),
        (
            "single",
            vec!["--set", "replicaCount=1", "--set", "leaderElection.enabled=false"],
        ),
    ] {
        let rendered = helm_template(&args);
        // ServiceMonitor is the Prometheus operator's CRD, not a built-in.
        let builtin: Vec<_> = docs(&rendered)
            .into_iter()
            .filter(|d| kind(d) != "ServiceMonitor")
            .collect();
        assert!(builtin.len() >= 6, "{name}: {} objects", builtin.len());
        let file = dir.path().join(format!("{name}.yaml"));
        let text: String = builtin
            .iter()
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
            .collect();
        std::fs::write(&file, text).unwrap();
        run(Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.32.0"])
            .arg(&file));
    }
    // The examples' built-in objects (the team key Secrets) too.
    let examples = dir.path().join("examples.yaml");
    let team = std::fs::read_to_string(format!("{REPO}/examples/team-keys.yaml")).unwrap();
    let secrets: String = docs(&team)
        .iter()
        .filter(|d| kind(d) == "Secret")
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    std::fs::write(&examples, secrets).unwrap();
    run(Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.32.0"])
        .arg(&examples));
}

/// The rules of the rendered ClusterRole and leader-election Role.
struct Rbac {
    objects: Vec<serde_yaml::Value>,
}

impl Rbac {
    fn render() -> Self {
        Rbac {
            objects: docs(&helm_template(&[])),
        }
    }

    /// The rendered objects as YAML, with rule `skip` (cluster role index, or `rules.len()` for
    /// the Lease rule) left out.
    fn without(&self, skip: Option<usize>) -> String {
        let cluster_rules = self.cluster_rules();
        let mut out = String::new();
        for d in &self.objects {
            let mut d = d.clone();
            match (kind(&d), skip) {
                ("ClusterRole", Some(i)) if i < cluster_rules => {
                    d["rules"].as_sequence_mut().unwrap().remove(i);
                }
                ("Role", Some(i)) if i == cluster_rules => {
                    d["rules"].as_sequence_mut().unwrap().clear();
                }
                _ => {}
            }
            out.push_str(&format!("---\n{}", serde_yaml::to_string(&d).unwrap()));
        }
        out
    }

    fn cluster_rules(&self) -> usize {
        self.objects.iter().find(|d| kind(d) == "ClusterRole").unwrap()["rules"]
            .as_sequence()
            .unwrap()
            .len()
    }

    fn describe(&self, i: usize) -> String {
        if i == self.cluster_rules() {
            return "leases (Role)".into();
        }
        let r = &self.objects.iter().find(|d| kind(d) == "ClusterRole").unwrap()["rules"][i];
        format!("{:?} {:?}", r["resources"], r["verbs"])
    }
}

fn apply(cp: &ControlPlane, yaml: &str, dir: &Path) {
    let file = dir.join("chart.yaml");
    std::fs::write(&file, yaml).unwrap();
    // --validate=false: kubectl 1.20 does not know the CRD's CEL rules (x-kubernetes-validations).
    run(cp.kubectl().args(["apply", "--validate=false", "-f"]).arg(&file));
}

/// A kubeconfig for the chart's ServiceAccount, from the token Secret Kubernetes 1.20 makes for it.
async fn service_account_kubeconfig(cp: &ControlPlane, dir: &Path) -> std::path::PathBuf {
    let client = cp.client().await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), RELEASE_NS);
    let secrets: Api<Secret> = Api::namespaced(client, RELEASE_NS);
    let token = eventually(Duration::from_secs(60), "the ServiceAccount's token Secret", || async {
        let sa = sas.get_opt("t-nixpool").await.ok()??;
        let name = sa.secrets?.first()?.name.clone()?;
        let s = secrets.get_opt(&name).await.ok()??;
        Some(String::from_utf8(s.data?.get("token")?.0.clone()).unwrap())
    })
    .await;
    let path = dir.join("sa-kubeconfig");
    std::fs::write(&path, cp.kubeconfig_yaml(&token, "default")).unwrap();
    path
}

/// A pool with a gateway and autoscaling, so that every rule is used.
fn pool(name: &str) -> NixBuilderPool {
    let mut p: NixBuilderPool = serde_yaml::from_str(include_str!("../../../examples/autoscaling.yaml")).unwrap();
    p.metadata.name = Some(name.into());
    p
}

#[tokio::test]
async fn the_operator_works_with_exactly_the_charts_permissions() {
    // Its own control plane: a cluster-wide operator must not see the other tests' pools.
    let cp = ControlPlane::start().unwrap();
    let dir = cp.dir().join("chart");
    std::fs::create_dir_all(&dir).unwrap();
    run(cp.kubectl().args(["create", "namespace", RELEASE_NS]));
    let rbac = Rbac::render();
    apply(&cp, &rbac.without(None), &dir);
    run(cp.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/nixbuilderpools.nixpool.dev",
    ]));
    let kubeconfig = service_account_kubeconfig(&cp, &dir).await;
    let client = cp.client().await.unwrap();
    let op_args = ["--lease-namespace", RELEASE_NS, "--lease-name", "t-nixpool"];

    // With every rule: a pool in any namespace converges.
    let ns = cp.namespace("team").await.unwrap();
    let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
    let op = Operator::spawn_here(&kubeconfig, &dir.join("op-full"), &op_args);
    pools.create(&Default::default(), &pool("builders")).await.unwrap();
    let converged = observed(&pools, "builders").await;
    assert!(converged.status.unwrap().host_public_key.is_some());
    op.settle(Duration::from_secs(1)).await;
    let log = op.log_text();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "with the chart's rules nothing is forbidden:\n{log}"
    );
    drop(op);

    // Secrets only by name: no list or watch anywhere, so no Secret reaches the operator's
    // memory unless a pool names it.
    let sa = format!("--as=system:serviceaccount:{RELEASE_NS}:t-nixpool");
    for (verb, expected) in [
        ("list", "no"),
        ("watch", "no"),
        ("update", "no"),
        ("patch", "no"),
        ("delete", "no"),
        ("get", "yes"),
        ("create", "yes"),
    ] {
        let out = cp
            .kubectl()
            .args(["auth", "can-i", verb, "secrets", "--all-namespaces", &sa])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "can the chart's ServiceAccount {verb} Secrets?"
        );
    }

    // Without any one rule, the operator runs into "forbidden".
    let policy_v1 = run(cp.kubectl().args(["api-versions"]))
        .lines()
        .any(|l| l == "policy/v1");
    for i in 0..=rbac.cluster_rules() {
        let what = rbac.describe(i);
        if what.contains("poddisruptionbudgets") && !policy_v1 {
            eprintln!(
                "skipping the PodDisruptionBudget rule: this server does not serve policy/v1, so the operator never uses it"
            );
            continue;
        }
        apply(&cp, &rbac.without(Some(i)), &dir);
        let ns = cp.namespace("rbac").await.unwrap();
        let pools: Api<NixBuilderPool> = Api::namespaced(client.clone(), &ns);
        let op = Operator::spawn_here(&kubeconfig, &dir.join(format!("op-{i}")), &op_args);
        pools.create(&Default::default(), &pool("builders")).await.unwrap();
        eventually(
            Duration::from_secs(30),
            &format!("a forbidden error without the rule {what}"),
            || async { op.log_text().to_lowercase().contains("forbidden").then_some(()) },
        )
        .await;
        drop(op);
    }
    apply(&cp, &rbac.without(None), &dir);
}
