//! Leader election on a coordination.k8s.io/v1 Lease, so two operator replicas never reconcile
//! at once. It follows client-go's rules, not kube-lease-manager's (docs/operator.md, "Leader
//! election", says why):
//!
//! - A standby judges the Lease expired by its own monotonic clock: the record has not changed
//!   for the lease's duration since this replica first saw it so. The holder's renewTime is
//!   never compared with the local wall clock, so clock skew between replicas cannot make two
//!   leaders.
//! - The leader stops acting [`RENEW_DEADLINE`] after it *sent* its last successful renewal,
//!   which is before any standby can have seen that renewal, let alone waited [`LEASE`] after
//!   it. Every Lease request is cut off at that deadline, and [`Leading::guard`] refuses the
//!   controller's requests after it.
//! - Every write carries the resourceVersion it read, so two replicas cannot both win.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// How long a Lease that stopped changing stays taken (client-go's default).
const LEASE: Duration = Duration::from_secs(15);
/// How long after sending its last successful renewal the leader keeps acting (client-go's default).
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Time between tries to take or renew the Lease (client-go's default).
const RETRY: Duration = Duration::from_secs(2);

/// Until when this replica may act as the leader: no limit until an elector first takes the
/// Lease (the controller starts only after that), then moved on at each renewal. The
/// controller's client sends nothing after it.
#[derive(Clone, Debug, Default)]
pub struct Leading(Arc<Mutex<Option<Instant>>>);

impl Leading {
    fn until(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, until: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }

    /// Runs an API request only while this replica leads, and cuts it off when that ends, so a
    /// replica that lost the Lease (stalled, or stopped past its deadline) cannot write.
    pub async fn guard<T, E: From<&'static str>>(&self, request: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        const NOT_LEADING: &str = "this replica no longer holds the leader Lease; it exits so that a restart re-elects";
        let Some(until) = self.until() else {
            return request.await;
        };
        if Instant::now() >= until {
            return Err(NOT_LEADING.into());
        }
        tokio::time::timeout_at(until, request)
            .await
            .unwrap_or_else(|_| Err(NOT_LEADING.into()))
    }
}

/// The Lease record as this replica last saw it, and since when (by its own clock) it has not changed.
#[derive(Clone, Debug)]
struct Observed {
    spec: LeaseSpec,
    since: Instant,
}

impl Observed {
    /// Notes the record read at `now`; its clock restarts only when the record changed.
    fn see(previous: Option<Observed>, spec: &LeaseSpec, now: Instant) -> Observed {
        match previous {
            Some(seen) if seen.spec == *spec => seen,
            _ => Observed {
                spec: spec.clone(),
                since: now,
            },
        }
    }

    /// Whether `identity` may write itself into the Lease at `now`: it holds it, nobody does,
    /// or the record has not changed for the lease's duration as this replica watched it.
    fn may_take(&self, identity: &str, now: Instant) -> bool {
        let duration = match self.spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(s as u64),
            _ => LEASE,
        };
        match self.spec.holder_identity.as_deref() {
            None | Some("") => true,
            Some(holder) if holder == identity => true,
            Some(_) => now.saturating_duration_since(self.since) > duration,
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    leading: Leading,
    seen: tokio::sync::Mutex<Option<Observed>>,
}

impl Elector {
    /// `leading` is moved on at each renewal; pass the same to [`Leading::guard`] the
    /// controller's requests.
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, leading: Leading) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            leading,
            seen: Default::default(),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> anyhow::Result<()> {
        let mut said = false;
        loop {
            let sent = Instant::now();
            match tokio::time::timeout(RENEW_DEADLINE, self.try_hold()).await {
                Ok(Ok(true)) => {
                    self.leading.set(sent + RENEW_DEADLINE);
                    return Ok(());
                }
                Ok(Ok(false)) if !said => {
                    tracing::info!(lease = %self.name, "another replica leads; standing by");
                    said = true;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot read or write the leader Lease; retrying"),
                Err(_) => tracing::warn!(lease = %self.name, "the leader Lease request timed out; retrying"),
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Renews the Lease until it is lost or cannot be renewed before this replica's deadline;
    /// returns why.
    pub async fn hold(&self) -> anyhow::Error {
        loop {
            tokio::time::sleep(RETRY).await;
            let deadline = self.leading.until().unwrap_or_else(Instant::now);
            let sent = Instant::now();
            let renewed = match deadline.checked_duration_since(sent) {
                Some(left) if !left.is_zero() => tokio::time::timeout(left, self.try_hold()).await.ok(),
                _ => None,
            };
            match renewed {
                Some(Ok(true)) => self.leading.set(sent + RENEW_DEADLINE),
                Some(Ok(false)) => return anyhow::anyhow!("another replica took the leader Lease {}", self.name),
                Some(Err(e)) => tracing::warn!(error = %e, "renewing the leader Lease failed; retrying"),
                None => {
                    return anyhow::anyhow!(
                        "could not renew the leader Lease {} within {RENEW_DEADLINE:?}; check the API server",
                        self.name
                    );
                }
            }
        }
    }

    /// Stops acting as the leader and gives the Lease up, so a standby takes over at once.
    pub async fn release(&self) {
        self.leading.set(Instant::now());
        let give_up = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(&self.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                self.api.replace(&self.name, &PostParams::default(), &lease).await?;
            }
            Ok::<(), kube::Error>(())
        };
        let failed = match tokio::time::timeout(RENEW_DEADLINE, give_up).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {RENEW_DEADLINE:?}"),
        };
        tracing::warn!(lease = %self.name, error = %failed, "could not release the leader Lease; a standby takes over when it expires");
    }

    /// Takes or renews the Lease if it is ours, free or expired. Writes carry the read's
    /// resourceVersion, so two replicas cannot both win.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let now = MicroTime(Timestamp::now());
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(LEASE.as_secs() as i32),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let may_take = {
            let mut seen = self.seen.lock().await;
            let observed = Observed::see(seen.take(), spec, Instant::now());
            let may = observed.may_take(&self.identity, Instant::now());
            *seen = Some(observed);
            may
        };
        if !may_take {
            return Ok(false);
        }
        // The holder's timestamps are for people and other tools; no replica's expiry uses them.
        let now = MicroTime(Timestamp::now());
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(lease = %self.name, identity = %self.identity, "took the leader Lease");
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(LEASE.as_secs() as i32);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_standby_waits_the_lease_duration_by_its_own_clock_whatever_the_holders_renew_time() {
        let t0 = Instant::now();
        // The holder's clock is 12 s behind this replica's, so its renewal just now reads as
        // 12 s old; 12 s ahead, as 12 s in the future. Neither moves the expiry.
        for skew in [-12, 12] {
            let renewed = Timestamp::now() + jiff::SignedDuration::from_secs(skew);
            let spec = held_by("a", renewed);
            let seen = Observed::see(None, &spec, t0);
            for at in [0, 3, 14, 15] {
                let seen_again = Observed::see(Some(seen.clone()), &spec, t0 + secs(at));
                assert!(!seen_again.may_take("b", t0 + secs(at)), "skew {skew} s, {at} s after");
            }
            assert!(seen.may_take("b", t0 + secs(16)), "skew {skew} s: unchanged for 16 s");
        }
    }

    #[test]
    fn a_record_older_than_its_duration_by_the_holders_clock_is_not_expired_when_just_seen() {
        // Old code compared renewTime + 15 s with the local clock and took this at once.
        let spec = held_by("a", Timestamp::now() - jiff::SignedDuration::from_secs(60));
        let t0 = Instant::now();
        assert!(!Observed::see(None, &spec, t0).may_take("b", t0));
    }

    #[test]
    fn renewals_keep_the_lease_taken() {
        let t0 = Instant::now();
        let first = Timestamp::now();
        let mut seen = Observed::see(None, &held_by("a", first), t0);
        for step in 1..=5 {
            let renewed = first + jiff::SignedDuration::from_secs(10 * step);
            seen = Observed::see(Some(seen), &held_by("a", renewed), t0 + secs(10 * step as u64));
            assert!(!seen.may_take("b", t0 + secs(10 * step as u64 + 14)));
        }
        // Unchanged since the last renewal (t0 + 50 s): expired after t0 + 65 s.
        let last = seen.spec.clone();
        let seen = Observed::see(Some(seen), &last, t0 + secs(60));
        assert!(!seen.may_take("b", t0 + secs(65)));
        assert!(seen.may_take("b", t0 + secs(66)));
    }

    #[test]
    fn its_own_or_a_free_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let ours = Observed::see(None, &held_by("b", Timestamp::now()), t0);
        assert!(ours.may_take("b", t0));
        assert!(!ours.may_take("c", t0));
        for holder in [None, Some(String::new())] {
            let free = LeaseSpec {
                holder_identity: holder,
                ..LeaseSpec::default()
            };
            assert!(Observed::see(None, &free, t0).may_take("b", t0));
        }
    }

    #[test]
    fn the_records_own_duration_counts() {
        let t0 = Instant::now();
        let spec = LeaseSpec {
            lease_duration_seconds: Some(40),
            ..held_by("a", Timestamp::now())
        };
        let seen = Observed::see(None, &spec, t0);
        assert!(!seen.may_take("b", t0 + secs(30)));
        assert!(seen.may_take("b", t0 + secs(41)));
    }

    #[tokio::test]
    async fn the_guard_passes_requests_before_the_deadline_and_refuses_or_cuts_them_off_after() {
        type R = Result<u32, Box<dyn std::error::Error + Send + Sync>>;
        let unbounded: R = Leading::default().guard(async { Ok(1) }).await;
        assert_eq!(unbounded.unwrap(), 1, "no elector has taken the Lease yet");

        let leading = Leading::default();
        leading.set(Instant::now());
        let refused: R = leading.guard(async { Ok(1) }).await;
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("no longer holds the leader Lease")
        );

        leading.set(Instant::now() + Duration::from_millis(300));
        let sent: R = leading.guard(async { Ok(2) }).await;
        assert_eq!(sent.unwrap(), 2);
        let started = Instant::now();
        let stalled: R = leading
            .guard(async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(3)
            })
            .await;
        assert!(stalled.is_err(), "a request that outlives the deadline is cut off");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
