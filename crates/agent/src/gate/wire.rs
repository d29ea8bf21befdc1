//! The Nix worker protocol's framing, as far as the gate reads it: little-endian 64-bit words,
//! byte strings padded to 8 bytes, framed data, and the two messages the gate sends a client
//! itself (a log line and an error). Layout as in Nix's `worker-protocol.hh` and `serialise.cc`.

use std::io::{self, Read, Write};

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_ERROR: u64 = 0x6378_7470;

/// A string longer than this ends the session: Nix sends store paths, setting values and
/// derivation fields here, never data (data travels in frames, which are streamed).
pub const MAX_STRING: u64 = 64 << 20;
/// A list longer than this ends the session.
pub const MAX_LIST: u64 = 1 << 24;

pub fn minor(version: u64) -> u64 {
    version & 0xff
}

pub fn major(version: u64) -> u64 {
    (version >> 8) & 0xff
}

/// Why a session ended early.
#[derive(Debug)]
pub enum WireError {
    Io(io::Error),
    /// The client sent something that is not the worker protocol.
    Malformed(String),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

/// Reads a client's bytes and keeps a copy of everything read, so that a request that passes can
/// be forwarded byte for byte.
pub struct Recorder<R> {
    inner: R,
    seen: Vec<u8>,
}

impl<R: Read> Recorder<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            seen: Vec::new(),
        }
    }

    /// The bytes read since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.seen)
    }

    /// Forgets the bytes read since the last `take` (a request the gate rewrites).
    pub fn discard(&mut self) {
        self.seen.clear();
    }

    /// The next word, or `None` at a clean end of input (nothing of it read).
    pub fn u64_or_eof(&mut self) -> Result<Option<u64>, WireError> {
        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.seen.extend_from_slice(&buf);
        Ok(Some(u64::from_le_bytes(buf)))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.u64_or_eof()?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof).into())
    }

    pub fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(WireError::Malformed(format!(
                "a string of {len} bytes (the limit is {MAX_STRING})"
            )));
        }
        let padded = len.div_ceil(8) * 8;
        let start = self.seen.len();
        self.seen.resize(start + padded as usize, 0);
        self.inner.read_exact(&mut self.seen[start..])?;
        Ok(self.seen[start..start + len as usize].to_vec())
    }

    pub fn string(&mut self) -> Result<String, WireError> {
        let b = self.bytes()?;
        String::from_utf8(b).map_err(|_| WireError::Malformed("a string that is not UTF-8".into()))
    }

    pub fn count(&mut self) -> Result<u64, WireError> {
        let n = self.u64()?;
        if n > MAX_LIST {
            return Err(WireError::Malformed(format!(
                "a list of {n} items (the limit is {MAX_LIST})"
            )));
        }
        Ok(n)
    }

    /// A list of strings, read and recorded; only its length is returned.
    pub fn strings(&mut self) -> Result<u64, WireError> {
        let n = self.count()?;
        for _ in 0..n {
            self.bytes()?;
        }
        Ok(n)
    }

    /// A list of string pairs.
    pub fn string_pairs(&mut self) -> Result<Vec<(String, String)>, WireError> {
        let n = self.count()?;
        let mut out = Vec::new();
        for _ in 0..n {
            out.push((self.string()?, self.string()?));
        }
        Ok(out)
    }

    /// Forwards what was recorded, then streams framed data (`u64 length, bytes`, until a
    /// zero length) from the client to `to` without keeping it.
    pub fn stream_frames(&mut self, to: &mut impl Write) -> Result<(), WireError> {
        to.write_all(&self.take())?;
        loop {
            let len = self.u64()?;
            to.write_all(&self.take())?;
            if len == 0 {
                return Ok(());
            }
            let copied = io::copy(&mut (&mut self.inner).take(len), to)?;
            if copied != len {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
    }
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u64(out, b.len() as u64);
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
}

/// A log line the client prints (`STDERR_NEXT`).
pub fn log_line(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, STDERR_NEXT);
    put_bytes(&mut out, format!("{text}\n").as_bytes());
    out
}

/// An error the client raises (`STDERR_ERROR`, the form of protocol 1.26 and later).
pub fn error(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, STDERR_ERROR);
    put_bytes(&mut out, b"Error");
    put_u64(&mut out, 0); // level: error
    put_bytes(&mut out, b"Error");
    put_bytes(&mut out, text.as_bytes());
    put_u64(&mut out, 0); // no position
    put_u64(&mut out, 0); // no traces
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_to_words_and_read_back() {
        let mut buf = Vec::new();
        put_bytes(&mut buf, b"abc");
        put_bytes(&mut buf, b"");
        put_bytes(&mut buf, b"12345678");
        assert_eq!(buf.len(), 8 + 8 + 8 + 8 + 8);
        let mut r = Recorder::new(&buf[..]);
        assert_eq!(r.string().unwrap(), "abc");
        assert_eq!(r.string().unwrap(), "");
        assert_eq!(r.string().unwrap(), "12345678");
        assert_eq!(r.take(), buf);
        assert!(r.u64_or_eof().unwrap().is_none());
    }

    #[test]
    fn oversized_strings_and_lists_end_the_session() {
        let mut buf = Vec::new();
        put_u64(&mut buf, MAX_STRING + 1);
        assert!(matches!(Recorder::new(&buf[..]).bytes(), Err(WireError::Malformed(_))));
        let mut buf = Vec::new();
        put_u64(&mut buf, MAX_LIST + 1);
        assert!(matches!(
            Recorder::new(&buf[..]).strings(),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn frames_stream_through_unchanged() {
        let mut buf = Vec::new();
        put_u64(&mut buf, 3);
        buf.extend_from_slice(b"xyz");
        put_u64(&mut buf, 1);
        buf.push(b'!');
        put_u64(&mut buf, 0);
        let mut r = Recorder::new(&buf[..]);
        let mut out = Vec::new();
        r.stream_frames(&mut out).unwrap();
        assert_eq!(out, buf);
    }

    #[test]
    fn a_cut_frame_is_an_error() {
        let mut buf = Vec::new();
        put_u64(&mut buf, 10);
        buf.extend_from_slice(b"short");
        assert!(Recorder::new(&buf[..]).stream_frames(&mut Vec::new()).is_err());
    }
}
