//! Which hosts does a host peer with? The one function the policy issue will replace.

use crate::model::Host;

/// Whether `host` gets `other` in its network map. In this issue: every non-removed host peers
/// with every other non-removed host. Must be cheap; it is evaluated for every pair when
/// membership or labels change.
pub fn is_peer(host: &Host, other: &Host) -> bool {
    host.id != other.id && !host.removed && !other.removed
}
