//! What every reconcile shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::events::{EventType, Recorder, Reporter};

use crate::cache::{Keys, Rollouts, Statuses, Stores};
use crate::metrics::Metrics;

pub struct Context {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    /// Publishes Warning Events, which repeat (a failing apply, a bad key): kube's recorder
    /// turns a repeat within 6 minutes into a count on the first Event, and keeps every Event
    /// it sent for those 6 minutes to do so.
    pub recorder: Recorder,
    /// Who Normal Events come from. They are news once (a pool created, a key generated), so
    /// they are published without that cache: 10,000 new pools would otherwise keep 10,000
    /// Events in memory.
    pub reporter: Reporter,
    /// Builder image for pools that name none.
    pub images: crate::reconcile::validate::Images,
    /// Whether the server serves policy/v1 (PodDisruptionBudgets).
    pub with_pdb: bool,
    /// How often an unchanged pool is looked at again.
    pub resync: Duration,
    /// Consecutive transient failures per pool, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The watched objects, once the controller's watches exist.
    pub stores: OnceLock<Stores>,
    /// The public halves of the keys the operator generated.
    pub keys: Keys,
    /// The Deployments it wrote whose controller has yet to observe them.
    pub rollouts: Rollouts,
    /// The statuses it wrote, until the pools' store has them.
    pub statuses: Statuses,
}

impl Context {
    pub fn stores(&self) -> Option<&Stores> {
        self.stores.get()
    }

    /// The recorder for an Event of this type (see `recorder` and `reporter`).
    pub fn recorder_for(&self, type_: EventType) -> Recorder {
        match type_ {
            EventType::Warning => self.recorder.clone(),
            EventType::Normal => Recorder::new(self.client.clone(), self.reporter.clone()),
        }
    }

    /// The clock. Pure code takes `now` as an argument instead of reading it.
    pub fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    /// Delay before retrying a pool after its `n`th consecutive failure: 2 s doubling to 5 min.
    pub fn backoff(&self, pool: &str) -> Duration {
        let mut failures = self.failures.lock().expect("the failures map is never poisoned");
        let n = failures.entry(pool.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(2u64.saturating_pow(*n).min(300))
    }

    pub fn succeeded(&self, pool: &str) {
        self.failures
            .lock()
            .expect("the failures map is never poisoned")
            .remove(pool);
    }
}
