//! The packaging around the binaries: the Nix files parse, the FluxCD and nix-darwin examples
//! say what they mean and what they say is accepted by the chart.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use nixpool_testenv::need_tool;

fn nix_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // crates/ holds Rust, and at most Nix *snippets* as test fixtures (builderctl's golden output).
        if path.is_dir() && !name.starts_with('.') && name != "target" && name != "crates" {
            nix_files(&path, out);
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    need_tool("nix-instantiate", "apt-get install nix-bin").unwrap_or_else(|e| panic!("{e:#}"));
    let mut files = Vec::new();
    nix_files(std::path::Path::new(REPO), &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(REPO).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nix/packages.nix",
        "nix/release.nix",
        "image/builder.nix",
        "image/operator.nix",
        "examples/nix-darwin.nix",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(expected)),
            "{expected} is missing: {names:?}"
        );
    }
    for f in &files {
        run(Command::new("nix-instantiate").arg("--parse").arg(f));
    }
}

/// What the flake offers: output → system → attribute names, as the host's Nix evaluates
/// flake.nix's `outputs` (its shape uses builtins only). nixpkgs is not here, so it is stood in
/// by an input whose every package set throws: only names are read, no package is evaluated.
fn flake_outputs() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    need_tool("nix-instantiate", "apt-get install nix-bin").unwrap_or_else(|e| panic!("{e:#}"));
    let expr = r#"{ repo }:
      let
        root = /. + repo;
        flake = import (root + "/flake.nix");
        systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" "x86_64-darwin" "i686-linux" "armv7l-linux" "riscv64-linux" ];
        nixpkgs = {
          legacyPackages = builtins.listToAttrs (map (name: { inherit name; value = throw "nixpkgs is not evaluated here"; }) systems);
        };
        self = outputs // { outPath = root; rev = "0000000000000000000000000000000000000000"; shortRev = "0000000"; };
        outputs = flake.outputs { inherit self nixpkgs; };
      in
      builtins.mapAttrs (_: perSystem:
        builtins.mapAttrs (_: attrs: builtins.attrNames attrs) perSystem) outputs"#;
    let out = run(Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", expr, "--argstr", "repo"])
        .arg(std::fs::canonicalize(REPO).unwrap()));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_flake_offers_what_users_build() {
    let outputs = flake_outputs();
    let names = |output: &str, system: &str| -> Vec<String> {
        outputs
            .get(output)
            .and_then(|s| s.get(system))
            .cloned()
            .unwrap_or_default()
    };
    for system in ["x86_64-linux", "aarch64-linux", "aarch64-darwin", "x86_64-darwin"] {
        let packages = names("packages", system);
        for everywhere in ["nixpool-operator", "builderctl", "default"] {
            assert!(
                packages.iter().any(|p| p == everywhere),
                "packages.{system} lacks {everywhere}: {packages:?}"
            );
        }
        // The agent and the gateway use Linux-only APIs: offered on Linux only.
        let linux = system.ends_with("-linux");
        for linux_only in ["nixpool-agent", "nixpool-gateway"] {
            assert_eq!(
                packages.iter().any(|p| p == linux_only),
                linux,
                "packages.{system}: {linux_only} must be offered exactly on Linux: {packages:?}"
            );
            if !linux {
                assert!(
                    names("legacyPackages", system).iter().any(|p| p == linux_only),
                    "`nix build .#{linux_only}` on {system} should say what to do instead"
                );
            }
        }
        // The images are x86_64-linux only; elsewhere `.#builder-image` says how to build it.
        for image in ["builder-image", "operator-image"] {
            let here = system == "x86_64-linux";
            assert_eq!(packages.iter().any(|p| p == image), here, "packages.{system}.{image}");
            assert_eq!(
                names("legacyPackages", system).iter().any(|p| p == image),
                !here,
                "legacyPackages.{system}.{image}"
            );
        }
        assert_eq!(names("checks", system), ["crd"]);
        assert_eq!(names("devShells", system), ["default"]);
        assert_eq!(
            names("apps", system).iter().any(|a| a == "release"),
            system == "x86_64-linux"
        );
    }

    let image = std::fs::read_to_string(format!("{REPO}/image/builder.nix")).unwrap();
    assert!(
        image.contains("lib64/ld-linux-x86-64.so.2"),
        "the builder image must carry the FHS loader link"
    );
    assert!(
        image.contains(nixpool_api::paths::AGENT_BINARY),
        "the image's entrypoint is the agent"
    );
    assert!(
        image.contains("gateway"),
        "gateway pods run the builder image's nixpool-gateway"
    );
}

/// Every flake attribute the fork workflow (.github/workflows/kind.yml) names exists, on the
/// system it runs on, and every file of this repository it names is there.
#[test]
fn the_fork_workflow_names_only_what_exists() {
    let path = format!("{REPO}/.github/workflows/kind.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let workflow: serde_norway::Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let outputs = flake_outputs();
    let jobs = workflow["jobs"].as_mapping().expect("the workflow has jobs");
    assert!(!jobs.is_empty());
    // Top-level names of this repository: a word starting with one of them and a `/` is a path.
    let top: Vec<String> = std::fs::read_dir(REPO)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n != "target")
        .collect();
    let (mut attrs, mut files, mut actions) = (Vec::new(), Vec::new(), Vec::new());
    for (job, spec) in jobs {
        let job = job.as_str().unwrap();
        assert_eq!(
            spec["runs-on"].as_str(),
            Some("ubuntu-latest"),
            "job {job}: the attributes are checked for x86_64-linux runners"
        );
        for step in spec["steps"]
            .as_sequence()
            .unwrap_or_else(|| panic!("job {job} has no steps"))
        {
            if let Some(uses) = step["uses"].as_str() {
                actions.push(uses.to_string());
            }
            let Some(script) = step["run"].as_str() else { continue };
            for word in script.split(|c: char| c.is_whitespace() || "\"'();|<>=".contains(c)) {
                if let Some(at) = word.find(".#") {
                    attrs.push(word[at + 2..].to_string());
                } else if top.iter().any(|t| word.starts_with(&format!("{t}/"))) {
                    files.push(word.trim_end_matches('/').to_string());
                }
            }
        }
    }
    for attr in &attrs {
        let parts: Vec<&str> = attr.split('.').collect();
        let found = match parts.as_slice() {
            // `.#name`: what `nix build` and `nix run` try on the runner's system.
            [name] => ["packages", "apps"].iter().any(|o| {
                outputs
                    .get(*o)
                    .and_then(|s| s.get("x86_64-linux"))
                    .is_some_and(|n| n.iter().any(|n| n == name))
            }),
            // `.#output.system.name[.passthru...]`: the attribute path as written. What lies
            // below a package (imageName, imageTag) is nixpkgs' and is not evaluated here.
            [output, system, name, ..] => outputs
                .get(*output)
                .and_then(|s| s.get(*system))
                .is_some_and(|n| n.iter().any(|n| n == name)),
            _ => false,
        };
        assert!(
            found,
            "{path} names .#{attr}, which the flake does not offer on x86_64-linux"
        );
    }
    for must in [
        "builder-image",
        "operator-image",
        "checks.x86_64-linux.crd",
        "builderctl",
    ] {
        assert!(
            attrs.iter().any(|a| a.contains(must)),
            "the workflow should build .#{must}: {attrs:?}"
        );
    }
    for file in &files {
        assert!(
            std::path::Path::new(REPO).join(file).exists(),
            "{path} names {file}, which is not in the repository"
        );
    }
    assert!(
        files.iter().any(|f| f == "charts/nixpool"),
        "the workflow installs the chart: {files:?}"
    );
    assert!(
        files.iter().any(|f| f.starts_with("crds/")),
        "the workflow installs the CRD: {files:?}"
    );
    // Real Nix and kind, each action pinned to a release tag.
    for action in &actions {
        let (name, tag) = action
            .split_once('@')
            .unwrap_or_else(|| panic!("{action} is not pinned"));
        assert!(
            tag.starts_with('v') && tag[1..].split('.').all(|n| n.parse::<u32>().is_ok()),
            "{name} is pinned to {tag}, not a release tag"
        );
    }
    assert!(
        actions.iter().any(|a| a.starts_with("cachix/install-nix-action@")
            || a.starts_with("DeterminateSystems/nix-installer-action@")),
        "the workflow installs a real Nix: {actions:?}"
    );
    assert!(
        actions.iter().any(|a| a.starts_with("helm/kind-action@")),
        "{actions:?}"
    );
    for needle in ["kind load image-archive", "builderctl machines-file", "--max-jobs 0"] {
        assert!(text.contains(needle), "the workflow lacks `{needle}`");
    }
}

/// image/builder.nix, evaluated by the host's Nix with nixpkgs stood in by store-path strings
/// and a `buildLayeredImage` that returns its arguments (nixpkgs and a binary cache are not
/// here, so the image itself cannot be built): what the image is asked to be.
#[test]
fn the_builder_image_carries_a_store_database_covering_what_it_runs() {
    need_tool("nix-instantiate", "apt-get install nix-bin").unwrap_or_else(|e| panic!("{e:#}"));
    let expr = r#"{ repo }:
      let
        p = name: "/nix/store/00000000000000000000000000000000-${name}";
        pkgs = builtins.listToAttrs (map (name: { inherit name; value = p name; }) [
          "nix" "openssh" "bashInteractive" "coreutils" "gnutar" "gzip" "xz" "git" "cacert"
          "attic-client" "cachix" "glibc"
        ]) // {
          dockerTools = { buildLayeredImage = args: args; binSh = p "bin-sh"; usrBinEnv = p "usr-bin-env"; };
        };
      in
      import (/. + repo + "/image/builder.nix") {
        inherit pkgs;
        agent = p "nixpool-agent";
        gateway = p "nixpool-gateway";
        name = "registry.example/nixpool-builder";
        tag = "1.2.3";
      }"#;
    let out = run(Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", expr, "--argstr", "repo"])
        .arg(std::fs::canonicalize(REPO).unwrap()));
    let image: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(image["name"], "registry.example/nixpool-builder");
    assert_eq!(image["tag"], "1.2.3");
    // Without the database every path is invalid to the builder's nix-daemon, and its GC
    // deletes glibc, nix and the agent.
    assert_eq!(
        image["includeNixDB"], true,
        "the builder image must carry a Nix store database"
    );
    let contents: Vec<&str> = image["contents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for needed in ["nixpool-agent", "nixpool-gateway", "-nix", "openssh", "cacert"] {
        assert!(
            contents.iter().any(|c| c.ends_with(needed)),
            "contents lack {needed}: {contents:?}"
        );
    }
    assert_eq!(image["config"]["Entrypoint"][0], nixpool_api::paths::AGENT_BINARY);
    // includeNixDB registers the closure of `contents` only: a store path the image uses
    // elsewhere must be in it. glibc is, through every dynamically linked content (nix, sshd).
    let used = format!("{} {}", image["config"], image["fakeRootCommands"]);
    for path in used.split(|c: char| c.is_whitespace() || "\"=,[]{}".contains(c)) {
        let Some(at) = path.find("/nix/store/") else { continue };
        let store_path: String = path[at..].split('/').take(4).collect::<Vec<_>>().join("/");
        assert!(
            contents.contains(&store_path.as_str()) || store_path.ends_with("-glibc"),
            "{store_path} is used by the image but not in its contents, so its store database would not register it"
        );
    }
    assert!(
        used.contains("-cacert/"),
        "the check above saw the store paths in Env: {used}"
    );
}

/// What includeNixDB gives the builder's nix-daemon, tried with the host's Nix 2.8 (nixpkgs'
/// build of the image cannot run here): an image `/nix` whose paths are registered as nixpkgs'
/// mkDbExtraCommand registers them (`nix-store --load-db` of the closure's registration, each
/// content linked in gcroots/docker), mounted as the agent mounts it (the read-only lower layer
/// of an overlay whose upper layer is the store volume), then garbage-collected through the
/// overlay. The same image without a database loses everything.
#[test]
fn through_the_agents_overlay_the_image_database_keeps_its_paths_from_gc() {
    need_tool("nix-store", "apt-get install nix-bin").unwrap_or_else(|e| panic!("{e:#}"));
    need_tool("unshare", "apt-get install util-linux").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        run(Command::new("id").arg("-u")).trim(),
        "0",
        "this test mounts an overlay: run it as root (hack/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    // Three store paths, made in a scratch store: the image's content (a), a registered path
    // nothing roots (b), and a path in the image's store that is not registered (c).
    let src = format!("local?root={}", t.join("src").display());
    let add = |name: &str| -> String {
        let d = t.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("file"), name).unwrap();
        run(Command::new("nix-store").args(["--store", &src, "--add"]).arg(&d))
            .trim()
            .to_string()
    };
    let (a, b, c) = (add("content"), add("registered"), add("unregistered"));
    let base = |p: &str| p.rsplit('/').next().unwrap().to_string();
    for with_db in [true, false] {
        let case = t.join(if with_db { "with-db" } else { "without-db" });
        let image = case.join("image");
        std::fs::create_dir_all(image.join("nix/store")).unwrap();
        for p in [&a, &b, &c] {
            run(Command::new("cp")
                .arg("-a")
                .arg(t.join("src").join(p.trim_start_matches('/')))
                .arg(image.join("nix/store")));
        }
        if with_db {
            let script = r#"nix-store --store "$SRC" --dump-db "$A" "$B" | nix-store --store "local?root=$IMAGE" --load-db
                mkdir -p "$IMAGE/nix/var/nix/gcroots/docker" && ln -s "$A" "$IMAGE/nix/var/nix/gcroots/docker/""#;
            run(Command::new("sh")
                .args(["-ec", script])
                .env("SRC", &src)
                .env("IMAGE", &image)
                .env("A", &a)
                .env("B", &b));
        }
        // The agent's overlay (crates/agent/src/store.rs), in a mount namespace of its own.
        let script = r#"mkdir -p "$CASE/volume/upper" "$CASE/volume/work" "$CASE/root/nix"
            mount -t overlay overlay -o "lowerdir=$CASE/image/nix,upperdir=$CASE/volume/upper,workdir=$CASE/volume/work" "$CASE/root/nix"
            nix-store --store "local?root=$CASE/root" --gc >&2
            ls "$CASE/root/nix/store""#;
        let left = run(Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-ec", script])
            .env("CASE", &case));
        let left: Vec<&str> = left.lines().filter(|l| !l.starts_with('.')).collect();
        if with_db {
            assert_eq!(left, [base(&a)], "the GC keeps the rooted content and removes the rest");
        } else {
            assert!(
                left.is_empty(),
                "without a database every image path is invalid and deleted: {left:?}"
            );
        }
        // The image's layer is untouched: the deletions are whiteouts in the volume's layer.
        let mut lower: Vec<String> = std::fs::read_dir(image.join("nix/store"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        lower.sort();
        let mut all = vec![base(&a), base(&b), base(&c)];
        all.sort();
        assert_eq!(lower, all);
    }
}

/// The release script as nix/release.nix makes it, for the host's bash: nixpkgs'
/// writeShellApplication (not here) is stood in by one that returns its arguments, and the
/// script gets writeShellApplication's `errexit nounset pipefail` header. Tools come from PATH.
fn release_script(
    dir: &std::path::Path,
    dirty: bool,
    builder: &std::path::Path,
    operator: &std::path::Path,
) -> std::path::PathBuf {
    need_tool("nix-instantiate", "apt-get install nix-bin").unwrap_or_else(|e| panic!("{e:#}"));
    let expr = r#"{ repo, dirty, builder, operator }:
      import (/. + repo + "/nix/release.nix") {
        pkgs = { writeShellApplication = args: args; skopeo = null; gh = null; jq = null; gnugrep = null; gzip = null; coreutils = null; };
        rev = "abc1234";
        dirty = dirty == "1";
        appVersion = "9.8.7";
        builderImage = builder;
        operatorImage = operator;
      }"#;
    // --read-write-mode: the script's trust policy file is copied into the store, as a build would.
    let out = run(Command::new("nix-instantiate")
        .args([
            "--eval",
            "--read-write-mode",
            "--strict",
            "--json",
            "-E",
            expr,
            "--argstr",
            "repo",
        ])
        .arg(std::fs::canonicalize(REPO).unwrap())
        .args(["--argstr", "dirty", if dirty { "1" } else { "" }, "--argstr", "builder"])
        .arg(builder)
        .arg("--argstr")
        .arg("operator")
        .arg(operator));
    let app: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(app["name"], "nixpool-release");
    let script = dir.join(if dirty { "release-dirty" } else { "release" });
    std::fs::write(
        &script,
        format!(
            "#!/usr/bin/env bash\nset -o errexit -o nounset -o pipefail\n{}",
            app["text"].as_str().unwrap()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// A release run with nothing of the caller's environment but what is given.
fn release(script: &std::path::Path, home: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(script)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A docker-archive (as `docker save` writes and skopeo reads), gzipped like the flake's
/// images: one layer holding `/hello` with `content`.
fn docker_archive(dir: &std::path::Path, name: &str, content: &str) -> std::path::PathBuf {
    use sha2::Digest as _;
    let root = dir.join(format!("{name}-archive"));
    std::fs::create_dir_all(root.join("rootfs")).unwrap();
    std::fs::write(root.join("rootfs/hello"), content).unwrap();
    run(Command::new("tar")
        .arg("-cf")
        .arg(root.join("layer.tar"))
        .arg("-C")
        .arg(root.join("rootfs"))
        .arg("."));
    let layer = std::fs::read(root.join("layer.tar")).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{:x}", sha2::Sha256::digest(&layer))] },
    });
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    let manifest =
        serde_json::json!([{ "Config": "config.json", "RepoTags": [format!("{name}:test")], "Layers": ["layer.tar"] }]);
    std::fs::write(root.join("manifest.json"), manifest.to_string()).unwrap();
    let archive = dir.join(format!("{name}.tar"));
    run(Command::new("tar").arg("-cf").arg(&archive).arg("-C").arg(&root).args([
        "manifest.json",
        "config.json",
        "layer.tar",
    ]));
    run(Command::new("gzip").arg("-n").arg(&archive));
    dir.join(format!("{name}.tar.gz"))
}

#[test]
fn the_release_refuses_a_dirty_tree_and_says_where_the_token_comes_from() {
    need_tool("shellcheck", "apt-get install shellcheck").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar.gz");
    let dirty = release_script(dir.path(), true, &archive, &archive);
    let clean = release_script(dir.path(), false, &archive, &archive);
    // writeShellApplication runs shellcheck at build time: the script must pass it.
    run(Command::new("shellcheck").arg(&clean));

    let out = release(&dirty, dir.path(), &[("GHCR_TOKEN", "t"), ("GHCR_USER", "u")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("uncommitted changes") && err.contains("commit first"),
        "{err}"
    );
    assert!(!err.contains("pushing"), "{err}");

    // No GHCR_TOKEN and no `gh` login: the message names both ways to give one.
    let out = release(&clean, dir.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no registry token") && err.contains("gh auth token") && err.contains("GHCR_TOKEN"),
        "{err}"
    );
    assert!(
        !err.contains("~/.config/gh/token"),
        "gh auth login never writes that file: {err}"
    );
}

/// A registry (Debian's docker-registry, the CNCF distribution registry) on loopback, killed on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
}

impl Registry {
    fn start(dir: &std::path::Path) -> Registry {
        need_tool("docker-registry", "apt-get install docker-registry").unwrap_or_else(|e| panic!("{e:#}"));
        let port = nixpool_testenv::free_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("registry.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("registry.err")).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Registry { child, port }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_release_pushes_the_chart_tag_and_the_sha_tag_and_never_replaces_a_release() {
    for (tool, package) in [("skopeo", "skopeo"), ("jq", "jq")] {
        need_tool(tool, &format!("apt-get install {package}")).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let host = format!("127.0.0.1:{}", registry.port);
    // Plain HTTP on loopback: skopeo is told through the user's registries.conf ($HOME is the
    // test's directory), as a user would.
    let conf_dir = dir.path().join(".config/containers");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("registries.conf"),
        format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"),
    )
    .unwrap();
    let builder = docker_archive(dir.path(), "builder", "the builder image\n");
    let operator = docker_archive(dir.path(), "operator", "the operator image\n");
    let script = release_script(dir.path(), false, &builder, &operator);
    let auth = dir.path().join("auth.json");
    let registry_prefix = format!("{host}/nixpool");
    let env = [
        ("NIXPOOL_REGISTRY", registry_prefix.as_str()),
        ("GHCR_TOKEN", "test-token"),
        ("GHCR_USER", "test-user"),
        ("REGISTRY_AUTH_FILE", auth.to_str().unwrap()),
    ];
    let skopeo = |args: &[&str]| -> String {
        run(Command::new("skopeo")
            .env("HOME", dir.path())
            .env("REGISTRY_AUTH_FILE", &auth)
            .args(args))
    };
    let tags = |name: &str| -> Vec<String> {
        let out = skopeo(&["list-tags", &format!("docker://{host}/nixpool/{name}")]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut t: Vec<String> = v["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    let digest = |name: &str, tag: &str| -> String {
        skopeo(&[
            "inspect",
            "--format",
            "{{.Digest}}",
            &format!("docker://{host}/nixpool/{name}:{tag}"),
        ])
        .trim()
        .to_string()
    };

    let out = release(&script, dir.path(), &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The chart's appVersion (what installs pull by default) and the sha tag, nothing else.
    for name in ["nixpool-builder", "nixpool-operator"] {
        assert_eq!(tags(name), ["9.8.7", "amd64-abc1234"], "{name}: {err}");
        assert_eq!(
            digest(name, "9.8.7"),
            digest(name, "amd64-abc1234"),
            "{name}: one image, two tags"
        );
    }
    assert_ne!(
        digest("nixpool-builder", "9.8.7"),
        digest("nixpool-operator", "9.8.7"),
        "each repository got its own archive"
    );
    assert!(!err.contains("test-token"), "the token is never printed: {err}");

    // The same appVersion again: refused before anything is pushed.
    let before = digest("nixpool-builder", "9.8.7");
    let out = release(&script, dir.path(), &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already exists") && err.contains("appVersion"), "{err}");
    assert!(!err.contains("pushing"), "{err}");
    assert_eq!(digest("nixpool-builder", "9.8.7"), before);

    let replace: Vec<(&str, &str)> = env.iter().copied().chain([("NIXPOOL_RELEASE_REPLACE", "1")]).collect();
    let out = release(&script, dir.path(), &replace);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The release's trust policy accepts only local archives: a registry source is refused.
    let policy = format!("{REPO}/nix/skopeo-policy.json");
    let out = Command::new("skopeo")
        .env("HOME", dir.path())
        .env("REGISTRY_AUTH_FILE", &auth)
        .args([
            "--policy",
            &policy,
            "copy",
            &format!("docker://{host}/nixpool/nixpool-builder:9.8.7"),
        ])
        .arg(format!("dir:{}", dir.path().join("pulled").display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rejected"), "{err}");
}

#[test]
fn the_nix_darwin_example_pins_the_host_key_and_uses_ssh_ng() {
    let text = std::fs::read_to_string(format!("{REPO}/examples/nix-darwin.nix")).unwrap();
    for needle in [
        "nix.distributedBuilds = true",
        "nix.buildMachines",
        "protocol = \"ssh-ng\"",
        "publicHostKey",
        "sshKey",
    ] {
        assert!(text.contains(needle), "examples/nix-darwin.nix lacks {needle}");
    }
    let b64 = text
        .split("publicHostKey = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let entry = nixpool_api::MachinesEntry::parse(&format!("ssh-ng://builder@h x86_64-linux - 1 1 - - {b64}")).unwrap();
    assert!(entry.host_public_key.unwrap().starts_with("ssh-ed25519 "));
}
