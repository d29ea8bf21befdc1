//! Measures the agent with real parts and prints a table (not a timed test):
//! agent start to ready, and build latency through the agent vs a hand-configured sshd builder
//! in the same run. Needs what the integration tests need (root, namespaces, Debian's nix-bin,
//! openssh-server, busybox-static). Run: `cargo bench -p nixpool-agent --bench agent_bench`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

fn stats(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[0]), ms(v[v.len() / 2]), ms(v[v.len() - 1]))
}

fn main() {
    let runs: usize = std::env::var("NIXPOOL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut rows = Vec::new();

    // Start to ready.
    let mut ready = Vec::new();
    for _ in 0..runs {
        let mut b = Builder::new(&config("bench"));
        let t0 = Instant::now();
        b.start_agent(&[]);
        b.wait_ready(Duration::from_secs(30));
        ready.push(t0.elapsed());
        b.stop_agent(Duration::from_secs(20));
    }
    rows.push(("agent start to /readyz 200", stats(&mut ready)));

    // Build latency: the agent, then a hand-configured builder, in one namespace.
    let mut b = Builder::new(&config("bench"));
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    let key = b.root.client_key.clone();
    let mut through_agent = Vec::new();
    for i in 0..=runs {
        let file = b.derivation(&format!("agent-{i}"), "echo hi > $out");
        let t0 = Instant::now();
        let out = b.build("ssh-ng", &key, &file);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if i > 0 {
            through_agent.push(t0.elapsed()); // the first build also copies busybox: warm-up
        }
    }
    b.stop_agent(Duration::from_secs(20));

    let hand_keys = b.root.path("/etc/ssh/hand_keys");
    std::fs::create_dir_all(&hand_keys).unwrap();
    std::fs::write(hand_keys.join("builder"), format!("{}\n", b.root.client_public)).unwrap();
    let hand_config = b.root.path("/etc/ssh/sshd_config_hand");
    std::fs::write(
        &hand_config,
        format!(
            "Port 22\nHostKey {}\nAuthorizedKeysFile {}/%u\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile {}\n",
            b.root.path("/etc/ssh/ssh_host_ed25519_key").display(),
            hand_keys.display(),
            b.root.path("/run/sshd-hand.pid").display()
        ),
    )
    .unwrap();
    let script = format!(
        "NIX_CONF_DIR={} {NIX_DAEMON} & exec {SSHD} -D -e -f {}",
        b.root.path("/etc/nix").display(),
        hand_config.display()
    );
    b.hand_made = Some(
        b.inside("sh")
            .args(["-c", &script])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut hand = Vec::new();
    for i in 0..=runs {
        let file = b.derivation(&format!("hand-{i}"), "echo hi > $out");
        let t0 = Instant::now();
        let out = b.build("ssh-ng", &key, &file);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if i > 0 {
            hand.push(t0.elapsed());
        }
    }
    rows.push(("trivial ssh-ng build through the agent", stats(&mut through_agent)));
    rows.push(("trivial ssh-ng build, hand-configured sshd", stats(&mut hand)));

    println!(
        "\n{runs} runs each, {} CPUs\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("| measurement | min ms | median ms | max ms |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, (min, med, max)) in rows {
        println!("| {name} | {min:.0} | {med:.0} | {max:.0} |");
    }
}
