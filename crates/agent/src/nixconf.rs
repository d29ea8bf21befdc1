//! `nix.conf`: rendered from the agent config. Pure.

use nixpool_api::AgentConfig;

use crate::accounts::BUILD_GROUP;

/// Facts found on the machine that shape nix.conf.
#[derive(Clone, Debug)]
pub struct Host {
    /// `/dev/kvm` can be opened read-write.
    pub kvm: bool,
    /// The native system, e.g. `x86_64-linux`.
    pub system: String,
    /// `sandbox` value: `true`, `false` or `relaxed`.
    pub sandbox: String,
    /// The post-build hook, when pushing is on.
    pub post_build_hook: Option<String>,
}

/// The native Nix system of this binary.
pub fn native_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// The features advertised: the pool's, plus `kvm` and `nixos-test` only with a usable /dev/kvm.
pub fn system_features(config: &AgentConfig, kvm: bool) -> Vec<String> {
    let mut f: Vec<String> = Vec::new();
    let mut add = |s: &str| {
        if !f.iter().any(|x| x == s) {
            f.push(s.to_string());
        }
    };
    for s in &config.supported_features {
        if kvm || (s != "kvm" && s != "nixos-test") {
            add(s);
        }
    }
    for s in &config.mandatory_features {
        add(s);
    }
    if kvm {
        add("kvm");
        add("nixos-test");
    }
    f
}

pub fn render(config: &AgentConfig, host: &Host) -> String {
    let mut out = String::new();
    let mut set = |k: &str, v: &str| {
        out.push_str(k);
        out.push_str(" =");
        if !v.is_empty() {
            out.push(' ');
            out.push_str(v);
        }
        out.push('\n');
    };
    set("build-users-group", BUILD_GROUP);
    set("trusted-users", &format!("root {}", config.builder_user));
    set("max-jobs", &config.max_jobs.to_string());
    set("cores", &config.cores.to_string());
    set("sandbox", &host.sandbox);
    set("system-features", &system_features(config, host.kvm).join(" "));
    let extra: Vec<&str> = config
        .systems
        .iter()
        .map(String::as_str)
        .filter(|s| *s != host.system)
        .collect();
    set("extra-platforms", &extra.join(" "));
    set("substituters", &config.substituters.join(" "));
    set("trusted-public-keys", &config.trusted_public_keys.join(" "));
    if let Some(b) = config.min_free_bytes {
        set("min-free", &b.to_string());
    }
    if let Some(b) = config.max_free_bytes {
        set("max-free", &b.to_string());
    }
    if let Some(hook) = &host.post_build_hook {
        set("post-build-hook", hook);
    }
    // A builder never forwards builds further.
    set("builders", "");
    for (k, v) in &config.extra_nix_config {
        set(k, v);
    }
    format!(
        "# Written by nixpool-agent for pool {pool}; rewritten at every start: change the pool, not this file.\n{out}",
        pool = config.pool
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn config() -> AgentConfig {
        AgentConfig::from_json(
            r#"{
              "pool": "p", "builderUser": "builder", "maxJobs": 4, "cores": 2,
              "systems": ["x86_64-linux", "i686-linux"], "supportedFeatures": ["big-parallel", "kvm"],
              "sshPort": 22, "healthPort": 8090, "substituters": ["https://cache.example"],
              "trustedPublicKeys": ["cache.example-1:abc="], "minFreeBytes": 100,
              "extraNixConfig": {"connect-timeout": "5"}, "drainTimeoutSeconds": 60
            }"#,
        )
        .unwrap()
    }

    fn host(kvm: bool) -> Host {
        Host {
            kvm,
            system: "x86_64-linux".into(),
            sandbox: "true".into(),
            post_build_hook: None,
        }
    }

    fn value(conf: &str, key: &str) -> Option<String> {
        conf.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} =")).map(|v| v.trim().to_string()))
    }

    #[test]
    fn renders_the_settings_a_builder_needs() {
        let c = render(&config(), &host(false));
        assert_eq!(value(&c, "trusted-users").unwrap(), "root builder");
        assert_eq!(value(&c, "build-users-group").unwrap(), "nixbld");
        assert_eq!(value(&c, "max-jobs").unwrap(), "4");
        assert_eq!(value(&c, "extra-platforms").unwrap(), "i686-linux");
        assert_eq!(value(&c, "min-free").unwrap(), "100");
        assert_eq!(value(&c, "max-free"), None);
        assert_eq!(value(&c, "connect-timeout").unwrap(), "5");
        assert_eq!(value(&c, "builders").unwrap(), "");
        assert_eq!(value(&c, "post-build-hook"), None);
    }

    #[test]
    fn kvm_features_only_with_kvm() {
        let without = render(&config(), &host(false));
        assert_eq!(value(&without, "system-features").unwrap(), "big-parallel");
        let with = render(&config(), &host(true));
        assert_eq!(value(&with, "system-features").unwrap(), "big-parallel kvm nixos-test");
    }
}
