//! The machines file: it parses (Nix uses no builder at all otherwise), and which of its lines
//! doctor goes on to check.

use nixpool_api::MachinesEntry;

use super::{Check, CheckId, Options};
use crate::merge;

/// One machines line doctor checks further.
pub(super) struct SelectedMachine {
    /// The pool's block id, or `line N: <uri>` outside any block.
    pub subject: String,
    pub entry: MachinesEntry,
    /// The line as written (the probe build passes it as `builders`).
    pub line: String,
}

const WRITE_IT: &str = "write it: `sudo builderctl machines-file <pool>` (or --from pool.yaml)";

pub(super) fn check_machines_file(opts: &Options) -> (Check, Vec<SelectedMachine>) {
    let id = CheckId::MachinesFile;
    let m = opts.machines_file.display().to_string();
    let text = match std::fs::read_to_string(&opts.machines_file) {
        Ok(t) => t,
        Err(e) => {
            return (
                Check::fail(id, None, format!("{m}: {e}")).with_fix(WRITE_IT),
                Vec::new(),
            );
        }
    };
    let entries = merge::entries(&text);
    let lines: Vec<&str> = text.lines().collect();
    let bad: Vec<String> = entries
        .iter()
        .filter_map(|(n, r, _)| r.as_ref().err().map(|e| format!("line {n}: {e}")))
        .collect();
    if !bad.is_empty() {
        let found = format!(
            "{m} does not parse, and Nix then uses no builder at all: {}",
            bad.join("; ")
        );
        let fix = format!("fix or delete those lines in {m} (builderctl never rewrites them)");
        return (Check::fail(id, None, found).with_fix(fix), Vec::new());
    }
    let wanted = opts.pool.as_ref().map(|p| merge::resolve_id(&text, p));
    let mut selected = Vec::new();
    let any_block = entries.iter().any(|(_, _, b)| b.is_some());
    for (n, r, block) in &entries {
        let Ok(entry) = r else { continue };
        let keep = match (&wanted, block) {
            (Some(Ok(id)), Some(b)) => b == id,
            (Some(Ok(_)), None) => false,
            (Some(Err(_)), _) => false,
            (None, Some(_)) => true,
            (None, None) => !any_block,
        };
        if keep {
            selected.push(SelectedMachine {
                subject: block.clone().unwrap_or_else(|| format!("line {n}: {}", entry.uri)),
                entry: entry.clone(),
                line: lines[n - 1].trim().to_string(),
            });
        }
    }
    if let Some(Err(ids)) = &wanted {
        let found = format!("{m}: several pools are called that: {}", ids.join(", "));
        return (
            Check::fail(id, None, found).with_fix("name the pool as namespace/name"),
            Vec::new(),
        );
    }
    if selected.is_empty() {
        let found = match &opts.pool {
            Some(p) => format!("{m} has no block for pool {p}"),
            None => format!("{m} has no builder in it"),
        };
        return (Check::fail(id, None, found).with_fix(WRITE_IT), Vec::new());
    }
    let names: Vec<&str> = selected.iter().map(|s| s.subject.as_str()).collect();
    (
        Check::pass(id, None, format!("{m} parses; checking {}", names.join(", "))),
        selected,
    )
}
