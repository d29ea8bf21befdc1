//! builderctl: puts a nixpool builder pool into a developer's Nix (`/etc/nix/machines`, an ssh
//! drop-in, a key) and says what is wrong when builds do not reach it (`doctor`).
//!
//! The pure parts (rendering a pool's machines line, merging it into an existing file, the
//! ssh_config drop-in, the nix-darwin snippet) are functions of their inputs and are tested
//! with golden files; the I/O parts (the cluster, the atomic write, ssh and nix) are thin.

pub mod asuser;
pub mod cli;
pub mod darwin;
pub mod diff;
pub mod doctor;
pub mod fsio;
pub mod keygen;
pub mod merge;
pub mod nixsetup;
pub mod render;
pub mod source;
pub mod sshconfig;
pub mod status;
pub mod tunnel;

/// Default paths. Every one of them is a flag, so tests (and unusual setups) can move them.
pub mod defaults {
    pub const MACHINES_FILE: &str = "/etc/nix/machines";
    pub const NIX_CONF: &str = "/etc/nix/nix.conf";
    pub const KEY: &str = "/etc/nix/nixpool_ed25519";
    pub const ETC_STATIC: &str = "/etc/static";
    pub const SSH_CONFIG_DIR: &str = "/etc/ssh/ssh_config.d";
    pub const KNOWN_HOSTS_DIR: &str = "/etc/ssh";
    pub const LAUNCH_DAEMONS: &str = crate::nixsetup::LAUNCH_DAEMONS;
    /// doctor's overall time limit, seconds.
    pub const DOCTOR_TIMEOUT: u64 = 60;
}
