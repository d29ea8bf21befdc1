//! Golden tests: what builderctl renders for the pools in fixtures/pools.yaml. Set
//! UPDATE_GOLDEN=1 to rewrite the files after an intended change (and review the diff).

use std::path::{Path, PathBuf};

use builderctl::render::{self, RenderError, RenderOptions};
use builderctl::{darwin, source, sshconfig, status, tunnel};
use nixpool_api::{MachinesEntry, NixBuilderPool};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn pools() -> Vec<NixBuilderPool> {
    source::from_file(&dir().join("fixtures/pools.yaml"), &Default::default()).expect("fixture parses")
}

fn pool(name: &str) -> NixBuilderPool {
    pools().into_iter().find(|p| render::name(p) == name).unwrap()
}

fn opts() -> RenderOptions {
    RenderOptions {
        key_path: "/etc/nix/nixpool_ed25519".into(),
        allow_unready: false,
        via_ssh_config: false,
        allow_stale: false,
    }
}

fn golden(name: &str, actual: &str) {
    let path = dir().join("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs; UPDATE_GOLDEN=1 rewrites it",
        path.display()
    );
}

#[test]
fn machines_lines() {
    let mut out = String::new();
    for p in pools().iter().filter(|p| render::name(p) != "pending") {
        out.push_str(&render::entry(p, &opts()).unwrap().to_string());
        out.push('\n');
    }
    let via = RenderOptions {
        via_ssh_config: true,
        ..opts()
    };
    out.push_str(&render::entry(&pool("kvm"), &via).unwrap().to_string());
    out.push('\n');
    golden("machines.txt", &out);
}

#[test]
fn the_line_carries_what_the_status_and_spec_say() {
    let e = render::entry(&pool("linux"), &opts()).unwrap();
    // The line is read back by the shared parser, field by field.
    let back = MachinesEntry::parse(&e.to_string()).unwrap();
    assert_eq!(back.uri, "ssh-ng://builder@nbp.example.com");
    assert_eq!(back.max_jobs, 2 * 4, "ready builders x jobs per builder");
    assert_eq!(back.speed_factor, 2);
    assert_eq!(back.systems, ["x86_64-linux", "i686-linux"]);
    assert_eq!(back.supported_features, ["benchmark", "big-parallel"]);
    assert_eq!(back.ssh_key.as_deref(), Some("/etc/nix/nixpool_ed25519"));
    assert_eq!(
        back.host_public_key,
        pool("linux").status.unwrap().host_public_key,
        "the host key is pinned"
    );
    let kvm = render::entry(&pool("kvm"), &opts()).unwrap();
    assert_eq!(kvm.uri, "ssh-ng://nix@192.0.2.10:2222");
    assert_eq!(kvm.mandatory_features, ["kvm"]);
}

#[test]
fn an_unready_pool_is_refused_unless_allowed() {
    let err = render::entry(&pool("pending"), &opts()).unwrap_err();
    assert!(matches!(err, RenderError::NotReady { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("builds/pending") && msg.contains("NoReadyBuilders") && msg.contains("--allow-unready"),
        "{msg}"
    );
    let allowed = RenderOptions {
        allow_unready: true,
        ..opts()
    };
    let e = render::entry(&pool("pending"), &allowed).unwrap();
    assert_eq!(e.max_jobs, 2 * 4, "no ready builder yet: the desired ones count");
}

#[test]
fn a_pool_without_host_key_or_endpoint_names_the_field() {
    let mut p = pool("linux");
    p.status.as_mut().unwrap().host_public_key = None;
    let msg = render::entry(&p, &opts()).unwrap_err().to_string();
    assert!(msg.contains("status.hostPublicKey"), "{msg}");
    let mut p = pool("linux");
    p.status.as_mut().unwrap().host_public_key = Some("not a key".into());
    let msg = render::entry(&p, &opts()).unwrap_err().to_string();
    assert!(
        msg.contains("status.hostPublicKey") && msg.contains("not an OpenSSH public key"),
        "{msg}"
    );
    let mut p = pool("linux");
    p.status.as_mut().unwrap().endpoint = None;
    let msg = render::entry(&p, &opts()).unwrap_err().to_string();
    assert!(msg.contains("status.endpoint"), "{msg}");
    let mut p = pool("linux");
    p.status = None;
    let msg = render::entry(&p, &opts()).unwrap_err().to_string();
    assert!(msg.contains("no status") && msg.contains("operator"), "{msg}");
}

#[test]
fn a_status_or_spec_value_nix_would_split_is_refused_with_the_pool_and_field() {
    type Breaker = fn(&mut NixBuilderPool);
    let cases: [(&str, Breaker, &str); 9] = [
        (
            "status.endpoint.host",
            |p| set_host(p, "evil.example.com builder"),
            "whitespace",
        ),
        ("status.endpoint.host", |p| set_host(p, "h\nssh://x"), "control"),
        ("status.endpoint.host", |p| set_host(p, "host#comment"), "`#`"),
        ("status.endpoint.host", |p| set_host(p, "a;b"), "`;`"),
        ("status.endpoint.host", |p| set_host(p, "other@host"), "`@`"),
        ("status.endpoint.host", |p| set_host(p, "[not-ipv6]"), "IPv6"),
        (
            "spec.systems",
            |p| p.spec.systems = vec!["x86_64-linux,aarch64-linux".into()],
            "`,`",
        ),
        (
            "spec.supportedFeatures",
            |p| p.spec.supported_features = vec!["kvm big".into()],
            "whitespace",
        ),
        ("spec.ssh.user", |p| p.spec.ssh.user = "builder#x".into(), "`#`"),
    ];
    for (field, break_it, why) in cases {
        let mut p = pool("linux");
        break_it(&mut p);
        let msg = render::entry(&p, &opts()).unwrap_err().to_string();
        assert!(
            msg.contains("builds/linux") && msg.contains(field) && msg.contains(why),
            "{field}: {msg}"
        );
    }
    // An IPv6 address is a host, bare or in brackets.
    for host in ["fd00::1", "[fd00::1]"] {
        let mut p = pool("linux");
        set_host(&mut p, host);
        let e = render::entry(&p, &opts()).unwrap();
        assert_eq!(e.uri, "ssh-ng://builder@[fd00::1]", "{host}");
    }
}

fn set_host(p: &mut NixBuilderPool, host: &str) {
    p.status.as_mut().unwrap().endpoint.as_mut().unwrap().host = host.into();
}

#[test]
fn a_status_older_than_the_spec_is_refused_unless_allowed() {
    let mut p = pool("linux");
    p.metadata.generation = Some(5);
    p.status.as_mut().unwrap().observed_generation = Some(4);
    let err = render::entry(&p, &opts()).unwrap_err();
    assert!(matches!(err, RenderError::Stale { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("builds/linux") && msg.contains("--allow-stale"), "{msg}");
    let allowed = RenderOptions {
        allow_stale: true,
        ..opts()
    };
    assert!(render::entry(&p, &allowed).is_ok());
    p.status.as_mut().unwrap().observed_generation = Some(5);
    assert!(
        render::entry(&p, &opts()).is_ok(),
        "a status of the current spec is used"
    );
}

#[test]
fn ssh_config_drop_in() {
    let p = pool("kvm");
    let e = render::entry(&p, &opts()).unwrap();
    let c = sshconfig::SshConfig {
        written_by: "builderctl ssh-config",
        machines_line_by: "builderctl machines-file --via-ssh-config",
        pool_id: render::pool_id(&p),
        alias: render::ssh_alias(&p),
        host: "192.0.2.10".into(),
        port: 2222,
        user: "nix".into(),
        key: "/etc/nix/nixpool_ed25519".into(),
        host_public_key: e.host_public_key.clone().unwrap(),
        known_hosts: sshconfig::known_hosts_path(Path::new("/etc/ssh"), &render::ssh_alias(&p)),
    };
    golden(
        "ssh-config-kvm.conf",
        &format!("{}# known_hosts:\n{}", c.render(), c.known_hosts_line()),
    );
    let text = c.render();
    for needed in [
        "ControlMaster no",
        "ControlPath none",
        "IdentitiesOnly yes",
        "HostKeyAlias nixpool-builds-kvm",
        "Port 2222",
    ] {
        assert!(text.contains(needed), "{needed} missing:\n{text}");
    }
}

#[test]
fn nix_darwin_snippet() {
    let entries: Vec<(String, MachinesEntry)> = ["kvm", "linux"]
        .iter()
        .map(|n| (format!("builds/{n}"), render::entry(&pool(n), &opts()).unwrap()))
        .collect();
    let snippets: Vec<darwin::SnippetPool> = entries
        .iter()
        .map(|(n, e)| darwin::SnippetPool {
            id: n,
            entry: e,
            ssh_config: None,
        })
        .collect();
    golden("darwin.nix", &darwin::snippet(&snippets));
}

#[test]
fn nix_darwin_is_detected_from_etc_static_or_a_link() {
    let t = tempfile::tempdir().unwrap();
    let machines = t.path().join("machines");
    let st = t.path().join("static");
    assert_eq!(darwin::managed_reason(&st, &machines), None, "no nix-darwin");
    // nix-darwin with `nix.enable = false` (Determinate Nix): /etc/static has no nix/.
    std::fs::create_dir_all(st.join("ssh")).unwrap();
    assert_eq!(
        darwin::managed_reason(&st, &machines),
        None,
        "nix-darwin leaves /etc/nix alone"
    );
    assert!(darwin::nix_darwin_without_nix(&st));
    // nix-darwin manages Nix (`nix.enable = true`, the default): its nix.conf is in /etc/static.
    std::fs::create_dir_all(st.join("nix")).unwrap();
    std::os::unix::fs::symlink("/nix/store/xyz-nix.conf", st.join("nix/nix.conf")).unwrap();
    let why = darwin::managed_reason(&st, &machines).unwrap();
    assert!(
        why.contains("nix-darwin") && why.contains("nix.enable = true") && why.contains("Unexpected files in /etc"),
        "{why}"
    );
    assert!(!darwin::nix_darwin_without_nix(&st));
    // nix-darwin generates this very file (e.g. nix.custom.conf from environment.etc).
    std::fs::remove_file(st.join("nix/nix.conf")).unwrap();
    std::os::unix::fs::symlink("/nix/store/xyz-custom", st.join("nix/nix.custom.conf")).unwrap();
    assert_eq!(darwin::managed_reason(&st, &machines), None);
    let why = darwin::managed_reason(&st, &t.path().join("nix.custom.conf")).unwrap();
    assert!(why.contains("generates"), "{why}");
    let t = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc/static/nix/machines", t.path().join("machines")).unwrap();
    let why = darwin::managed_reason(&t.path().join("none"), &t.path().join("machines")).unwrap();
    assert!(why.contains("/etc/static/nix/machines"), "{why}");
}

#[test]
fn status_json_has_its_stable_field_names() {
    let text = status::json(&pools());
    golden("status.json", &text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pools = v["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 3);
    let mut keys: Vec<&str> = pools[0].as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "endpoint",
            "hostPublicKey",
            "mandatoryFeatures",
            "maxJobs",
            "name",
            "namespace",
            "ready",
            "readyBuilders",
            "reason",
            "replicas",
            "supportedFeatures",
            "systems"
        ],
        "the documented field names (docs/builderctl.md): renaming one breaks users' scripts"
    );
    let pending = pools.iter().find(|p| p["name"] == "pending").unwrap();
    assert_eq!(pending["ready"], false);
    assert!(
        pending["reason"].as_str().unwrap().contains("NoReadyBuilders"),
        "{pending}"
    );
    assert_eq!(pending["maxJobs"], 0);
    let kvm = pools.iter().find(|p| p["name"] == "kvm").unwrap();
    assert_eq!(kvm["ready"], true);
    assert_eq!(kvm["reason"], serde_json::Value::Null);
    assert_eq!(kvm["endpoint"], serde_json::json!({"host": "192.0.2.10", "port": 2222}));
}

#[test]
fn status_table() {
    golden("status.txt", &status::table(&pools()));
}

#[test]
fn bad_pool_files_name_the_file_and_document() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("pool.yaml");
    std::fs::write(&f, "kind: ConfigMap\napiVersion: v1\nmetadata: {name: x}\n").unwrap();
    let msg = source::from_file(&f, &Default::default()).unwrap_err().to_string();
    assert!(
        msg.contains("pool.yaml") && msg.contains("document 1") && msg.contains("kubectl get nbp"),
        "{msg}"
    );
    std::fs::write(
        &f,
        "apiVersion: nixpool.dev/v1alpha1\nkind: NixBuilderPool\nmetadata: {name: x}\nspec: {maxJobs: many}\n",
    )
    .unwrap();
    let msg = source::from_file(&f, &Default::default()).unwrap_err().to_string();
    assert!(
        msg.contains("not a valid NixBuilderPool") && msg.contains("maxJobs") || msg.contains("invalid type"),
        "{msg}"
    );
    let sel = source::Selection {
        names: vec![],
        selector: Some("team=web".into()),
    };
    let only = source::from_file(&dir().join("fixtures/pools.yaml"), &sel).unwrap();
    assert_eq!(only.iter().map(render::name).collect::<Vec<_>>(), ["linux"]);
}

/// A list as the API server sends it: every pool with the metadata builderctl skips when it
/// decodes (managedFields, annotations, uid...), in an order that is not the file's.
fn api_list(pools: &[NixBuilderPool]) -> String {
    let items: Vec<serde_json::Value> = pools
        .iter()
        .rev()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap();
            let meta = v["metadata"].as_object_mut().unwrap();
            meta.insert("uid".into(), "0b0e4e7e-5c0a-4a7e-9d43-2f1c5b0a7d11".into());
            meta.insert("resourceVersion".into(), "4711".into());
            meta.insert("creationTimestamp".into(), "2026-01-01T00:00:00Z".into());
            meta.insert(
                "annotations".into(),
                serde_json::json!({
                    "kubectl.kubernetes.io/last-applied-configuration": serde_json::to_string(&p.spec).unwrap()
                }),
            );
            meta.insert(
                "managedFields".into(),
                serde_json::json!([{
                    "manager": "nixpool-operator", "operation": "Apply", "apiVersion": "nixpool.dev/v1alpha1",
                    "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "subresource": "status",
                    "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}}}}}
                }]),
            );
            v
        })
        .collect();
    serde_json::to_string(&serde_json::json!({
        "apiVersion": "nixpool.dev/v1alpha1", "kind": "NixBuilderPoolList",
        "metadata": {"resourceVersion": "4711"}, "items": items
    }))
    .unwrap()
}

#[test]
fn pools_listed_from_the_cluster_render_as_the_whole_objects_do() {
    let mut whole = pools();
    whole[0].metadata.generation = Some(3);
    let listed = source::decode_list(&api_list(&whole)).unwrap();
    let ids = |ps: &[NixBuilderPool]| ps.iter().map(render::pool_id).collect::<Vec<_>>();
    assert_eq!(ids(&listed), ids(&whole), "sorted by namespace/name, as from a file");
    for (l, w) in listed.iter().zip(&whole) {
        assert_eq!(
            (
                &l.metadata.name,
                &l.metadata.namespace,
                l.metadata.generation,
                &l.metadata.labels
            ),
            (
                &w.metadata.name,
                &w.metadata.namespace,
                w.metadata.generation,
                &w.metadata.labels
            )
        );
        assert_eq!((&l.spec, &l.status), (&w.spec, &w.status), "{}", render::pool_id(w));
        for o in [
            opts(),
            RenderOptions {
                allow_unready: true,
                via_ssh_config: true,
                ..opts()
            },
        ] {
            assert_eq!(render::entry(l, &o), render::entry(w, &o), "{}", render::pool_id(w));
        }
        assert!(l.metadata.managed_fields.is_none() && l.metadata.annotations.is_none());
    }
    assert_eq!(status::table(&listed), status::table(&whole));
    let bad = api_list(&whole).replace("\"maxJobs\":4", "\"maxJobs\":\"many\"");
    assert!(source::decode_list(&bad).is_err());
}

#[test]
fn the_tunnel_drop_in_reaches_the_pool_alias_on_localhost_and_pins_the_pools_host_key() {
    let p = pool("kvm");
    let via = RenderOptions {
        via_ssh_config: true,
        ..opts()
    };
    let e = render::entry(&p, &via).unwrap();
    let c = tunnel::ssh_config(
        &p,
        Path::new("/etc/nix/nixpool_ed25519"),
        Path::new("/etc/ssh"),
        &e,
        tunnel::DEFAULT_PORT,
    );
    let text = c.render();
    golden(
        "tunnel-kvm.conf",
        &format!("{text}# known_hosts:\n{}# machines:\n{e}\n", c.known_hosts_line()),
    );
    // The machines line's host is the drop-in's alias, and ssh looks the host key up under it.
    let alias = render::ssh_alias(&p);
    assert_eq!(e.uri, format!("ssh-ng://{}@{alias}", p.spec.ssh.user));
    for needed in [
        format!("Host {alias}\n"),
        "HostName 127.0.0.1\n".to_string(),
        format!("Port {}\n", tunnel::DEFAULT_PORT),
        format!("HostKeyAlias {alias}\n"),
        "StrictHostKeyChecking yes\n".to_string(),
    ] {
        assert!(text.contains(&needed), "{needed} missing:\n{text}");
    }
    assert_eq!(
        c.known_hosts_line(),
        format!(
            "{alias} {}\n",
            p.status.as_ref().unwrap().host_public_key.as_deref().unwrap().trim()
        )
    );
}
