//! What a gateway tells the operator: the sessions it holds and runs, and how each builder is
//! used. Each gateway pod writes its own [`GatewayReport`] as JSON under its pod name in the
//! pool's demand ConfigMap (`names::gateway_demand`); the operator reads them all and sets the
//! number of builders.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A gateway rewrites its report at least this often while it has sessions, so the operator
/// can tell a live report from one left by a gateway pod that is gone.
pub const REFRESH_SECONDS: i64 = 10;
/// A report with sessions that is older than this is ignored: its gateway is gone.
pub const STALE_SECONDS: i64 = 3 * REFRESH_SECONDS;

/// One gateway pod's report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    /// When it was written, in Unix seconds.
    pub at: i64,
    /// Sessions waiting for a builder slot.
    pub waiting: u32,
    /// Sessions running on a builder.
    pub active: u32,
    /// The Ready builders the gateway sends sessions to, by pod name.
    #[serde(default)]
    pub builders: BTreeMap<String, BuilderUse>,
}

/// How a gateway uses one builder.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BuilderUse {
    /// Its sessions from this gateway that are open now.
    pub used: u32,
    /// Since when (Unix seconds) it has had no session from this gateway; absent while it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<i64>,
}

impl GatewayReport {
    /// Sessions this gateway wants builder slots for.
    pub fn sessions(&self) -> u32 {
        self.waiting + self.active
    }

    /// Whether the operator should count this report at `now`: a report without sessions counts
    /// forever (it says nothing but idle times), one with sessions only while it is refreshed.
    pub fn is_live(&self, now: i64) -> bool {
        self.sessions() == 0 || now - self.at <= STALE_SECONDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_goes_stale_only_with_sessions() {
        let r = GatewayReport {
            at: 100,
            waiting: 1,
            active: 2,
            builders: BTreeMap::from([(
                "pool-abc".into(),
                BuilderUse {
                    used: 0,
                    idle_since: Some(90),
                },
            )]),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<GatewayReport>(&text).unwrap(), r);
        assert!(text.contains("\"idleSince\":90"), "{text}");
        assert!(r.is_live(100 + STALE_SECONDS));
        assert!(!r.is_live(101 + STALE_SECONDS));
        let idle = GatewayReport {
            waiting: 0,
            active: 0,
            ..r
        };
        assert!(idle.is_live(100_000));
    }
}
