//! The local demo: a real control plane on loopback, the CRD, the operator, the minimal example
//! pool, and what the operator made of it. Everything it starts stops when it exits.
//!
//! Run it through `hack/demo.sh`, which installs and builds what it needs.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nixpool_testenv::{ControlPlane, free_port};

struct Args {
    operator: PathBuf,
    repo: PathBuf,
    keep: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        operator: "target/debug/nixpool-operator".into(),
        repo: ".".into(),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--operator" => args.operator = it.next().context("--operator needs a path")?.into(),
            "--repo" => args.repo = it.next().context("--repo needs a path")?.into(),
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!(
                    "nixpool-demo: runs nixpool locally on a real Kubernetes control plane (etcd, kube-apiserver,\n\
                     kube-controller-manager on loopback), applies examples/minimal.yaml and shows the pool.\n\n\
                     Usage: nixpool-demo [--operator PATH] [--repo DIR] [--keep]\n\
                     \x20 --operator PATH  the nixpool-operator binary (default target/debug/nixpool-operator)\n\
                     \x20 --repo DIR       the nixpool checkout (default .)\n\
                     \x20 --keep           keep everything running until Ctrl-C, to explore with kubectl\n\n\
                     Use hack/demo.sh, which installs the packages and builds the binaries first."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(args)
}

fn step<T>(what: &str, started: Instant, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let t = Instant::now();
    let v = f().with_context(|| format!("{what} failed"))?;
    println!(
        "[{:>6.1}s] {what} ({:.1}s)",
        started.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    Ok(v)
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.kubectl().args(args).output()?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let cp = step(
        "started etcd, kube-apiserver 1.20 and kube-controller-manager on 127.0.0.1",
        started,
        ControlPlane::start,
    )?;
    let crd = args.repo.join("crds/nixbuilderpools.nixpool.dev.yaml");
    step("installed the NixBuilderPool CRD", started, || {
        kubectl(&cp, &["apply", "--validate=false", "-f", &crd.to_string_lossy()])?;
        kubectl(
            &cp,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/nixbuilderpools.nixpool.dev",
            ],
        )
    })?;
    let port = free_port();
    let log = cp.dir().join("operator.log");
    let mut operator = step("started nixpool-operator", started, || {
        let file = std::fs::File::create(&log)?;
        Command::new(&args.operator)
            .args([
                "run",
                "--namespace",
                "default",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {}; build it with cargo build -p nixpool-operator",
                    args.operator.display()
                )
            })
    })?;
    let example = args.repo.join("examples/minimal.yaml");
    step("applied examples/minimal.yaml", started, || {
        kubectl(&cp, &["apply", "-f", &example.to_string_lossy()])
    })?;
    step(
        "the operator made the pool's children and wrote its status",
        started,
        || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let key = kubectl(
                    &cp,
                    &["get", "nbp", "builders", "-o", "jsonpath={.status.hostPublicKey}"],
                )?;
                if !key.is_empty() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("no status after 60 s; see {}", log.display());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        },
    )?;
    println!("\n$ kubectl get nbp\n{}", kubectl(&cp, &["get", "nbp"])?);
    println!(
        "$ kubectl get deploy,svc,secret,cm -l app.kubernetes.io/instance=builders\n{}",
        kubectl(
            &cp,
            &[
                "get",
                "deploy,svc,secret,cm",
                "-l",
                "app.kubernetes.io/instance=builders"
            ]
        )?
    );
    println!(
        "$ kubectl get nbp builders -o jsonpath='{{.status.conditions}}'\n{}\n",
        kubectl(
            &cp,
            &[
                "get",
                "nbp",
                "builders",
                "-o",
                "jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{\"\\n\"}{end}"
            ]
        )?
    );
    println!(
        "machines line (status.machinesEntry):\n  {}\n",
        kubectl(
            &cp,
            &["get", "nbp", "builders", "-o", "jsonpath={.status.machinesEntry}"]
        )?
    );
    println!(
        "No kubelet runs here, so the builder pods stay Pending and the pool is not Ready; the operator's log is {}.",
        log.display()
    );
    if args.keep {
        println!(
            "\nEverything keeps running. Explore with:\n  export KUBECONFIG={}\n  {} get nbp,pods\nCtrl-C stops it all.",
            cp.kubeconfig().display(),
            cp.kubectl().get_program().to_string_lossy()
        );
        let _ = operator.wait();
    } else {
        let _ = operator.kill();
        let _ = operator.wait();
        let _ = std::fs::remove_dir_all(cp.dir());
        println!("\nStopped the operator and the control plane (rerun with --keep to explore).");
    }
    Ok(())
}
