//! Cache push for real: `file://` binary caches written with `nix copy` and a signing key, and
//! caches that are down, which must neither fail a build nor hold back the other caches.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

    // The down cache: failures counted, the path stays queued, retried with backoff.
    let down = "nix-copy:http://127.0.0.1:9";
    assert!(
        wait_for(Duration::from_secs(10), || counter(
            &b,
            "push_failures_total",
            &[("target", down)]
        ) >= 2.0),
        "push failures not counted/retried: {}",
        b.http("/metrics").1
    );
    assert_eq!(metric_of(&b, "push_queue_length", &[("target", down)]), Some(1.0));
    assert!(metric_of(&b, "push_lag_seconds", &[("target", down)]).unwrap() > 0.0);
    assert!(b.log().contains("push failed; will retry"));
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));
    assert!(
        b.log().contains("still queued for push; they stay queued"),
        "{}",
        b.log()
    );
    assert_eq!(
        queued_files(&b).len(),
        1,
        "the queue survives the pod for the next start"
    );
}

/// A metric's value for the series whose labels include `labels`, from the agent's /metrics.
fn metric_of(b: &Builder, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let name = format!("nixpool_agent_{name}{{");
    b.http("/metrics").1.lines().find_map(|l| {
        let rest = l.strip_prefix(&name)?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// A counter: a series not there yet is 0.
fn counter(b: &Builder, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_of(b, name, labels).unwrap_or(0.0)
}

fn wait_for(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ready()
}

/// The per-target queue files under the push queue.
fn queued_files(b: &Builder) -> Vec<PathBuf> {
    let targets = b.root.path("/nix/var/nixpool/push-queue/targets");
    std::fs::read_dir(targets)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

/// A signing key in the builder's cache Secret; returns its file as the agent config names it.
fn signing_key(b: &Builder) -> String {
    let dir = b.root.dir.path();
    ok(Command::new(NIX_STORE)
        .arg("--generate-binary-cache-key")
        .arg("test-cache-1")
        .arg(dir.join("sk"))
        .arg(dir.join("pk")));
    let sk = std::fs::read_to_string(dir.join("sk")).unwrap();
    write_secret(&b.root.path("/run/nixpool/cache"), &[("store-signing-key", &sk)], 0o400);
    "/run/nixpool/cache/store-signing-key".into()
}

/// Adds `n` new paths to the builder's store (`nix-store --add`, which fires no post-build hook).
fn add_paths(b: &Builder, name: &str, n: usize) -> Vec<String> {
    let dir = b.root.dir.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let f = dir.join(format!("{name}-{i}"));
            std::fs::write(&f, format!("{name} {i} {:?}", Instant::now())).unwrap();
            f
        })
        .collect();
    let out = ok(b.inside(NIX_STORE).arg("--add").args(&files));
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(paths.len(), n);
    paths
}

/// Queues `paths` as the post-build hook does for a build with these outputs: one entry.
fn enqueue(b: &Builder, paths: &[String]) {
    ok(Command::new(AGENT)
        .arg("--root")
        .arg(&b.root.root)
        .arg("enqueue")
        .env("OUT_PATHS", paths.join(" ")));
}

/// How many of `paths` a `file://` binary cache at `cache` has.
fn in_cache(cache: &Path, paths: &[String]) -> usize {
    paths
        .iter()
        .filter(|p| {
            let hash = p.trim_start_matches("/nix/store/").split('-').next().unwrap();
            cache.join(format!("{hash}.narinfo")).exists()
        })
        .count()
}

/// Waits until `cache` has all `paths`; returns the time since `t0` then.
fn until_cached(b: &Builder, cache: &Path, paths: &[String], t0: Instant, timeout: Duration) -> Duration {
    assert!(
        wait_for(timeout, || in_cache(cache, paths) == paths.len()),
        "{} of {} paths reached {} within {timeout:?}:\n{}",
        in_cache(cache, paths),
        paths.len(),
        cache.display(),
        b.log()
    );
    t0.elapsed()
}

/// Issue 14, goal 8: two caches, one down. The good one gets every path while the down one
/// retries each path with backoff (its failures, queue length and lag in /metrics); once back it
/// catches up. A path Nix cannot copy is retried alone and holds back no other. Prints the
/// figures of docs/reliability.md. `NIXPOOL_LONG=1`: 300 paths instead of 30.
#[test]
fn a_down_cache_or_a_bad_path_holds_back_no_other_and_the_cache_catches_up() {
    preflight();
    let n = if std::env::var_os("NIXPOOL_LONG").is_some() {
        300
    } else {
        30
    };
    let mut c = config("push");
    let mut b = Builder::new(&c);
    let dir = b.root.dir.path().to_path_buf();
    let key = signing_key(&b);
    // The second cache is reached through a symbolic link, swapped atomically to take it down
    // (to a file: Nix cannot create the cache's directory) and up again.
    let (store, blocker, link) = (dir.join("bad-store"), dir.join("blocker"), dir.join("bad-link"));
    std::fs::create_dir(&store).unwrap();
    std::fs::write(&blocker, "not a directory").unwrap();
    let point = |to: &Path| {
        let tmp = dir.join("bad-link.tmp");
        std::os::unix::fs::symlink(to, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
    };
    point(&store);
    let (good, bad) = (dir.join("good-cache"), store.join("cache"));
    let uris = [good.clone(), link.join("cache")].map(|cache| format!("file://{}", cache.display()));
    c.push = uris
        .iter()
        .map(|uri| PushTarget::NixCopy {
            uri: uri.clone(),
            signing_key_file: key.clone(),
        })
        .collect();
    let [good_name, bad_name] = uris.map(|uri| format!("nix-copy:{uri}"));
    let (on_good, on_bad) = ([("target", good_name.as_str())], [("target", bad_name.as_str())]);
    b.root.write_config(&c);
    b.start_agent(&[
        "--push-poll-ms",
        "100",
        "--push-backoff-ms",
        "200",
        "--push-max-backoff-ms",
        "1000",
        "--push-max-attempts",
        "1000",
    ]);
    b.wait_ready(Duration::from_secs(30));

    // Both up.
    let up = add_paths(&b, "up", n);
    let t0 = Instant::now();
    enqueue(&b, &up);
    let good_up = until_cached(&b, &good, &up, t0, Duration::from_secs(300));
    let bad_up = until_cached(&b, &bad, &up, t0, Duration::from_secs(300));
    assert_eq!(counter(&b, "push_failures_total", &on_good), 0.0);

    // Queued first: a path in the store's directory but not valid in its database, which
    // `nix copy` refuses; its batch fails, and the paths behind it go on alone.
    let invalid = "/nix/store/00000000000000000000000000000000-not-valid".to_string();
    std::fs::create_dir(b.root.path(&invalid)).unwrap();
    let mixed = add_paths(&b, "mixed", n);
    let t0 = Instant::now();
    enqueue(&b, &[vec![invalid.clone()], mixed.clone()].concat());
    let good_mixed = until_cached(&b, &good, &mixed, t0, Duration::from_secs(300));
    until_cached(&b, &bad, &mixed, t0, Duration::from_secs(300));
    assert!(
        wait_for(Duration::from_secs(10), || counter(&b, "push_failures_total", &on_good)
            >= 2.0
            && counter(&b, "push_failures_total", &on_bad) >= 2.0),
        "the invalid path is tried again, alone:\n{}",
        b.http("/metrics").1
    );
    assert_eq!(metric_of(&b, "push_queue_length", &on_good), Some(1.0));
    assert!(!b.log().contains(&key), "the key's path is in the command, not the log");
    // Gone from the store: dropped, counted.
    std::fs::remove_dir(b.root.path(&invalid)).unwrap();
    for on in [&on_good, &on_bad] {
        assert!(
            wait_for(Duration::from_secs(10), || metric_of(&b, "push_queue_length", on)
                == Some(0.0)),
            "{}",
            b.http("/metrics").1
        );
        let dropped = [on[0], ("reason", "not_in_store")];
        assert_eq!(counter(&b, "push_dropped_paths_total", &dropped), 1.0);
    }
    let good_failures = counter(&b, "push_failures_total", &on_good);

    // The second cache goes down.
    point(&blocker);
    let bad_failures = counter(&b, "push_failures_total", &on_bad);
    let down = add_paths(&b, "down", n);
    let t0 = Instant::now();
    enqueue(&b, &down);
    let enqueued = t0.elapsed();
    let good_down = until_cached(&b, &good, &down, t0, Duration::from_secs(300));
    assert!(
        wait_for(Duration::from_secs(120), || counter(&b, "push_failures_total", &on_bad)
            >= bad_failures + 2.0 * n as f64),
        "each of the {n} paths is tried again on its own:\n{}",
        b.http("/metrics").1
    );
    assert_eq!(metric_of(&b, "push_queue_length", &on_bad), Some(n as f64));
    let before = t0.elapsed().as_secs_f64();
    let lag = metric_of(&b, "push_lag_seconds", &on_bad).unwrap();
    let after = t0.elapsed().as_secs_f64();
    assert!(
        before - enqueued.as_secs_f64() - 0.1 <= lag && lag <= after + 0.1,
        "the lag ({lag} s) is the age of the oldest queued path, enqueued {before} s ago"
    );
    assert_eq!(metric_of(&b, "push_queue_length", &on_good), Some(0.0));
    assert_eq!(metric_of(&b, "push_lag_seconds", &on_good), Some(0.0));
    assert_eq!(counter(&b, "push_failures_total", &on_good), good_failures);
    assert_eq!(in_cache(&bad, &down), 0);
    assert!(b.log().contains("push failed; will retry each path with backoff"));

    // Back: it catches up.
    point(&store);
    let catch_up = until_cached(&b, &bad, &down, Instant::now(), Duration::from_secs(300));
    assert!(wait_for(Duration::from_secs(5), || metric_of(
        &b,
        "push_queue_length",
        &on_bad
    ) == Some(0.0)));
    assert_eq!(metric_of(&b, "push_lag_seconds", &on_bad), Some(0.0));
    for on in [&on_good, &on_bad] {
        assert_eq!(counter(&b, "pushed_paths_total", on), 3.0 * n as f64, "{on:?}");
        for reason in ["queue_full", "gave_up"] {
            assert_eq!(
                counter(&b, "push_dropped_paths_total", &[on[0], ("reason", reason)]),
                0.0
            );
        }
    }
    assert!(b.log().contains("pushes succeed again"));
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));
    assert!(!b.log().contains("still queued for push"), "{}", b.log());

    println!(
        "figures, {n} paths queued at once: both caches up: all in the first cache after {good_up:.2?}, \
         in the second after {bad_up:.2?}; behind a path Nix refuses: all in the first after \
         {good_mixed:.2?}; the second down: all in the first after {good_down:.2?}; the second back: \
         all in it {catch_up:.2?} later"
    );
}

/// Every path given up on is counted, by cache and reason: beyond the queue's cap, gone from the
/// store, or after the last attempt, and every failed attempt is counted once.
#[test]
fn dropped_paths_and_failed_attempts_are_counted_exactly() {
    preflight();
    let mut c = config("push");
    let mut b = Builder::new(&c);
    let dir = b.root.dir.path().to_path_buf();
    let key = signing_key(&b);
    let (good, bad) = (dir.join("good-cache"), dir.join("bad-cache"));
    std::fs::write(&bad, "not a directory").unwrap();
    c.push = [&good, &bad]
        .map(|cache| PushTarget::NixCopy {
            uri: format!("file://{}", cache.display()),
            signing_key_file: key.clone(),
        })
        .to_vec();
    let good_name = format!("nix-copy:file://{}", good.display());
    let bad_name = format!("nix-copy:file://{}", bad.display());
    b.root.write_config(&c);
    // Six store paths, queued (as the post-build hook does) before the agent starts, behind a
    // path that is not in the store.
    let entries = [
        vec!["/nix/store/00000000000000000000000000000000-gone".to_string()],
        add_paths(&b, "real", 6),
    ]
    .concat();
    enqueue(&b, &entries);
    b.start_agent(&[
        "--push-poll-ms",
        "100",
        "--push-backoff-ms",
        "100",
        "--push-max-backoff-ms",
        "200",
        "--push-max-attempts",
        "3",
        "--push-max-queued-paths",
        "3",
    ]);
    b.wait_ready(Duration::from_secs(30));
    // Each cache queues the first 3 (the gone one and 2 real ones) and drops the other 4.
    let settled = || {
        metric_of(&b, "push_queue_length", &[("target", &bad_name)]) == Some(0.0)
            && counter(
                &b,
                "push_dropped_paths_total",
                &[("target", &bad_name), ("reason", "gave_up")],
            ) == 2.0
    };
    assert!(
        wait_for(Duration::from_secs(60), settled),
        "{}\n{}",
        b.http("/metrics").1,
        b.log()
    );
    let expected = [
        (&good_name, "pushed_paths_total", vec![], 2.0),
        (&good_name, "push_failures_total", vec![], 0.0),
        (
            &good_name,
            "push_dropped_paths_total",
            vec![("reason", "queue_full")],
            4.0,
        ),
        (
            &good_name,
            "push_dropped_paths_total",
            vec![("reason", "not_in_store")],
            1.0,
        ),
        (&good_name, "push_dropped_paths_total", vec![("reason", "gave_up")], 0.0),
        (&bad_name, "pushed_paths_total", vec![], 0.0),
        // 2 paths × 3 attempts.
        (&bad_name, "push_failures_total", vec![], 6.0),
        (
            &bad_name,
            "push_dropped_paths_total",
            vec![("reason", "queue_full")],
            4.0,
        ),
        (
            &bad_name,
            "push_dropped_paths_total",
            vec![("reason", "not_in_store")],
            1.0,
        ),
        (&bad_name, "push_dropped_paths_total", vec![("reason", "gave_up")], 2.0),
        (&good_name, "push_queue_length", vec![], 0.0),
        (&good_name, "push_lag_seconds", vec![], 0.0),
        (&bad_name, "push_lag_seconds", vec![], 0.0),
    ];
    for (target, name, mut labels, value) in expected {
        labels.insert(0, ("target", target.as_str()));
        assert_eq!(
            counter(&b, name, &labels),
            value,
            "{name}{labels:?}:\n{}",
            b.http("/metrics").1
        );
    }
    assert_eq!(in_cache(&good, &entries[1..3]), 2);
    assert!(b.log().contains("giving up on this path for this target"));
    assert!(b.log().contains("push queue full: dropping new paths for this target"));
    assert!(queued_files(&b).is_empty());
    assert_eq!(b.stop_agent(Duration::from_secs(20)).code(), Some(0));
}
