//! `builderctl status`: a table of pools.

use nixpool_api::NixBuilderPool;

use crate::render::{max_jobs, name, namespace, not_ready_reason};

/// One row of the table.
pub fn row(p: &NixBuilderPool) -> [String; 8] {
    let st = p.status.clone().unwrap_or_default();
    let ready = match (&p.status, not_ready_reason(p)) {
        (None, _) => "no status".to_string(),
        (Some(_), None) => "True".into(),
        (Some(_), Some(_)) => "False".into(),
    };
    let endpoint = st
        .endpoint
        .as_ref()
        .map(|e| format!("{}:{}", e.host, e.port))
        .unwrap_or_else(|| "-".into());
    let jobs = if st.ready_replicas > 0 {
        max_jobs(p).to_string()
    } else {
        "0".into()
    };
    let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
    [
        namespace(p).to_string(),
        name(p).to_string(),
        ready,
        format!("{}/{}", st.ready_replicas, p.spec.replicas),
        endpoint,
        jobs,
        list(&p.spec.systems),
        list(&p.spec.supported_features),
    ]
}

/// The table, columns aligned.
pub fn table(pools: &[NixBuilderPool]) -> String {
    let header = [
        "NAMESPACE",
        "NAME",
        "READY",
        "BUILDERS",
        "ENDPOINT",
        "JOBS",
        "SYSTEMS",
        "FEATURES",
    ]
    .map(String::from);
    let rows: Vec<[String; 8]> = std::iter::once(header).chain(pools.iter().map(row)).collect();
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| if i == 7 { c.clone() } else { format!("{c:<w$}") })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Why each unready pool is not ready, for below the table.
pub fn reasons(pools: &[NixBuilderPool]) -> Vec<String> {
    pools
        .iter()
        .filter_map(|p| not_ready_reason(p).map(|r| format!("{}/{}: {r}", namespace(p), name(p))))
        .collect()
}

/// One pool in `builderctl status -o json`. The field names are stable: tools may rely on them
/// (new fields may be added; none is renamed or removed within v1alpha1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub namespace: String,
    pub name: String,
    /// `true` when the pool is usable (Ready=True, status current), `false` when not, `null`
    /// when it has no status yet.
    pub ready: Option<bool>,
    /// Why it is not ready (`null` when ready).
    pub reason: Option<String>,
    /// Builders ready / wanted.
    pub ready_builders: i32,
    pub replicas: i32,
    /// `null` until the operator has published one.
    pub endpoint: Option<Endpoint>,
    /// What the machines line offers: ready builders × jobs per builder (0 when none is ready).
    pub max_jobs: u32,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    /// The host key the machines line pins (`null` until published).
    pub host_public_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub host: String,
    pub port: i32,
}

/// The machine-readable form of each pool.
pub fn pool_status(p: &NixBuilderPool) -> PoolStatus {
    let st = p.status.clone().unwrap_or_default();
    let reason = not_ready_reason(p);
    PoolStatus {
        namespace: namespace(p).to_string(),
        name: name(p).to_string(),
        ready: p.status.as_ref().map(|_| reason.is_none()),
        reason: p.status.as_ref().and(reason),
        ready_builders: st.ready_replicas,
        replicas: p.spec.replicas,
        endpoint: st.endpoint.as_ref().map(|e| Endpoint {
            host: e.host.clone(),
            port: e.port,
        }),
        max_jobs: if st.ready_replicas > 0 { max_jobs(p) } else { 0 },
        systems: p.spec.systems.clone(),
        supported_features: p.spec.supported_features.clone(),
        mandatory_features: p.spec.mandatory_features.clone(),
        host_public_key: st.host_public_key.clone(),
    }
}

/// `{"pools": [...]}`, pretty-printed, with a final newline.
pub fn json(pools: &[NixBuilderPool]) -> String {
    #[derive(serde::Serialize)]
    struct Doc {
        pools: Vec<PoolStatus>,
    }
    let doc = Doc {
        pools: pools.iter().map(pool_status).collect(),
    };
    // Strings, numbers and lists only: serializing cannot fail.
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}
