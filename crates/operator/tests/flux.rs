//! The FluxCD examples (`examples/flux`, laid out as a fleet repository): every Flux object is
//! one of Flux's own API types, every Kustomization path builds with kustomize, and what they
//! build applies in order: Namespaces, then the CRD and the operator (a HelmRelease of the OCI
//! chart), then the pools, which are valid pools, with a health check on them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use nixpool_testenv::{helm, kube_bin_dir, need_tool};

const FLUX: &str = "examples/flux";

/// The version of PyPI's cloudcoil-models-fluxcd that `hack/setup.sh` installs: the newest that
/// installs on Python 3.11 (later ones need 3.14). It models Flux 2.5.1.
const FLUX_MODELS: &str = "cloudcoil-models-fluxcd==2.5.1.0";

/// Validates each YAML document of the files it is given against the cloudcoil model of its
/// apiVersion and kind, and fails on a field the model does not know (the models ignore unknown
/// fields, so every input key must survive the model's round trip). Prints what it validated as
/// JSON; non-Flux documents are listed with `"model": null`.
const VALIDATE: &str = r#"
import importlib, json, pkgutil, sys
import pydantic, yaml
import cloudcoil.models.fluxcd as fluxcd
from cloudcoil.resources import get_model

for m in pkgutil.walk_packages(fluxcd.__path__, fluxcd.__name__ + "."):
    importlib.import_module(m.name)

# Flux 2.5.1's models have OCIRepository only as v1beta2. source-controller 1.6 (Flux 2.6)
# promoted it unchanged to v1 ("backwards compatible"; the same spec fields), and Flux 2.8 stopped
# serving v1beta2, so the examples use v1, checked against the v1beta2 model.
PROMOTED = {("source.toolkit.fluxcd.io/v1", "OCIRepository"): "source.toolkit.fluxcd.io/v1beta2"}

def unknown(given, kept, path):
    out = []
    if isinstance(given, dict):
        for k, v in given.items():
            if not isinstance(kept, dict) or k not in kept:
                out.append(path + "." + k)
            else:
                out += unknown(v, kept[k], path + "." + k)
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            out += unknown(g, k, "%s[%d]" % (path, i))
    return out

results, errors = [], []
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        name = (doc.get("metadata") or {}).get("name")
        where = "%s: %s %s %s" % (path, api, kind, name)
        if ".toolkit.fluxcd.io/" not in api:
            results.append({"file": path, "apiVersion": api, "kind": kind, "name": name, "model": None})
            continue
        model_api = api
        try:
            model = get_model(kind, api_version=api)
        except KeyError:
            model_api = PROMOTED.get((api, kind))
            if model_api is None:
                errors.append(where + ": Flux has no such type")
                continue
            model = get_model(kind, api_version=model_api)
        doc = dict(doc, apiVersion=model_api)
        try:
            parsed = model.model_validate(doc)
        except pydantic.ValidationError as e:
            errors.append(where + ": " + str(e))
            continue
        kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        for field in unknown(doc, kept, ""):
            errors.append(where + ": unknown field " + field[1:])
        results.append({"file": path, "apiVersion": api, "kind": kind, "name": name,
                        "model": model.__module__ + "." + model.__name__})
print(json.dumps(results))
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
"#;

fn root() -> PathBuf {
    Path::new(REPO).join(FLUX)
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") && path.file_name().unwrap() != "kustomization.yaml" {
            out.push(path);
        }
    }
    out.sort();
}

/// Every manifest of the examples (kustomize's own kustomization.yaml files left out).
fn manifests() -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&root(), &mut files);
    files
}

fn docs(text: &str) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a serde_norway::Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or_else(|| panic!("{path:?} is missing in {v:?}"))
}

fn kind(v: &serde_norway::Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

/// The Flux Kustomizations of the examples (kustomize.toolkit.fluxcd.io).
fn flux_kustomizations() -> Vec<serde_norway::Value> {
    manifests()
        .iter()
        .flat_map(|f| docs(&std::fs::read_to_string(f).unwrap()))
        .filter(|d| s(d, &["apiVersion"]).starts_with("kustomize.toolkit.fluxcd.io/"))
        .collect()
}

fn by_name<'a>(ks: &'a [serde_norway::Value], name: &str) -> &'a serde_norway::Value {
    ks.iter()
        .find(|k| s(k, &["metadata", "name"]) == name)
        .unwrap_or_else(|| panic!("no Kustomization {name}"))
}

/// What `kustomize build` makes of a Flux Kustomization's `path` (relative to the fleet
/// repository's root, here examples/flux), with kubectl's built-in kustomize.
fn build(path: &str) -> Vec<serde_norway::Value> {
    // Debian bookworm has no kustomize package; the control plane's kubectl (1.20) carries one.
    let kubectl = kube_bin_dir().unwrap_or_else(|e| panic!("{e:#}")).join("kubectl");
    assert!(
        path.starts_with("./"),
        "a Flux path is relative to the source root: {path}"
    );
    let dir = root().join(path);
    assert!(
        dir.join("kustomization.yaml").is_file(),
        "{path} has no kustomization.yaml"
    );
    docs(&run(Command::new(kubectl).arg("kustomize").arg(&dir)))
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    let out = Command::new("python3")
        .args(["-c", "import cloudcoil.models.fluxcd"])
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "Flux's API types are missing: pip install {FLUX_MODELS} (or run hack/setup.sh)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Command::new("python3")
        .args(["-c", VALIDATE])
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn every_flux_object_is_one_of_fluxs_own_types() {
    let files = manifests();
    let out = validate(&files);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut checked: Vec<(String, String)> = results
        .iter()
        .filter(|r| !r["model"].is_null())
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    checked.sort();
    assert_eq!(
        checked,
        [
            ("HelmRelease", "nixpool"),
            ("Kustomization", "nixpool-operator"),
            ("Kustomization", "nixpool-pools"),
            ("OCIRepository", "nixpool"),
        ]
        .map(|(k, n)| (k.to_string(), n.to_string()))
    );
    // The rest are Namespaces and pools, checked in the other tests.
    for r in results.iter().filter(|r| r["model"].is_null()) {
        let what = (r["apiVersion"].as_str().unwrap(), r["kind"].as_str().unwrap());
        assert!(
            [("v1", "Namespace"), ("nixpool.dev/v1alpha1", "NixBuilderPool")].contains(&what),
            "{r}"
        );
    }

    // The check fails on what Flux would refuse: an unknown field, a value out of its enum, a type
    // that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let release = std::fs::read_to_string(root().join("infrastructure/nixpool/helmrelease.yaml")).unwrap();
    let source = std::fs::read_to_string(root().join("infrastructure/nixpool/ocirepository.yaml")).unwrap();
    for (name, text, message) in [
        (
            "typo",
            release.replace("  install:\n    crds:", "  install:\n    crd:"),
            "unknown field spec.install.crd",
        ),
        (
            "enum",
            release.replace("crds: CreateReplace", "crds: Replace"),
            "spec.install.crds",
        ),
        (
            "nested",
            source.replace("operation: copy", "operation: copy\n    digest: sha256:00"),
            "unknown field spec.layerSelector.digest",
        ),
        (
            "type",
            source.replace("kind: OCIRepository", "kind: OciRepository"),
            "Flux has no such type",
        ),
    ] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &text).unwrap();
        let out = validate(&[file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{name}: expected {message:?}, got:\n{stderr}"
        );
    }
}

#[test]
fn every_kustomization_path_builds_and_applies_in_order() {
    let ks = flux_kustomizations();
    assert_eq!(ks.len(), 2, "{ks:?}");
    for k in &ks {
        let name = s(k, &["metadata", "name"]);
        assert_eq!(s(k, &["metadata", "namespace"]), "flux-system", "{name}");
        // The fleet repository flux bootstrap made.
        assert_eq!(
            (
                s(k, &["spec", "sourceRef", "kind"]),
                s(k, &["spec", "sourceRef", "name"])
            ),
            ("GitRepository", "flux-system"),
            "{name}"
        );
        assert_eq!(k["spec"]["prune"].as_bool(), Some(true), "{name}");
        s(k, &["spec", "interval"]);
        s(k, &["spec", "timeout"]);
    }

    // 1. The operator: its Namespace, the chart's OCIRepository and the HelmRelease, and Ready only
    // when all of them are (wait), so the CRD exists before anything depends on it.
    let operator = by_name(&ks, "nixpool-operator");
    assert_eq!(operator["spec"]["wait"].as_bool(), Some(true));
    let built = build(s(operator, &["spec", "path"]));
    let namespace = built
        .iter()
        .find(|d| kind(d) == "Namespace")
        .expect("the operator's path creates its Namespace");
    let ns = s(namespace, &["metadata", "name"]);
    for d in built.iter().filter(|d| kind(d) != "Namespace") {
        assert_eq!(s(d, &["metadata", "namespace"]), ns, "{d:?}");
    }
    let release = built.iter().find(|d| kind(d) == "HelmRelease").expect("a HelmRelease");
    let chart_ref = &release["spec"]["chartRef"];
    assert_eq!(s(chart_ref, &["kind"]), "OCIRepository");
    let source = built
        .iter()
        .find(|d| kind(d) == "OCIRepository" && d["metadata"]["name"] == chart_ref["name"])
        .expect("the HelmRelease's chartRef names the OCIRepository next to it");
    assert!(chart_ref.get("namespace").is_none_or(|n| n.as_str() == Some(ns)));
    assert!(s(source, &["spec", "url"]).starts_with("oci://"));
    assert_eq!(
        s(source, &["spec", "layerSelector", "mediaType"]),
        "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    );
    for phase in ["install", "upgrade"] {
        assert_eq!(s(release, &["spec", phase, "crds"]), "CreateReplace", "{phase}");
    }
    // The values pass the chart's values.schema.json, and the release installs the CRD.
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        serde_norway::to_string(&release["spec"]["values"]).unwrap(),
    )
    .unwrap();
    let helm = helm().unwrap_or_else(|e| panic!("{e:#}"));
    let rendered = run(Command::new(&helm)
        .args(["template", "nixpool", &format!("{REPO}/charts/nixpool"), "-n", ns, "-f"])
        .arg(values.path()));
    assert!(
        docs(&rendered).iter().any(|d| kind(d) == "CustomResourceDefinition"),
        "the HelmRelease must install the CRD"
    );

    // 2. The pools: after the operator, in a Namespace of their own, Ready only when each pool is.
    let pools = by_name(&ks, "nixpool-pools");
    let depends: Vec<&str> = pools["spec"]["dependsOn"]
        .as_sequence()
        .expect("the pools depend on the operator")
        .iter()
        .map(|d| s(d, &["name"]))
        .collect();
    assert_eq!(depends, ["nixpool-operator"]);
    let built = build(s(pools, &["spec", "path"]));
    assert_eq!(kind(&built[0]), "Namespace", "kustomize puts the Namespace first");
    let pool_ns = s(&built[0], &["metadata", "name"]);
    let built_pools: Vec<_> = built.iter().filter(|d| kind(d) == "NixBuilderPool").collect();
    assert!(!built_pools.is_empty());
    let checks = pools["spec"]["healthChecks"].as_sequence().expect("health checks");
    for pool in &built_pools {
        assert_eq!(s(pool, &["metadata", "namespace"]), pool_ns);
        assert!(
            checks.iter().any(|c| s(c, &["apiVersion"]) == "nixpool.dev/v1alpha1"
                && s(c, &["kind"]) == "NixBuilderPool"
                && c["name"] == pool["metadata"]["name"]
                && c["namespace"] == pool["metadata"]["namespace"]),
            "no health check on {pool:?}"
        );
    }
    assert_eq!(
        checks.len(),
        built_pools.len(),
        "every health check names a pool the path builds"
    );

    // The pools are valid: the operator renders their children (its own validation, the CRD's
    // rules included).
    let file = tempfile::NamedTempFile::new().unwrap();
    let text: String = built_pools
        .iter()
        .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap()))
        .collect();
    std::fs::write(file.path(), text).unwrap();
    let children = run(Command::new(OPERATOR).args(["render", "-f"]).arg(file.path()));
    assert!(children.contains("kind: Deployment"), "{children}");
}

#[test]
fn the_flux_namespaces_are_valid_kubernetes_1_32() {
    need_tool("kubernetes-validate", "pip install kubernetes-validate").unwrap_or_else(|e| panic!("{e:#}"));
    let namespaces: Vec<_> = flux_kustomizations()
        .iter()
        .flat_map(|k| build(s(k, &["spec", "path"])))
        .filter(|d| kind(d) == "Namespace")
        .collect();
    assert_eq!(namespaces.len(), 2);
    let file = tempfile::NamedTempFile::new().unwrap();
    let text: String = namespaces
        .iter()
        .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap()))
        .collect();
    std::fs::write(file.path(), text).unwrap();
    run(Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.32.0"])
        .arg(file.path()));
}
