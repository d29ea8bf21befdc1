//! Merging pools' lines into an existing machines file. Pure: text in, text out.
//!
//! Each pool owns one block:
//!
//! ```text
//! # BEGIN nixpool <namespace>/<name> (managed by builderctl, edits inside are replaced)
//! ssh-ng://builder@host x86_64-linux /etc/nix/nixpool_ed25519 8 1 big-parallel - c3No...
//! # END nixpool <namespace>/<name>
//! ```
//!
//! Every byte outside the blocks being set or removed is kept as it was: other lines, comments,
//! blank lines, line endings. Lines outside the blocks that do not parse are kept and reported.
//! A block appended to a file whose last line has no newline needs one before it; its BEGIN
//! line says so ([`NEWLINE_ADDED`]), and removing the block takes that newline out again, so a
//! pool set and then removed leaves the file exactly as it was.

use std::collections::HashMap;

use nixpool_api::machines::{MachinesEntry, ParseError};

pub const BEGIN: &str = "# BEGIN nixpool ";
pub const END: &str = "# END nixpool ";
/// The rest of a BEGIN line.
const MANAGED: &str = "(managed by builderctl, edits inside are replaced)";
/// The rest of a BEGIN line whose block follows a newline builderctl added (the file's last
/// line had none).
pub const NEWLINE_ADDED: &str = "(managed by builderctl, edits inside are replaced, newline above added)";

/// What to do with one pool's block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Put exactly this line in the pool's block (replacing it, or appending a new block).
    Set { id: String, line: String },
    /// Take the pool's block out.
    Remove { id: String },
}

/// A line of the existing file, outside our blocks, that Nix would not parse.
#[derive(Debug, PartialEq, Eq)]
pub struct Unparsable {
    /// 1-based.
    pub line_no: usize,
    pub text: String,
    pub error: ParseError,
}

/// The result of a merge.
#[derive(Debug, PartialEq, Eq)]
pub struct Merged {
    pub text: String,
    pub unparsable: Vec<Unparsable>,
    /// Ids of blocks that were added, replaced with different content, or removed.
    pub changed: Vec<String>,
    /// Ids asked to be removed that had no block.
    pub not_found: Vec<String>,
}

/// Why the file cannot be merged safely; nothing is written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error(
        "line {line}: the block of pool {id} has no `{END}{id}` line; the file was edited by hand. Add that line where the block ends (or delete the BEGIN line), then run again"
    )]
    Unterminated { id: String, line: usize },
    #[error(
        "line {line}: a second block for pool {id} (the first starts at line {first}); delete one of them by hand, then run again"
    )]
    Duplicate { id: String, line: usize, first: usize },
    #[error("line {line}: `{END}{id}` without its BEGIN line; delete it or add the BEGIN line, then run again")]
    Stray { id: String, line: usize },
}

/// The pool id of a marker line, e.g. `# BEGIN nixpool ns/name (managed ...)` → `ns/name`.
fn marker_id<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.trim_end_matches(['\n', '\r'])
        .strip_prefix(prefix)?
        .split_whitespace()
        .next()
}

/// The block for a pool, as written.
pub fn block(id: &str, line: &str) -> String {
    block_text(id, line, false)
}

fn block_text(id: &str, line: &str, newline_added: bool) -> String {
    let rest = if newline_added { NEWLINE_ADDED } else { MANAGED };
    format!("{BEGIN}{id} {rest}\n{line}\n{END}{id}\n")
}

/// Whether a BEGIN line says builderctl added the newline before it.
fn says_newline_added(begin_line: &str) -> bool {
    begin_line.trim_end_matches(['\n', '\r']).ends_with(NEWLINE_ADDED)
}

enum Piece<'a> {
    Foreign(&'a str),
    Block {
        text: String,
        newline_added: bool,
    },
    /// A block taken out by [`Change::Remove`].
    Removed {
        newline_added: bool,
    },
}

/// The machines lines of the file (inside and outside blocks) with their 1-based numbers;
/// `Err` for the lines that do not parse. Comments and blank lines are left out.
pub fn entries(text: &str) -> Vec<(usize, Result<MachinesEntry, ParseError>, Option<String>)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(id) = marker_id(line, BEGIN) {
            current = Some(id.to_string());
            continue;
        }
        if marker_id(line, END).is_some() {
            current = None;
            continue;
        }
        match MachinesEntry::parse(line) {
            Err(ParseError::Empty) => {}
            r => out.push((i + 1, r, current.clone())),
        }
    }
    out
}

/// Applies `changes` to `existing`.
pub fn merge(existing: &str, changes: &[Change]) -> Result<Merged, MergeError> {
    // Split into foreign lines and our blocks, keeping every byte.
    let lines: Vec<&str> = existing.split_inclusive('\n').collect();
    let mut pieces: Vec<Piece> = Vec::new();
    // Where each block starts (line) and which piece it is: looked up once per block and per
    // change, so 1000 pools cost 1000 lookups, not 1000 scans of 1000 pieces.
    let mut blocks: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut unparsable = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(id) = marker_id(line, BEGIN) {
            if let Some((first, _)) = blocks.get(id) {
                return Err(MergeError::Duplicate {
                    id: id.into(),
                    line: i + 1,
                    first: *first,
                });
            }
            let end = (i + 1..lines.len())
                .find(|&j| marker_id(lines[j], END) == Some(id) || marker_id(lines[j], BEGIN).is_some());
            match end {
                Some(j) if marker_id(lines[j], END) == Some(id) => {
                    blocks.insert(id, (i + 1, pieces.len()));
                    pieces.push(Piece::Block {
                        text: lines[i..=j].concat(),
                        newline_added: says_newline_added(line),
                    });
                    i = j + 1;
                    continue;
                }
                _ => {
                    return Err(MergeError::Unterminated {
                        id: id.into(),
                        line: i + 1,
                    });
                }
            }
        }
        if let Some(id) = marker_id(line, END) {
            return Err(MergeError::Stray {
                id: id.into(),
                line: i + 1,
            });
        }
        match MachinesEntry::parse(line) {
            Ok(_) | Err(ParseError::Empty) => {}
            Err(error) => unparsable.push(Unparsable {
                line_no: i + 1,
                text: line.trim_end_matches(['\n', '\r']).to_string(),
                error,
            }),
        }
        pieces.push(Piece::Foreign(line));
        i += 1;
    }

    let mut changed = Vec::new();
    let mut not_found = Vec::new();
    let mut appended: Vec<(&str, &str)> = Vec::new();
    for change in changes {
        match change {
            Change::Set { id, line } => {
                let existing = blocks.get(id.as_str()).and_then(|&(_, k)| match &mut pieces[k] {
                    Piece::Block { text, newline_added } => Some((text, *newline_added)),
                    _ => None,
                });
                match existing {
                    Some((text, newline_added)) => {
                        let new = block_text(id, line, newline_added);
                        if *text != new {
                            *text = new;
                            changed.push(id.clone());
                        }
                    }
                    // A pool named twice in one run gets one block, with its last line.
                    None => match appended.iter_mut().find(|(a, _)| a == id) {
                        Some(pending) => pending.1 = line,
                        None => {
                            appended.push((id, line));
                            changed.push(id.clone());
                        }
                    },
                }
            }
            Change::Remove { id } => match blocks.get(id.as_str()).map(|&(_, k)| (k, &pieces[k])) {
                Some((k, &Piece::Block { newline_added, .. })) => {
                    pieces[k] = Piece::Removed { newline_added };
                    changed.push(id.clone());
                }
                // Set earlier in this run: it is not appended after all.
                _ if appended.iter().any(|(a, _)| a == id) => appended.retain(|(a, _)| a != id),
                _ => not_found.push(id.clone()),
            },
        }
    }

    let mut text = String::with_capacity(existing.len() + appended.len() * 200);
    // A removed block owes the newline added before it: to the next block (which now follows
    // it), or to the end of the file. Once a foreign line follows, the newline ends that line.
    let mut owed_newline = false;
    for p in &pieces {
        match p {
            Piece::Foreign(l) => {
                owed_newline = false;
                text.push_str(l);
            }
            Piece::Block { text: t, newline_added } => {
                if owed_newline && !newline_added {
                    text.push_str(&t.replacen(MANAGED, NEWLINE_ADDED, 1));
                } else {
                    text.push_str(t);
                }
                owed_newline = false;
            }
            Piece::Removed { newline_added } => owed_newline |= newline_added,
        }
    }
    if owed_newline && text.ends_with('\n') {
        text.pop();
    }
    for (n, (id, line)) in appended.iter().enumerate() {
        let newline_added = n == 0 && !text.is_empty() && !text.ends_with('\n');
        if newline_added {
            text.push('\n');
        }
        text.push_str(&block_text(id, line, newline_added));
    }
    Ok(Merged {
        text,
        unparsable,
        changed,
        not_found,
    })
}

/// Ids of the pool blocks in a file.
pub fn block_ids(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| marker_id(l, BEGIN))
        .map(str::to_string)
        .collect()
}

/// Resolves what the user typed (`ns/name` or `name`) against the blocks in the file.
pub fn resolve_id(text: &str, wanted: &str) -> Result<String, Vec<String>> {
    let ids = block_ids(text);
    if wanted.contains('/') {
        return Ok(wanted.to_string());
    }
    let hits: Vec<String> = ids
        .iter()
        .filter(|id| id.rsplit('/').next() == Some(wanted))
        .cloned()
        .collect();
    match hits.len() {
        1 => Ok(hits[0].clone()),
        0 => Ok(format!("default/{wanted}")),
        _ => Err(hits),
    }
}
