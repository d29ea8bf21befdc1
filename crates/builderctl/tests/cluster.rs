//! builderctl against a real kube-apiserver (crates/testenv): pools selected by name, label
//! selector and namespace, with the request counts the API server itself reports.

mod support;

use std::process::{Command, Output};

use nixpool_api::MachinesEntry;
use support::cluster::*;

const BIN: &str = env!("CARGO_BIN_EXE_builderctl");

/// The tests share one API server and count its requests: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn builderctl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env_remove("KUBECONFIG")
        .env_remove("SUDO_USER")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn machines_file_and_status_from_the_cluster() {
    let _serial = SERIAL.lock().await;
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    let ns = cp.namespace("builderctl").await.unwrap();
    let web = serde_json::json!({"team": "web"});
    let infra = serde_json::json!({"team": "infra"});
    pool(
        &client,
        &ns,
        "web",
        web.clone(),
        3,
        2,
        ("web.example.com", 22),
        HOST_KEY,
    )
    .await;
    pool(&client, &ns, "infra", infra, 1, 1, ("10.0.0.7", 2222), HOST_KEY).await;
    pool(&client, &ns, "cold", web, 2, 0, ("cold.example.com", 22), HOST_KEY).await;

    let t = tempfile::tempdir().unwrap();
    let machines = t.path().join("machines");
    std::fs::write(&machines, "ssh://me@mine x86_64-linux\n").unwrap();
    let kc = cp.kubeconfig();
    let m = machines.to_str().unwrap();
    let none = t.path().join("none");
    let base = [
        "machines-file",
        "--machines-file",
        m,
        "--etc-static",
        none.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| builderctl(&kc, &args.iter().map(String::as_str).collect::<Vec<_>>());

    // One pool by name (and namespace), through the kubeconfig's context.
    let out = run(with(&["-n", &ns, "--context", "nixpool-test", "web"]));
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(&machines).unwrap();
    assert!(file.starts_with("ssh://me@mine x86_64-linux\n"), "{file}");
    let line = file.lines().find(|l| l.starts_with("ssh-ng://")).unwrap();
    let e = MachinesEntry::parse(line).unwrap();
    assert_eq!(e.uri, "ssh-ng://builder@web.example.com");
    assert_eq!(e.max_jobs, 4, "2 ready builders x 2 jobs");
    assert_eq!(e.host_public_key.as_deref(), Some(HOST_KEY));
    assert!(file.contains(&format!("# BEGIN nixpool {ns}/web")));

    // A label selector: one list call, no get. `cold` matches but is not Ready: refused.
    let (lists, gets) = (pool_requests(cp, "LIST"), pool_requests(cp, "GET"));
    let out = run(with(&["-n", &ns, "-l", "team=web"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{ns}/cold is not Ready")),
        "{}",
        text(&out)
    );
    assert_eq!(pool_requests(cp, "LIST") - lists, 1.0, "one list call");
    assert_eq!(pool_requests(cp, "GET") - gets, 0.0, "no get per pool");
    let out = run(with(&["-n", &ns, "-l", "team=web", "--allow-unready"]));
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(&machines).unwrap();
    assert!(
        file.contains(&format!("{ns}/cold")) && !file.contains(&format!("{ns}/infra")),
        "{file}"
    );

    // Every pool of the namespace; --check agrees afterwards.
    let out = run(with(&["-n", &ns, "--allow-unready"]));
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(&machines).unwrap();
    assert!(file.contains("ssh-ng://builder@10.0.0.7:2222"), "{file}");
    let out = run(with(&["-n", &ns, "--allow-unready", "--check"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A pool that does not exist, and a context that does not.
    let out = run(with(&["-n", &ns, "nope"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains(&format!("{ns}/nope was not found")),
        "{}",
        text(&out)
    );
    let out = run(with(&["-n", &ns, "--context", "nope", "web"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("kubeconfig") && text(&out).contains("--context"),
        "{}",
        text(&out)
    );

    // status: the table.
    let out = builderctl(&kc, &["status", "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap()
            .to_string()
    };
    assert!(
        row("web").contains("True") && row("web").contains("web.example.com:22"),
        "{table}"
    );
    assert!(row("cold").contains("False") && row("cold").contains("0/2"), "{table}");
    assert!(
        table.contains(&format!("not ready: {ns}/cold: Ready=False NoReadyBuilders")),
        "{table}"
    );
    let out = builderctl(&kc, &["status", "-A"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ns));
    // status -o json: the same pools, by their stable field names.
    let out = builderctl(&kc, &["status", "-n", &ns, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = |n: &str| {
        v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("web")["ready"], true);
    assert_eq!(by_name("web")["readyBuilders"], 2);
    assert_eq!(by_name("web")["maxJobs"], 4);
    assert_eq!(by_name("cold")["ready"], false);
    assert_eq!(
        by_name("infra")["endpoint"],
        serde_json::json!({"host": "10.0.0.7", "port": 2222})
    );

    // ssh-config from the cluster, written into a temp dir.
    let out = builderctl(
        &kc,
        &[
            "ssh-config",
            "-n",
            &ns,
            "infra",
            "--ssh-config-dir",
            t.path().to_str().unwrap(),
            "--known-hosts-dir",
            t.path().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let alias = format!("nixpool-{ns}-infra");
    let conf = std::fs::read_to_string(t.path().join(format!("{alias}.conf"))).unwrap();
    assert!(
        conf.contains("Port 2222") && conf.contains("HostName 10.0.0.7"),
        "{conf}"
    );
    // Real ssh reads it: the Host alias resolves to the pool's host, port, user and key.
    let g = Command::new("ssh")
        .args(["-G", "-F"])
        .arg(t.path().join(format!("{alias}.conf")))
        .arg(&alias)
        .output()
        .unwrap();
    let g = String::from_utf8_lossy(&g.stdout);
    for want in [
        "hostname 10.0.0.7",
        "port 2222",
        "user builder",
        "controlmaster false",
        "identitiesonly yes",
        "stricthostkeychecking true",
    ] {
        assert!(g.lines().any(|l| l == want), "ssh -G lacks {want:?}:\n{g}");
    }
    assert!(
        !g.lines().any(|l| l.starts_with("controlpath ")),
        "ControlPath none: no control socket\n{g}"
    );
    let kh = std::fs::read_to_string(t.path().join(format!("{alias}.known_hosts"))).unwrap();
    assert_eq!(kh, format!("{alias} {HOST_KEY}\n"));
}

/// A user created for one test, removed with its home when dropped.
struct TestUser {
    name: String,
    home: std::path::PathBuf,
    uid: u32,
}

impl TestUser {
    fn create() -> TestUser {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (it creates a user)"
        );
        for tool in ["useradd", "userdel"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "{tool} is needed: apt-get install passwd"
            );
        }
        let name = format!("nxp-sudo-{}", std::process::id());
        let home = std::path::PathBuf::from(format!("/tmp/{name}"));
        let out = Command::new("useradd")
            .args(["--create-home", "--home-dir"])
            .arg(&home)
            .args(["--shell", "/bin/sh", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "useradd: {}", text(&out));
        let uid = nix::unistd::User::from_name(&name).unwrap().unwrap().uid.as_raw();
        TestUser { name, home, uid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["--remove", &self.name]).output();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// `sudo builderctl machines-file`: root with SUDO_USER set, no KUBECONFIG, and root's HOME
/// without a kubeconfig. The pools are read as that user, with the kubeconfig in their home,
/// whose exec credential plugin checks it runs as that user with that user's HOME; the machines
/// file, in a directory only root may write, is written.
#[tokio::test(flavor = "multi_thread")]
async fn under_sudo_the_cluster_is_read_as_the_invoking_user_and_the_file_written_as_root() {
    let _serial = SERIAL.lock().await;
    let cp = control_plane();
    let client = cp.client().await.unwrap();
    let ns = cp.namespace("builderctl-sudo").await.unwrap();
    pool(
        &client,
        &ns,
        "web",
        serde_json::json!({}),
        1,
        1,
        ("web.example.com", 22),
        HOST_KEY,
    )
    .await;

    let user = TestUser::create();
    let kube = user.home.join(".kube");
    std::fs::create_dir_all(&kube).unwrap();
    let plugin = user.home.join("credential-plugin");
    let ran = user.home.join("plugin-ran");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\n\
             [ \"$(id -u)\" = {uid} ] || {{ echo \"credential plugin ran as uid $(id -u), not {uid}\" >&2; exit 1; }}\n\
             [ \"$HOME\" = {home} ] || {{ echo \"credential plugin got HOME=$HOME\" >&2; exit 1; }}\n\
             id -u > {ran}\n\
             printf '{{\"apiVersion\":\"client.authentication.k8s.io/v1beta1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{token}\"}}}}'\n",
            uid = user.uid,
            home = user.home.display(),
            ran = ran.display(),
            token = nixpool_testenv::ADMIN_TOKEN,
        ),
    )
    .unwrap();
    std::fs::write(
        kube.join("config"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: {}\n      interactiveMode: Never\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: {ns}\ncurrent-context: c\n",
            cp.server(),
            plugin.display()
        ),
    )
    .unwrap();
    for p in [&user.home, &kube, &kube.join("config"), &plugin] {
        std::os::unix::fs::chown(p, Some(user.uid), None).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(kube.join("config"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // Root's side: a HOME without a kubeconfig, and a directory only root may write.
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc-nix");
    std::fs::create_dir(&etc).unwrap();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o700)).unwrap();
    let machines = etc.join("machines");
    let sudo = |extra: &[&str]| {
        Command::new(BIN)
            .args(["machines-file", "web", "--machines-file"])
            .arg(&machines)
            .arg("--etc-static")
            .arg(root.path().join("none"))
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("HOME", root.path())
            .env("SUDO_USER", &user.name)
            .output()
            .unwrap()
    };
    let out = sudo(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let file = std::fs::read_to_string(&machines).unwrap();
    assert!(file.contains("ssh-ng://builder@web.example.com"), "{file}");
    assert!(file.contains(&format!("# BEGIN nixpool {ns}/web")), "{file}");
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap().trim(),
        user.uid.to_string(),
        "the credential plugin ran as the user"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&machines).unwrap().uid(), 0, "written as root");

    // --read-as-root: root's HOME has no kubeconfig, and the error says so.
    let out = sudo(&["--read-as-root"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("kubeconfig"), "{}", text(&out));

    // A SUDO_USER that is no user: named, with the way out.
    let out = Command::new(BIN)
        .args(["status"])
        .env("SUDO_USER", "no-such-user-here")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no-such-user-here") && text(&out).contains("--read-as-root"),
        "{}",
        text(&out)
    );
}
