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
    /// Retry delays of the pools whose last reconcile failed transiently.
    pub failures: Mutex<HashMap<String, backon::ExponentialBackoff>>,
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

    /// Delay before retrying a pool after a transient failure: 2 s doubling per consecutive
    /// failure to 5 min, each plus up to as much again at random, so that pools that failed
    /// together (an API server restart) are not retried in step.
    pub fn backoff(&self, pool: &str) -> Duration {
        let mut failures = self.failures.lock().expect("the failures map is never poisoned");
        failures
            .entry(pool.to_string())
            .or_insert_with(retry_delays)
            .next()
            .unwrap_or(MAX_RETRY_DELAY)
    }

    /// A pool reconciled without error: its next failure starts again from the first delay.
    pub fn reset_backoff(&self, pool: &str) {
        self.failures
            .lock()
            .expect("the failures map is never poisoned")
            .remove(pool);
    }
}

const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// A pool's retry delays after consecutive transient failures (see [`Context::backoff`]).
fn retry_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_secs(2))
        .with_max_delay(MAX_RETRY_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_from_2_s_to_5_min_plus_jitter() {
        let delays: Vec<Duration> = retry_delays().take(12).collect();
        let plain = [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300].map(Duration::from_secs);
        for (delay, plain) in delays.iter().zip(plain) {
            assert!(*delay >= plain && *delay < plain * 2, "{delay:?} for {plain:?}");
        }
    }
}
