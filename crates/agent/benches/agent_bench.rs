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
    // The key line the agent wrote, with its forced command (the gate): the hand-made sshd
    // below runs it too, to tell the gate's cost from the rest of the agent's setup.
    let gated_line = std::fs::read_to_string(b.root.path("/etc/ssh/authorized_keys.d/builder"))
        .unwrap()
        .lines()
        .find(|l| l.contains(&b.root.client_public))
        .expect("the agent's key line")
        .to_string();
    b.stop_agent(Duration::from_secs(20));

    // The same plain sshd (no hardening) and nix-daemon, once with the bare key and once with
    // the agent's gated key line.
    let hand_made = |label: &str, key_line: &str| -> Vec<Duration> {
        let keys = b.root.path(&format!("/etc/ssh/hand_keys_{label}"));
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("builder"), format!("{key_line}\n")).unwrap();
        let config = b.root.path(&format!("/etc/ssh/sshd_config_{label}"));
        std::fs::write(
            &config,
            format!(
                "Port 22\nHostKey {}\nAuthorizedKeysFile {}/%u\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile {}\n",
                b.root.path("/etc/ssh/ssh_host_ed25519_key").display(),
                keys.display(),
                b.root.path(&format!("/run/sshd-{label}.pid")).display()
            ),
        )
        .unwrap();
        let daemon_pid = b.root.path(&format!("/run/nix-daemon-{label}.pid"));
        let script = format!(
            "NIX_CONF_DIR={} {NIX_DAEMON} & echo $! > {}; exec {SSHD} -D -e -f {}",
            b.root.path("/etc/nix").display(),
            daemon_pid.display(),
            config.display()
        );
        let mut server = b
            .inside("sh")
            .args(["-c", &script])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let mut times = Vec::new();
        for i in 0..=runs {
            let file = b.derivation(&format!("{label}-{i}"), "echo hi > $out");
            let t0 = Instant::now();
            let out = b.build("ssh-ng", &key, &file);
            assert!(
                out.status.success(),
                "{label}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if i > 0 {
                times.push(t0.elapsed());
            }
        }
        // sh exec'd sshd; the nix-daemon it started is stopped by its pid (in the builder's PID
        // namespace).
        let _ = server.kill();
        let _ = server.wait();
        let stopped = b
            .inside("sh")
            .args(["-c", &format!("kill $(cat {})", daemon_pid.display())])
            .status()
            .unwrap();
        assert!(stopped.success(), "the hand-made nix-daemon ({label}) was not stopped");
        std::thread::sleep(Duration::from_millis(300));
        times
    };
    let mut hand = hand_made("plain", &b.root.client_public.clone());
    let mut hand_gated = hand_made("gated", &gated_line);
    rows.push(("trivial ssh-ng build through the agent", stats(&mut through_agent)));
    rows.push(("trivial ssh-ng build, hand-configured sshd", stats(&mut hand)));
    rows.push((
        "trivial ssh-ng build, hand-configured sshd + the gate as forced command",
        stats(&mut hand_gated),
    ));

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
