//! The SSH server: each session's `exec` request is checked like the builder's gate checks it,
//! waits for a free slot (holding the client, with keepalives, for up to `--hold-seconds`), is
//! opened on that builder with the gateway's own key, and spliced through both ways. One log line
//! per session says who, where, how long and how many bytes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nixpool_api::rules::remote_command;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::server::{Auth, Handle, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, CryptoVec, client, server};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::keys;
use crate::route::Slots;

/// Everything the sessions share.
pub struct Gateway {
    pub slots: Mutex<Slots>,
    /// Signalled when a slot is given back.
    pub freed: Notify,
    pub authorized_keys: PathBuf,
    pub builder_key: Arc<PrivateKey>,
    /// Builders present the pool's host key too; the gateway accepts only that one.
    pub host_public: PublicKey,
    pub builder_user: String,
    pub hold: Duration,
}

/// One slot on one builder, given back when dropped.
struct SlotGuard {
    gw: Arc<Gateway>,
    index: usize,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.gw
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(self.index);
        self.gw.freed.notify_waiters();
    }
}

impl Gateway {
    /// Takes a slot, waiting up to the hold time for one to free up.
    async fn take_slot(self: &Arc<Self>) -> Option<(SlotGuard, String)> {
        let deadline = Instant::now() + self.hold;
        loop {
            let freed = self.freed.notified();
            {
                let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(index) = slots.take() {
                    let address = slots.builders[index].address.clone();
                    return Some((
                        SlotGuard {
                            gw: Arc::clone(self),
                            index,
                        },
                        address,
                    ));
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            // A bounded wait: a release between the check and here is seen within a second.
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), freed).await;
        }
    }
}

/// Runs the server until it fails.
pub async fn serve(gw: Arc<Gateway>, host_key: PrivateKey, listen: SocketAddr) -> anyhow::Result<()> {
    let config = Arc::new(server::Config {
        keys: vec![host_key],
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        // Keepalives keep a held session (and a quiet build) open; a client that stops
        // answering them is dropped after a minute.
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    });
    let mut server = Server(gw);
    info!(%listen, "listening");
    russh::server::Server::run_on_address(&mut server, config, listen)
        .await
        .context("the SSH server stopped")
}

#[derive(Clone)]
struct Server(Arc<Gateway>);

impl server::Server for Server {
    type Handler = Connection;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Connection {
        Connection {
            gw: Arc::clone(&self.0),
            peer,
            client: None,
        }
    }
}

struct Connection {
    gw: Arc<Gateway>,
    peer: Option<SocketAddr>,
    /// The authenticated key's fingerprint.
    client: Option<String>,
}

impl server::Handler for Connection {
    type Error = anyhow::Error;

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        let label = keys::label(key);
        let listed = std::fs::read_to_string(&self.gw.authorized_keys)
            .map(|text| keys::authorized(&text, key))
            .unwrap_or_else(|e| {
                warn!(file = %self.gw.authorized_keys.display(), error = %e, "cannot read the authorized keys; refusing every key");
                false
            });
        if listed && user == self.gw.builder_user {
            self.client = Some(label);
            Ok(Auth::Accept)
        } else {
            info!(peer = ?self.peer, key = %label, user, "login refused: not an authorized key of this pool, or not the builder user");
            Ok(Auth::Reject {
                proceed_with_methods: None,
                partial_success: false,
            })
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let gw = Arc::clone(&self.gw);
        let handle = session.handle();
        let client = self.client.clone().unwrap_or_default();
        tokio::spawn(async move {
            let id = channel.id();
            if let Err(e) = serve_channel(gw, channel, handle.clone(), &client).await {
                warn!(client, error = %format!("{e:#}"), "session failed");
                let _ = handle.close(id).await;
            }
        });
        Ok(true)
    }
}

/// Refuses a session as the builder's forced command would: the request is taken, the message
/// goes to the client's stderr, and the exit status is 1 (a failed request would hide the
/// message from the client).
async fn refuse(handle: &Handle, id: ChannelId, message: &str) {
    let _ = handle.channel_success(id).await;
    let _ = handle
        .extended_data(
            id,
            1,
            CryptoVec::from(format!("nixpool gateway: {message}\n").into_bytes()),
        )
        .await;
    let _ = handle.exit_status_request(id, 1).await;
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

async fn serve_channel(
    gw: Arc<Gateway>,
    mut channel: Channel<Msg>,
    handle: Handle,
    client: &str,
) -> anyhow::Result<()> {
    let id = channel.id();
    let command = loop {
        match channel.wait().await {
            Some(ChannelMsg::Exec { command, .. }) => break String::from_utf8_lossy(&command).into_owned(),
            Some(ChannelMsg::RequestShell { .. }) | Some(ChannelMsg::RequestSubsystem { .. }) => {
                info!(client, "session refused: a shell or subsystem was asked for");
                refuse(
                    &handle,
                    id,
                    "this pool only serves Nix remote builds (ssh-ng:// or ssh://); no shell",
                )
                .await;
                return Ok(());
            }
            Some(_) => continue,
            None => return Ok(()),
        }
    };
    let allowed = match remote_command(Some(&command)) {
        Ok(c) => c,
        Err(reason) => {
            info!(client, command, "session refused: not a Nix remote-build command");
            refuse(
                &handle,
                id,
                &format!("this pool only serves Nix remote builds; {reason}"),
            )
            .await;
            return Ok(());
        }
    };
    let waited = Instant::now();
    let Some((slot, address)) = gw.take_slot().await else {
        info!(
            client,
            held_ms = waited.elapsed().as_millis() as u64,
            "session refused: no builder slot freed up in time"
        );
        refuse(
            &handle,
            id,
            &format!("no builder was free within {} s; try again", gw.hold.as_secs()),
        )
        .await;
        return Ok(());
    };
    let held = waited.elapsed();
    let (_builder_session, builder) = match open_on_builder(&gw, &address, allowed.command_line()).await {
        Ok(b) => b,
        Err(e) => {
            drop(slot);
            refuse(
                &handle,
                id,
                &format!("the builder at {address} did not take the session: {e:#}"),
            )
            .await;
            return Err(e);
        }
    };
    let _ = handle.channel_success(id).await;
    let started = Instant::now();
    // The client's side is written through `handle`; the builder's through its write half.
    let (mut from_client, _client_write) = channel.split();
    let (mut from_builder, to_builder) = builder.split();
    let (mut up, mut down) = (0u64, 0u64);
    let mut client_open = true;
    loop {
        tokio::select! {
            m = from_client.wait(), if client_open => match m {
                Some(ChannelMsg::Data { data }) => {
                    up += data.len() as u64;
                    to_builder.data(&data[..]).await.context("forwarding to the builder")?;
                }
                Some(ChannelMsg::Eof) => to_builder.eof().await.context("forwarding EOF to the builder")?,
                None | Some(ChannelMsg::Close) => {
                    client_open = false;
                    let _ = to_builder.close().await;
                }
                _ => {}
            },
            m = from_builder.wait() => match m {
                Some(ChannelMsg::Data { data }) => {
                    down += data.len() as u64;
                    if handle.data(id, data).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    let _ = handle.extended_data(id, ext, data).await;
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    let _ = handle.exit_status_request(id, exit_status).await;
                }
                Some(ChannelMsg::Eof) => {
                    let _ = handle.eof(id).await;
                }
                None | Some(ChannelMsg::Close) => {
                    let _ = handle.close(id).await;
                    break;
                }
                _ => {}
            },
        }
    }
    info!(
        client,
        builder = %address,
        command = allowed.command_line(),
        held_ms = held.as_millis() as u64,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = up,
        bytes_down = down,
        "session done"
    );
    Ok(())
}

/// Accepts only the pool's host key from a builder.
struct BuilderHostKey(PublicKey);

impl client::Handler for BuilderHostKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        Ok(key.key_data() == self.0.key_data())
    }
}

/// Opens `command` on the builder at `address` with the gateway's key.
async fn open_on_builder(
    gw: &Gateway,
    address: &str,
    command: &str,
) -> anyhow::Result<(client::Handle<BuilderHostKey>, Channel<client::Msg>)> {
    let config = Arc::new(client::Config {
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(15)),
        ..Default::default()
    });
    let mut session = tokio::time::timeout(
        Duration::from_secs(10),
        client::connect(config, address, BuilderHostKey(gw.host_public.clone())),
    )
    .await
    .context("connecting timed out")?
    .context("connecting (is its host key the pool's?)")?;
    let auth = session
        .authenticate_publickey(
            gw.builder_user.clone(),
            PrivateKeyWithHashAlg::new(Arc::clone(&gw.builder_key), None),
        )
        .await?;
    if !auth.success() {
        bail!("it refused the gateway's key: add the gateway's public key to the pool's authorized keys");
    }
    let channel = session.channel_open_session().await?;
    channel.exec(true, command).await?;
    Ok((session, channel))
}
