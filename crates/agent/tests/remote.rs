//! Real remote builds through the agent: sshd, nix-daemon and nix, no mocks.

mod support;

use std::time::Duration;

use support::*;

fn out_path(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

fn assert_built_remotely(b: &Builder, out: &std::process::Output, content: &str) {
    assert!(
        out.status.success(),
        "build failed:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
    let path = out_path(out);
    assert!(path.starts_with("/nix/store/"), "{path}");
    // The output is in the builder's own store (the scratch root's /nix) and was copied back.
    let on_builder = b.root.path(&path);
    assert_eq!(
        std::fs::read_to_string(&on_builder)
            .unwrap_or_else(|e| panic!("{} not on the builder: {e}", on_builder.display())),
        content
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
}

#[test]
fn builds_over_ssh_ng_and_ssh() {
    let mut b = Builder::new(&config("remote"));
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    let key = b.root.client_key.clone();
    let out = b.build(
        "ssh-ng",
        &key,
        &b.derivation("via-ssh-ng", "echo built-over-ssh-ng > $out"),
    );
    assert_built_remotely(&b, &out, "built-over-ssh-ng\n");
    let out = b.build("ssh", &key, &b.derivation("via-ssh", "echo built-over-ssh > $out"));
    assert_built_remotely(&b, &out, "built-over-ssh\n");
    assert!(
        b.log().contains("not advertising kvm"),
        "the log says whether kvm is advertised"
    );
    let conf = std::fs::read_to_string(b.root.path("/etc/nix/nix.conf")).unwrap();
    assert!(conf.contains("trusted-users = root builder"), "{conf}");
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn forced_command_refuses_anything_but_nix() {
    let mut b = Builder::new(&config("gate"));
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    let key = b.root.client_key.clone();
    let out = b.ssh("builder", &key, "ls /");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("only serves Nix remote builds") && stderr.contains("\"ls /\""),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "ls ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // root cannot log in, even with an authorized key.
    let out = b.ssh("root", &key, "nix-daemon --stdio");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn untrusted_builder_user_fails_and_the_agent_config_fixes_it() {
    let mut b = Builder::new(&config("trust"));
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));

    // A hand-made builder: the same files, but the builder user is not trusted.
    let conf_path = b.root.path("/etc/nix/nix.conf");
    let conf = std::fs::read_to_string(&conf_path)
        .unwrap()
        .replace("trusted-users = root builder", "trusted-users = root");
    std::fs::write(&conf_path, conf).unwrap();
    let script = format!(
        "NIX_CONF_DIR={conf_dir} {NIX_DAEMON} & exec {SSHD} -D -e -f {sshd_config}",
        conf_dir = b.root.path("/etc/nix").display(),
        sshd_config = b.root.path("/etc/ssh/sshd_config").display()
    );
    b.hand_made = Some(
        b.inside("sh")
            .args(["-c", &script])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let key = b.root.client_key.clone();
    let mut out = None;
    for _ in 0..100 {
        let o = b.build("ssh-ng", &key, &b.derivation("untrusted", "echo x > $out"));
        if String::from_utf8_lossy(&o.stderr).contains("Connection refused") {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        out = Some(o);
        break;
    }
    let out = out.expect("the hand-made builder never came up");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not privileged to build input-addressed derivations"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.kill_all_inside("TERM");
    b.hand_made.take().unwrap().wait().unwrap();

    // The agent rewrites nix.conf on start; the same build now works.
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    let out = b.build("ssh-ng", &key, &b.derivation("trusted", "echo trusted > $out"));
    assert_built_remotely(&b, &out, "trusted\n");
}

#[test]
fn authorized_keys_reload_live_without_restarting_sshd() {
    let mut b = Builder::new(&config("reload"));
    b.start_agent(&["--key-reload-interval-ms", "200"]);
    b.wait_ready(Duration::from_secs(30));
    let second = b.root.dir.path().join("second_ed25519");
    let second_public = keygen(&second);
    let denied = b.ssh("builder", &second, "nix-daemon --stdio");
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let sshd = b.sshd_pid(b.agent_pid()).expect("sshd runs under the agent");

    let first = b.root.client_public.clone();
    b.root.set_authorized_keys(&[&first, &second_public]);
    let mut accepted = false;
    for _ in 0..50 {
        let o = b.ssh("builder", &second, "echo");
        if String::from_utf8_lossy(&o.stderr).contains("only serves Nix remote builds") {
            accepted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        accepted,
        "the second key was not accepted after the Secret changed:\n{}",
        b.log()
    );
    let out = b.build("ssh-ng", &second, &b.derivation("second-key", "echo second > $out"));
    assert_built_remotely(&b, &out, "second\n");
    assert_eq!(b.sshd_pid(b.agent_pid()), Some(sshd), "sshd was restarted");
    assert!(b.log().contains("authorized keys reloaded"));
}

#[test]
fn sigterm_drains_a_running_build() {
    let mut b = Builder::new(&config("drain"));
    b.start_agent(&["--drain-accept-ms", "1500"]);
    b.wait_ready(Duration::from_secs(30));
    let key = b.root.client_key.clone();
    let file = b.derivation("slow", "busybox sleep 4; echo survived > $out");
    let t0 = std::time::Instant::now();
    let out = std::thread::scope(|s| {
        let build = s.spawn(|| b.build("ssh-ng", &key, &file));
        // Wait for the build to run on the builder.
        let mut running = false;
        for _ in 0..150 {
            if b.metric("nixpool_agent_builds_running").unwrap_or(0.0) >= 1.0 {
                running = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            running,
            "no build showed up in nixpool_agent_builds_running:\n{}",
            b.log()
        );
        assert!(b.metric("nixpool_agent_ssh_sessions").unwrap_or(0.0) >= 1.0);
        let pid = nix::unistd::Pid::from_raw(b.agent_pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let sigterm_at = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        assert!(!b.http("/readyz").0, "still ready while draining");
        // For --drain-accept-ms a new connection, which kube-proxy may still send here while
        // the endpoints drop the pod, is accepted: the gate answers (the session has no input,
        // so the gate says it ended mid-request).
        let accepted = b.ssh("builder", &key, "nix-daemon --stdio");
        let stderr = String::from_utf8_lossy(&accepted.stderr);
        assert!(
            !stderr.contains("Connection refused") && stderr.contains("nixpool: the session ended"),
            "a new SSH session was not accepted right after SIGTERM: {}",
            String::from_utf8_lossy(&accepted.stderr)
        );
        // After it, the port is closed.
        std::thread::sleep(Duration::from_millis(2500).saturating_sub(sigterm_at.elapsed()));
        let refused = b.ssh("builder", &key, "nix-daemon --stdio");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("Connection refused"),
            "a new SSH session was accepted while draining: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
        build.join().unwrap()
    });
    let built_at = t0.elapsed();
    assert_built_remotely(&b, &out, "survived\n");
    let mut agent = b.agent.take().unwrap();
    let status = wait_timeout(&mut agent, Duration::from_secs(20)).expect("the agent exits after the build");
    assert_eq!(status.code(), Some(0), "{}", b.log());
    assert!(built_at >= Duration::from_secs(4));
    assert!(b.log().contains("no SSH session left"));
}

#[test]
fn a_crash_looping_child_ends_in_the_termination_log() {
    let mut b = Builder::new(&config("crash"));
    b.start_agent(&[
        "--nix-daemon",
        "/bin/false",
        "--restart-limit",
        "2",
        "--restart-backoff-ms",
        "50",
    ]);
    let mut agent = b.agent.take().unwrap();
    let status = wait_timeout(&mut agent, Duration::from_secs(30)).expect("the agent gives up");
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(b.root.path("/dev/termination-log")).unwrap();
    assert!(
        log.starts_with("nix-daemon crashed 3 times within 300s (last: exit status: 1)"),
        "{log}"
    );
}

#[test]
fn a_crashed_nix_daemon_is_restarted_and_builds_go_on() {
    let mut b = Builder::new(&config("restart"));
    b.start_agent(&["--restart-backoff-ms", "100"]);
    b.wait_ready(Duration::from_secs(30));
    let agent = b.agent_pid();
    let daemon = sigkill_child(agent, "nix-daemon");
    let mut restarted = None;
    for _ in 0..100 {
        restarted = child_named(agent, "nix-daemon").filter(|p| *p != daemon);
        if restarted.is_some() && b.http("/readyz").0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(restarted.is_some(), "nix-daemon was not restarted:\n{}", b.log());
    assert_eq!(
        b.metric("nixpool_agent_child_restarts_total"),
        Some(1.0),
        "{}",
        b.http("/metrics").1
    );
    let key = b.root.client_key.clone();
    let out = b.build("ssh-ng", &key, &b.derivation("after-restart", "echo again > $out"));
    assert_built_remotely(&b, &out, "again\n");
}

/// Issue 14, goal 4: a session that comes while nix-daemon is down (killed, its restart waiting
/// out the backoff) waits for it in the gate, over ssh-ng:// and ssh://, instead of failing a
/// build Nix would not try again.
#[test]
fn builds_that_come_while_nix_daemon_restarts_wait_for_it() {
    let mut b = Builder::new(&config("daemon-gap"));
    b.start_agent(&["--restart-backoff-ms", "2000"]);
    b.wait_ready(Duration::from_secs(30));
    let agent = b.agent_pid();
    let kill_daemon = |b: &Builder| {
        let daemon = sigkill_child(agent, "nix-daemon");
        for _ in 0..200 {
            if child_named(agent, "nix-daemon").is_none_or(|p| p != daemon) {
                return daemon;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nix-daemon {daemon} did not die:\n{}", b.log());
    };
    // The first crash is restarted at once; the second waits out the 2 s backoff.
    let first = kill_daemon(&b);
    for _ in 0..200 {
        if child_named(agent, "nix-daemon").is_some_and(|p| p != first) && b.http("/readyz").0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The derivations first: writing them takes a while under load, and the builds must start
    // while nix-daemon is down.
    let key = b.root.client_key.clone();
    let (ng, serve) = (
        b.derivation("gap-ng", "echo ng > $out"),
        b.derivation("gap-serve", "echo serve > $out"),
    );
    kill_daemon(&b);
    let t0 = std::time::Instant::now();
    let (out_ng, out_serve) = std::thread::scope(|s| {
        let ng = s.spawn(|| b.build("ssh-ng", &key, &ng));
        let serve = s.spawn(|| b.build("ssh", &key, &serve));
        (ng.join().unwrap(), serve.join().unwrap())
    });
    let took = t0.elapsed();
    assert_built_remotely(&b, &out_ng, "ng\n");
    assert_built_remotely(&b, &out_serve, "serve\n");
    // Both started while no nix-daemon listened: the restart came after its backoff.
    assert!(
        took >= Duration::from_millis(1500),
        "{took:?}: the builds did not meet a down nix-daemon"
    );
    assert_eq!(b.metric("nixpool_agent_child_restarts_total"), Some(2.0));
    eprintln!("two builds that met a down nix-daemon took {took:?}");
}

/// SIGKILLs the agent's child named `comm`; returns its pid.
fn sigkill_child(agent: u32, comm: &str) -> u32 {
    let pid = child_named(agent, comm).unwrap_or_else(|| panic!("{comm} runs under the agent"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    pid
}

/// The newest child of `parent` named `comm`. Newest: when nix-daemon is killed, the worker it
/// forked for a connection (a readiness probe's) is left to the agent, which is its subreaper;
/// the restarted nix-daemon is younger than any such leftover.
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (head, tail) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1;
            let fields: Vec<&str> = tail.split_whitespace().collect();
            // After the name: state, ppid, ... starttime is field 22 of stat, the 20th here.
            let ppid: u32 = fields.get(1)?.parse().ok()?;
            let started: u64 = fields.get(19)?.parse().ok()?;
            (name == comm && ppid == parent).then_some((started, pid))
        })
        .max()
        .map(|(_, pid)| pid)
}

/// A team's `from=` and `expiry-time=` options narrow who may log in, on the builder too:
/// a key only allowed from elsewhere, or expired, is refused; the same key from here works.
#[test]
fn restrictive_key_options_are_kept() {
    let mut b = Builder::new(&config("keyopts"));
    b.start_agent(&["--key-reload-interval-ms", "200"]);
    b.wait_ready(Duration::from_secs(30));
    let k = b.root.client_key.clone();
    let public = b.root.client_public.clone();
    let gate_answers = |b: &Builder| {
        let o = b.ssh("builder", &k, "echo");
        String::from_utf8_lossy(&o.stderr).contains("only serves Nix remote builds")
    };
    let wait_for = |b: &Builder, want: bool, what: &str| {
        for _ in 0..50 {
            if gate_answers(b) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{what}:\n{}", b.log());
    };
    for (line, allowed) in [
        (format!("from=\"10.9.9.9\" {public}"), false),
        (format!("expiry-time=\"20000101\" {public}"), false),
        (format!("from=\"127.0.0.1\",expiry-time=\"29990101\" {public}"), true),
    ] {
        // From a known state: the plain key logs in, then the line with options replaces it.
        b.root.set_authorized_keys(&[&public]);
        wait_for(&b, true, "the plain key logs in");
        b.root.set_authorized_keys(&[&line]);
        let option = line.split(' ').next().unwrap().to_string();
        let file = b.root.path("/etc/ssh/authorized_keys.d/builder");
        let mut reloaded = false;
        for _ in 0..50 {
            if std::fs::read_to_string(&file).unwrap_or_default().contains(&option) {
                reloaded = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            reloaded,
            "the builder's authorized_keys never got {option}:\n{}",
            b.log()
        );
        assert_eq!(gate_answers(&b), allowed, "{line}: login allowed should be {allowed}");
    }
}

/// The gateway's slot count: with `NIXPOOL_GATE_SLOTS=1`, a session held open makes a second
/// one exit 75 with the message before it reads anything, over ssh-ng (the gate holds the slot)
/// and ssh (nix-store, exec'd by the gate, holds it). Sessions without the variable are not
/// counted, and a closed session frees its slot.
#[test]
fn gate_slots_refuse_a_session_beyond_the_gateways_count() {
    use std::os::unix::fs::MetadataExt;
    let mut b = Builder::new(&config("slots"));
    b.start_agent(&[]);
    b.wait_ready(Duration::from_secs(30));
    let dir = std::fs::metadata(b.root.path("/run/nixpool/gate-slots")).expect("the agent made the slots directory");
    let passwd = std::fs::read_to_string(b.root.path("/etc/passwd")).unwrap();
    let builder_uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("builder:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (builder_uid, 0o700));

    const WORKER_MAGIC_1: u64 = 0x6e69_7863;
    const SERVE_MAGIC_1: u64 = 0x390c_9deb;
    for (command, magic) in [
        ("nix-daemon --stdio", WORKER_MAGIC_1),
        ("nix-store --serve --write", SERVE_MAGIC_1),
    ] {
        let first = Session::open(&b, Some("1"), command, magic)
            .unwrap_or_else(|o| panic!("{command}: {}\n{}", String::from_utf8_lossy(&o.stderr), b.log()));
        let refused = run(session_command(&b, Some("1"), command).stdin(std::process::Stdio::null()));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(75), "{command}: {stderr}");
        assert!(
            stderr.contains("nixpool: all 1 build slots of this builder are in use"),
            "{command}: {stderr}"
        );
        assert!(refused.stdout.is_empty(), "{command}: the refused session was served");

        // A direct client (no variable) is not counted, nor is one with a bad value.
        let direct = Session::open(&b, None, command, magic).unwrap_or_else(|o| {
            panic!(
                "{command}: a direct client was refused: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        let bad = Session::open(&b, Some("0"), command, magic).unwrap_or_else(|o| {
            panic!(
                "{command}: a bad count was not ignored: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        direct.close();
        bad.close();

        // Closing the first session frees its slot (sshd reaps the session a moment later).
        first.close();
        let mut again = None;
        for _ in 0..50 {
            match Session::open(&b, Some("1"), command, magic) {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(o) => assert_eq!(o.status.code(), Some(75), "{}", String::from_utf8_lossy(&o.stderr)),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        again
            .unwrap_or_else(|| panic!("{command}: the slot was not freed when the session closed"))
            .close();
    }
}
