//! Which builder a new session goes to. Pure: the gateway counts each builder's slots (its
//! maxJobs) and gives a session the one with the most free slots, so no builder runs over
//! maxJobs while another has a free slot. With none free, the session waits.

/// One builder the gateway may send sessions to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Builder {
    /// `host:port` of its sshd.
    pub address: String,
    /// Its maxJobs: sessions it takes at once.
    pub slots: u32,
    /// Sessions the gateway has sent it that are still open.
    pub used: u32,
}

/// The builders and their slots.
#[derive(Clone, Debug, Default)]
pub struct Slots {
    pub builders: Vec<Builder>,
}

impl Slots {
    pub fn new(builders: impl IntoIterator<Item = (String, u32)>) -> Self {
        Self {
            builders: builders
                .into_iter()
                .map(|(address, slots)| Builder {
                    address,
                    slots,
                    used: 0,
                })
                .collect(),
        }
    }

    /// Takes a slot on the builder with the most free ones (the first of equals), or `None`
    /// when every slot is taken.
    pub fn take(&mut self) -> Option<usize> {
        let (i, b) = self
            .builders
            .iter_mut()
            .enumerate()
            .filter(|(_, b)| b.used < b.slots)
            .max_by_key(|(i, b)| (b.slots - b.used, std::cmp::Reverse(*i)))?;
        b.used += 1;
        Some(i)
    }

    /// Gives back a slot taken with [`Slots::take`].
    pub fn release(&mut self, i: usize) {
        if let Some(b) = self.builders.get_mut(i) {
            b.used = b.used.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sessions_spread_before_any_builder_takes_a_second() {
        let mut s = Slots::new([("a:22".into(), 1), ("b:22".into(), 1), ("c:22".into(), 1)]);
        let mut got: Vec<usize> = (0..3).map(|_| s.take().unwrap()).collect();
        got.sort();
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(s.take(), None, "every slot taken: the next session waits");
        s.release(1);
        assert_eq!(s.take(), Some(1));
    }

    #[test]
    fn the_builder_with_most_free_slots_wins() {
        let mut s = Slots::new([("a:22".into(), 2), ("b:22".into(), 4)]);
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), Some(0), "2 free on a, 2 on b: the first of equals");
    }

    proptest! {
        /// Whatever the takes and releases, no builder is over its slots, and a builder gets a
        /// session only when none has more free slots.
        #[test]
        fn never_over_slots_and_always_the_most_free(
            slots in proptest::collection::vec(1u32..4, 1..5),
            ops in proptest::collection::vec(any::<(bool, u8)>(), 0..60),
        ) {
            let mut s = Slots::new(slots.iter().enumerate().map(|(i, n)| (format!("b{i}:22"), *n)));
            let mut open: Vec<usize> = Vec::new();
            for (take, pick) in ops {
                if take || open.is_empty() {
                    let free: Vec<u32> = s.builders.iter().map(|b| b.slots - b.used).collect();
                    match s.take() {
                        Some(i) => {
                            prop_assert_eq!(free[i], *free.iter().max().unwrap());
                            open.push(i);
                        }
                        None => prop_assert!(free.iter().all(|f| *f == 0)),
                    }
                } else {
                    let i = open.remove(pick as usize % open.len());
                    s.release(i);
                }
                prop_assert!(s.builders.iter().all(|b| b.used <= b.slots));
            }
        }
    }
}
