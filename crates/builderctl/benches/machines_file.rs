//! `builderctl machines-file` for N pools (1000 unless `NIXPOOL_BENCH_POOLS` says otherwise)
//! from a real kube-apiserver (crates/testenv):
//! wall time of the whole process (start, kubeconfig, TLS, one list call, render, merge, atomic
//! write), against `kubectl get nbp -o json` of the same pools as the API-bound baseline, and the
//! list/get requests the API server counted. Then where an unchanged run's time goes, each part
//! measured alone in this process: the list call (kubeconfig, TLS, the API server, the transfer),
//! decoding the pools (as builderctl does, and as whole typed objects for comparison), render +
//! merge. Prints a table.
//!
//! `NIXPOOL_BENCH_BASELINE=/path/to/an/older/builderctl` adds a row for that binary's unchanged
//! run, measured in turns with this one (same API server, same file, same load).
//!
//! cargo bench -p builderctl --bench machines_file

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_builderctl");
const RUNS: usize = 15;

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[0]), ms(v[v.len() / 2]), ms(v[v.len() - 1]))
}

fn time(mut f: impl FnMut()) -> Vec<Duration> {
    f(); // warm-up
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

/// Like [`time`] for several functions, run in turns so that they share the machine's load.
fn time_in_turns(fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<Duration>> {
    let mut out = vec![Vec::new(); fs.len()];
    for run in 0..=RUNS {
        for (f, times) in fs.iter_mut().zip(&mut out) {
            let t = Instant::now();
            f();
            if run > 0 {
                times.push(t.elapsed()); // run 0 is the warm-up
            }
        }
    }
    out
}

fn main() {
    let n: usize = std::env::var("NIXPOOL_BENCH_POOLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cp = cluster::control_plane();
    let ns = rt.block_on(async {
        let client = cp.client().await.unwrap();
        let ns = cp.namespace("bench").await.unwrap();
        for i in 0..n {
            cluster::pool(
                &client,
                &ns,
                &format!("pool-{i:05}"),
                serde_json::json!({"team": "bench"}),
                3,
                3,
                (&format!("pool-{i:05}.example.com"), 22),
                cluster::HOST_KEY,
            )
            .await;
        }
        ns
    });
    let t = tempfile::tempdir().unwrap();
    let machines = t.path().join("machines");
    let kc = cp.kubeconfig();
    let baseline = std::env::var_os("NIXPOOL_BENCH_BASELINE");
    let run_bin = |bin: &std::ffi::OsStr, extra: &[&str]| {
        let out = Command::new(bin)
            .args(["machines-file", "-n", &ns, "--kubeconfig"])
            .arg(&kc)
            .arg("--machines-file")
            .arg(&machines)
            .arg("--etc-static")
            .arg(t.path().join("none"))
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success() || extra.contains(&"--check"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let builderctl = |extra: &[&str]| run_bin(BIN.as_ref(), extra);

    // First write (a new block per pool), then unchanged runs (nothing written), then a rewrite of
    // every block after the file was emptied.
    let lists0 = cluster::pool_requests(cp, "LIST");
    let gets0 = cluster::pool_requests(cp, "GET");
    let first = {
        let t0 = Instant::now();
        builderctl(&[]);
        t0.elapsed()
    };
    let lists1 = cluster::pool_requests(cp, "LIST");
    let gets1 = cluster::pool_requests(cp, "GET");
    let blocks = std::fs::read_to_string(&machines)
        .unwrap()
        .matches("# BEGIN nixpool")
        .count();
    assert_eq!(blocks, n);
    let (unchanged, unchanged_baseline) = match &baseline {
        None => (
            time(|| {
                builderctl(&[]);
            }),
            None,
        ),
        Some(old) => {
            let mut times = time_in_turns(&mut [
                &mut || {
                    builderctl(&[]);
                },
                &mut || {
                    let out = run_bin(old, &[]);
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    assert!(stdout.contains("nothing written"), "{stdout}");
                },
            ]);
            let old_times = times.pop();
            (times.pop().unwrap(), old_times)
        }
    };
    let check = time(|| {
        builderctl(&["--check"]);
    });
    let rewrite = time(|| {
        std::fs::write(&machines, "ssh://me@mine x86_64-linux\n").unwrap();
        builderctl(&[]);
    });
    let kubectl = time(|| {
        let out = cp
            .kubectl()
            .args(["get", "nixbuilderpools.nixpool.dev", "-n", &ns, "-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
    let size = std::fs::metadata(&machines).unwrap().len();
    // The parts alone, in process. The list call as builderctl makes it, on a new client (so
    // with the kubeconfig and the TLS handshake); its body as text.
    let list_url = format!("/apis/nixpool.dev/v1alpha1/namespaces/{ns}/nixbuilderpools");
    let list_text = || {
        rt.block_on(async {
            let opts = builderctl::source::ClusterOptions {
                kubeconfig: Some(kc.clone()),
                ..Default::default()
            };
            let (client, _) = builderctl::source::client(&opts).await.unwrap();
            let lp = kube::api::ListParams::default().match_any(); // resourceVersion=0, as builderctl
            let req = kube::core::Request::new(&list_url).list(&lp).unwrap();
            client.request_text(req).await.unwrap()
        })
    };
    let list_call = time(|| {
        list_text();
    });
    let text = list_text();
    let decode_lean = time(|| {
        assert_eq!(builderctl::source::decode_list(&text).unwrap().len(), n);
    });
    let decode_full = time(|| {
        let list: kube::core::ObjectList<nixpool_api::NixBuilderPool> = serde_json::from_str(&text).unwrap();
        assert_eq!(list.items.len(), n);
    });
    // Render a line per pool and merge them into the file.
    let pools = builderctl::source::decode_list(&text).unwrap();
    let existing = std::fs::read_to_string(&machines).unwrap();
    let opts = builderctl::render::RenderOptions {
        key_path: "/etc/nix/nixpool_ed25519".into(),
        allow_unready: false,
        via_ssh_config: false,
        allow_stale: false,
    };
    let pure = time(|| {
        let changes: Vec<_> = pools
            .iter()
            .map(|p| builderctl::merge::Change::Set {
                id: builderctl::render::pool_id(p),
                line: builderctl::render::entry(p, &opts).unwrap().to_string(),
            })
            .collect();
        let m = builderctl::merge::merge(&existing, &changes).unwrap();
        assert!(m.changed.is_empty());
    });

    println!("\nmachines-file, {n} pools, real kube-apiserver 1.20 on loopback, {RUNS} runs each (ms)\n");
    println!("| run                                             |    min | median |    max |");
    println!("|-------------------------------------------------|-------:|-------:|-------:|");
    let row = |name: &str, (a, b, c): (f64, f64, f64)| println!("| {name:<47} | {a:>6.1} | {b:>6.1} | {c:>6.1} |");
    let f = first.as_secs_f64() * 1000.0;
    row(&format!("first write ({n} new blocks)"), (f, f, f));
    row("unchanged (nothing written)", stats(unchanged));
    if let Some(times) = unchanged_baseline {
        row("unchanged, NIXPOOL_BENCH_BASELINE (in turns)", stats(times));
    }
    row("--check", stats(check));
    row(
        &format!("rewrite of {n} blocks (atomic write + backup)"),
        stats(rewrite),
    );
    row("in process: the list call (new client, TLS)", stats(list_call));
    row(
        &format!("in process: decode {n} pools (builderctl)"),
        stats(decode_lean),
    );
    row(&format!("in process: decode {n} whole typed pools"), stats(decode_full));
    row("in process: render + merge only (no I/O)", stats(pure));
    row("baseline: kubectl get nbp -o json (same list)", stats(kubectl));
    println!(
        "\nAPI requests of one run: {} LIST, {} GET (namespaced pools, counted by the API server); file: {} bytes; list body: {} bytes",
        lists1 - lists0,
        gets1 - gets0,
        size,
        text.len()
    );
    if let Some(old) = &baseline {
        println!("NIXPOOL_BENCH_BASELINE: {}", old.to_string_lossy());
    }
}
