//! The SSH server: each session's `exec` request is checked like the builder's gate checks it,
//! waits for a free slot (holding the client, with keepalives, for up to `--hold-seconds`), is
//! opened on that builder with the gateway's own key, and spliced through both ways. One log line
//! per session says who, where, how long, on how many builders it was tried and how many bytes.
//!
//! # A session, step by step
//!
//! 1. The `exec` request is checked ([`remote_command`]); a shell, a subsystem or another
//!    command is refused with a message on stderr and exit status 1.
//! 2. It takes a slot on the builder with the most free slots ([`Slots::take`]), or is held
//!    until one frees up. What the client sends meanwhile is kept (up to [`EARLY_BYTES`]; past
//!    that the gateway stops reading from the client).
//! 3. The key is checked against the pool's file once more, and the gateway logs in to the
//!    builder. On the builder's channel it sends the `env` request
//!    `NIXPOOL_GATE_SLOTS=<the builder's slots>` ([`GATE_SLOTS_ENV`]), then the client's command.
//!    Once the first builder has taken the `exec` request, the client's request is answered
//!    with success (never twice). A builder that cannot be reached or does not take the command
//!    (connection refused, as from a builder that has just started draining; handshake, login
//!    or `exec` failed) has seen none of the client's bytes: it is passed over as in step 4.
//! 4. **Started or busy.** The kept client bytes go to the builder, and so does what the client
//!    sends next (kept too, up to the same bound). What the builder says is kept back ([`Kept`])
//!    until it is clear whether the session started there. Both Nix protocols have the client
//!    speak first, so the builder's first stdout byte means it started. So does an exit status
//!    other than [`BUSY_STATUS`] (a genuine failure: the client gets its stderr and status, as
//!    from the builder itself), or more stderr than a refusal writes. An exit status of
//!    [`BUSY_STATUS`] means the builder's gate counted all its slots in use (the gateways'
//!    counts lagged behind each other, see `route`); a close, a signal or a lost connection
//!    before any answer means it died. Either way its stderr is dropped, the slot is given back,
//!    the builder is passed over for a while ([`Slots::refused`]), and the session goes back
//!    to step 2: the next builder with a free slot gets the kept bytes, or the session is held
//!    within what is left of the same `--hold-seconds`. The client sees none of this (no stderr
//!    line, only the time the try took).
//! 5. **Spliced.** The kept-back builder messages go to the client first, then data, stderr,
//!    the exit status, EOF and close pass through both ways until the builder closes.
//!
//! # Limits and memory
//!
//! The gateway's memory is bounded by `--max-connections` (connections beyond it are closed at
//! once, before any SSH byte) times what one connection may hold:
//! - the connection: russh's session state and packet buffers (a packet is at most 256 KiB;
//!   in practice about 100 KiB with its key-exchange state);
//! - at most [`MAX_SESSIONS_PER_CONNECTION`] sessions (OpenSSH's `MaxSessions` default), each
//!   with four queues of at most [`CHANNEL_BUFFER`] messages of at most [`MAX_PACKET`] bytes (per
//!   direction, russh's own and the splice's: 4 × 16 × 32 KiB = 2 MiB), plus up to [`EARLY_BYTES`]
//!   the client sent before a builder started the session (one packet more at most), up to
//!   [`EARLY_STDERR`] of the builder's stderr kept back meanwhile (64 KiB: within the rounding
//!   below), and at most the client's SSH window of the builder's output on its way out
//!   (OpenSSH's window is 2 MiB): output to the client waits for its window, so a slow client
//!   holds the builder back rather than filling the gateway.
//!
//! So at most about 1000 × (0.1 + 10 × 4.25) MiB; a pool's clients open one session per
//! connection in practice (at most about 4.4 MiB each, 4.4 GiB at the default limit). A
//! connection that has not logged in within [`AUTH_TIMEOUT`] is closed, so silent or slow
//! connections cannot hold the limit for long; a logged-in connection that stops answering
//! keepalives is closed within a minute.
//!
//! russh replenishes a channel's window when a packet arrives, not when it is read, and stops
//! reading the whole connection while one channel's queue is full. The splice therefore reads
//! each side on its own, so one direction waiting for its window never stops the other from
//! being read. A peer that saturates both directions of a session at once (an echo) can still
//! stall it; Nix's protocols move bulk data one way at a time (paths up, then outputs down).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::task::AtomicWaker;
use nixpool_api::demand::GatewayReport;
use nixpool_api::rules::remote_command;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::server::{Auth, Handle, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, CryptoVec, client, server};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::health::{BuilderLabel, Metrics, Readiness, StateLabel};
use crate::route::Slots;
use crate::{demand, keys};

/// A connection that has not logged in by then is closed.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(20);
/// Sessions (channels) one connection may have open at once.
pub const MAX_SESSIONS_PER_CONNECTION: usize = 10;
/// Messages queued per channel and direction before the sender waits.
pub const CHANNEL_BUFFER: usize = 16;
/// The largest SSH packet the gateway accepts or sends on a channel.
pub const MAX_PACKET: u32 = 32 * 1024;
/// Bytes a held client may send before it gets a slot (Nix sends a few to start its protocol);
/// past that, the gateway stops reading until the session starts.
pub const EARLY_BYTES: usize = 256 * 1024;
/// The `env` request that asks the builder's gate to count its slots: the value is the
/// builder's slots (the pool's maxJobs, or SLOTS of a static `--builder`).
pub const GATE_SLOTS_ENV: &str = "NIXPOOL_GATE_SLOTS";
/// The exit status of a builder's gate that refuses a session because all its slots are in use
/// (`EX_TEMPFAIL`). It writes no stdout byte before it.
pub const BUSY_STATUS: u32 = 75;
/// Stderr a builder may write before its first stdout byte that the gateway keeps back. A
/// refusal is one line; past this, the session counts as started there.
pub const EARLY_STDERR: usize = 64 * 1024;
/// How long a builder may take to answer the client's first bytes. Both Nix protocols answer the
/// client's hello at once; a builder silent for this long is stuck, and the session is tried on
/// the next one instead of waiting on it for ever.
pub const FIRST_ANSWER: Duration = Duration::from_secs(30);

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The settings the sessions need.
pub struct Settings {
    pub authorized_keys: PathBuf,
    pub builder_key: Arc<PrivateKey>,
    /// Builders present the pool's host key too; the gateway accepts only that one.
    pub host_public: PublicKey,
    pub builder_user: String,
    pub hold: Duration,
    /// Slots of each discovered builder.
    pub slots_per_builder: u32,
    pub max_connections: usize,
}

/// What changes under the lock.
struct State {
    slots: Slots,
    /// Sessions held for a slot.
    waiting: u32,
    /// Builders with `builder_slots_used` and `builder_slots_used_elsewhere` series.
    exported: Vec<String>,
}

/// Everything the sessions share.
pub struct Gateway {
    pub settings: Settings,
    state: Mutex<State>,
    /// Signalled when a slot is given back or the builders change: held sessions look again.
    freed: Notify,
    /// Signalled on every change of the demand report.
    pub changed: Notify,
    pub metrics: Metrics,
    pub ready: Arc<Readiness>,
    /// Open connections, against `--max-connections`.
    connections: AtomicUsize,
    /// Open sessions (channels); the process exits after SIGTERM when it is 0.
    pub sessions: watch::Sender<usize>,
}

impl Gateway {
    pub fn new(settings: Settings, slots: Slots, metrics: Metrics, ready: Arc<Readiness>) -> Self {
        let gw = Self {
            settings,
            state: Mutex::new(State {
                slots,
                waiting: 0,
                exported: Vec::new(),
            }),
            freed: Notify::new(),
            changed: Notify::new(),
            metrics,
            ready,
            connections: AtomicUsize::new(0),
            sessions: watch::Sender::new(0),
        };
        gw.publish(&mut gw.lock());
        gw
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the metrics up to date and wakes the demand writer. Called after every change.
    fn publish(&self, st: &mut State) {
        let m = &self.metrics;
        m.sessions_open
            .get_or_create(&StateLabel { state: "waiting" })
            .set(st.waiting.into());
        m.sessions_open
            .get_or_create(&StateLabel { state: "active" })
            .set(st.slots.used().into());
        m.builders.set(st.slots.ready().count() as i64);
        let names: Vec<String> = st.slots.builders().map(|(n, _)| n.to_string()).collect();
        for (name, b) in st.slots.builders() {
            let label = BuilderLabel {
                builder: name.to_string(),
            };
            m.builder_slots_used.get_or_create(&label).set(b.used.into());
            m.builder_slots_used_elsewhere
                .get_or_create(&label)
                .set(st.slots.elsewhere(name).into());
        }
        for dropped in st.exported.iter().filter(|n| !names.contains(n)) {
            let label = BuilderLabel {
                builder: dropped.clone(),
            };
            m.builder_slots_used.remove(&label);
            m.builder_slots_used_elsewhere.remove(&label);
            m.builder_busy.remove(&label);
        }
        st.exported = names;
        self.changed.notify_one();
    }

    /// Makes `ready` (`(pod name, address)`) the builders new sessions go to, and wakes held
    /// sessions.
    pub fn set_builders(&self, ready: impl IntoIterator<Item = (String, String)>) {
        let (change, names) = {
            let mut st = self.lock();
            let change = st.slots.replace(ready, self.settings.slots_per_builder, now_unix());
            self.publish(&mut st);
            let names: Vec<String> = st.slots.ready().map(|(n, _)| n.to_string()).collect();
            (change, names)
        };
        if !change.is_empty() {
            info!(added = ?change.added, gone = ?change.gone, builders = ?names, "the builders changed");
            self.freed.notify_waiters();
        }
    }

    /// Sets the sessions the other gateways run on each builder (by builder name) and this
    /// gateway's rank among them; wakes held sessions when one of theirs ended.
    pub fn set_elsewhere(&self, elsewhere: BTreeMap<String, u32>, rank: usize) {
        let freed = {
            let mut st = self.lock();
            let freed = st.slots.set_elsewhere(elsewhere, rank);
            self.publish(&mut st);
            freed
        };
        if freed {
            self.freed.notify_waiters();
        }
    }

    /// The demand report as of now.
    pub fn report(&self, at: i64) -> GatewayReport {
        let st = self.lock();
        demand::report(&st.slots, st.waiting, at)
    }
}

/// One slot on one builder, given back when dropped.
struct SlotGuard {
    gw: Arc<Gateway>,
    name: String,
    /// The builder refused the session: all its slots were in use.
    full: bool,
}

impl SlotGuard {
    /// Gives the slot back and passes the builder over for a while: it refused the session.
    fn refused(mut self) {
        self.full = true;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut st = self.gw.lock();
        if self.full {
            st.slots.refused(&self.name, now_unix(), Instant::now());
        } else {
            st.slots.release(&self.name, now_unix());
        }
        self.gw.publish(&mut st);
        drop(st);
        self.gw.freed.notify_waiters();
    }
}

/// Counts a session as waiting until it takes a slot or is dropped.
struct Waiting {
    gw: Arc<Gateway>,
    counted: bool,
}

impl Waiting {
    fn new(gw: &Arc<Gateway>) -> Self {
        let mut st = gw.lock();
        st.waiting += 1;
        gw.publish(&mut st);
        Self {
            gw: Arc::clone(gw),
            counted: true,
        }
    }

    /// No longer waiting: counted under the same lock as the slot it took, so no report shows
    /// the session twice.
    fn done(&mut self, st: &mut State) {
        if std::mem::take(&mut self.counted) {
            st.waiting = st.waiting.saturating_sub(1);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.counted {
            let mut st = self.gw.lock();
            st.waiting = st.waiting.saturating_sub(1);
            self.gw.publish(&mut st);
        }
    }
}

/// How a hold ended.
enum Held {
    /// A slot, the builder's address and its slots.
    Slot(SlotGuard, String, u32),
    TimedOut,
    ClientLeft,
}

/// What the client sent before a builder started the session: forwarded to each builder
/// tried first, and kept for the next one until one starts it.
#[derive(Default)]
struct Early {
    data: Vec<Vec<u8>>,
    bytes: usize,
    eof: bool,
}

impl Gateway {
    /// Whether `key` is in the pool's authorized-keys file now (read at each call, so a removal
    /// counts at once). An unreadable file authorizes no one.
    fn still_authorized(&self, key: &PublicKey) -> bool {
        let file = &self.settings.authorized_keys;
        std::fs::read_to_string(file)
            .map(|text| keys::authorized(&text, key))
            .unwrap_or_else(|e| {
                warn!(file = %file.display(), error = %e, "cannot read the authorized keys; refusing every key");
                false
            })
    }

    /// Takes a slot, waiting until `deadline` for one to free up (or a builder to appear).
    /// Meanwhile it keeps what the client sends, and notices when the client leaves.
    async fn take_slot(self: &Arc<Self>, channel: &mut Channel<Msg>, early: &mut Early, deadline: Instant) -> Held {
        let mut waiting: Option<Waiting> = None;
        loop {
            let freed = self.freed.notified();
            {
                let mut st = self.lock();
                // A builder that refused a session is tried again after FULL_FOR: the bounded
                // wait below notices within a second.
                st.slots.expire(Instant::now());
                if let Some((name, address)) = st.slots.take() {
                    let slots = st.slots.get(&name).map_or(1, |b| b.slots);
                    if let Some(w) = waiting.as_mut() {
                        w.done(&mut st);
                    }
                    self.publish(&mut st);
                    drop(st);
                    let guard = SlotGuard {
                        gw: Arc::clone(self),
                        name,
                        full: false,
                    };
                    return Held::Slot(guard, address, slots);
                }
            }
            if waiting.is_none() {
                waiting = Some(Waiting::new(self));
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Held::TimedOut;
            };
            tokio::select! {
                // Release and builder changes notify; the bounded wait is a safety net.
                _ = freed => {}
                () = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                // Read on after EOF too: a client that leaves must not stay counted as waiting.
                m = channel.wait(), if early.bytes < EARLY_BYTES => match m {
                    None | Some(ChannelMsg::Close) => return Held::ClientLeft,
                    Some(ChannelMsg::Data { data }) if !early.eof => {
                        early.bytes += data.len();
                        early.data.push(data.to_vec());
                    }
                    Some(ChannelMsg::Eof) => early.eof = true,
                    Some(_) => {}
                },
            }
        }
    }
}

/// The SSH server's settings.
pub fn ssh_config(host_key: PrivateKey) -> Arc<server::Config> {
    Arc::new(server::Config {
        keys: vec![host_key],
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        // Keepalives keep a held session (and a quiet build) open; a client that stops
        // answering them is dropped after a minute.
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        channel_buffer_size: CHANNEL_BUFFER,
        maximum_packet_size: MAX_PACKET,
        ..Default::default()
    })
}

/// Accepts connections until the future returns: each is served on a task of its own (so the
/// sessions outlive the listener); beyond `--max-connections` a new one is closed at once.
pub async fn accept(
    gw: Arc<Gateway>,
    config: Arc<server::Config>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    // Refusals are logged at most every 10 s, with how many there were.
    let mut refused = 0u64;
    let mut refusal_logged: Option<Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let open = gw.connections.load(Ordering::SeqCst);
        if open >= gw.settings.max_connections {
            gw.metrics.connections_refused.inc();
            refused += 1;
            if refusal_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                info!(%peer, open, refused, "connection closed at once: --max-connections are open");
                refusal_logged = Some(Instant::now());
                refused = 0;
            }
            drop(tcp);
            continue;
        }
        let open = Open::new(&gw);
        tokio::spawn(connection(Arc::clone(&gw), Arc::clone(&config), tcp, peer, open));
    }
}

/// Counts a connection as open while it lives.
struct Open(Arc<Gateway>);

impl Open {
    fn new(gw: &Arc<Gateway>) -> Self {
        let n = gw.connections.fetch_add(1, Ordering::SeqCst) + 1;
        gw.metrics.connections.set(n as i64);
        Self(Arc::clone(gw))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let n = self.0.connections.fetch_sub(1, Ordering::SeqCst) - 1;
        self.0.metrics.connections.set(n as i64);
    }
}

/// Serves one connection; closes it if it has not logged in within [`AUTH_TIMEOUT`].
async fn connection(gw: Arc<Gateway>, config: Arc<server::Config>, tcp: TcpStream, peer: SocketAddr, _open: Open) {
    let _ = tcp.set_nodelay(true);
    let cut = Arc::new(Cut::default());
    let logged_in = Arc::new(AtomicBool::new(false));
    let handler = Connection {
        gw,
        peer,
        client: None,
        client_key: None,
        logged_in: Arc::clone(&logged_in),
        sessions: Arc::new(AtomicUsize::new(0)),
    };
    let stream = Cuttable {
        inner: tcp,
        cut: Arc::clone(&cut),
    };
    let run = async move { server::run_stream(config, stream, handler).await?.await };
    let mut run = std::pin::pin!(run);
    let result = tokio::select! {
        r = &mut run => r,
        () = tokio::time::sleep(AUTH_TIMEOUT) => {
            if !logged_in.load(Ordering::SeqCst) {
                info!(%peer, "connection closed: no login within {} s", AUTH_TIMEOUT.as_secs());
                cut.cut();
            }
            run.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %format!("{e:#}"), "connection ended");
    }
}

/// Lets the gateway cut a connection whatever russh is waiting for (a read, a write, the
/// client's banner).
#[derive(Default)]
struct Cut {
    cut: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Cut {
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> std::io::Result<()> {
        waker.register(cx.waker());
        if self.cut.load(Ordering::SeqCst) {
            Err(std::io::ErrorKind::ConnectionAborted.into())
        } else {
            Ok(())
        }
    }
}

/// A TCP stream that fails every read and write once cut.
struct Cuttable {
    inner: TcpStream,
    cut: Arc<Cut>,
}

impl AsyncRead for Cuttable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.cut.check(&self.cut.read, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Err(e) = self.cut.check(&self.cut.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Err(e) = self.cut.check(&self.cut.write, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.cut.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Connection {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    /// The authenticated key's fingerprint.
    client: Option<String>,
    /// The authenticated key, checked again when a held session gets its slot.
    client_key: Option<PublicKey>,
    logged_in: Arc<AtomicBool>,
    /// Sessions open on this connection.
    sessions: Arc<AtomicUsize>,
}

/// Counts a session (channel) as open, on its connection and in the gateway, while it lives.
struct Serving {
    gw: Arc<Gateway>,
    on_connection: Arc<AtomicUsize>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.on_connection.fetch_sub(1, Ordering::SeqCst);
        self.gw.sessions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl server::Handler for Connection {
    type Error = anyhow::Error;

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        let label = keys::label(key);
        let reject = Auth::Reject {
            proceed_with_methods: None,
            partial_success: false,
        };
        if key.key_data() == self.gw.settings.builder_key.public_key().key_data() {
            self.gw.metrics.logins_refused.inc();
            info!(peer = %self.peer, key = %label, user, "login refused: that is the gateway's own key (it logs in to builders with it); a client needs a key of its own");
            return Ok(reject);
        }
        if self.gw.still_authorized(key) && user == self.gw.settings.builder_user {
            self.client = Some(label);
            self.client_key = Some(key.clone());
            self.logged_in.store(true, Ordering::SeqCst);
            Ok(Auth::Accept)
        } else {
            self.gw.metrics.logins_refused.inc();
            info!(peer = %self.peer, key = %label, user, "login refused: not an authorized key of this pool, or not the builder user");
            Ok(reject)
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let client = self.client.clone().unwrap_or_default();
        let client_key = self.client_key.clone();
        if self.sessions.load(Ordering::SeqCst) >= MAX_SESSIONS_PER_CONNECTION {
            info!(client, peer = %self.peer, max = MAX_SESSIONS_PER_CONNECTION, "session refused: too many sessions on one connection");
            return Ok(false);
        }
        self.sessions.fetch_add(1, Ordering::SeqCst);
        self.gw.sessions.send_modify(|n| *n += 1);
        let serving = Serving {
            gw: Arc::clone(&self.gw),
            on_connection: Arc::clone(&self.sessions),
        };
        let gw = Arc::clone(&self.gw);
        let handle = session.handle();
        tokio::spawn(async move {
            serve_channel(&gw, channel, handle, &client, client_key.as_ref()).await;
            drop(serving);
        });
        Ok(true)
    }
}

/// Refuses a session as the builder's forced command would: the request is taken, the message
/// goes to the client's stderr, and the exit status is 1 (a failed request would hide the
/// message from the client).
async fn refuse(handle: &Handle, id: ChannelId, message: &str) {
    let _ = handle.channel_success(id).await;
    end_with(handle, id, message).await;
}

/// Ends a session whose request was answered already: the message goes to the client's stderr,
/// and the exit status is 1.
async fn end_with(handle: &Handle, id: ChannelId, message: &str) {
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

/// Serves one session. An error is the builder's (connecting to it, or forwarding to it).
async fn serve_channel(
    gw: &Arc<Gateway>,
    mut channel: Channel<Msg>,
    handle: Handle,
    client: &str,
    client_key: Option<&PublicKey>,
) {
    let id = channel.id();
    let command = loop {
        match channel.wait().await {
            Some(ChannelMsg::Exec { command, .. }) => break String::from_utf8_lossy(&command).into_owned(),
            Some(ChannelMsg::RequestShell { .. }) | Some(ChannelMsg::RequestSubsystem { .. }) => {
                gw.metrics.ended("refused_command");
                info!(client, "session refused: a shell or subsystem was asked for");
                refuse(
                    &handle,
                    id,
                    "this pool only serves Nix remote builds (ssh-ng:// or ssh://); no shell",
                )
                .await;
                return;
            }
            Some(_) => continue,
            None => return,
        }
    };
    let allowed = match remote_command(Some(&command)) {
        Ok(c) => c,
        Err(reason) => {
            gw.metrics.ended("refused_command");
            info!(client, command, "session refused: not a Nix remote-build command");
            refuse(
                &handle,
                id,
                &format!("this pool only serves Nix remote builds; {reason}"),
            )
            .await;
            return;
        }
    };
    let waited = Instant::now();
    let deadline = waited + gw.settings.hold;
    let mut early = Early::default();
    // Builders the session was tried on; the client's request is answered once the first
    // builder has taken the command (`answered`), never twice.
    let mut tries = 0u32;
    let mut answered = false;
    // Why the last builder that could not be reached did not take the session, for the
    // client's message if no builder does in time.
    let mut unreachable: Option<String> = None;
    let (slot, address, held, _builder_session, mut from_builder, to_builder, kept) = loop {
        let (slot, address, slots) = match gw.take_slot(&mut channel, &mut early, deadline).await {
            Held::Slot(slot, address, slots) => (slot, address, slots),
            Held::TimedOut => {
                gw.metrics.ended("hold_timeout");
                info!(
                    client,
                    held_ms = waited.elapsed().as_millis() as u64,
                    tries,
                    "session refused: no builder slot freed up in time"
                );
                let mut message = format!("no builder was free within {} s; try again", gw.settings.hold.as_secs());
                if let Some(why) = &unreachable {
                    message.push_str(&format!(" (the last builder tried could not be reached: {why})"));
                }
                if !answered {
                    refuse(&handle, id, &message).await;
                } else {
                    end_with(&handle, id, &message).await;
                }
                return;
            }
            Held::ClientLeft => {
                gw.metrics.ended("abandoned");
                info!(
                    client,
                    held_ms = waited.elapsed().as_millis() as u64,
                    tries,
                    "session abandoned: the client left while it was held"
                );
                return;
            }
        };
        let held = waited.elapsed();
        // A key removed from the pool while its session was held does not get to build.
        if !client_key.is_some_and(|k| gw.still_authorized(k)) {
            drop(slot);
            gw.metrics.queue_wait_seconds.observe(held.as_secs_f64());
            gw.metrics.ended("key_revoked");
            info!(
                client,
                held_ms = held.as_millis() as u64,
                "session refused: the key was removed from the pool while the session was held"
            );
            let message = "your key was removed from this pool's authorized keys";
            if !answered {
                refuse(&handle, id, message).await;
            } else {
                end_with(&handle, id, message).await;
            }
            return;
        }
        let name = slot.name.clone();
        tries += 1;
        let opened = open_on_builder(gw, &address, slots, allowed.command_line()).await;
        let (builder_session, builder) = match opened {
            Ok(b) => b,
            Err(e) => {
                // Nothing of the client's reached it (a builder that has just started draining
                // refuses connections before its pod is seen terminating): the next one gets
                // the session, within the same hold.
                gw.metrics
                    .builder_unreachable
                    .get_or_create(&BuilderLabel { builder: name.clone() })
                    .inc();
                warn!(
                    client,
                    builder = %name,
                    address = %address,
                    tries,
                    "the builder did not take the session: {e:#}; trying the next one"
                );
                unreachable = Some(format!("{name}: {e:#}"));
                slot.refused();
                continue;
            }
        };
        if !answered {
            answered = true;
            let _ = handle.channel_success(id).await;
        }
        match try_builder(&mut channel, builder, &mut early).await {
            Tried::Started(from_builder, to_builder, kept) => {
                break (slot, address, held, builder_session, from_builder, to_builder, kept);
            }
            Tried::Refused(Start::Busy) => {
                gw.metrics
                    .builder_busy
                    .get_or_create(&BuilderLabel { builder: name.clone() })
                    .inc();
                info!(
                    client,
                    builder = %name,
                    address = %address,
                    tries,
                    "the builder refused the session: all its slots are in use; trying the next one"
                );
                slot.refused();
            }
            Tried::Refused(Start::Silent) => {
                warn!(
                    client,
                    builder = %name,
                    address = %address,
                    tries,
                    "the builder did not answer within {} s; trying the next one",
                    FIRST_ANSWER.as_secs()
                );
                slot.refused();
            }
            Tried::Refused(_) => {
                warn!(
                    client,
                    builder = %name,
                    address = %address,
                    tries,
                    "the builder's session ended before it answered; trying the next one"
                );
                slot.refused();
            }
            Tried::ClientLeft => {
                drop(slot);
                gw.metrics.queue_wait_seconds.observe(held.as_secs_f64());
                gw.metrics.ended("abandoned");
                info!(
                    client,
                    builder = %name,
                    held_ms = held.as_millis() as u64,
                    tries,
                    "session abandoned: the client left before the builder answered"
                );
                return;
            }
        }
    };
    gw.metrics.queue_wait_seconds.observe(held.as_secs_f64());
    let name = slot.name.clone();
    let started = Instant::now();
    // The client's side is written through `handle`; the builder's through its write half.
    // Both go through the channel's halves, which wait for the peer's SSH window: a slow client
    // holds the builder's output back at the builder, not in the gateway's memory.
    let (mut from_client, to_client) = channel.split();
    let mut up = early.bytes as u64;
    drop(early);
    let mut down = 0u64;
    // What the builder said before it was known to have started goes first.
    let mut builder_open = true;
    for m in kept {
        if !pass_down(&to_client, Some(m), &mut down).await {
            builder_open = false;
            break;
        }
    }
    // Each direction is a reader and a writer with a bounded queue between them. A russh
    // connection reads the peer's packets (window adjustments too) on one loop that waits while
    // a channel's queue is full, so a writer waiting for one side's window must not stop the
    // other side's queue from being read (the module's notes say what is left). The session
    // ends when the builder's side does.
    if builder_open {
        let (up_tx, mut up_rx) = tokio::sync::mpsc::channel(CHANNEL_BUFFER);
        let (down_tx, mut down_rx) = tokio::sync::mpsc::channel(CHANNEL_BUFFER);
        let read_up = pump(&mut from_client, up_tx);
        let read_down = pump(&mut from_builder, down_tx);
        let write_up = async {
            while let Some(m) = up_rx.recv().await {
                match m {
                    Some(ChannelMsg::Data { data }) => {
                        up += data.len() as u64;
                        if to_builder.data(&data[..]).await.is_err() {
                            break;
                        }
                    }
                    Some(ChannelMsg::Eof) => {
                        let _ = to_builder.eof().await;
                    }
                    None | Some(ChannelMsg::Close) => {
                        let _ = to_builder.close().await;
                        break;
                    }
                    Some(_) => {}
                }
            }
            // Nothing more goes up; the builder's side ends the session.
            std::future::pending::<()>().await
        };
        let write_down = async {
            while let Some(m) = down_rx.recv().await {
                if !pass_down(&to_client, m, &mut down).await {
                    break;
                }
            }
        };
        tokio::select! {
            () = read_up => {}
            () = read_down => {}
            () = write_up => {}
            () = write_down => {}
        }
    }
    drop(slot);
    gw.metrics.ended("done");
    info!(
        client,
        builder = %name,
        address = %address,
        command = allowed.command_line(),
        held_ms = held.as_millis() as u64,
        tries,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = up,
        bytes_down = down,
        "session done"
    );
}

/// Moves one side's messages into `queue` until that side closes; then waits for ever (the
/// session's end is the builder's side, written down by the other half).
async fn pump(from: &mut ChannelReadHalf, queue: tokio::sync::mpsc::Sender<Option<ChannelMsg>>) {
    loop {
        let m = from.wait().await;
        let end = matches!(m, None | Some(ChannelMsg::Close));
        if queue.send(m).await.is_err() || end {
            break;
        }
    }
    std::future::pending::<()>().await
}

/// Passes one of the builder's messages on to the client; false once the session is over.
/// Data waits for the client's window.
async fn pass_down(to_client: &ChannelWriteHalf<Msg>, m: Option<ChannelMsg>, down: &mut u64) -> bool {
    match m {
        Some(ChannelMsg::Data { data }) => {
            *down += data.len() as u64;
            to_client.data(&data[..]).await.is_ok()
        }
        Some(ChannelMsg::ExtendedData { data, ext }) => {
            let _ = to_client.extended_data(ext, &data[..]).await;
            true
        }
        Some(ChannelMsg::ExitStatus { exit_status }) => {
            let _ = to_client.exit_status(exit_status).await;
            true
        }
        Some(ChannelMsg::Eof) => {
            let _ = to_client.eof().await;
            true
        }
        None | Some(ChannelMsg::Close) => {
            let _ = to_client.close().await;
            false
        }
        Some(_) => true,
    }
}

/// What a builder's session has shown before its first stdout byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// Nothing that decides it yet.
    Waiting,
    /// It started there: stdout, an exit status other than [`BUSY_STATUS`] (a genuine failure,
    /// which the client gets as it is), or more stderr than a refusal writes.
    Started,
    /// Its gate refused the session: all its slots are in use.
    Busy,
    /// It ended without an answer: closed, killed by a signal, or the connection was lost.
    Died,
    /// It did not answer the client's first bytes within [`FIRST_ANSWER`].
    Silent,
}

/// The builder's messages, kept back until it is known whether the session started there.
#[derive(Debug, Default)]
struct Kept {
    msgs: Vec<ChannelMsg>,
    stderr: usize,
}

impl Kept {
    /// Takes the builder's next message (`None`: its connection is gone) and says what is known.
    /// Every message but the one that says busy or died is kept, to go to the client if the
    /// session started.
    fn push(&mut self, m: Option<ChannelMsg>) -> Start {
        match m {
            None | Some(ChannelMsg::Close) | Some(ChannelMsg::ExitSignal { .. }) => Start::Died,
            Some(ChannelMsg::ExitStatus {
                exit_status: BUSY_STATUS,
            }) => Start::Busy,
            Some(m @ (ChannelMsg::Data { .. } | ChannelMsg::ExitStatus { .. })) => {
                self.msgs.push(m);
                Start::Started
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                self.stderr += data.len();
                self.msgs.push(ChannelMsg::ExtendedData { data, ext });
                if self.stderr > EARLY_STDERR {
                    Start::Started
                } else {
                    Start::Waiting
                }
            }
            // EOF, the reply to `exec`, window changes: passed on (or ignored) in order later.
            Some(m) => {
                self.msgs.push(m);
                Start::Waiting
            }
        }
    }
}

/// How a try on one builder ended.
enum Tried {
    /// The session started there: the builder channel's halves, and what it said so far.
    Started(ChannelReadHalf, ChannelWriteHalf<client::Msg>, Vec<ChannelMsg>),
    /// [`Start::Busy`] or [`Start::Died`]: what it said is dropped.
    Refused(Start),
    ClientLeft,
}

/// Runs the session on `builder` until it is known whether it started there. What the client
/// sent so far goes first; what it sends meanwhile goes to the builder and is kept too (up to
/// [`EARLY_BYTES`]; past that the client is not read from), for the next builder if this one
/// is busy. What the builder says is kept back ([`Kept`]).
async fn try_builder(client: &mut Channel<Msg>, builder: Channel<client::Msg>, early: &mut Early) -> Tried {
    let (mut from_builder, to_builder) = builder.split();
    // Writes to a builder that has gone fail; its next messages say so, hence no error here.
    for data in &early.data {
        let _ = to_builder.data(&data[..]).await;
    }
    if early.eof {
        let _ = to_builder.eof().await;
    }
    let mut kept = Kept::default();
    // From the client's first byte on, the builder must answer within FIRST_ANSWER. A client
    // that sends nothing gets its builder as it is: there is nothing to replay elsewhere.
    let answer_by = |early: &Early| (early.bytes > 0).then(|| tokio::time::Instant::now() + FIRST_ANSWER);
    let mut deadline = answer_by(early);
    loop {
        tokio::select! {
            () = sleep_until_some(deadline) => return Tried::Refused(Start::Silent),
            m = client.wait(), if early.bytes < EARLY_BYTES => match m {
                None | Some(ChannelMsg::Close) => {
                    let _ = to_builder.close().await;
                    return Tried::ClientLeft;
                }
                Some(ChannelMsg::Data { data }) if !early.eof => {
                    let _ = to_builder.data(&data[..]).await;
                    early.bytes += data.len();
                    early.data.push(data.to_vec());
                    deadline = deadline.or_else(|| answer_by(early));
                }
                Some(ChannelMsg::Eof) if !early.eof => {
                    early.eof = true;
                    let _ = to_builder.eof().await;
                }
                Some(_) => {}
            },
            m = from_builder.wait() => match kept.push(m) {
                Start::Waiting => {}
                Start::Started => return Tried::Started(from_builder, to_builder, kept.msgs),
                refused => return Tried::Refused(refused),
            },
        }
    }
}

/// Sleeps until `deadline`; never returns without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Accepts only the pool's host key from a builder.
struct BuilderHostKey(PublicKey);

impl client::Handler for BuilderHostKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        Ok(key.key_data() == self.0.key_data())
    }
}

/// Opens `command` on the builder at `address` with the gateway's key, asking its gate to count
/// its `slots` (no reply asked: a builder without the gate ignores it).
async fn open_on_builder(
    gw: &Gateway,
    address: &str,
    slots: u32,
    command: &str,
) -> anyhow::Result<(client::Handle<BuilderHostKey>, Channel<client::Msg>)> {
    let s = &gw.settings;
    let config = Arc::new(client::Config {
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(15)),
        channel_buffer_size: CHANNEL_BUFFER,
        maximum_packet_size: MAX_PACKET,
        ..Default::default()
    });
    // Connecting, logging in and starting the command, bounded as a whole: a builder that
    // stops answering half-way must not hold the session (and its slot) forever.
    tokio::time::timeout(Duration::from_secs(20), async {
        let tcp = TcpStream::connect(address).await.context("connecting to its sshd")?;
        let _ = tcp.set_nodelay(true);
        let mut session = client::connect_stream(config, tcp, BuilderHostKey(s.host_public.clone()))
            .await
            .context("the SSH handshake failed (is its host key the pool's?)")?;
        let auth = session
            .authenticate_publickey(
                s.builder_user.clone(),
                PrivateKeyWithHashAlg::new(Arc::clone(&s.builder_key), None),
            )
            .await?;
        if !auth.success() {
            bail!("it refused the gateway's key: add the gateway's public key to the pool's authorized keys");
        }
        let channel = session.channel_open_session().await?;
        channel.set_env(false, GATE_SLOTS_ENV, slots.to_string()).await?;
        channel.exec(true, command).await?;
        Ok((session, channel))
    })
    .await
    .context("connecting, logging in and starting the command took over 20 s")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(text: &str) -> ChannelMsg {
        ChannelMsg::Data {
            data: CryptoVec::from(text.as_bytes().to_vec()),
        }
    }

    fn stderr(text: &str) -> ChannelMsg {
        ChannelMsg::ExtendedData {
            data: CryptoVec::from(text.as_bytes().to_vec()),
            ext: 1,
        }
    }

    fn status(exit_status: u32) -> ChannelMsg {
        ChannelMsg::ExitStatus { exit_status }
    }

    /// What the messages add up to, and how many are kept for the client.
    fn run(msgs: Vec<Option<ChannelMsg>>) -> (Vec<Start>, usize) {
        let mut kept = Kept::default();
        let starts = msgs.into_iter().map(|m| kept.push(m)).collect();
        (starts, kept.msgs.len())
    }

    #[test]
    fn a_builder_starts_at_its_first_stdout_byte_with_its_stderr_kept_before_it() {
        use Start::*;
        let (starts, kept) = run(vec![
            Some(ChannelMsg::Success),
            Some(stderr("warning: something\n")),
            Some(data("\x01")),
        ]);
        assert_eq!(starts, [Waiting, Waiting, Started]);
        assert_eq!(
            kept, 3,
            "the reply, the stderr line and the data go to the client in order"
        );
    }

    #[test]
    fn exit_75_before_stdout_is_busy_and_its_line_is_dropped() {
        use Start::*;
        let line = "nixpool: all 2 build slots of this builder are in use\n";
        // OpenSSH sends EOF and the exit status in either order.
        for msgs in [
            vec![Some(stderr(line)), Some(ChannelMsg::Eof), Some(status(75))],
            vec![Some(stderr(line)), Some(status(75))],
        ] {
            let n = msgs.len();
            let (starts, _) = run(msgs);
            assert_eq!(starts.last(), Some(&Busy));
            assert!(starts[..n - 1].iter().all(|s| *s == Waiting), "{starts:?}");
        }
    }

    #[test]
    fn a_close_a_signal_or_a_lost_connection_before_stdout_is_a_builder_that_died() {
        for end in [
            None,
            Some(ChannelMsg::Close),
            Some(ChannelMsg::ExitSignal {
                signal_name: russh::Sig::KILL,
                core_dumped: false,
                error_message: String::new(),
                lang_tag: String::new(),
            }),
        ] {
            let (starts, _) = run(vec![Some(ChannelMsg::Eof), end]);
            assert_eq!(starts, [Start::Waiting, Start::Died]);
        }
    }

    #[test]
    fn another_exit_status_before_stdout_is_a_genuine_failure_passed_to_the_client() {
        for code in [0, 1, 74, 76, 255] {
            let (starts, kept) = run(vec![Some(stderr("error: no space left\n")), Some(status(code))]);
            assert_eq!(starts, [Start::Waiting, Start::Started], "exit {code}");
            assert_eq!(kept, 2, "the client gets the stderr and the status");
        }
    }

    #[test]
    fn more_stderr_than_a_refusal_counts_as_started() {
        let chunk = "x".repeat(EARLY_STDERR / 2);
        let (starts, kept) = run(vec![Some(stderr(&chunk)), Some(stderr(&chunk)), Some(stderr("y"))]);
        assert_eq!(starts, [Start::Waiting, Start::Waiting, Start::Started]);
        assert_eq!(kept, 3);
    }
}
