//! A small Nix worker-protocol client for attack tests: it sends what a hostile client would
//! (any `SetOptions` override, a hand-made derivation, a GC root anywhere), which Nix's own CLI
//! does not forward. It speaks protocol 1.34 (Nix 2.8's) over any command's stdin/stdout, such as
//! `ssh builder@host nix-daemon --stdio`.

use std::io::{BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, bail};

const MAGIC_1: u64 = 0x6e69_7863;
const MAGIC_2: u64 = 0x6478_696f;
const VERSION: u64 = (1 << 8) | 34;
const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

/// A derivation as `BuildDerivation` sends it (one output, `out`).
pub struct BasicDerivation {
    pub drv_path: String,
    pub out_path: String,
    pub input_srcs: Vec<String>,
    pub builder: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub struct WorkerClient {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    /// What the daemon logged (`STDERR_NEXT`) so far.
    pub log: Vec<String>,
}

impl WorkerClient {
    /// Runs `command` (which must speak `nix-daemon --stdio` on its stdin/stdout) and does the
    /// handshake.
    pub fn connect(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the worker-protocol transport")?;
        let mut c = Self {
            to: child.stdin.take().expect("piped"),
            from: BufReader::new(child.stdout.take().expect("piped")),
            child,
            log: Vec::new(),
        };
        c.put(MAGIC_1);
        c.put(VERSION);
        c.put(0); // no CPU affinity
        c.put(0); // reserveSpace
        c.to.flush()?;
        let magic = c.word().context("the daemon's handshake")?;
        if magic != MAGIC_2 {
            bail!("not a Nix daemon: magic {magic:#x}");
        }
        let daemon = c.word()?;
        if (daemon & 0xff) >= 33 {
            c.string()?; // the daemon's Nix version
        }
        c.stderr()?.map_err(|e| anyhow::anyhow!("handshake refused: {e}"))?;
        Ok(c)
    }

    /// Sends `SetOptions` with these overrides; returns the daemon's (or gate's) error, if any.
    pub fn set_options(&mut self, overrides: &[(&str, &str)]) -> anyhow::Result<Result<(), String>> {
        self.put(19);
        // keepFailed keepGoing tryFallback verbosity maxBuildJobs maxSilentTime useBuildHook
        // verboseBuild logType printBuildTrace buildCores useSubstitutes
        for f in [0, 0, 0, 4, 1, 0, 1, 0, 0, 0, 1, 0] {
            self.put(f);
        }
        self.put(overrides.len() as u64);
        for (k, v) in overrides {
            self.put_str(k);
            self.put_str(v);
        }
        self.to.flush()?;
        self.stderr()
    }

    /// Sends `BuildDerivation`; returns the build status and error message, or the error.
    pub fn build_derivation(&mut self, d: &BasicDerivation) -> anyhow::Result<Result<(u64, String), String>> {
        self.put(36);
        self.put_str(&d.drv_path);
        self.put(1);
        for s in ["out", &d.out_path, "", ""] {
            self.put_str(s);
        }
        self.put_list(&d.input_srcs);
        self.put_str("x86_64-linux");
        self.put_str(&d.builder);
        self.put_list(&d.args);
        self.put(d.env.len() as u64);
        for (k, v) in &d.env {
            self.put_str(k);
            self.put_str(v);
        }
        self.put(0); // normal build
        self.to.flush()?;
        if let Err(e) = self.stderr()? {
            return Ok(Err(e));
        }
        let status = self.word()?;
        let msg = self.string()?;
        Ok(Ok((status, msg)))
    }

    /// Sends `AddPermRoot`: a GC root symlink at `link`, made by the daemon (root).
    pub fn add_perm_root(&mut self, path: &str, link: &str) -> anyhow::Result<Result<String, String>> {
        self.put(47);
        self.put_str(path);
        self.put_str(link);
        self.to.flush()?;
        if let Err(e) = self.stderr()? {
            return Ok(Err(e));
        }
        Ok(Ok(self.string()?))
    }

    /// The transport's stderr after it ended (the gate's messages land there too).
    pub fn finish(mut self) -> String {
        drop(self.to);
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        err
    }

    fn put(&mut self, v: u64) {
        self.to.write_all(&v.to_le_bytes()).expect("write to the transport");
    }

    fn put_str(&mut self, s: &str) {
        self.put(s.len() as u64);
        self.to.write_all(s.as_bytes()).expect("write to the transport");
        let pad = (8 - s.len() % 8) % 8;
        self.to.write_all(&[0u8; 8][..pad]).expect("write to the transport");
    }

    fn put_list(&mut self, l: &[String]) {
        self.put(l.len() as u64);
        for s in l {
            self.put_str(s);
        }
    }

    fn word(&mut self) -> anyhow::Result<u64> {
        let mut b = [0u8; 8];
        self.from.read_exact(&mut b).context("the connection closed")?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> anyhow::Result<String> {
        let len = self.word()? as usize;
        let mut b = vec![0u8; len.div_ceil(8) * 8];
        self.from.read_exact(&mut b)?;
        b.truncate(len);
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn fields(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.word()? {
            match self.word()? {
                0 => {
                    self.word()?;
                }
                1 => {
                    self.string()?;
                }
                t => bail!("unknown field type {t}"),
            }
        }
        Ok(())
    }

    /// Reads the daemon's log messages up to the end of a request: `Ok(Err(msg))` is an error
    /// the daemon (or the gate) sent.
    fn stderr(&mut self) -> anyhow::Result<Result<(), String>> {
        loop {
            match self.word()? {
                STDERR_LAST => return Ok(Ok(())),
                STDERR_NEXT => {
                    let line = self.string()?;
                    self.log.push(line);
                }
                STDERR_WRITE => {
                    self.string()?;
                }
                STDERR_READ => bail!("the daemon asked for data this client never offers"),
                STDERR_ERROR => {
                    self.string()?; // "Error"
                    self.word()?; // level
                    self.string()?; // name
                    let msg = self.string()?;
                    self.word()?; // position
                    for _ in 0..self.word()? {
                        self.word()?;
                        self.string()?;
                    }
                    return Ok(Err(msg));
                }
                STDERR_START_ACTIVITY => {
                    self.word()?;
                    self.word()?;
                    self.word()?;
                    self.string()?;
                    self.fields()?;
                    self.word()?;
                }
                STDERR_STOP_ACTIVITY => {
                    self.word()?;
                }
                STDERR_RESULT => {
                    self.word()?;
                    self.word()?;
                    self.fields()?;
                }
                other => bail!("unknown message {other:#x} from the daemon"),
            }
        }
    }
}
