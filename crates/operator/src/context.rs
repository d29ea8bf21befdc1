//! What every reconcile shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::events::Recorder;

use crate::cache::{Keys, Rollouts, Statuses, Stores};
use crate::metrics::Metrics;

pub struct Context {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
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
