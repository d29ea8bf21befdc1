//! Command line. Every setting is a flag with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use crate::route::Slots;
use crate::server::{Gateway, serve};

/// The pool's SSH front door. It presents the pool's host key, so clients' pinned machines lines
/// keep working. It lets in the pool's authorized keys (read at every login, so a revoked key
/// stops at once), and runs each Nix session (`nix-daemon --stdio`, `nix-store --serve`) on the
/// builder with the most free slots, with a key of its own. With every slot taken it holds the
/// session until one frees up.
#[derive(Parser, Debug)]
#[command(name = "nixpool-gateway", version)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = "NIXPOOL_GATEWAY_LISTEN", default_value = "0.0.0.0:22")]
    listen: SocketAddr,
    /// The pool's host key (OpenSSH private key file, the pool's host-key Secret).
    #[arg(long, env = "NIXPOOL_GATEWAY_HOST_KEY")]
    host_key: PathBuf,
    /// The pool's authorized keys (the file of the `<pool>-authorized-keys` ConfigMap).
    #[arg(long, env = "NIXPOOL_GATEWAY_AUTHORIZED_KEYS")]
    authorized_keys: PathBuf,
    /// The gateway's own private key; its public half must be one of the pool's authorized keys.
    #[arg(long, env = "NIXPOOL_GATEWAY_BUILDER_KEY")]
    builder_key: PathBuf,
    /// The user clients log in as, and the gateway logs in to builders as.
    #[arg(long, env = "NIXPOOL_GATEWAY_USER", default_value = "builder")]
    user: String,
    /// A builder, as HOST:PORT=SLOTS (SLOTS is its maxJobs). Repeat for each builder.
    #[arg(
        long = "builder",
        env = "NIXPOOL_GATEWAY_BUILDERS",
        value_delimiter = ',',
        required = true
    )]
    builders: Vec<String>,
    /// How long a session waits for a free builder slot before it is refused.
    #[arg(long, env = "NIXPOOL_GATEWAY_HOLD_SECONDS", default_value_t = 300)]
    hold_seconds: u64,
}

/// `HOST:PORT=SLOTS`.
fn parse_builder(s: &str) -> anyhow::Result<(String, u32)> {
    let (address, slots) = s
        .rsplit_once('=')
        .with_context(|| format!("--builder {s:?}: write HOST:PORT=SLOTS, e.g. 10.244.1.5:22=2"))?;
    let slots: u32 = slots
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("--builder {s:?}: SLOTS must be a positive number (the builder's maxJobs)"))?;
    if !address.contains(':') {
        anyhow::bail!("--builder {s:?}: give the port too, e.g. {address}:22={slots}");
    }
    Ok((address.to_string(), slots))
}

impl Cli {
    pub fn run(self) -> ExitCode {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,russh=warn".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
        match self.start() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nixpool-gateway: {e:#}");
                ExitCode::from(1)
            }
        }
    }

    fn start(self) -> anyhow::Result<()> {
        let builders = self
            .builders
            .iter()
            .map(|b| parse_builder(b))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let host_key = russh::keys::load_secret_key(&self.host_key, None).with_context(|| {
            format!(
                "--host-key {}: not an unencrypted OpenSSH private key",
                self.host_key.display()
            )
        })?;
        let builder_key = russh::keys::load_secret_key(&self.builder_key, None).with_context(|| {
            format!(
                "--builder-key {}: not an unencrypted OpenSSH private key",
                self.builder_key.display()
            )
        })?;
        std::fs::metadata(&self.authorized_keys)
            .with_context(|| format!("--authorized-keys {}: cannot read it", self.authorized_keys.display()))?;
        let gw = Arc::new(Gateway {
            slots: Mutex::new(Slots::new(builders)),
            freed: Default::default(),
            authorized_keys: self.authorized_keys,
            builder_key: Arc::new(builder_key),
            host_public: host_key.public_key().clone(),
            builder_user: self.user,
            hold: Duration::from_secs(self.hold_seconds),
        });
        let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
        runtime.block_on(serve(gw, host_key, self.listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_are_host_port_and_slots() {
        assert_eq!(parse_builder("10.0.0.1:22=2").unwrap(), ("10.0.0.1:22".into(), 2));
        assert_eq!(parse_builder("[::1]:2222=1").unwrap(), ("[::1]:2222".into(), 1));
        for bad in ["10.0.0.1:22", "10.0.0.1=2", "10.0.0.1:22=0", "10.0.0.1:22=x"] {
            let e = parse_builder(bad).unwrap_err().to_string();
            assert!(e.contains("--builder"), "{e}");
        }
    }
}
