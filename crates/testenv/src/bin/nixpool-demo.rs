//! The local demo: the whole product on one machine. A real Kubernetes control plane on
//! loopback, the CRD, the operator, a real node (containerd, kubelet, kube-proxy, kube-scheduler)
//! running the builder pods from the builder test image, the minimal example pool, `builderctl machines-file` from the cluster, and a real
//! `nix-build --max-jobs 0` that can only succeed on the pool. Prints what happened, with
//! timings. Everything it starts stops when it exits; `down` removes what a killed run left.
//!
//! Run it through `hack/demo.sh`, which installs and builds what it needs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nixpool_testenv::flow::{binary, derivation, nix_build};
use nixpool_testenv::node::Node;
use nixpool_testenv::{ControlPlane, free_port};

const HELP: &str = "nixpool-demo: nixpool end to end on this machine (as root).

Usage: nixpool-demo [up] [--repo DIR] [--workdir DIR] [--keep]
       nixpool-demo down [--workdir DIR]

  up (default)     start a Kubernetes control plane on 127.0.0.1, install the CRD, run the
                   operator and a real node, apply examples/minimal.yaml, write a machines
                   file with builderctl, and run a real remote nix-build through it
  down             stop what an earlier run left behind and remove its files
  --repo DIR       the nixpool checkout (default .)
  --workdir DIR    keys, logs, machines file (default /var/lib/nixpool-demo)
  --keep           keep everything running until Ctrl-C, to explore with kubectl and nix-build

Use hack/demo.sh, which installs the packages and builds the binaries first.";

struct Args {
    down: bool,
    repo: PathBuf,
    workdir: PathBuf,
    keep: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        down: false,
        repo: ".".into(),
        workdir: "/var/lib/nixpool-demo".into(),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "up" => {}
            "down" => args.down = true,
            "--repo" => args.repo = it.next().context("--repo needs a directory")?.into(),
            "--workdir" => args.workdir = it.next().context("--workdir needs a directory")?.into(),
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(args)
}

struct Timeline {
    started: Instant,
    rows: Vec<(String, Duration)>,
}

impl Timeline {
    fn step<T>(&mut self, what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let t = Instant::now();
        let v = f().with_context(|| format!("{what} failed"))?;
        self.done(what, t);
        Ok(v)
    }

    fn done(&mut self, what: &str, since: Instant) {
        println!(
            "[{:>6.1}s] {what} ({:.1}s)",
            self.started.elapsed().as_secs_f64(),
            since.elapsed().as_secs_f64()
        );
        self.rows.push((what.to_string(), since.elapsed()));
    }
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.kubectl().args(args).output()?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Stops what an earlier (killed) run left: its processes, the test node, the files.
fn down(workdir: &Path) -> anyhow::Result<()> {
    let marker = workdir.display().to_string();
    for entry in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmdline).contains(&marker) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    nixpool_testenv::node::down()?;
    if let Ok(cp_dir) = std::fs::read_to_string(workdir.join("control-plane-dir")) {
        let _ = std::fs::remove_dir_all(cp_dir.trim());
    }
    if workdir.exists() {
        std::fs::remove_dir_all(workdir).with_context(|| format!("removing {}", workdir.display()))?;
    }
    println!("nixpool demo: stopped what was left and removed {}", workdir.display());
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.down {
        return down(&args.workdir);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root (containerd, kubelet, kube-proxy's iptables rules, a root-owned Nix client): run sudo hack/demo.sh"
        );
    }
    if args.workdir.exists() {
        down(&args.workdir)?;
    }
    std::fs::create_dir_all(&args.workdir)?;
    let operator_bin = binary("nixpool-operator")?;
    let ours = nixpool_testenv::node::Binaries::of_workspace()?;
    let builderctl = binary("builderctl")?;

    let mut t = Timeline {
        started: Instant::now(),
        rows: Vec::new(),
    };
    // Lives as long as the process: the node's threads borrow it.
    let cp: &'static ControlPlane = Box::leak(Box::new(t.step(
        "control plane: etcd, kube-apiserver 1.20, kube-controller-manager on 127.0.0.1",
        ControlPlane::start,
    )?));
    std::fs::write(args.workdir.join("control-plane-dir"), cp.dir().display().to_string())?;
    t.step("installed the NixBuilderPool CRD", || {
        nixpool_testenv::harness::install_crd_from(cp, &args.repo)
    })?;

    let port = free_port();
    let operator_log = args.workdir.join("operator.log");
    let mut operator = t.step("started nixpool-operator", || {
        let file = std::fs::File::create(&operator_log)?;
        Ok(Command::new(&operator_bin)
            .args([
                "run",
                "--namespace",
                "default",
                "--lease-namespace",
                "default",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?)
    })?;

    let node = t.step(
        "a real node: containerd, kubelet, kube-proxy, kube-scheduler; builder image imported",
        || Node::start(cp, &ours),
    )?;

    let key = args.workdir.join("client_ed25519");
    t.step("builderctl keygen: a client key for this machine's Nix", || {
        run(Command::new(&builderctl)
            .args(["keygen", "--pool", "builders", "--out"])
            .arg(&key))
        .map(drop)
    })?;
    let public = std::fs::read_to_string(key.with_extension("pub"))?.trim().to_string();

    // The example as a user would adapt it, in one apply: this machine's key instead of Alice's,
    // the builder test image the node imported (nothing is pulled here), and no cache.nixos.org
    // (this machine has no internet).
    let mut pool: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(args.repo.join("examples/minimal.yaml"))?)?;
    let spec = pool.get_mut("spec").context("examples/minimal.yaml has no spec")?;
    spec["ssh"]["authorizedKeys"] = serde_norway::to_value([&public])?;
    spec["image"] = node.builder_image().into();
    spec["imagePullPolicy"] = "Never".into();
    spec["cache"] = serde_norway::to_value(serde_json::json!({"nixosCache": false}))?;
    // The example's Service is a ClusterIP; this host reaches the pool at the address the test
    // load balancer gives a LoadBalancer Service.
    spec["service"] = serde_norway::to_value(serde_json::json!({"type": "LoadBalancer"}))?;
    let pool_file = args.workdir.join("pool.yaml");
    std::fs::write(&pool_file, serde_norway::to_string(&pool)?)?;
    let apply = Instant::now();
    kubectl(cp, &["apply", "-f", &pool_file.to_string_lossy()])?;
    t.done(
        "kubectl apply -f examples/minimal.yaml (+ this machine's key, the test image, no cache.nixos.org)",
        apply,
    );

    let ready = Instant::now();
    wait_for("the pool Ready", Duration::from_secs(120), || {
        Ok(kubectl(
            cp,
            &[
                "get",
                "nbp",
                "builders",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
        )? == "True")
    })
    .await?;
    t.done("the pool is Ready: builder pods up, load balancer published", ready);

    let machines = args.workdir.join("machines");
    t.step("builderctl machines-file builders (from the cluster)", || {
        run(Command::new(&builderctl)
            .args(["machines-file", "builders", "-n", "default", "--kubeconfig"])
            .arg(cp.kubeconfig())
            .arg("--machines-file")
            .arg(&machines)
            .arg("--key")
            .arg(&key)
            .args(["--etc-static", "/nonexistent"]))
        .map(drop)
    })?;

    let drv = derivation(&args.workdir, "nixpool-demo", "echo built by a nixpool builder > $out")?;
    let out = t.step("nix-build --max-jobs 0: a real remote build on the pool", || {
        let out = nix_build(&machines, &drv)?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })?;
    let first_build = apply.elapsed();

    println!("\n$ kubectl get nbp\n{}", kubectl(cp, &["get", "nbp"])?);
    println!(
        "$ kubectl get pods -o wide\n{}",
        kubectl(cp, &["get", "pods", "-o", "wide"])?
    );
    println!("$ cat {}\n{}", machines.display(), std::fs::read_to_string(&machines)?);
    println!("$ cat {out}\n{}", std::fs::read_to_string(&out)?);
    println!("| Step | Seconds |\n| --- | --- |");
    for (what, d) in &t.rows {
        println!("| {what} | {:.1} |", d.as_secs_f64());
    }
    println!(
        "| **kubectl apply to first successful remote build** | **{:.1}** |",
        first_build.as_secs_f64()
    );

    if args.keep {
        println!(
            "\nEverything keeps running. Explore:\n  export KUBECONFIG={}\n  {} get nbp,pods\n  nix-build <file.nix> --max-jobs 0 --option builders @{}\nCtrl-C stops it all.",
            cp.kubeconfig().display(),
            cp.kubectl().get_program().to_string_lossy(),
            machines.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    let _ = operator.kill();
    let _ = operator.wait();
    drop(node);
    down(&args.workdir)?;
    Ok(())
}
