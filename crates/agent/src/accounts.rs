//! `/etc/passwd`, `/etc/group` and `/etc/shadow`: the entries a builder needs, merged into what
//! the image already has. Pure: text in, text out.

use std::collections::BTreeSet;

/// Name of the group Nix's build users are in (nix.conf `build-users-group`).
pub const BUILD_GROUP: &str = nixpool_api::rules::BUILD_GROUP;
/// sshd's privilege-separation user (Debian's and upstream's default).
pub const SSHD_USER: &str = nixpool_api::rules::SSHD_USER;
const FIRST_BUILD_UID: u32 = 30001;
const BUILD_GID: u32 = 30000;
const BUILDER_UID: u32 = 1000;
const SSHD_UID: u32 = 74;
const NOGROUP_GID: u32 = 65534;

/// What the accounts must contain.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub builder_user: String,
    /// Number of `nixbldN` users (at least max-jobs).
    pub build_users: u32,
    /// Home of the builder and the build users (`/var/empty` under the root).
    pub empty_home: String,
    /// sshd's privilege-separation directory.
    pub sshd_home: String,
    /// Login shell of root and the builder (the forced command runs through it).
    pub shell: String,
    pub nologin: String,
}

/// The three files after merging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accounts {
    pub passwd: String,
    pub group: String,
    pub shadow: String,
    /// Uids of the build users (to count running builds).
    pub build_uids: Vec<u32>,
    /// The builder user's uid and primary gid (owner of what its sessions write).
    pub builder_uid: u32,
    pub builder_gid: u32,
}

#[derive(Clone, Debug)]
struct Entry {
    fields: Vec<String>,
}

impl Entry {
    fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        Some(Self {
            fields: line.split(':').map(str::to_string).collect(),
        })
    }
    fn name(&self) -> &str {
        &self.fields[0]
    }
    fn id(&self) -> Option<u32> {
        self.fields.get(2).and_then(|f| f.parse().ok())
    }
    fn line(&self) -> String {
        self.fields.join(":")
    }
}

struct Table {
    entries: Vec<Entry>,
}

impl Table {
    fn parse(text: &str) -> Self {
        Self {
            entries: text.lines().filter_map(Entry::parse).collect(),
        }
    }
    fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name() == name)
    }
    fn get_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.name() == name)
    }
    fn ids(&self) -> BTreeSet<u32> {
        self.entries.iter().filter_map(Entry::id).collect()
    }
    /// `preferred` if free, else the next free id above it.
    fn free_id(&self, preferred: u32, taken_extra: &BTreeSet<u32>) -> u32 {
        let ids = self.ids();
        (preferred..)
            .find(|id| !ids.contains(id) && !taken_extra.contains(id))
            .expect("a free id")
    }
    /// Replaces the entry with the same name or appends it.
    fn upsert(&mut self, fields: Vec<String>) {
        let e = Entry { fields };
        match self.get_mut(&e.fields[0].clone()) {
            Some(existing) => *existing = e,
            None => self.entries.push(e),
        }
    }
    fn render(&self) -> String {
        let mut s: String = self.entries.iter().map(|e| e.line() + "\n").collect();
        if s.is_empty() {
            s.push('\n');
        }
        s
    }
}

fn v(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|s| s.to_string()).collect()
}

/// Merges what a builder needs into the existing files. Entries the agent does not own are kept
/// as they are; existing ids of owned entries are kept so that file ownership stays right.
pub fn merge(passwd: &str, group: &str, shadow: &str, want: &Wanted) -> Accounts {
    let mut pw = Table::parse(passwd);
    let mut gr = Table::parse(group);
    let mut sh = Table::parse(shadow);
    let none = BTreeSet::new();

    if pw.get("root").is_none() {
        pw.upsert(v(&["root", "x", "0", "0", "root", "/root", &want.shell]));
    }
    if gr.get("root").is_none() {
        gr.upsert(v(&["root", "x", "0", ""]));
    }
    if sh.get("root").is_none() {
        sh.upsert(v(&["root", "*", "1", "0", "99999", "7", "", "", ""]));
    }

    // The build group and users.
    let build_gid = gr
        .get(BUILD_GROUP)
        .and_then(Entry::id)
        .unwrap_or_else(|| gr.free_id(BUILD_GID, &none));
    let mut members = Vec::new();
    let mut build_uids = Vec::new();
    let mut new_uids = BTreeSet::new();
    for n in 1..=want.build_users.max(1) {
        let name = format!("nixbld{n}");
        let uid = match pw.get(&name).and_then(Entry::id) {
            Some(uid) => uid,
            None => {
                let uid = pw.free_id(FIRST_BUILD_UID + n - 1, &new_uids);
                new_uids.insert(uid);
                uid
            }
        };
        pw.upsert(v(&[
            &name,
            "x",
            &uid.to_string(),
            &build_gid.to_string(),
            &format!("Nix build user {n}"),
            &want.empty_home,
            &want.nologin,
        ]));
        sh.upsert(v(&[&name, "!", "1", "0", "99999", "7", "", "", ""]));
        build_uids.push(uid);
        members.push(name);
    }
    gr.upsert(v(&[BUILD_GROUP, "x", &build_gid.to_string(), &members.join(",")]));

    // The builder: password field `*` (no password, but not locked: sshd refuses `!` accounts).
    let builder = want.builder_user.as_str();
    let builder_uid = pw
        .get(builder)
        .and_then(Entry::id)
        .unwrap_or_else(|| pw.free_id(BUILDER_UID, &none));
    let builder_gid = gr
        .get(builder)
        .and_then(Entry::id)
        .unwrap_or_else(|| gr.free_id(builder_uid, &none));
    gr.upsert(v(&[builder, "x", &builder_gid.to_string(), ""]));
    pw.upsert(v(&[
        builder,
        "x",
        &builder_uid.to_string(),
        &builder_gid.to_string(),
        "Nix remote builder",
        &want.empty_home,
        &want.shell,
    ]));
    sh.upsert(v(&[builder, "*", "1", "0", "99999", "7", "", "", ""]));

    // sshd's privilege-separation user.
    let sshd_uid = pw
        .get(SSHD_USER)
        .and_then(Entry::id)
        .unwrap_or_else(|| pw.free_id(SSHD_UID, &none));
    pw.upsert(v(&[
        SSHD_USER,
        "x",
        &sshd_uid.to_string(),
        &NOGROUP_GID.to_string(),
        "sshd privilege separation",
        &want.sshd_home,
        &want.nologin,
    ]));
    sh.upsert(v(&[SSHD_USER, "!", "1", "0", "99999", "7", "", "", ""]));
    if gr.entries.iter().all(|e| e.id() != Some(NOGROUP_GID)) {
        gr.upsert(v(&["nogroup", "x", &NOGROUP_GID.to_string(), ""]));
    }

    Accounts {
        passwd: pw.render(),
        group: gr.render(),
        shadow: sh.render(),
        build_uids,
        builder_uid,
        builder_gid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want() -> Wanted {
        Wanted {
            builder_user: "builder".into(),
            build_users: 3,
            empty_home: "/var/empty".into(),
            sshd_home: "/run/sshd".into(),
            shell: "/bin/sh".into(),
            nologin: "/bin/false".into(),
        }
    }

    fn field<'a>(text: &'a str, name: &str, i: usize) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap()
            .split(':')
            .nth(i)
            .unwrap()
    }

    #[test]
    fn empty_files_get_every_entry() {
        let a = merge("", "", "", &want());
        assert_eq!(field(&a.passwd, "root", 2), "0");
        assert_eq!(field(&a.passwd, "builder", 6), "/bin/sh");
        assert_eq!(field(&a.shadow, "builder", 1), "*", "sshd refuses a locked (!) account");
        assert_eq!(field(&a.group, "nixbld", 3), "nixbld1,nixbld2,nixbld3");
        assert_eq!(field(&a.passwd, "nixbld2", 3), field(&a.group, "nixbld", 2));
        assert_eq!(field(&a.passwd, "sshd", 5), "/run/sshd");
        assert_eq!(a.build_uids, vec![30001, 30002, 30003]);
        assert_eq!((a.builder_uid, a.builder_gid), (1000, 1000));
    }

    #[test]
    fn merging_is_idempotent_and_keeps_foreign_entries_and_ids() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/bin/false\nnixbld1:x:999:994::/var/empty:/bin/false\nbuilder:x:1000:1000::/h:/bin/bash\n";
        let group = "root:x:0:\nnixbld:x:994:nixbld1\n";
        let a = merge(passwd, group, "", &want());
        assert!(a.passwd.contains("daemon:x:1:1::/:/bin/false\n"));
        assert_eq!(
            field(&a.passwd, "root", 6),
            "/bin/bash",
            "an existing root is left alone"
        );
        assert_eq!(field(&a.passwd, "nixbld1", 2), "999");
        assert_eq!(field(&a.group, "nixbld", 2), "994");
        assert_eq!(field(&a.passwd, "nixbld2", 3), "994");
        assert_eq!(field(&a.passwd, "builder", 5), "/var/empty");
        let b = merge(&a.passwd, &a.group, &a.shadow, &want());
        assert_eq!(a, b);
    }

    #[test]
    fn taken_ids_are_skipped() {
        let passwd = "someone:x:30001:100::/:/bin/false\nother:x:1000:1000::/:/bin/false\n";
        let a = merge(passwd, "", "", &want());
        assert_eq!(a.build_uids, vec![30002, 30003, 30004]);
        assert_eq!(field(&a.passwd, "builder", 2), "1001");
        assert_eq!(a.builder_uid, 1001);
    }
}
