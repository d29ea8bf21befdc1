//! Where pools come from: the cluster (one get or one list call) or a YAML/JSON file as
//! `kubectl get -o yaml` prints it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{GetParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Request;
use kube::{Client, Resource};
use nixpool_api::{NixBuilderPool, NixBuilderPoolSpec, NixBuilderPoolStatus};
use serde::Deserialize;

/// Why pools could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}, document {doc}: {message}. Give the output of `kubectl get nbp <name> -o yaml` (a pool, a List of pools, or several documents)"
    )]
    Parse { path: PathBuf, doc: usize, message: String },
    #[error("{path}: no NixBuilderPool in it{hint}")]
    Empty { path: PathBuf, hint: String },
    #[error("kubeconfig: {0}. Point --kubeconfig (or KUBECONFIG) at a kubeconfig and --context at one of its contexts")]
    Config(String),
    #[error("pool {ns}/{name} was not found; `kubectl get nbp -n {ns}` lists the pools there")]
    NotFound { ns: String, name: String },
    #[error(
        "{what} from the cluster does not decode as nixpool.dev/v1alpha1: {source}. Is this builderctl older than the operator's CRD? Use the builderctl of the operator's release"
    )]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the cluster refused to {what}: {source}. Check your credentials and RBAC (you need get/list on nixbuilderpools.nixpool.dev)"
    )]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// How to reach the cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub all_namespaces: bool,
}

/// Which pools.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Names (or `ns/name`); empty means every pool (matching `selector`).
    pub names: Vec<String>,
    pub selector: Option<String>,
}

/// A client and the namespace to use.
pub async fn client(opts: &ClusterOptions) -> Result<(Client, String), SourceError> {
    let kco = KubeConfigOptions {
        context: opts.context.clone(),
        ..Default::default()
    };
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).map_err(|e| SourceError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kco).await
        }
        None => kube::Config::from_kubeconfig(&kco).await,
    }
    .map_err(|e| SourceError::Config(e.to_string()))?;
    // `insecure-skip-tls-verify` and no CA: kube would still load every certificate of the
    // system's trust store for a verifier it then replaces with one that accepts anything (tens
    // of milliseconds, once per run). An empty root store is what it checks against instead;
    // the server's certificate is not checked either way.
    if config.accept_invalid_certs && config.root_cert.is_none() {
        config.root_cert = Some(Vec::new());
    }
    let ns = opts
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| SourceError::Config(e.to_string()))?;
    Ok((client, ns))
}

/// A pool as the API server sends it, decoded without what builderctl never reads: of the
/// metadata only the name, namespace, generation and labels are kept. `managedFields` is most of
/// a pool's bytes (and of the time to decode 1000 of them), and an annotation such as
/// `kubectl.kubernetes.io/last-applied-configuration` holds the whole spec again. `spec` and
/// `status` are the typed ones, so a pool reads exactly as with [`NixBuilderPool`]'s own decoder.
#[derive(Deserialize)]
struct WirePool {
    metadata: WireMeta,
    spec: NixBuilderPoolSpec,
    status: Option<NixBuilderPoolStatus>,
}

#[derive(Deserialize)]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct WireList {
    items: Vec<WirePool>,
}

impl From<WirePool> for NixBuilderPool {
    fn from(p: WirePool) -> Self {
        let WireMeta {
            name,
            namespace,
            generation,
            labels,
        } = p.metadata;
        NixBuilderPool {
            metadata: ObjectMeta {
                name,
                namespace,
                generation,
                labels,
                ..ObjectMeta::default()
            },
            spec: p.spec,
            status: p.status,
        }
    }
}

/// The pools of a list as the API server sends it (`{"items": [...]}`), sorted by
/// `namespace/name`, each decoded as [`WirePool`] says.
pub fn decode_list(json: &str) -> Result<Vec<NixBuilderPool>, serde_json::Error> {
    let list: WireList = serde_json::from_str(json)?;
    let mut items: Vec<NixBuilderPool> = list.items.into_iter().map(NixBuilderPool::from).collect();
    // One key per pool, not two per comparison.
    items.sort_by_cached_key(crate::render::pool_id);
    Ok(items)
}

/// Pools from the cluster: one get per named pool, or one list call for a selector or all.
pub async fn from_cluster(opts: &ClusterOptions, sel: &Selection) -> Result<Vec<NixBuilderPool>, SourceError> {
    let (client, ns) = client(opts).await?;
    if sel.names.is_empty() {
        let url = NixBuilderPool::url_path(&(), (!opts.all_namespaces).then_some(ns.as_str()));
        // resourceVersion=0: served from the API server's watch cache (kept current by its own
        // watch) instead of a quorum read of every pool from etcd.
        let mut lp = ListParams::default().match_any();
        if let Some(s) = &sel.selector {
            lp = lp.labels(s);
        }
        let req = Request::new(url).list(&lp).map_err(|e| SourceError::Api {
            what: "list pools".into(),
            source: kube::Error::BuildRequest(e),
        })?;
        let text = client.request_text(req).await.map_err(|source| SourceError::Api {
            what: "list pools".into(),
            source,
        })?;
        return decode_list(&text).map_err(|source| SourceError::Decode {
            what: "the list of pools".into(),
            source,
        });
    }
    let mut out = Vec::new();
    for wanted in &sel.names {
        let (pns, name) = match wanted.split_once('/') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (ns.clone(), wanted.clone()),
        };
        let what = || format!("get pool {pns}/{name}");
        let req = Request::new(NixBuilderPool::url_path(&(), Some(&pns)))
            .get(&name, &GetParams::default())
            .map_err(|e| SourceError::Api {
                what: what(),
                source: kube::Error::BuildRequest(e),
            })?;
        let text = match client.request_text(req).await {
            Ok(text) => text,
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                return Err(SourceError::NotFound { ns: pns, name });
            }
            Err(source) => return Err(SourceError::Api { what: what(), source }),
        };
        let pool: WirePool = serde_json::from_str(&text).map_err(|source| SourceError::Decode {
            what: format!("pool {pns}/{name}"),
            source,
        })?;
        out.push(pool.into());
    }
    Ok(out)
}

/// Pools from a file: one pool, a `List`, or several YAML documents (JSON is YAML too).
/// `names` filters by name or `ns/name`.
pub fn from_file(path: &Path, sel: &Selection) -> Result<Vec<NixBuilderPool>, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
        path: path.into(),
        source,
    })?;
    let pools = parse(&text).map_err(|(doc, message)| SourceError::Parse {
        path: path.into(),
        doc,
        message,
    })?;
    let mut pools: Vec<NixBuilderPool> = pools
        .into_iter()
        .filter(|p| {
            sel.names.is_empty()
                || sel
                    .names
                    .iter()
                    .any(|n| *n == crate::render::pool_id(p) || n == crate::render::name(p))
        })
        .filter(|p| match &sel.selector {
            None => true,
            Some(s) => matches_selector(p, s),
        })
        .collect();
    if pools.is_empty() {
        let hint = if sel.names.is_empty() {
            String::new()
        } else {
            format!(" named {}", sel.names.join(", "))
        };
        return Err(SourceError::Empty {
            path: path.into(),
            hint,
        });
    }
    pools.sort_by_key(crate::render::pool_id);
    Ok(pools)
}

/// Equality-based selectors only (`a=b,c!=d,e`), which is what a file needs.
fn matches_selector(p: &NixBuilderPool, selector: &str) -> bool {
    let labels = p.metadata.labels.clone().unwrap_or_default();
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                labels.get(k.trim().trim_end_matches('=')).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k)
            } else {
                labels.contains_key(term)
            }
        })
}

/// Parses pools from text; `Err((document number, message))`.
pub fn parse(text: &str) -> Result<Vec<NixBuilderPool>, (usize, String)> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|e| (i + 1, e.to_string()))?;
        if value.is_null() {
            continue;
        }
        collect(value, i + 1, &mut out)?;
    }
    Ok(out)
}

fn collect(value: serde_json::Value, doc: usize, out: &mut Vec<NixBuilderPool>) -> Result<(), (usize, String)> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = value.get("items").and_then(|i| i.as_array()) {
            for item in items {
                collect(item.clone(), doc, out)?;
            }
        }
        return Ok(());
    }
    if kind != "NixBuilderPool" {
        return Err((doc, format!("kind is {kind:?}, not NixBuilderPool")));
    }
    let pool: NixBuilderPool =
        serde_json::from_value(value).map_err(|e| (doc, format!("not a valid NixBuilderPool: {e}")))?;
    out.push(pool);
    Ok(())
}
