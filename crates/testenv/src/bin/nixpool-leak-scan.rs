//! `nixpool-leak-scan --since MARKER [ROOT...]`: the suite's secret-leak scan (see
//! `nixpool_testenv::leak_scan`). `hack/test.sh` runs it after every test, with a marker file it
//! touched before them. The default roots are /dev/shm (the control planes' directories) and
//! `$CARGO_TARGET_DIR/tmp` (the tests' scratch directories). Exits 1 on any leak, and also when
//! it saw no secret or no log, since then it proved nothing.

use std::path::PathBuf;
use std::process::ExitCode;

const HELP: &str = "nixpool-leak-scan: fail if a secret the tests made appears in a log, Event, ConfigMap, Pod, pool status or render output.

Usage: nixpool-leak-scan --since MARKER [ROOT...]

  --since MARKER  only files changed after MARKER (touch it before the tests) count
  ROOT            directories to scan (default: /dev/shm and $CARGO_TARGET_DIR/tmp)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let Some(i) = args.iter().position(|a| a == "--since") else {
        eprintln!("nixpool-leak-scan: --since MARKER is required (touch a file before the tests run)\n\n{HELP}");
        return ExitCode::from(2);
    };
    let Some(since) = args
        .get(i + 1)
        .and_then(|m| std::fs::metadata(m).ok())
        .and_then(|m| m.modified().ok())
    else {
        eprintln!("nixpool-leak-scan: cannot read the marker given to --since; touch it before the tests run");
        return ExitCode::from(2);
    };
    let mut roots: Vec<PathBuf> = args
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i && *j != i + 1)
        .map(|(_, a)| PathBuf::from(a))
        .collect();
    if roots.is_empty() {
        roots.push("/dev/shm".into());
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
            roots.push(PathBuf::from(t).join("tmp"));
        }
    }
    let report = nixpool_testenv::leak_scan::scan(&roots, since);
    println!(
        "| Secret-leak scan of {} | |",
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| --- | --- |");
    println!(
        "| Secret sources (Secrets in audit logs, key and token files) | {} |",
        report.secret_sources
    );
    println!("| Distinct secret substrings looked for | {} |", report.secrets);
    println!("| Log and render files scanned | {} |", report.files_scanned);
    println!(
        "| Events, ConfigMaps, Pods and pools scanned | {} |",
        report.audit_objects_scanned
    );
    println!("| Leaks | {} |", report.leaks.len());
    for leak in &report.leaks {
        eprintln!("LEAK: a value of {} appears in {}", leak.origin, leak.place);
    }
    if !report.leaks.is_empty() {
        return ExitCode::from(1);
    }
    if report.secrets == 0 || report.files_scanned == 0 || report.audit_objects_scanned == 0 {
        eprintln!(
            "nixpool-leak-scan: it saw no secret, no log or no API object since the marker, so it proved nothing; did the tests run?"
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
