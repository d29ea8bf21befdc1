//! The Helm chart: lint, schema, each value rendered where it belongs, the rendered objects against
//! the Kubernetes 1.32 schemas, its RBAC proven on a real control plane (the operator reconciles
//! with exactly the chart's permissions, and without any one of them it fails), and `helm upgrade`
//! replacing an older CRD on that control plane.

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
        .args(["template", RELEASE, &chart(), "-n", RELEASE_NS])
        .args(extra))
}

/// The chart's objects rendered with `--set` pairs.
fn render(sets: &[&str]) -> Vec<serde_norway::Value> {
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    docs(&helm_template(&args))
}

fn find<'a>(objects: &'a [serde_norway::Value], k: &str) -> &'a serde_norway::Value {
    objects
        .iter()
        .find(|d| kind(d) == k)
        .unwrap_or_else(|| panic!("no {k} rendered"))
}

fn app_version() -> String {
    let chart: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(format!("{}/Chart.yaml", chart())).unwrap()).unwrap();
    chart["appVersion"].as_str().unwrap().to_string()
}

fn yaml(text: &str) -> serde_norway::Value {
    serde_norway::from_str(text).unwrap()
}

fn docs(yaml: &str) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &serde_norway::Value) -> &str {
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

    // A typo in any value is refused, and the message names the field.
    for (set, message) in [
        ("podLabel.team=a", "Additional property podLabel is not allowed"),
        ("priorityClass=high", "Additional property priorityClass is not allowed"),
        (
            "fullnameOveride=x",
            "Additional property fullnameOveride is not allowed",
        ),
        (
            "fullnameOverride=Not_A_Name",
            "fullnameOverride: Does not match pattern",
        ),
        ("nameOverride=Not_A_Name", "nameOverride: Does not match pattern"),
        ("crds.keeep=true", "crds: Additional property keeep is not allowed"),
        ("crds.enabled=yes", "crds.enabled: Invalid type. Expected: boolean"),
        (
            "builderImage.tga=1",
            "builderImage: Additional property tga is not allowed",
        ),
        (
            "podSecurityContext.runAsNonroot=true",
            "podSecurityContext: Additional property runAsNonroot is not allowed",
        ),
        (
            "securityContext.readOnlyRootFileSystem=true",
            "securityContext: Additional property readOnlyRootFileSystem is not allowed",
        ),
        (
            "topologySpreadConstraints[0].topologykey=zone",
            "topologySpreadConstraints.0: Additional property topologykey is not allowed",
        ),
        (
            "topologySpreadConstraints[0].whenUnsatisfiable=Never",
            "topologySpreadConstraints.0.whenUnsatisfiable must be one of the following",
        ),
        (
            "podDisruptionBudget.minAvaliable=1",
            "podDisruptionBudget: Additional property minAvaliable is not allowed",
        ),
        (
            "podDisruptionBudget.maxUnavailable=half",
            "podDisruptionBudget.maxUnavailable",
        ),
        (
            "global.imagePullSecrets[0].nmae=creds",
            "global.imagePullSecrets.0: Additional property nmae",
        ),
        (
            "global.commonLabels.team[0]=a",
            "global.commonLabels.team: Invalid type",
        ),
        ("enabled=1", "enabled: Invalid type. Expected: boolean"),
        (
            "builderImagePullSecrets[0].name=Reg_Cred",
            "builderImagePullSecrets.0.name: Does not match pattern",
        ),
        (
            "builderImagePullSecrets[0]=regcred",
            "builderImagePullSecrets.0: Invalid type. Expected: object",
        ),
    ] {
        let out = Command::new(&helm)
            .args(["template", RELEASE, &chart(), "--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "--set {set} must be refused with {message:?}, got:\n{stderr}"
        );
    }
    // minAvailable and maxUnavailable together: Kubernetes takes only one.
    let out = Command::new(&helm)
        .args(["template", RELEASE, &chart()])
        .args(["--set", "podDisruptionBudget.minAvailable=1"])
        .args(["--set", "podDisruptionBudget.maxUnavailable=1"])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("podDisruptionBudget: Must not validate the schema (not)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_chart_works_as_a_subchart() {
    // A parent chart with this chart in its charts/, switched by `condition: nixpool.enabled`, and
    // global values of its own (one for another subchart) next to the ones this chart reads.
    let helm = helm().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("platform");
    std::fs::create_dir_all(parent.join("charts")).unwrap();
    run(Command::new("cp")
        .arg("-r")
        .arg(chart())
        .arg(parent.join("charts/nixpool")));
    std::fs::write(
        parent.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: nixpool\n    version: \">=0.0.0\"\n    condition: nixpool.enabled\n",
    )
    .unwrap();
    std::fs::write(
        parent.join("values.yaml"),
        "global:\n  imagePullSecrets: [{name: platform-pull}]\n  commonLabels: {platform: core}\n  storageClass: fast\nnixpool:\n  enabled: true\n  watchNamespace: builders\n",
    )
    .unwrap();
    run(Command::new(&helm).args(["lint", "--strict"]).arg(&parent));
    let objects = docs(&run(Command::new(&helm).args(["template", "p"]).arg(&parent)));
    let deploy = find(&objects, "Deployment");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["imagePullSecrets"],
        yaml("[{name: platform-pull}]")
    );
    assert_eq!(deploy["metadata"]["labels"]["platform"].as_str(), Some("core"));
    let args = serde_norway::to_string(&deploy["spec"]["template"]["spec"]["containers"][0]["args"]).unwrap();
    assert!(args.contains("--namespace=builders"), "{args}");
    assert!(objects.iter().any(|d| kind(d) == "CustomResourceDefinition"));

    let off = run(Command::new(&helm)
        .args(["template", "p", "--set", "nixpool.enabled=false"])
        .arg(&parent));
    assert!(docs(&off).is_empty(), "nixpool.enabled=false renders nothing:\n{off}");
}

#[test]
fn the_defaults_run_the_released_images_safely_spread_and_covered_by_a_pdb() {
    let version = app_version();

    // Both images at the chart's appVersion (what the release pushes), today's security
    // contexts, the two replicas spread over nodes and covered by a PodDisruptionBudget.
    let objects = render(&[]);
    let deploy = find(&objects, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"].as_str(),
        Some(format!("ghcr.io/nixpool/nixpool-operator:{version}").as_str())
    );
    // The operator run without the chart defaults to the same builder tag.
    assert_eq!(
        nixpool_operator::cli::DEFAULT_IMAGE,
        format!("ghcr.io/nixpool/nixpool-builder:{version}"),
        "the workspace version (Cargo.toml) and the chart's appVersion must agree"
    );
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&format!("--default-image=ghcr.io/nixpool/nixpool-builder:{version}").as_str()),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--default-image-pull-secret")),
        "no default pull secret unless builderImagePullSecrets names one: {args:?}"
    );
    assert_eq!(
        pod["securityContext"],
        yaml("{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, seccompProfile: {type: RuntimeDefault}}")
    );
    assert_eq!(
        container["securityContext"],
        yaml("{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}")
    );
    let selector = deploy["spec"]["selector"]["matchLabels"].clone();
    assert_eq!(
        pod["topologySpreadConstraints"],
        yaml(&format!(
            "[{{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {}}}}}]",
            serde_json::to_string(&selector).unwrap()
        ))
    );
    assert!(pod.get("priorityClassName").is_none());
    assert!(pod.get("imagePullSecrets").is_none());
    let pdb = find(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"].as_str(), Some("policy/v1"));
    assert_eq!(
        pdb["spec"],
        yaml(&format!(
            "{{minAvailable: 1, selector: {{matchLabels: {}}}}}",
            serde_json::to_string(&selector).unwrap()
        ))
    );
    assert_eq!(pdb["metadata"]["name"], deploy["metadata"]["name"]);
}

#[test]
fn the_pdb_follows_replica_count_and_its_values() {
    // One replica: no PodDisruptionBudget (it would block every drain); none when disabled.
    for sets in [&["replicaCount=1"][..], &["podDisruptionBudget.enabled=false"]] {
        assert!(
            !render(sets).iter().any(|d| kind(d) == "PodDisruptionBudget"),
            "{sets:?}"
        );
    }
    let pdb = render(&["podDisruptionBudget.minAvailable=0"]);
    assert_eq!(
        find(&pdb, "PodDisruptionBudget")["spec"]["minAvailable"].as_i64(),
        Some(0)
    );
    let pdb = render(&["podDisruptionBudget.maxUnavailable=50%"]);
    assert_eq!(
        find(&pdb, "PodDisruptionBudget")["spec"]["maxUnavailable"].as_str(),
        Some("50%")
    );
    assert!(find(&pdb, "PodDisruptionBudget")["spec"].get("minAvailable").is_none());
}

#[test]
fn each_value_lands_where_it_belongs() {
    let objects = render(&[
        "fullnameOverride=builders-operator",
        "podLabels.team=infra",
        "podAnnotations.example\\.com/owner=infra",
        "priorityClassName=system-cluster-critical",
        "global.commonLabels.cost-center=c42",
        "global.imagePullSecrets[0].name=shared",
        "global.imagePullSecrets[1].name=both",
        "imagePullSecrets[0].name=both",
        "imagePullSecrets[1].name=own",
        "podSecurityContext.runAsUser=1000",
        "podSecurityContext.fsGroup=1000",
        "securityContext.readOnlyRootFilesystem=false",
        "topologySpreadConstraints[0].maxSkew=2",
        "topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
        "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
        "topologySpreadConstraints[0].labelSelector.matchLabels.mine=yes",
        "builderImage.repository=registry.example.com/builder",
        "builderImage.tag=amd64-abc123",
        "builderImagePullSecrets[0].name=regcred",
        "builderImagePullSecrets[1].name=mirror.creds",
        "image.tag=amd64-abc123",
    ]);
    for o in &objects {
        let name = o["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            o["metadata"]["labels"]["cost-center"].as_str(),
            Some("c42"),
            "{name}: commonLabels"
        );
        assert!(
            kind(o) == "CustomResourceDefinition" || name.starts_with("builders-operator"),
            "fullnameOverride names every object: {name}"
        );
    }
    let deploy = find(&objects, "Deployment");
    let template = &deploy["spec"]["template"];
    let pod = &template["spec"];
    assert_eq!(template["metadata"]["labels"]["team"].as_str(), Some("infra"));
    assert_eq!(template["metadata"]["labels"]["cost-center"].as_str(), Some("c42"));
    assert!(
        deploy["spec"]["selector"]["matchLabels"].get("team").is_none(),
        "pod labels stay out of the immutable selector"
    );
    assert_eq!(
        template["metadata"]["annotations"]["example.com/owner"].as_str(),
        Some("infra")
    );
    assert_eq!(pod["priorityClassName"].as_str(), Some("system-cluster-critical"));
    assert_eq!(
        pod["imagePullSecrets"],
        yaml("[{name: shared}, {name: both}, {name: own}]")
    );
    assert_eq!(pod["securityContext"]["runAsUser"].as_i64(), Some(1000));
    assert_eq!(pod["securityContext"]["fsGroup"].as_i64(), Some(1000));
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true),
        "defaults merge"
    );
    assert_eq!(
        pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(false)
    );
    assert_eq!(
        pod["topologySpreadConstraints"],
        yaml(
            "[{maxSkew: 2, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {mine: 'yes'}}}]"
        )
    );
    assert_eq!(
        pod["containers"][0]["image"].as_str(),
        Some("ghcr.io/nixpool/nixpool-operator:amd64-abc123")
    );
    let args = serde_norway::to_string(&pod["containers"][0]["args"]).unwrap();
    assert!(
        args.contains("--default-image=registry.example.com/builder:amd64-abc123"),
        "{args}"
    );
    assert!(args.contains("--lease-name=builders-operator"), "{args}");
    assert!(
        args.contains("--default-image-pull-secret=regcred\n- --default-image-pull-secret=mirror.creds\n"),
        "{args}"
    );
    let rbac = find(&objects, "ClusterRoleBinding");
    assert_eq!(rbac["subjects"][0]["name"].as_str(), Some("builders-operator"));
}

#[test]
fn global_fallbacks_name_override_and_the_old_builder_image_string() {
    // global.priorityClassName when the chart's own is empty; nameOverride; the old string form of
    // builderImage.
    let objects = render(&[
        "global.priorityClassName=platform",
        "nameOverride=nix",
        "builderImage=ghcr.io/x/builder:v1",
    ]);
    let deploy = find(&objects, "Deployment");
    assert_eq!(deploy["metadata"]["name"].as_str(), Some("t-nix"));
    assert_eq!(
        deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("nix-operator")
    );
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"].as_str(), Some("platform"));
    let args = serde_norway::to_string(&pod["containers"][0]["args"]).unwrap();
    assert!(args.contains("--default-image=ghcr.io/x/builder:v1"), "{args}");
}

/// Where the chart keeps the CRD it templates.
const CHART_CRD: &str = "charts/nixpool/files/nixbuilderpools.nixpool.dev.yaml";

#[test]
fn the_charts_crd_is_the_generated_one() {
    let chart_crd = std::fs::read_to_string(format!("{REPO}/{CHART_CRD}")).unwrap();
    let crd = std::fs::read_to_string(format!("{REPO}/crds/nixbuilderpools.nixpool.dev.yaml")).unwrap();
    assert!(
        chart_crd == crd,
        "{CHART_CRD} is out of date: cp crds/nixbuilderpools.nixpool.dev.yaml {CHART_CRD}"
    );
    assert!(
        !std::path::Path::new(&format!("{}/crds", chart())).exists(),
        "the chart's crds/ would be installed once and never upgraded; the CRD is a template"
    );

    // The rendered CRD is that file, with the release's labels and, by default, kept on uninstall.
    let generated = yaml(&crd);
    let objects = render(&[]);
    let rendered = find(&objects, "CustomResourceDefinition");
    assert_eq!(rendered["spec"], generated["spec"]);
    assert_eq!(rendered["apiVersion"], generated["apiVersion"]);
    assert_eq!(rendered["metadata"]["name"], generated["metadata"]["name"]);
    assert_eq!(
        rendered["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(),
        Some("keep")
    );
    assert_eq!(
        rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"].as_str(),
        Some("Helm")
    );
    let not_kept = render(&["crds.keep=false"]);
    assert!(
        find(&not_kept, "CustomResourceDefinition")["metadata"]
            .get("annotations")
            .is_none()
    );
    assert!(
        !render(&["crds.enabled=false"])
            .iter()
            .any(|d| kind(d) == "CustomResourceDefinition")
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
        (
            "every-value",
            [
                "fullnameOverride=nixpool-operator",
                "podLabels.team=infra",
                "podAnnotations.owner=infra",
                "priorityClassName=high",
                "global.commonLabels.cost-center=c42",
                "global.imagePullSecrets[0].name=shared",
                "imagePullSecrets[0].name=own",
                "podSecurityContext.fsGroup=65532",
                "podSecurityContext.fsGroupChangePolicy=OnRootMismatch",
                "securityContext.runAsNonRoot=true",
                "topologySpreadConstraints[0].maxSkew=1",
                "topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
                "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
                "topologySpreadConstraints[0].minDomains=2",
                "topologySpreadConstraints[0].matchLabelKeys[0]=pod-template-hash",
                "podDisruptionBudget.maxUnavailable=1",
                "replicaCount=3",
                "builderImage.tag=amd64-abc123",
            ]
            .iter()
            .flat_map(|s| ["--set", s])
            .collect(),
        ),
    ] {
        let rendered = helm_template(&args);
        // ServiceMonitor is the Prometheus operator's CRD, not a built-in.
        let builtin: Vec<_> = docs(&rendered)
            .into_iter()
            .filter(|d| kind(d) != "ServiceMonitor")
            .collect();
        assert!(builtin.len() >= 6, "{name}: {} objects", builtin.len());
        if name != "single" {
            assert!(builtin.iter().any(|d| kind(d) == "PodDisruptionBudget"), "{name}");
        }
        let file = dir.path().join(format!("{name}.yaml"));
        let text: String = builtin
            .iter()
            .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap()))
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
        .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap()))
        .collect();
    std::fs::write(&examples, secrets).unwrap();
    run(Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.32.0"])
        .arg(&examples));
}

/// The rules of the rendered ClusterRole and leader-election Role.
struct Rbac {
    objects: Vec<serde_norway::Value>,
}

impl Rbac {
    fn render() -> Self {
        // No PodDisruptionBudget: `helm template` renders policy/v1, which Kubernetes 1.20 lacks.
        Rbac {
            objects: render(&["podDisruptionBudget.enabled=false"]),
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
            out.push_str(&format!("---\n{}", serde_norway::to_string(&d).unwrap()));
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
    let mut p: NixBuilderPool = serde_norway::from_str(include_str!("../../../examples/autoscaling.yaml")).unwrap();
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
    wait_established(&cp, "nixbuilderpools.nixpool.dev").unwrap_or_else(|e| panic!("{e:#}"));
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

/// `helm` against `cp`, with its cache and config under `dir`.
fn helm_on(cp: &ControlPlane, dir: &Path) -> Command {
    let mut c = Command::new(helm().unwrap_or_else(|e| panic!("{e:#}")));
    c.arg("--kubeconfig").arg(cp.kubeconfig());
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        c.env(var, dir.join("helm").join(sub));
    }
    c
}

/// `helm upgrade --install` of `chart` as release t. Kubernetes 1.20's OpenAPI does not know the
/// CRD's CEL rules, so Helm's client-side check is off (the server still validates everything).
fn upgrade(cp: &ControlPlane, dir: &Path, chart: &Path) -> std::process::Output {
    helm_on(cp, dir)
        .args(["upgrade", "--install", RELEASE])
        .arg(chart)
        .args(["-n", RELEASE_NS, "--create-namespace", "--disable-openapi-validation"])
        .output()
        .unwrap()
}

fn succeeded(out: std::process::Output) {
    assert!(
        out.status.success(),
        "helm failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the served NixBuilderPool schema has `spec.speedFactor` (the field the older CRD
/// lacks): a pool created with it keeps it, or the API server prunes it.
fn serves_speed_factor(cp: &ControlPlane, dir: &Path, ns: &str) -> bool {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("p{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut pool = yaml(&std::fs::read_to_string(format!("{REPO}/examples/minimal.yaml")).unwrap());
    pool["metadata"]["name"] = name.clone().into();
    pool["spec"]["speedFactor"] = 3.into();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, serde_norway::to_string(&pool).unwrap()).unwrap();
    cp.forget_discovery();
    run(cp
        .kubectl()
        .args(["create", "--validate=false", "-n", ns, "-f"])
        .arg(&file));
    let kept = run(cp.kubectl().args([
        "get",
        "nixbuilderpools.nixpool.dev",
        &name,
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.speedFactor}",
    ]));
    kept.trim() == "3"
}

async fn until_served(cp: &ControlPlane, dir: &Path, ns: &str, speed_factor: bool, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        (serves_speed_factor(cp, dir, ns) == speed_factor).then_some(())
    })
    .await;
}

#[tokio::test]
async fn helm_upgrade_replaces_an_older_crd() {
    let cp = ControlPlane::start().unwrap();
    let dir = cp.dir().join("upgrade");
    std::fs::create_dir_all(&dir).unwrap();
    let ns = cp.namespace("pools").await.unwrap();
    let crd_name = "crd/nixbuilderpools.nixpool.dev";

    // An older CRD: today's without spec.speedFactor.
    let mut old = yaml(&std::fs::read_to_string(format!("{REPO}/crds/nixbuilderpools.nixpool.dev.yaml")).unwrap());
    let spec = &mut old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert!(spec.as_mapping_mut().unwrap().remove("speedFactor").is_some());
    let old_text = serde_norway::to_string(&old).unwrap();
    let old_crd = dir.join("old-crd.yaml");
    std::fs::write(&old_crd, &old_text).unwrap();
    // The same chart carrying that older CRD.
    let old_chart = dir.join("old-chart");
    run(Command::new("cp").arg("-r").arg(chart()).arg(&old_chart));
    std::fs::write(old_chart.join("files/nixbuilderpools.nixpool.dev.yaml"), &old_text).unwrap();
    let new_chart = Path::new(&chart()).to_path_buf();

    // 1. The CRD as chart 0.1.0 left it: created once from the chart's crds/, not owned by Helm.
    run(cp.kubectl().args(["create", "--validate=false", "-f"]).arg(&old_crd));
    wait_established(&cp, crd_name.trim_start_matches("crd/")).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !serves_speed_factor(&cp, &dir, &ns),
        "the older CRD prunes spec.speedFactor"
    );

    // 2. Helm will not take over a CRD it did not create...
    let out = upgrade(&cp, &dir, &new_chart);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("invalid ownership metadata"),
        "{stderr}"
    );
    // 3. ...until it is labelled and annotated as the release's (docs/install.md, "Upgrading
    // from chart 0.1.0"); then the upgrade replaces it and the new schema is served.
    run(cp
        .kubectl()
        .args(["label", "--overwrite", crd_name, "app.kubernetes.io/managed-by=Helm"]));
    run(cp.kubectl().args([
        "annotate",
        "--overwrite",
        crd_name,
        &format!("meta.helm.sh/release-name={RELEASE}"),
        &format!("meta.helm.sh/release-namespace={RELEASE_NS}"),
    ]));
    // Helm's client-side OpenAPI check on a server before 1.25 refuses the CEL rules (docs/install.md).
    let out = helm_on(&cp, &dir)
        .args(["upgrade", "--install", RELEASE])
        .arg(&new_chart)
        .args(["-n", RELEASE_NS, "--create-namespace"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("x-kubernetes-validations"),
        "{stderr}"
    );
    succeeded(upgrade(&cp, &dir, &new_chart));
    until_served(&cp, &dir, &ns, true, "the new CRD after adopting the 0.1.0 one").await;

    // 4. A Helm-managed older CRD: the release goes to the chart with the older CRD and back
    // with plain `helm upgrade`; each time the API server serves the chart's CRD.
    succeeded(upgrade(&cp, &dir, &old_chart));
    until_served(&cp, &dir, &ns, false, "the older CRD after an upgrade to the old chart").await;
    succeeded(upgrade(&cp, &dir, &new_chart));
    until_served(&cp, &dir, &ns, true, "the new CRD after helm upgrade").await;
    let live = run(cp.kubectl().args(["get", crd_name, "-o", "json"]));
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    // The 1.20 server has no policy/v1: the chart falls back to policy/v1beta1.
    run(cp.kubectl().args([
        "get",
        "poddisruptionbudgets.v1beta1.policy",
        "t-nixpool",
        "-n",
        RELEASE_NS,
    ]));

    // 5. Uninstalling the release keeps the CRD, and with it every pool.
    succeeded(
        helm_on(&cp, &dir)
            .args(["uninstall", RELEASE, "-n", RELEASE_NS])
            .output()
            .unwrap(),
    );
    run(cp.kubectl().args(["get", crd_name]));
    let pools = run(cp
        .kubectl()
        .args(["get", "nixbuilderpools.nixpool.dev", "-n", &ns, "-o", "name"]));
    assert!(pools.lines().count() >= 3, "{pools}");
    assert!(
        run(cp
            .kubectl()
            .args(["get", "deployments", "-n", RELEASE_NS, "-o", "name"]))
        .trim()
        .is_empty(),
        "the release's other objects are gone"
    );
}
