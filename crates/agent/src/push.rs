//! Cache push. The post-build hook (`nixpool-agent enqueue`) only writes the built paths into a
//! queue directory and returns at once; the pusher sends queued paths to every target with
//! retries and backoff, so a slow or down cache never fails or slows a build.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nixpool_api::agent::PushTarget;
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::health::{Metrics, TargetLabel};
use crate::layout::{Binaries, Layout};
use crate::procs;

/// Writes one queue entry for `out_paths` (the hook's space-separated `OUT_PATHS`).
pub fn enqueue(queue: &Path, out_paths: &str) -> std::io::Result<Option<PathBuf>> {
    let paths: Vec<&str> = out_paths.split_whitespace().collect();
    if paths.is_empty() {
        return Ok(None);
    }
    fs::create_dir_all(queue)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!("{:020}-{}", now.as_nanos(), std::process::id());
    let tmp = queue.join(format!(".{name}.tmp"));
    fs::write(&tmp, paths.join("\n") + "\n")?;
    let dest = queue.join(format!("{name}.paths"));
    fs::rename(&tmp, &dest)?;
    Ok(Some(dest))
}

/// The outputs of `drv_path` found in the store: the paths named like the derivation whose
/// deriver is `drv_path`. For Nix versions (such as 2.8) that give the post-build hook an empty
/// `OUT_PATHS`; the derivation itself is not in the builder's store for remote builds, so its
/// outputs cannot be asked for directly.
pub fn outputs_of(store: &Path, drv_path: &str, nix_store: &Path) -> Vec<String> {
    let Some(base) = drv_path.rsplit('/').next().and_then(|b| b.strip_suffix(".drv")) else {
        return Vec::new();
    };
    let Some((_, name)) = base.split_once('-') else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir(store) else {
        return Vec::new();
    };
    let candidates = dir.filter_map(Result::ok).filter_map(|e| {
        let file = e.file_name().to_string_lossy().into_owned();
        let (_, pname) = file.split_once('-')?;
        let matches = pname == name || pname.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'));
        (matches && !file.ends_with(".drv")).then(|| format!("/nix/store/{file}"))
    });
    candidates
        .filter(|p| {
            std::process::Command::new(nix_store)
                .args(["--query", "--deriver", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == drv_path)
        })
        .collect()
}

/// Queue entries, oldest first.
pub fn queued(queue: &Path) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(queue) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "paths"))
        .collect();
    v.sort();
    v
}

/// Queue length and the age of its oldest entry.
pub fn queue_stats(queue: &Path) -> (usize, Duration) {
    let q = queued(queue);
    let lag = q
        .first()
        .and_then(|p| fs::metadata(p).ok()?.modified().ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    (q.len(), lag)
}

/// One push, ready to run. Tokens travel in the environment or a 0600 file, never in argv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Files to write (0600) before running.
    pub files: Vec<(PathBuf, String)>,
}

fn read_secret(layout: &Layout, file: &str) -> Result<String, String> {
    let path = layout.path(file);
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A short name for logs and metric labels.
pub fn target_name(t: &PushTarget) -> String {
    match t {
        PushTarget::NixCopy { uri, .. } => format!("nix-copy:{}", uri.split('?').next().unwrap_or(uri)),
        PushTarget::Attic { cache, .. } => format!("attic:{cache}"),
        PushTarget::Cachix { cache, .. } => format!("cachix:{cache}"),
    }
}

/// The command line pushing `paths` to `target`.
pub fn command(target: &PushTarget, bins: &Binaries, layout: &Layout, paths: &[String]) -> Result<PushCommand, String> {
    let conf = ("NIX_CONF_DIR".to_string(), layout.nix_conf_dir().display().to_string());
    Ok(match target {
        PushTarget::NixCopy { uri, signing_key_file } => {
            let key = layout.path(signing_key_file);
            if !key.is_file() {
                return Err(format!("signing key {} is missing", key.display()));
            }
            let sep = if uri.contains('?') { '&' } else { '?' };
            let mut args = vec![
                "--extra-experimental-features".into(),
                "nix-command".into(),
                "copy".into(),
                "--to".into(),
            ];
            args.push(format!("{uri}{sep}secret-key={}", key.display()));
            args.extend(paths.iter().cloned());
            PushCommand {
                program: bins.nix.clone(),
                args,
                env: vec![conf],
                files: vec![],
            }
        }
        PushTarget::Attic {
            endpoint,
            cache,
            token_file,
        } => {
            let token = read_secret(layout, token_file)?;
            let home = layout.agent_run_dir().join("attic");
            let config = format!(
                "default-server = \"nixpool\"\n\n[servers.nixpool]\nendpoint = {}\ntoken = {}\n",
                toml_str(endpoint),
                toml_str(&token)
            );
            let mut args = vec!["push".to_string(), format!("nixpool:{cache}")];
            args.extend(paths.iter().cloned());
            PushCommand {
                program: bins.attic.clone(),
                args,
                env: vec![conf, ("XDG_CONFIG_HOME".into(), home.display().to_string())],
                files: vec![(home.join("attic/config.toml"), config)],
            }
        }
        PushTarget::Cachix { cache, token_file } => {
            let token = read_secret(layout, token_file)?;
            let mut args = vec!["push".to_string(), cache.clone()];
            args.extend(paths.iter().cloned());
            PushCommand {
                program: bins.cachix.clone(),
                args,
                env: vec![conf, ("CACHIX_AUTH_TOKEN".into(), token)],
                files: vec![],
            }
        }
    })
}

async fn run_push(cmd: &PushCommand) -> Result<(), String> {
    for (path, content) in &cmd.files {
        crate::fhs::write_file(path, content.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    }
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, OsString::from(v))));
    let out = tokio::time::timeout(Duration::from_secs(1800), procs::output(&mut c))
        .await
        .map_err(|_| "timed out after 30 minutes".to_string())?
        .map_err(|e| format!("cannot run {}: {e}", cmd.program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        Err(format!(
            "{}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// Delays between the retries of a failing push: `base` doubling to `max`, each plus up to as
/// much again at random, so that agents that failed together do not retry in step.
pub fn retry_delays(base: Duration, max: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::new()
        .with_min_delay(base)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Settings of the pusher loop.
#[derive(Clone, Debug)]
pub struct Pusher {
    pub targets: Vec<PushTarget>,
    pub poll: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Most queue entries pushed in one batch.
    pub batch: usize,
}

impl Pusher {
    /// Runs until `stop`; what is still queued stays queued for the next start.
    pub async fn run(self, layout: Layout, bins: Binaries, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
        let queue = layout.push_queue();
        // While pushes fail, the delays before the next tries.
        let mut retries: Option<backon::ExponentialBackoff> = None;
        loop {
            let wait = match &mut retries {
                None => self.poll,
                Some(delays) => delays.next().unwrap_or(self.max_backoff),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::supervise::stopped(&mut stop) => return,
            }
            let entries: Vec<PathBuf> = queued(&queue).into_iter().take(self.batch).collect();
            if entries.is_empty() {
                continue;
            }
            let mut paths: Vec<String> = entries
                .iter()
                .filter_map(|e| fs::read_to_string(e).ok())
                .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
                .filter(|p| layout.path(p).exists())
                .collect();
            paths.sort();
            paths.dedup();
            let mut ok = true;
            if !paths.is_empty() {
                for t in &self.targets {
                    let name = target_name(t);
                    let result = match command(t, &bins, &layout, &paths) {
                        Ok(cmd) => run_push(&cmd).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        warn!(target = %name, error = %e, paths = paths.len(), "push failed; will retry");
                        metrics.push_failures.get_or_create(&TargetLabel { target: name }).inc();
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                info!(paths = paths.len(), targets = self.targets.len(), "pushed");
                metrics.pushed_paths.inc_by(paths.len() as u64);
                for e in &entries {
                    let _ = fs::remove_file(e);
                }
                retries = None;
            } else {
                retries.get_or_insert_with(|| retry_delays(self.base_backoff, self.max_backoff));
            }
            let (len, lag) = queue_stats(&queue);
            metrics.push_queue_length.set(len as i64);
            metrics.push_lag_seconds.set(lag.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins() -> Binaries {
        Binaries {
            sshd: "sshd".into(),
            nix_daemon: "nix-daemon".into(),
            nix_store: "nix-store".into(),
            nix: "/bin/nix".into(),
            attic: "/bin/attic".into(),
            cachix: "/bin/cachix".into(),
            agent: "/bin/nixpool-agent".into(),
        }
    }

    fn root_with(file: &str, content: &str) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let p = layout.path(file);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
        (dir, layout)
    }

    #[test]
    fn enqueue_writes_one_entry_per_build_and_stats_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        assert_eq!(enqueue(&q, "  ").unwrap(), None);
        let e = enqueue(&q, "/nix/store/a-x /nix/store/b-y").unwrap().unwrap();
        assert_eq!(fs::read_to_string(e).unwrap(), "/nix/store/a-x\n/nix/store/b-y\n");
        enqueue(&q, "/nix/store/c-z").unwrap();
        let (len, _) = queue_stats(&q);
        assert_eq!(len, 2);
        assert!(queued(&q)[0] < queued(&q)[1]);
    }

    #[test]
    fn outputs_are_found_by_name_and_deriver() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "aaa-hello-1.0",
            "bbb-hello-1.0-dev",
            "ccc-hello-1.0.drv",
            "ddd-hello-10",
            "eee-other",
        ] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        // A fake nix-store that names the deriver of the first two.
        let fake = dir.path().join("fake-nix-store");
        fs::write(&fake, "#!/bin/sh\ncase \"$3\" in */aaa-*|*/bbb-*) echo /nix/store/zzz-hello-1.0.drv;; *) echo unknown-deriver;; esac\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let mut found = outputs_of(dir.path(), "/nix/store/zzz-hello-1.0.drv", &fake);
        found.sort();
        assert_eq!(found, ["/nix/store/aaa-hello-1.0", "/nix/store/bbb-hello-1.0-dev"]);
        assert!(outputs_of(dir.path(), "not-a-drv", &fake).is_empty());
    }

    #[test]
    fn nix_copy_signs_with_the_key_file() {
        let (_d, layout) = root_with("/run/nixpool/cache/store-signing-key", "k:secret");
        let t = PushTarget::NixCopy {
            uri: "s3://b?region=x".into(),
            signing_key_file: "/run/nixpool/cache/store-signing-key".into(),
        };
        let c = command(&t, &bins(), &layout, &["/nix/store/a-x".into()]).unwrap();
        assert_eq!(c.program, PathBuf::from("/bin/nix"));
        assert_eq!(&c.args[2..4], ["copy", "--to"]);
        assert_eq!(
            c.args[4],
            format!(
                "s3://b?region=x&secret-key={}",
                layout.path("/run/nixpool/cache/store-signing-key").display()
            )
        );
        assert_eq!(c.args[5], "/nix/store/a-x");
        assert!(!c.args.iter().any(|a| a.contains("k:secret")));
    }

    #[test]
    fn attic_gets_its_token_through_a_config_file() {
        let (_d, layout) = root_with("/run/nixpool/cache/attic-token", "tok-123\n");
        let t = PushTarget::Attic {
            endpoint: "https://attic.example".into(),
            cache: "main".into(),
            token_file: "/run/nixpool/cache/attic-token".into(),
        };
        let c = command(
            &t,
            &bins(),
            &layout,
            &["/nix/store/a-x".into(), "/nix/store/b-y".into()],
        )
        .unwrap();
        assert_eq!(c.program, PathBuf::from("/bin/attic"));
        assert_eq!(c.args, ["push", "nixpool:main", "/nix/store/a-x", "/nix/store/b-y"]);
        assert!(!c.args.iter().any(|a| a.contains("tok-123")));
        let (path, config) = &c.files[0];
        assert!(path.ends_with("attic/attic/config.toml"));
        assert!(config.contains("endpoint = \"https://attic.example\"") && config.contains("token = \"tok-123\""));
        let xdg = c.env.iter().find(|(k, _)| k == "XDG_CONFIG_HOME").unwrap();
        assert!(path.starts_with(&xdg.1));
    }

    #[test]
    fn cachix_gets_its_token_in_the_environment() {
        let (_d, layout) = root_with("/run/nixpool/cache/cachix-token", "ctok\n");
        let t = PushTarget::Cachix {
            cache: "mycache".into(),
            token_file: "/run/nixpool/cache/cachix-token".into(),
        };
        let c = command(&t, &bins(), &layout, &["/nix/store/a-x".into()]).unwrap();
        assert_eq!(c.args, ["push", "mycache", "/nix/store/a-x"]);
        assert!(c.env.contains(&("CACHIX_AUTH_TOKEN".into(), "ctok".into())));
        let missing = PushTarget::Cachix {
            cache: "c".into(),
            token_file: "/nope".into(),
        };
        assert!(command(&missing, &bins(), &layout, &[]).unwrap_err().contains("/nope"));
    }

    #[test]
    fn retry_delays_double_up_to_the_cap_plus_jitter() {
        let delays: Vec<Duration> = retry_delays(Duration::from_secs(1), Duration::from_secs(60))
            .take(10)
            .collect();
        // Without jitter: 1, 2, 4, ... 32, then 60 s; jitter adds less than as much again.
        let plain = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60].map(Duration::from_secs);
        for (delay, plain) in delays.iter().zip(plain) {
            assert!(*delay >= plain && *delay < plain * 2, "{delay:?} for {plain:?}");
        }
        assert_ne!(delays[6..], plain[6..], "jittered, capped delays are not all equal");
    }
}
