//! Pure tests of the builders, from YAML fixtures.

use crate::reconcile::validate::Images;
use k8s_openapi::api::core::v1::Container;
use kube::ResourceExt;
use nixpool_api::agent::PushTarget;
use nixpool_api::{NixBuilderPool, labels, names, paths, ports};

use super::*;
use crate::authorized_keys::AuthorizedKeys;
use crate::hostkey::HostKey;
use crate::reconcile::validate::validate;

fn pool(yaml: &str) -> NixBuilderPool {
    let mut p: NixBuilderPool = serde_norway::from_str(yaml).unwrap();
    p.metadata.namespace = Some("ci".into());
    p.metadata.uid = Some("0b1c2d3e-0000-4000-8000-000000000001".into());
    p
}

fn children(p: &NixBuilderPool) -> Children {
    let valid = validate(p, &Images::from("img:default")).unwrap();
    let mut keys = AuthorizedKeys::default();
    for k in &p.spec.ssh.authorized_keys {
        keys.add(k, || crate::authorized_keys::Origin(String::new()));
    }
    build(
        p,
        &BuildInputs {
            valid: &valid,
            authorized_keys: &keys,
            with_pdb: true,
            builder_replicas: p.spec.replicas,
        },
    )
}

fn builder(c: &Children) -> &Container {
    &c.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

const MINIMAL: &str = include_str!("../../../../../examples/minimal.yaml");
const CACHES: &str = include_str!("../../../../../examples/caches.yaml");
const AUTOSCALING: &str = include_str!("../../../../../examples/autoscaling.yaml");

#[test]
fn every_child_has_a_deterministic_name_labels_and_the_controller_owner() {
    let p = pool(MINIMAL);
    let key = HostKey::generate();
    let c = children(&p);
    let Children {
        authorized_keys,
        config_map,
        deployment,
        service,
        pdb,
        gateway,
    } = &c;
    assert!(gateway.is_none(), "no gateway unless the pool asks for one");
    let metas = [
        (
            &crate::reconcile::build::host_key_secret(&p, &key).metadata,
            names::host_key_secret("builders"),
        ),
        (&authorized_keys.metadata, "builders-authorized-keys".into()),
        (&config_map.metadata, "builders-config".into()),
        (&deployment.metadata, "builders".into()),
        (&service.metadata, "builders".into()),
        (&pdb.as_ref().unwrap().metadata, "builders".into()),
    ];
    for (meta, name) in metas {
        assert_eq!(meta.name.as_deref(), Some(name.as_str()));
        assert_eq!(meta.namespace.as_deref(), Some("ci"));
        let l = meta.labels.as_ref().unwrap();
        assert_eq!(l[labels::INSTANCE], "builders");
        assert_eq!(l[labels::MANAGED_BY], "nixpool-operator");
        let o = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (o.kind.as_str(), o.name.as_str(), o.controller),
            ("NixBuilderPool", "builders", Some(true))
        );
    }
}

#[test]
fn the_deployment_runs_the_agent_safely() {
    let p = pool(MINIMAL);
    let c = children(&p);
    let spec = c.deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.termination_grace_period_seconds, Some(3600));
    assert_eq!(pod.node_selector.as_ref().unwrap()["kubernetes.io/arch"], "amd64");
    let b = builder(&c);
    assert_eq!(b.image.as_deref(), Some("img:default"));
    assert_eq!(
        b.command.as_ref().unwrap(),
        &vec![
            paths::AGENT_BINARY.to_string(),
            "run".to_string(),
            "--store-volume".to_string(),
            paths::STORE_VOLUME.to_string()
        ]
    );
    let port_names: Vec<_> = b
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        port_names,
        vec![
            ("ssh".to_string(), ports::SSH as i32),
            ("health".to_string(), ports::AGENT_HEALTH as i32)
        ]
    );
    let mounts: Vec<_> = b
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        vec![
            paths::STORE_VOLUME,
            paths::CONFIG_DIR,
            paths::HOST_KEY_DIR,
            paths::AUTHORIZED_KEYS_DIR
        ]
    );
    let volumes = pod.volumes.as_ref().unwrap();
    let hk = volumes
        .iter()
        .find(|v| v.name == "host-key")
        .unwrap()
        .secret
        .as_ref()
        .unwrap();
    assert_eq!(hk.secret_name.as_deref(), Some("builders-host-key"));
    assert_eq!(hk.default_mode, Some(0o400));
    assert_eq!(hk.items.as_ref().unwrap()[0].path, paths::HOST_KEY_FILE);
    // The store volume is not mounted over the image's /nix (the agent puts the image's /nix
    // under a writable layer kept on it), and nothing copies the store before the builder starts.
    assert!(!mounts.contains(&paths::STORE_MOUNT));
    assert_eq!(pod.init_containers, None);
    let store = volumes.iter().find(|v| v.name == "nix").unwrap();
    assert!(store.empty_dir.is_some());
}

#[test]
fn the_config_hash_follows_nix_settings_but_not_keys() {
    let p = pool(MINIMAL);
    let hash = |c: &Children| {
        c.deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[nixpool_api::annotations::CONFIG_HASH]
            .clone()
    };
    let base = children(&p);

    let mut more_keys = p.clone();
    more_keys
        .spec
        .ssh
        .authorized_keys
        .push("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6o/4wuvKOUyj0Yb5Ef8nC3U8OgAAbIAaAFhg8k45qB bob@mac".into());
    let with_keys = children(&more_keys);
    assert_eq!(hash(&with_keys), hash(&base), "a key change must not restart builders");
    assert_ne!(with_keys.authorized_keys.data, base.authorized_keys.data);

    let mut nix = p.clone();
    nix.spec.nix_config.insert("keep-outputs".into(), "true".into());
    assert_ne!(
        hash(&children(&nix)),
        hash(&base),
        "a nix.conf change must roll the builders"
    );
}

#[test]
fn caches_become_substituters_keys_and_push_targets_with_mounted_tokens() {
    let p = pool(CACHES);
    let c = children(&p);
    let agent =
        nixpool_api::AgentConfig::from_json(&c.config_map.data.as_ref().unwrap()[paths::AGENT_CONFIG_KEY]).unwrap();
    assert_eq!(
        agent.substituters,
        vec![
            "https://cache.nixos.org",
            "https://attic.example.com/main",
            "https://my-team.cachix.org"
        ]
    );
    assert_eq!(agent.trusted_public_keys.len(), 3);
    let mut offline = p.clone();
    offline.spec.cache.nixos_cache = false;
    let offline = children(&offline);
    let agent_offline =
        nixpool_api::AgentConfig::from_json(&offline.config_map.data.as_ref().unwrap()[paths::AGENT_CONFIG_KEY])
            .unwrap();
    assert_eq!(
        agent_offline.substituters,
        vec!["https://attic.example.com/main", "https://my-team.cachix.org"]
    );
    assert!(
        matches!(&agent.push[0], PushTarget::Attic { cache, token_file, .. } if cache == "main" && token_file == "/run/nixpool/cache/attic-token")
    );
    assert!(matches!(&agent.push[1], PushTarget::Cachix { cache, .. } if cache == "my-team"));
    assert_eq!(agent.max_jobs, 8);
    assert_eq!(agent.min_free_bytes, Some(20 << 30));
    assert_eq!(agent.drain_timeout_seconds, 3590);
    assert_eq!(agent.extra_nix_config["keep-outputs"], "true");
    // The tokens are mounted, never in the ConfigMap.
    let cm = serde_json::to_string(&c.config_map).unwrap();
    assert!(!cm.contains("token\":\"") && cm.contains("attic-token"));
    let pod = c.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let projected = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "cache-secrets")
        .unwrap()
        .projected
        .as_ref()
        .unwrap();
    let names: Vec<_> = projected
        .sources
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| s.secret.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec!["attic-token", "cachix-token"]);
    assert_eq!(
        builder(&c).resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0,
        "8"
    );

    let svc = c.service.spec.as_ref().unwrap();
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        svc.load_balancer_source_ranges.as_ref().unwrap(),
        &vec!["10.0.0.0/8".to_string()]
    );
    let store = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "nix").unwrap();
    let claim = store
        .ephemeral
        .as_ref()
        .unwrap()
        .volume_claim_template
        .as_ref()
        .unwrap();
    assert_eq!(
        claim.spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "200Gi"
    );
}

#[test]
fn a_users_host_key_secret_is_mounted_and_none_is_built() {
    let mut p = pool(MINIMAL);
    p.spec.ssh.host_key_secret = Some(nixpool_api::v1alpha1::SecretKeyRef {
        name: "mine".into(),
        key: "id".into(),
    });
    let c = children(&p);
    let pod = c.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let hk = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "host-key")
        .unwrap()
        .secret
        .clone()
        .unwrap();
    assert_eq!(hk.secret_name.as_deref(), Some("mine"));
    assert_eq!(hk.items.unwrap()[0].key, "id");
}

#[test]
fn the_host_key_secret_holds_the_key_and_no_pdb_without_policy_v1() {
    let p = pool(MINIMAL);
    let key = HostKey::generate();
    let valid = validate(&p, &Images::from("img")).unwrap();
    let c = build(
        &p,
        &BuildInputs {
            valid: &valid,
            authorized_keys: &AuthorizedKeys::default(),
            with_pdb: false,
            builder_replicas: p.spec.replicas,
        },
    );
    assert!(c.pdb.is_none());
    let data = crate::reconcile::build::host_key_secret(&p, &key).data.unwrap();
    assert_eq!(HostKey::parse(&data[paths::HOST_KEY_FILE].0).unwrap(), key);
    assert_eq!(
        String::from_utf8(data[paths::HOST_PUBLIC_KEY_FILE].0.clone())
            .unwrap()
            .trim(),
        key.public
    );
}

#[test]
fn stamping_is_stable_and_tracks_content() {
    let p = pool(MINIMAL);
    let a = with_applied_hash(children(&p).deployment);
    let b = with_applied_hash(with_applied_hash(children(&p).deployment));
    assert_eq!(
        a.annotations()[nixpool_api::annotations::APPLIED_HASH],
        b.annotations()[nixpool_api::annotations::APPLIED_HASH]
    );
    let mut p2 = p.clone();
    p2.spec.tolerations.clear();
    p2.spec.replicas = 3;
    assert_ne!(
        with_applied_hash(children(&p2).deployment).annotations()[nixpool_api::annotations::APPLIED_HASH],
        a.annotations()[nixpool_api::annotations::APPLIED_HASH]
    );
}

#[test]
fn a_gateway_gets_least_rights_runs_unprivileged_and_takes_the_service() {
    let p = pool(AUTOSCALING);
    let valid = validate(&p, &Images::from("img:default")).unwrap();
    let c = build(
        &p,
        &BuildInputs {
            valid: &valid,
            authorized_keys: &AuthorizedKeys::default(),
            with_pdb: true,
            builder_replicas: 3,
        },
    );
    assert_eq!(
        c.deployment.spec.as_ref().unwrap().replicas,
        Some(3),
        "the builder count is the autoscaler's, not spec.replicas"
    );
    let g = c.gateway.as_ref().expect("autoscaling implies a gateway");
    let name = "builders-on-demand-gateway";
    for meta in [
        &g.service_account.metadata,
        &g.role.metadata,
        &g.role_binding.metadata,
        &g.deployment.metadata,
    ] {
        assert_eq!(meta.name.as_deref(), Some(name));
        assert_eq!(meta.owner_references.as_ref().unwrap()[0].controller, Some(true));
    }
    assert_eq!(
        g.demand.metadata.name.as_deref(),
        Some("builders-on-demand-gateway-demand")
    );
    let pdb = g.pdb.as_ref().expect("a drain takes one gateway pod at a time");
    assert_eq!(pdb.metadata.name.as_deref(), Some(name));
    let selector = pdb.spec.as_ref().unwrap().selector.as_ref().unwrap();
    assert_eq!(
        selector.match_labels.as_ref().unwrap()[labels::NAME],
        labels::GATEWAY_NAME_VALUE
    );

    // Rights: read pods, write one ConfigMap, nothing else.
    let rules = g.role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].resources.as_deref(), Some(&["pods".to_string()][..]));
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    assert_eq!(rules[1].resources.as_deref(), Some(&["configmaps".to_string()][..]));
    assert_eq!(
        rules[1].resource_names.as_deref(),
        Some(&["builders-on-demand-gateway-demand".to_string()][..])
    );
    assert_eq!(rules[1].verbs, ["get", "list", "watch", "patch"]);
    assert_eq!(g.role_binding.subjects.as_ref().unwrap()[0].name, name);

    let d = g.deployment.spec.as_ref().unwrap();
    assert_eq!(d.replicas, Some(2));
    let pod = d.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(name));
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    let ctr = &pod.containers[0];
    let sc = ctr.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, None);
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(ctr.command.as_deref(), Some(&[paths::GATEWAY_BINARY.to_string()][..]));
    let args = ctr.args.as_ref().unwrap();
    for want in [
        "--slots=2",
        "--hold-seconds=300",
        "--demand-config-map=builders-on-demand-gateway-demand",
        "--builders-selector=app.kubernetes.io/instance=builders-on-demand,app.kubernetes.io/name=nixpool-builder",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    // The gateway's pods do not match the builders' selector, and the Service picks them.
    let gw_labels = d.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(gw_labels[labels::NAME], labels::GATEWAY_NAME_VALUE);
    let svc_selector = c.service.spec.as_ref().unwrap().selector.as_ref().unwrap();
    assert_eq!(svc_selector[labels::NAME], labels::GATEWAY_NAME_VALUE);
    assert_eq!(svc_selector[labels::INSTANCE], "builders-on-demand");
}

#[test]
fn spec_pod_lands_on_the_builder_pods_and_in_part_on_the_gateways() {
    let mut p = pool(&format!("{AUTOSCALING}  imagePullSecrets: [{{name: own}}]\n"));
    p.spec.pod.priority_class_name = Some("nix-builders".into());
    p.spec.pod.runtime_class_name = Some("sandboxed".into());
    p.spec.pod.topology_spread_constraints.push(
        serde_json::from_value(serde_json::json!({
            "maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"mine": "yes"}}
        }))
        .unwrap(),
    );
    let valid = validate(
        &p,
        &Images::from("img:default").with_default_pull_secrets(vec!["regcred".into()]),
    )
    .unwrap();
    let c = build(
        &p,
        &BuildInputs {
            valid: &valid,
            authorized_keys: &AuthorizedKeys::default(),
            with_pdb: true,
            builder_replicas: 1,
        },
    );

    let template = &c.deployment.spec.as_ref().unwrap().template;
    let meta = template.metadata.as_ref().unwrap();
    let pod = template.spec.as_ref().unwrap();
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels["team"], "platform");
    assert_eq!(labels[labels::NAME], labels::NAME_VALUE, "nixpool's labels stay");
    let annotations = meta.annotations.as_ref().unwrap();
    assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
    assert_eq!(annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"], "false");
    assert!(
        annotations.contains_key(nixpool_api::annotations::CONFIG_HASH),
        "the config hash stays"
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("nix-builders"));
    assert_eq!(pod.runtime_class_name.as_deref(), Some("sandboxed"));
    let own: Vec<&str> = pod
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(own, ["own"], "the pool's own pull secrets replace the operator's");
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    assert_eq!(spread.len(), 2);
    assert_eq!(spread[0].topology_key, "topology.kubernetes.io/zone");
    assert_eq!(
        spread[0].label_selector.as_ref().unwrap().match_labels.as_ref(),
        Some(&selector_labels(&p)),
        "a constraint without a selector counts this pool's builders"
    );
    assert_eq!(
        spread[1]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["mine"],
        "yes",
        "a constraint's own selector is kept"
    );
    assert!(pod.affinity.is_some(), "the default anti-affinity stays");

    let g = c.gateway.as_ref().unwrap().deployment.spec.as_ref().unwrap();
    let gmeta = g.template.metadata.as_ref().unwrap();
    let gpod = g.template.spec.as_ref().unwrap();
    assert_eq!(gmeta.labels.as_ref().unwrap()["team"], "platform");
    assert_eq!(gmeta.labels.as_ref().unwrap()[labels::NAME], labels::GATEWAY_NAME_VALUE);
    assert_eq!(
        gmeta.annotations.as_ref().unwrap()["karpenter.sh/do-not-disrupt"],
        "true"
    );
    assert_eq!(gpod.priority_class_name.as_deref(), Some("nix-builders"));
    assert_eq!(gpod.runtime_class_name, None, "the gateway needs no builder runtime");
    assert_eq!(
        gpod.topology_spread_constraints, None,
        "the gateway spreads by its own anti-affinity"
    );

    // Without pull secrets of its own, a pool's pods get the operator's.
    let p = pool(MINIMAL);
    let valid = validate(
        &p,
        &Images::from("img:default").with_default_pull_secrets(vec!["regcred".into()]),
    )
    .unwrap();
    let c = build(
        &p,
        &BuildInputs {
            valid: &valid,
            authorized_keys: &AuthorizedKeys::default(),
            with_pdb: true,
            builder_replicas: 1,
        },
    );
    let pod = c.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let names: Vec<&str> = pod
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["regcred"]);
    assert_eq!(pod.priority_class_name, None);
    assert_eq!(pod.topology_spread_constraints, None);
}
