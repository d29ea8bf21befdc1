//! Which builder a new session goes to. Pure: the gateway counts each builder's slots (its
//! maxJobs) and gives a session the one with the most free slots, so no builder runs over
//! maxJobs while another has a free slot. With none free, the session waits.
//!
//! Builders come and go (pods turn Ready, are deleted): they are keyed by name (the pod's name,
//! or the address for a static `--builder`). A builder that left is marked gone: it never gets a
//! new session, but the sessions it runs keep their slot until they end, and then it is dropped.
//!
//! # Several gateways
//!
//! A pool runs several gateway pods behind one Service. Each counts its own sessions exactly
//! (`used`), and learns the others' from their demand reports ([`Slots::set_elsewhere`], fed by
//! the `peers` module): a builder's free slots are `slots - used - elsewhere`. What is
//! guaranteed:
//!
//! - within one gateway, exactly: it never sends a builder more sessions than its free slots;
//! - across gateways, up to the report latency (another gateway's write, coalesced for at most
//!   `demand::COALESCE`, plus the watch event that brings it here: typically tens of
//!   milliseconds): two sessions that arrive at different gateways within that window may
//!   still share a builder while another has a free slot;
//! - for sessions arriving at 2 gateways at the same instant, the tie-break spreads them: among
//!   builders with equally many free slots, a gateway of even rank (its index among the live
//!   gateway pods, sorted by name) takes the first by name, one of odd rank the last.
//!
//! A session that ended at another gateway frees its slot here once that gateway's report
//! arrives: [`Slots::set_elsewhere`] says so, and held sessions look again.
//!
//! # A builder that says it is full
//!
//! The builder's gate counts its slots too, and refuses a session beyond them (exit status 75).
//! When it does, this gateway's count was behind (another gateway's session that no report has
//! brought yet): [`Slots::refused`] gives the slot back and treats the builder as full until
//! the count can be right again, whichever comes first:
//! - this gateway releases a slot on it (one of its own sessions there ended);
//! - the other gateways' count on it changes (the report that was missing arrived, or one of
//!   their sessions there ended);
//! - [`FULL_FOR`] passes ([`Slots::expire`]): a session the gateways do not see at all (someone
//!   logged in to the builder directly) is then tried again, a refusal costs a few ms.
//!
//! No exact bookkeeping of the builder's own count: it is the builder that decides, and a wrong
//! guess here costs one more refusal, not an overloaded builder.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a builder that refused a session as full is passed over at most.
pub const FULL_FOR: Duration = Duration::from_secs(2);

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
    /// It refused a session as full: no new session goes to it until then (or until the
    /// count changes; see the module docs).
    pub full_until: Option<Instant>,
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
    /// Sessions the other gateways run, by builder name (builders this gateway does not know
    /// included: their pod may turn Ready here a moment later).
    elsewhere: BTreeMap<String, u32>,
    /// This gateway's index among the live gateway pods: it breaks ties (see the module docs).
    rank: usize,
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
                        full_until: None,
                    };
                    (name, b)
                })
                .collect(),
            elsewhere: BTreeMap::new(),
            rank: 0,
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

    /// Sessions the other gateways run on the builder `name`, as their reports last said.
    pub fn elsewhere(&self, name: &str) -> u32 {
        self.elsewhere.get(name).copied().unwrap_or(0)
    }

    /// The builder `name`, gone or not.
    pub fn get(&self, name: &str) -> Option<&Builder> {
        self.builders.get(name)
    }

    /// Slots of `b` (named `name`) that no gateway uses; none while it says it is full.
    fn free(&self, name: &str, b: &Builder) -> u32 {
        if b.full_until.is_some() {
            return 0;
        }
        b.slots.saturating_sub(b.used).saturating_sub(self.elsewhere(name))
    }

    /// Sets the sessions the other gateways run, by builder name, and this gateway's rank among
    /// the live gateways. Returns whether some builder has more free slots than before (another
    /// gateway's session ended): held sessions should look again.
    ///
    /// A builder that said it was full is counted again when the others' count on it changes.
    pub fn set_elsewhere(&mut self, elsewhere: BTreeMap<String, u32>, rank: usize) -> bool {
        let mut freed = self
            .elsewhere
            .iter()
            .any(|(name, n)| elsewhere.get(name).copied().unwrap_or(0) < *n);
        for (name, b) in &mut self.builders {
            let (before, after) = (self.elsewhere.get(name), elsewhere.get(name));
            if b.full_until.is_some() && before.copied().unwrap_or(0) != after.copied().unwrap_or(0) {
                b.full_until = None;
                freed = true;
            }
        }
        self.elsewhere = elsewhere;
        self.rank = rank;
        freed
    }

    /// Counts again the builders that said they were full [`FULL_FOR`] or more before `now`.
    /// Returns whether there were any.
    pub fn expire(&mut self, now: Instant) -> bool {
        let mut expired = false;
        for b in self.builders.values_mut() {
            if b.full_until.is_some_and(|t| t <= now) {
                b.full_until = None;
                expired = true;
            }
        }
        expired
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
                        full_until: None,
                    };
                    self.builders.insert(name.clone(), b);
                    change.added.push(name);
                }
            }
        }
        self.builders.retain(|_, b| !(b.gone && b.used == 0));
        change
    }

    /// Takes a slot on the builder with the most free ones (counting the other gateways'
    /// sessions), and returns its name and address, or `None` when every slot is taken. Among
    /// equals, a gateway of even rank takes the first by name, one of odd rank the last.
    pub fn take(&mut self) -> Option<(String, String)> {
        let candidates = self
            .builders
            .iter()
            .filter(|(_, b)| !b.gone)
            .map(|(name, b)| (name, self.free(name, b)))
            .filter(|(_, free)| *free > 0);
        // `max_by_key` keeps the last of equals: reversed, that is the first by name.
        let name = if self.rank.is_multiple_of(2) {
            candidates.rev().max_by_key(|(_, free)| *free)
        } else {
            candidates.max_by_key(|(_, free)| *free)
        }?
        .0
        .clone();
        let b = self.builders.get_mut(&name)?;
        b.used += 1;
        Some((name, b.address.clone()))
    }

    /// Gives back a slot taken with [`Slots::take`]. A gone builder whose last session ends
    /// is dropped. A builder that said it was full is counted again.
    pub fn release(&mut self, name: &str, now: i64) {
        let Some(b) = self.builders.get_mut(name) else {
            return;
        };
        b.used = b.used.saturating_sub(1);
        b.full_until = None;
        if b.used == 0 {
            b.idle_since = now;
            if b.gone {
                self.builders.remove(name);
            }
        }
    }

    /// Gives back a slot taken with [`Slots::take`] that the builder refused because all its
    /// slots were in use: it gets no new session until [`FULL_FOR`] after `at` at most (see the
    /// module docs).
    pub fn refused(&mut self, name: &str, now: i64, at: Instant) {
        self.release(name, now);
        if let Some(b) = self.builders.get_mut(name) {
            b.full_until = Some(at + FULL_FOR);
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

    #[test]
    fn other_gateways_sessions_count_against_a_builders_slots() {
        // The real case: 3 builders of 1 slot; another gateway runs a session on a.
        let mut s = fixed(&[("a", 1), ("b", 1), ("c", 1)]);
        assert!(!s.set_elsewhere(BTreeMap::from([("a".into(), 1)]), 0));
        assert_eq!(name(s.take()).as_deref(), Some("b"));
        assert_eq!(name(s.take()).as_deref(), Some("c"));
        assert_eq!(s.take(), None, "a is busy at the other gateway: the session waits");
        assert_eq!(s.elsewhere("a"), 1);

        // Its session ends: a frees up here, and held sessions are told.
        assert!(s.set_elsewhere(BTreeMap::new(), 0), "a decrease wakes held sessions");
        assert_eq!(name(s.take()).as_deref(), Some("a"));
        assert!(
            !s.set_elsewhere(BTreeMap::from([("b".into(), 1)]), 0),
            "an increase does not"
        );
        assert!(s.builders().all(|(_, b)| b.used <= b.slots));

        let mut s = fixed(&[("a", 4), ("b", 3)]);
        s.set_elsewhere(BTreeMap::from([("a".into(), 2), ("x".into(), 9)]), 0);
        assert_eq!(name(s.take()).as_deref(), Some("b"), "3 free on b, 2 on a");
        assert_eq!(name(s.take()).as_deref(), Some("a"), "2 free on each: the first");
    }

    #[test]
    fn gateways_of_even_and_odd_rank_spread_simultaneous_sessions() {
        let builders = [("a", 1), ("b", 1), ("c", 1)];
        let (mut even, mut odd) = (fixed(&builders), fixed(&builders));
        even.set_elsewhere(BTreeMap::new(), 0);
        odd.set_elsewhere(BTreeMap::new(), 1);
        // Neither has seen the other's session yet.
        assert_eq!(name(even.take()).as_deref(), Some("a"));
        assert_eq!(name(odd.take()).as_deref(), Some("c"));
        // A third arrives at the odd one after the even one's report did.
        odd.set_elsewhere(BTreeMap::from([("a".into(), 1)]), 1);
        assert_eq!(name(odd.take()).as_deref(), Some("b"));
        let mut rank2 = fixed(&builders);
        rank2.set_elsewhere(BTreeMap::new(), 2);
        assert_eq!(name(rank2.take()).as_deref(), Some("a"));
    }

    #[test]
    fn a_builder_that_said_it_is_full_is_passed_over_until_its_count_can_be_right() {
        let t0 = Instant::now();
        // Another gateway's session on a that no report has brought yet: a refuses.
        let mut s = fixed(&[("a", 1), ("b", 1)]);
        assert_eq!(name(s.take()).as_deref(), Some("a"));
        s.refused("a", 1, t0);
        assert_eq!(s.used(), 0, "the refused session's slot is given back");
        assert_eq!(
            name(s.take()).as_deref(),
            Some("b"),
            "the next builder with a free slot"
        );
        assert_eq!(s.take(), None, "a is full by its own word: the session waits");
        assert!(!s.expire(t0 + FULL_FOR - Duration::from_millis(1)));
        assert_eq!(s.take(), None);
        assert!(s.expire(t0 + FULL_FOR), "tried again after FULL_FOR");
        assert_eq!(name(s.take()).as_deref(), Some("a"));

        // The missing report arrives: counted again at once, by the report's numbers.
        let mut s = fixed(&[("a", 2), ("b", 1)]);
        assert_eq!(name(s.take()).as_deref(), Some("a"));
        s.refused("a", 1, t0);
        assert!(
            !s.set_elsewhere(BTreeMap::from([("b".into(), 0)]), 0),
            "no change on a: still full"
        );
        assert_eq!(name(s.take()).as_deref(), Some("b"));
        assert_eq!(s.take(), None);
        assert!(
            s.set_elsewhere(BTreeMap::from([("a".into(), 1)]), 0),
            "a's count changed: held sessions look again"
        );
        assert_eq!(name(s.take()).as_deref(), Some("a"), "2 slots, 1 used elsewhere");
        assert_eq!(s.take(), None);

        // One of this gateway's own sessions on it ends: that slot is free for sure.
        let mut s = fixed(&[("a", 2)]);
        s.take();
        s.take();
        s.refused("a", 1, t0);
        assert_eq!(s.take(), None);
        s.release("a", 2);
        assert_eq!(name(s.take()).as_deref(), Some("a"));

        // A gone builder that refused its last session is dropped, as on release.
        let mut s = fixed(&[("a", 1)]);
        s.take();
        s.replace([], 1, 1);
        s.refused("a", 2, t0);
        assert!(s.builders().next().is_none());
    }

    proptest! {
        /// Whatever the takes, releases, other gateways' sessions and changes of the builder
        /// set: no builder is over its slots, a gone builder never gets a session, a builder
        /// gets a session only when it had a slot no gateway used and no ready one had more
        /// free slots, and among equals the rank picks the first or the last by name.
        #[test]
        fn never_over_slots_never_gone_and_always_the_most_free(
            slots in 1u32..4,
            ops in proptest::collection::vec((0u8..5, any::<u8>(), 0u8..16, proptest::collection::vec(0u32..4, 5)), 0..80),
        ) {
            let t0 = Instant::now();
            let mut s = Slots::default();
            let mut open: Vec<String> = Vec::new();
            for (now, (op, pick, set, others)) in ops.into_iter().enumerate() {
                let now = now as i64;
                match op {
                    0 => {
                        let free: BTreeMap<String, u32> = s
                            .ready()
                            .map(|(n, b)| {
                                let free = if b.full_until.is_some() { 0 } else { b.slots.saturating_sub(b.used + s.elsewhere(n)) };
                                (n.to_string(), free)
                            })
                            .collect();
                        let gone: Vec<String> =
                            s.builders().filter(|(_, b)| b.gone).map(|(n, _)| n.to_string()).collect();
                        match s.take() {
                            Some((n, _)) => {
                                prop_assert!(!gone.contains(&n), "{n} is gone");
                                prop_assert!(free[&n] > 0, "{n} had no free slot");
                                let most = *free.values().max().unwrap();
                                prop_assert_eq!(free[&n], most);
                                let equals: Vec<&String> = free.iter().filter(|(_, f)| **f == most).map(|(n, _)| n).collect();
                                let expected = if s.rank.is_multiple_of(2) { equals[0] } else { equals[equals.len() - 1] };
                                prop_assert_eq!(&n, expected);
                                open.push(n);
                            }
                            None => prop_assert!(free.values().all(|f| *f == 0)),
                        }
                    }
                    1 if !open.is_empty() => {
                        let n = open.remove(pick as usize % open.len());
                        s.release(&n, now);
                    }
                    2 => {
                        // The other gateways' sessions on p0..p4 (p4 never Ready here), and a rank.
                        let elsewhere: BTreeMap<String, u32> =
                            others.iter().enumerate().map(|(i, n)| (format!("p{i}"), *n)).collect();
                        let before: BTreeMap<String, u32> = s.ready().map(|(n, b)| (n.to_string(), s.free(n, b))).collect();
                        let freed = s.set_elsewhere(elsewhere, pick as usize);
                        let more = s.ready().any(|(n, b)| s.free(n, b) > before[n]);
                        prop_assert!(!more || freed, "a slot freed up elsewhere and no one was told");
                    }
                    3 => {
                        // A builder refuses a session as full (that slot is given back), and
                        // refusals FULL_FOR old expire.
                        s.expire(t0 + Duration::from_secs(now as u64));
                        if !open.is_empty() {
                            let n = open.remove(pick as usize % open.len());
                            s.refused(&n, now, t0 + Duration::from_secs(now as u64));
                            let b = s.get(&n);
                            prop_assert!(b.is_none_or(|b| b.full_until.is_some()));
                        }
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
