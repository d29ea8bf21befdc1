//! A pool's `/etc/nix/machines` line, rendered from its status and spec. Pure.

use nixpool_api::conditions::READY;
use nixpool_api::machines::{column_problem, parse_file};
use nixpool_api::{MachinesEntry, NixBuilderPool, NixBuilderPoolStatus};

/// Why a pool gives no machines line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error(
        "pool {pool} is not Ready ({reason}); wait for it (`kubectl get nbp -n {ns} {name}`) or pass --allow-unready to write it anyway"
    )]
    NotReady {
        pool: String,
        ns: String,
        name: String,
        reason: String,
    },
    #[error("pool {pool}: {field} is empty: {why}")]
    Missing {
        pool: String,
        field: &'static str,
        why: &'static str,
    },
    #[error(
        "pool {pool}: its status (generation {observed}) is older than its spec (generation {generation}): the operator has not caught up; wait for it (`kubectl get nbp -n {ns} {name}`) or pass --allow-stale"
    )]
    Stale {
        pool: String,
        ns: String,
        name: String,
        observed: i64,
        generation: i64,
    },
    #[error("pool {pool}: {field} is {value:?}: {why}")]
    Invalid {
        pool: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// How the line is rendered.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// Path of the client's private key on this machine (the line's 3rd column).
    pub key_path: String,
    /// Render pools that are not Ready.
    pub allow_unready: bool,
    /// Connect through the `builderctl ssh-config` Host alias instead of host and port.
    pub via_ssh_config: bool,
    /// Render pools whose status is older than their spec.
    pub allow_stale: bool,
}

/// Why `host` is no host of an ssh URI, if it is not: an extra `@`, `/` or bracket would move
/// the connection elsewhere; a colon or bracket is only for an IPv6 address.
fn bad_host(host: &str) -> Option<&'static str> {
    if let Some(why) = column_problem(host) {
        return Some(why);
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.contains(['@', '/', '?']) {
        Some("a host name or address is needed, without `@`, `/` or `?`")
    } else if (host.contains(['[', ']', ':'])) && bare.parse::<std::net::Ipv6Addr>().is_err() {
        Some("a colon or bracket is allowed only in an IPv6 address")
    } else {
        None
    }
}

/// `namespace/name`: the id of a pool's block in the machines file.
pub fn pool_id(pool: &NixBuilderPool) -> String {
    format!("{}/{}", namespace(pool), pool.metadata.name.as_deref().unwrap_or("?"))
}

pub fn namespace(pool: &NixBuilderPool) -> &str {
    pool.metadata.namespace.as_deref().unwrap_or("default")
}

pub fn name(pool: &NixBuilderPool) -> &str {
    pool.metadata.name.as_deref().unwrap_or("?")
}

/// The ssh_config `Host` alias of a pool (`builderctl ssh-config`).
pub fn ssh_alias(pool: &NixBuilderPool) -> String {
    format!("nixpool-{}-{}", namespace(pool), name(pool))
}

/// `Some(reason)` when the pool's Ready condition is not True.
pub fn not_ready_reason(pool: &NixBuilderPool) -> Option<String> {
    let status = pool.status.as_ref()?;
    let Some(ready) = status.condition(READY) else {
        return Some("it has no Ready condition yet".into());
    };
    if ready.status == "True" {
        None
    } else {
        Some(format!("Ready={} {}: {}", ready.status, ready.reason, ready.message))
    }
}

fn is_ready(pool: &NixBuilderPool) -> Result<(), String> {
    match &pool.status {
        None => Err("it has no status: is the operator running?".into()),
        Some(_) => match not_ready_reason(pool) {
            None => Ok(()),
            Some(r) => Err(r),
        },
    }
}

/// Builds that may run at once on the pool, as the operator advertises them (ready builders ×
/// jobs per builder, or the gateway's capacity). An unready pool rendered with
/// `--allow-unready` counts its desired builders (at least one), so Nix does not see a machine
/// with zero slots.
pub fn max_jobs(pool: &NixBuilderPool) -> u32 {
    let ready = pool.status.as_ref().map(|s| s.ready_replicas).unwrap_or(0);
    match pool.spec.advertised_jobs(ready) {
        0 => pool.spec.replicas.max(1) as u32 * pool.spec.max_jobs.max(1) as u32,
        n => n,
    }
}

/// The pool's machines line with the local key path.
pub fn entry(pool: &NixBuilderPool, opts: &RenderOptions) -> Result<MachinesEntry, RenderError> {
    let id = pool_id(pool);
    if let Err(reason) = is_ready(pool)
        && !opts.allow_unready
    {
        return Err(RenderError::NotReady {
            pool: id,
            ns: namespace(pool).into(),
            name: name(pool).into(),
            reason,
        });
    }
    let no_status = NixBuilderPoolStatus::default();
    let status = pool.status.as_ref().unwrap_or(&no_status);
    if let (Some(observed), Some(generation)) = (status.observed_generation, pool.metadata.generation)
        && observed < generation
        && !opts.allow_stale
    {
        return Err(RenderError::Stale {
            pool: id,
            ns: namespace(pool).into(),
            name: name(pool).into(),
            observed,
            generation,
        });
    }
    let endpoint = status.endpoint.as_ref().ok_or_else(|| RenderError::Missing {
        pool: id.clone(),
        field: "status.endpoint",
        why: "the operator has not published where to connect yet (is the Service created?)",
    })?;
    if let Some(why) = bad_host(&endpoint.host) {
        return Err(RenderError::Invalid {
            pool: id,
            field: "status.endpoint.host",
            value: endpoint.host.clone(),
            why,
        });
    }
    let tokens = std::iter::once(("spec.ssh.user", &pool.spec.ssh.user))
        .chain(pool.spec.systems.iter().map(|v| ("spec.systems", v)))
        .chain(
            pool.spec
                .supported_features
                .iter()
                .map(|v| ("spec.supportedFeatures", v)),
        )
        .chain(
            pool.spec
                .mandatory_features
                .iter()
                .map(|v| ("spec.mandatoryFeatures", v)),
        );
    for (field, value) in tokens {
        let bad = column_problem(value).or_else(|| value.contains(['@', '/']).then_some("it holds `@` or `/`"));
        if let Some(why) = bad {
            return Err(RenderError::Invalid {
                pool: id,
                field,
                value: value.clone(),
                why,
            });
        }
    }
    let port = u16::try_from(endpoint.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| RenderError::Invalid {
            pool: id.clone(),
            field: "status.endpoint.port",
            value: endpoint.port.to_string(),
            why: "a TCP port between 1 and 65535 is needed",
        })?;
    let host_key = status
        .host_public_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| RenderError::Missing {
            pool: id.clone(),
            field: "status.hostPublicKey",
            why: "without the host key the builder cannot be pinned; wait for the operator to publish it",
        })?;
    if nixpool_api::ssh_keys::parse_public_key(host_key).is_err() {
        return Err(RenderError::Invalid {
            pool: id,
            field: "status.hostPublicKey",
            value: host_key.chars().take(40).collect(),
            why: "it is not an OpenSSH public key line (`ssh-ed25519 AAAA...`)",
        });
    }
    let user = &pool.spec.ssh.user;
    let uri = if opts.via_ssh_config {
        nixpool_api::machines::StoreUri {
            scheme: "ssh-ng".into(),
            user: Some(user.clone()),
            host: ssh_alias(pool),
            port: None,
        }
        .to_string()
    } else {
        MachinesEntry::ssh_ng_uri(user, &endpoint.host, port)
    };
    let entry = MachinesEntry {
        uri,
        systems: pool.spec.systems.clone(),
        ssh_key: Some(opts.key_path.clone()),
        max_jobs: max_jobs(pool),
        speed_factor: pool.spec.speed_factor.max(1) as u32,
        supported_features: pool.spec.supported_features.clone(),
        mandatory_features: pool.spec.mandatory_features.clone(),
        host_public_key: Some(host_key.to_string()),
    };
    // The key path is the user's (`--key`): a space in it would split the line.
    if let Some((field, problem)) = entry.problems().into_iter().next() {
        return Err(RenderError::Invalid {
            pool: id,
            field: if field == "sshKey" { "--key" } else { field },
            value: problem,
            why: "Nix would not read it back from the machines line as written",
        });
    }
    // What Nix will read back must be what was meant: parse the rendered line as Nix does before
    // it is used.
    let line = entry.to_string();
    if parse_file(&line) != [Ok(entry.clone())] {
        return Err(RenderError::Invalid {
            pool: id,
            field: "status",
            value: line,
            why: "the rendered machines line does not read back as written; report this with the pool's status",
        });
    }
    Ok(entry)
}
