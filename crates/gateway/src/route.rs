//! Which builder a new session goes to. Pure: the gateway counts each builder's slots (its
//! maxJobs) and gives a session the one with the most free slots, so no builder runs over
//! maxJobs while another has a free slot. With none free, the session waits.
//!
//! Builders come and go (pods turn Ready, are deleted): they are keyed by name (the pod's name,
//! or the address for a static `--builder`). A builder that left is marked gone: it never gets a
//! new session, but the sessions it runs keep their slot until they end, and then it is dropped.

use std::collections::BTreeMap;

/// One builder the gateway may send sessions to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Builder {
    /// `host:port` of its sshd.
    pub address: String,
    /// Its maxJobs: sessions it takes at once.
    pub slots: u32,
    /// Sessions the gateway has sent it that are still open.
    pub used: u32,
    /// It is no longer Ready (or no longer exists): no new session goes to it.
    pub gone: bool,
    /// Unix seconds since it has had no session from this gateway (or since it was first
    /// seen). Meaningful only while `used` is 0.
    pub idle_since: i64,
}

/// What [`Slots::replace`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub gone: Vec<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.gone.is_empty()
    }
}

/// The builders and their slots, by name.
#[derive(Clone, Debug, Default)]
pub struct Slots {
    builders: BTreeMap<String, Builder>,
}

impl Slots {
    /// A fixed set of builders: `(name, address, slots)`, all first seen at `now`.
    pub fn new(builders: impl IntoIterator<Item = (String, String, u32)>, now: i64) -> Self {
        Self {
            builders: builders
                .into_iter()
                .map(|(name, address, slots)| {
                    let b = Builder {
                        address,
                        slots,
                        used: 0,
                        gone: false,
                        idle_since: now,
                    };
                    (name, b)
                })
                .collect(),
        }
    }

    /// Every builder still known, gone ones with open sessions included.
    pub fn builders(&self) -> impl Iterator<Item = (&str, &Builder)> {
        self.builders.iter().map(|(n, b)| (n.as_str(), b))
    }

    /// Builders that take new sessions.
    pub fn ready(&self) -> impl Iterator<Item = (&str, &Builder)> {
        self.builders().filter(|(_, b)| !b.gone)
    }

    /// Sessions open on builders.
    pub fn used(&self) -> u32 {
        self.builders.values().map(|b| b.used).sum()
    }

    /// Makes `ready` (`(name, address)`) the builders that take new sessions: new ones get
    /// `slots` slots, ones that left are marked gone (and dropped once they have no session).
    pub fn replace(&mut self, ready: impl IntoIterator<Item = (String, String)>, slots: u32, now: i64) -> Change {
        let ready: BTreeMap<String, String> = ready.into_iter().collect();
        let mut change = Change::default();
        for (name, b) in &mut self.builders {
            if !b.gone && !ready.contains_key(name) {
                b.gone = true;
                change.gone.push(name.clone());
            }
        }
        for (name, address) in ready {
            match self.builders.get_mut(&name) {
                Some(b) => {
                    if b.gone {
                        // Back (a pod re-created under its name): its old sessions still count.
                        b.gone = false;
                        b.slots = slots;
                        change.added.push(name.clone());
                    }
                    b.address = address;
                }
                None => {
                    let b = Builder {
                        address,
                        slots,
                        used: 0,
                        gone: false,
                        idle_since: now,
                    };
                    self.builders.insert(name.clone(), b);
                    change.added.push(name);
                }
            }
        }
        self.builders.retain(|_, b| !(b.gone && b.used == 0));
        change
    }

    /// Takes a slot on the builder with the most free ones (the first by name of equals), and
    /// returns its name and address, or `None` when every slot is taken.
    pub fn take(&mut self) -> Option<(String, String)> {
        let (name, b) = self
            .builders
            .iter_mut()
            .filter(|(_, b)| !b.gone && b.used < b.slots)
            .rev()
            .max_by_key(|(_, b)| b.slots - b.used)?;
        b.used += 1;
        Some((name.clone(), b.address.clone()))
    }

    /// Gives back a slot taken with [`Slots::take`]. A gone builder whose last session ends
    /// is dropped.
    pub fn release(&mut self, name: &str, now: i64) {
        let Some(b) = self.builders.get_mut(name) else {
            return;
        };
        b.used = b.used.saturating_sub(1);
        if b.used == 0 {
            b.idle_since = now;
            if b.gone {
                self.builders.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn fixed(list: &[(&str, u32)]) -> Slots {
        Slots::new(list.iter().map(|(a, n)| (a.to_string(), a.to_string(), *n)), 0)
    }

    fn name(t: Option<(String, String)>) -> Option<String> {
        t.map(|(n, _)| n)
    }

    #[test]
    fn sessions_spread_before_any_builder_takes_a_second() {
        let mut s = fixed(&[("a:22", 1), ("b:22", 1), ("c:22", 1)]);
        let mut got: Vec<String> = (0..3).map(|_| name(s.take()).unwrap()).collect();
        got.sort();
        assert_eq!(got, ["a:22", "b:22", "c:22"]);
        assert_eq!(s.take(), None, "every slot taken: the next session waits");
        s.release("b:22", 5);
        assert_eq!(s.take(), Some(("b:22".into(), "b:22".into())));
    }

    #[test]
    fn the_builder_with_most_free_slots_wins() {
        let mut s = fixed(&[("a:22", 2), ("b:22", 4)]);
        assert_eq!(name(s.take()).as_deref(), Some("b:22"));
        assert_eq!(name(s.take()).as_deref(), Some("b:22"));
        assert_eq!(
            name(s.take()).as_deref(),
            Some("a:22"),
            "2 free on each: the first of equals"
        );
    }

    #[test]
    fn a_builder_that_left_keeps_its_sessions_and_gets_no_new_one() {
        let mut s = Slots::default();
        assert_eq!(s.take(), None, "no builder yet: the session waits");
        let change = s.replace([("p-a".into(), "10.0.0.1:22".into())], 2, 100);
        assert_eq!(change.added, ["p-a"]);
        assert_eq!(s.take(), Some(("p-a".into(), "10.0.0.1:22".into())));

        let change = s.replace([("p-b".into(), "10.0.0.2:22".into())], 2, 110);
        assert_eq!((change.added, change.gone), (vec!["p-b".into()], vec!["p-a".into()]));
        assert_eq!(s.used(), 1, "p-a's session keeps its slot");
        assert_eq!(name(s.take()).as_deref(), Some("p-b"));
        assert_eq!(name(s.take()).as_deref(), Some("p-b"));
        assert_eq!(s.take(), None, "p-a has a free slot but is gone");
        assert!(s.builders().any(|(n, b)| n == "p-a" && b.gone));
        assert_eq!(s.ready().map(|(n, _)| n).collect::<Vec<_>>(), ["p-b"]);

        s.release("p-a", 120);
        assert!(s.builders().all(|(n, _)| n != "p-a"), "gone and unused: dropped");
        s.release("p-b", 130);
        let b = s.builders().find(|(n, _)| *n == "p-b").unwrap().1;
        assert_eq!((b.used, b.idle_since), (1, 110), "still used: idle time not reset");
        s.release("p-b", 140);
        let b = s.builders().find(|(n, _)| *n == "p-b").unwrap().1;
        assert_eq!((b.used, b.idle_since), (0, 140));
        assert!(s.replace([("p-b".into(), "10.0.0.2:22".into())], 2, 150).is_empty());
        assert!(s.replace([], 2, 160).gone == ["p-b"] && s.builders().next().is_none());
    }

    proptest! {
        /// Whatever the takes, releases and changes of the builder set: no builder is over its
        /// slots, a gone builder never gets a session, and a builder gets a session only when
        /// no ready one has more free slots.
        #[test]
        fn never_over_slots_never_gone_and_always_the_most_free(
            slots in 1u32..4,
            ops in proptest::collection::vec((0u8..3, any::<u8>(), 0u8..16), 0..80),
        ) {
            let mut s = Slots::default();
            let mut open: Vec<String> = Vec::new();
            for (now, (op, pick, set)) in ops.into_iter().enumerate() {
                let now = now as i64;
                match op {
                    0 => {
                        let free: BTreeMap<String, u32> =
                            s.ready().map(|(n, b)| (n.to_string(), b.slots.saturating_sub(b.used))).collect();
                        let gone: Vec<String> =
                            s.builders().filter(|(_, b)| b.gone).map(|(n, _)| n.to_string()).collect();
                        match s.take() {
                            Some((n, _)) => {
                                prop_assert!(!gone.contains(&n), "{n} is gone");
                                prop_assert_eq!(free[&n], *free.values().max().unwrap());
                                open.push(n);
                            }
                            None => prop_assert!(free.values().all(|f| *f == 0)),
                        }
                    }
                    1 if !open.is_empty() => {
                        let n = open.remove(pick as usize % open.len());
                        s.release(&n, now);
                    }
                    _ => {
                        // A subset of 4 pods is Ready.
                        let ready: Vec<(String, String)> = (0..4)
                            .filter(|i| set & (1 << i) != 0)
                            .map(|i| (format!("p{i}"), format!("10.0.0.{i}:22")))
                            .collect();
                        s.replace(ready, slots, now);
                    }
                }
                prop_assert!(s.builders().all(|(_, b)| b.used <= b.slots));
                prop_assert!(s.builders().all(|(_, b)| !b.gone || b.used > 0), "gone and unused is dropped");
                prop_assert_eq!(s.used() as usize, open.len());
            }
        }
    }
}
