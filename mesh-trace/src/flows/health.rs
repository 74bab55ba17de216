//! TCP health per leg: retransmitted segments, resets and RTT samples from
//! the kernel, each put on the leg of the socket it happened on and on that
//! socket's end of the leg. The flow table holds them while a socket's leg
//! is not known yet (waiting for its peer, or still connecting).
use mesh_trace_common::{
    TcpIssueEvent, ISSUE_RESET_RECEIVED, ISSUE_RESET_SENT, ISSUE_RETRANSMIT, ISSUE_RTT_SAMPLE,
};

use super::legs::LegKind;

/// Which end of a leg a socket is: the one that connected, or the one
/// that accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn of(active: bool) -> Side {
        if active {
            Side::Client
        } else {
            Side::Server
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// One thing the kernel reported about a socket's TCP health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Segments retransmitted (successfully sent again).
    Retransmits(u32),
    /// A reset sent, with the kernel's `enum sk_rst_reason` value.
    ResetSent(u32),
    ResetReceived,
    /// An RTT sample, microseconds: smoothed, and the kernel's windowed
    /// minimum where the sample carries it.
    Rtt {
        srtt_us: u32,
        min_us: Option<u32>,
    },
}

impl Health {
    pub fn from_kernel(t: &TcpIssueEvent) -> Option<Health> {
        match t.issue {
            ISSUE_RETRANSMIT => Some(Health::Retransmits(t.detail.max(1))),
            ISSUE_RESET_SENT => Some(Health::ResetSent(t.detail)),
            ISSUE_RESET_RECEIVED => Some(Health::ResetReceived),
            ISSUE_RTT_SAMPLE if t.detail > 0 => Some(Health::Rtt {
                srtt_us: t.detail,
                min_us: (t.min_rtt_us > 0).then_some(t.min_rtt_us),
            }),
            _ => None,
        }
    }
}

/// The leg an observation was put on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegRef {
    pub kind: LegKind,
    pub destination_service: String,
}

/// A health observation on its leg; `leg` and `side` are `None` when the
/// socket's leg never became known (it was evicted, never established, or
/// opened before the agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthRecord {
    pub leg: Option<LegRef>,
    pub side: Option<Side>,
    pub health: Health,
}

/// Observations held for a socket whose leg is not known yet. Bounded:
/// beyond it they are reported without a leg rather than lost.
pub const PENDING_MAX: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_events_become_observations() {
        let ev = |issue, detail| TcpIssueEvent {
            issue,
            detail,
            ..Default::default()
        };
        assert_eq!(
            Health::from_kernel(&ev(ISSUE_RETRANSMIT, 3)),
            Some(Health::Retransmits(3))
        );
        assert_eq!(
            Health::from_kernel(&ev(ISSUE_RETRANSMIT, 0)),
            Some(Health::Retransmits(1))
        );
        assert_eq!(
            Health::from_kernel(&ev(ISSUE_RTT_SAMPLE, 250)),
            Some(Health::Rtt {
                srtt_us: 250,
                min_us: None
            })
        );
        assert_eq!(Health::from_kernel(&ev(ISSUE_RTT_SAMPLE, 0)), None);
        assert_eq!(Health::from_kernel(&ev(99, 0)), None);
    }
}
