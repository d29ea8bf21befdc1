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
