//! Leader election on a coordination.k8s.io/v1 Lease, so two operator replicas never reconcile
//! at once. The holder renews the Lease; a standby takes it over once it has not been renewed
//! for its duration.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> anyhow::Result<()> {
        let mut said = false;
        loop {
            match self.try_hold().await {
                Ok(true) => return Ok(()),
                Ok(false) if !said => {
                    tracing::info!(lease = %self.name, "another replica leads; standing by");
                    said = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or write the leader Lease; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Renews the Lease until it is lost or cannot be renewed within its duration; returns why.
    pub async fn hold(&self) -> anyhow::Error {
        let renew = self.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(renew).await;
            match self.try_hold().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return anyhow::anyhow!("another replica took the leader Lease {}", self.name),
                Err(e) if last_ok.elapsed() > self.duration => {
                    return anyhow::anyhow!(
                        "could not renew the leader Lease {} for {:?}: {e}",
                        self.name,
                        self.duration
                    );
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader Lease failed; retrying"),
            }
        }
    }

    /// Gives the Lease up so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(&self.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
            }
        }
    }

    /// Takes or renews the Lease if it is ours, free or expired. Writes carry the read's
    /// resourceVersion, so two replicas cannot both win.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
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
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        let expired = match &spec.renew_time {
            Some(MicroTime(t)) => {
                let dur = spec.lease_duration_seconds.unwrap_or(secs).max(1) as i64;
                now > t.checked_add(jiff::SignedDuration::from_secs(dur)).unwrap_or(*t)
            }
            None => true,
        };
        if !ours && held && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(lease = %self.name, identity = %self.identity, "took the leader Lease");
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
