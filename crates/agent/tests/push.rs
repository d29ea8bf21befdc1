//! Cache push for real: a `file://` binary cache written with `nix copy` and a signing key, and a
//! cache that is down, which must neither fail nor block the build.

mod support;

use std::process::Command;
use std::time::Duration;

use nixpool_api::agent::PushTarget;
use support::*;

#[test]
fn built_paths_are_pushed_signed_and_a_down_cache_fails_nothing() {
    preflight();
    let mut c = config("push");
    // The down cache keeps the queue from emptying: the drain waits this long for it.
    c.drain_timeout_seconds = 2;
    let key_file = "/run/nixpool/cache/store-signing-key".to_string();
    // A placeholder root to learn the scratch dir; the real one is made by Builder::new below.
    c.push = vec![];
    let mut b = Builder::new(&c);
    let dir = b.root.dir.path().to_path_buf();
    let cache = dir.join("cache");
    ok(Command::new(NIX_STORE)
        .arg("--generate-binary-cache-key")
        .arg("test-cache-1")
        .arg(dir.join("sk"))
        .arg(dir.join("pk")));
    let sk = std::fs::read_to_string(dir.join("sk")).unwrap();
    let pk = std::fs::read_to_string(dir.join("pk")).unwrap();
    write_secret(&b.root.path("/run/nixpool/cache"), &[("store-signing-key", &sk)], 0o400);
    c.push = vec![
        PushTarget::NixCopy {
            uri: format!("file://{}", cache.display()),
            signing_key_file: key_file.clone(),
        },
        // Nothing listens there: every push to it fails.
        PushTarget::NixCopy {
            uri: "http://127.0.0.1:9".into(),
            signing_key_file: key_file,
        },
    ];
    b.root.write_config(&c);
    b.start_agent(&[
        "--push-poll-ms",
        "200",
        "--push-backoff-ms",
        "200",
        "--push-max-backoff-ms",
        "400",
    ]);
    b.wait_ready(Duration::from_secs(30));
    let conf = std::fs::read_to_string(b.root.path("/etc/nix/nix.conf")).unwrap();
    assert!(conf.contains("post-build-hook = "), "{conf}");

    let key = b.root.client_key.clone();
    let out = b.build("ssh-ng", &key, &b.derivation("pushed", "echo pushed > $out"));
    assert!(
        out.status.success(),
        "the build failed with a cache down:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hash = path
        .trim_start_matches("/nix/store/")
        .split('-')
        .next()
        .unwrap()
        .to_string();

    let narinfo = cache.join(format!("{hash}.narinfo"));
    let mut found = false;
    for _ in 0..150 {
        if narinfo.exists() {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(found, "{} was not pushed to the file cache:\n{}", path, b.log());
    let info = std::fs::read_to_string(&narinfo).unwrap();
    assert!(info.contains("Sig: test-cache-1:"), "{info}");
    ok(Command::new(NIX)
        .args([
            "--extra-experimental-features",
            "nix-command",
            "store",
            "verify",
            "--no-contents",
            "--store",
        ])
        .arg(format!("file://{}", cache.display()))
        .args(["--trusted-public-keys", pk.trim(), &path]));

    // The down cache: failures counted, the batch stays queued, retried with backoff.
    let mut failures = 0.0;
    for _ in 0..100 {
        failures = b.metric("nixpool_agent_push_failures_total").unwrap_or(0.0);
        if failures >= 2.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failures >= 2.0,
        "push failures not counted/retried: {}",
        b.http("/metrics").1
    );
    assert!(b.metric("nixpool_agent_push_queue_length").unwrap() >= 1.0);
    assert!(b.metric("nixpool_agent_push_lag_seconds").is_some());
    assert!(b.log().contains("push failed; will retry"));
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));
    assert!(
        b.log().contains("still queued for push; they stay queued"),
        "{}",
        b.log()
    );
    assert!(
        !push_queue_is_empty(&b),
        "the queue survives the pod for the next start"
    );
}

fn push_queue_is_empty(b: &Builder) -> bool {
    std::fs::read_dir(b.root.path("/nix/var/nixpool/push-queue"))
        .unwrap()
        .next()
        .is_none()
}
