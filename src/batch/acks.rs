//! What the slot may be told: the acknowledgement rules in one place.

use crate::changelog::Lsn;

/// Decides which LSN to confirm to the slot. Two sources move it: the processor's
/// durable LSN (everything up to it is in the lake), and, while the batcher is idle,
/// the server's keepalive (nothing of ours lies before it unacknowledged). It never
/// moves back, and never past a batch that was handed on but is not yet durable.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    /// The latest LSN confirmed to the slot.
    confirmed: Lsn,
    /// End LSN of the last batch handed to the processor.
    handed_on: Lsn,
    /// The latest LSN the processor reported durable.
    durable: Lsn,
}

impl Acks {
    /// Starting from a resume point already committed in every table: it may be
    /// confirmed at once (a crash between the lake commit and the acknowledgement
    /// leaves the slot behind the lake). Returns what to confirm now.
    pub(crate) fn resuming_at(skip_through: Lsn) -> (Acks, Option<Lsn>) {
        let mut acks = Acks {
            handed_on: skip_through,
            durable: skip_through,
            ..Acks::default()
        };
        let now = acks.advance(skip_through);
        (acks, now)
    }

    /// A batch ending at `end_lsn` went to the processor.
    pub(crate) fn handed_on(&mut self, end_lsn: Lsn) {
        self.handed_on = self.handed_on.max(end_lsn);
    }

    /// The processor made everything up to `lsn` durable.
    pub(crate) fn durable(&mut self, lsn: Lsn) -> Option<Lsn> {
        self.durable = self.durable.max(lsn);
        self.advance(lsn)
    }

    /// A server keepalive: every transaction committed before `wal_end` has been sent.
    /// When the batcher holds nothing (`idle`) and every batch handed on is durable, the
    /// slot may move to `wal_end`, so an idle slot does not retain the WAL other tables
    /// and databases write.
    pub(crate) fn keepalive(&mut self, wal_end: Lsn, idle: bool) -> Option<Lsn> {
        if idle && self.durable >= self.handed_on {
            self.advance(wal_end)
        } else {
            None
        }
    }

    /// The LSN to confirm now, if `to` is ahead of what was confirmed.
    fn advance(&mut self, to: Lsn) -> Option<Lsn> {
        (to > self.confirmed).then(|| {
            self.confirmed = to;
            to
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v)
    }

    #[test]
    fn confirms_the_resume_point_then_only_durable_or_idle_positions_forward() {
        let (mut acks, now) = Acks::resuming_at(lsn(100));
        assert_eq!(now, Some(lsn(100)));
        assert_eq!(Acks::resuming_at(Lsn::ZERO).1, None);

        // A batch is in flight: keepalives must not move the slot past it.
        acks.handed_on(lsn(200));
        assert_eq!(acks.keepalive(lsn(300), true), None);
        // Durable: confirmed, and then an idle keepalive moves the slot on.
        assert_eq!(acks.durable(lsn(200)), Some(lsn(200)));
        assert_eq!(acks.keepalive(lsn(300), false), None, "not idle");
        assert_eq!(acks.keepalive(lsn(300), true), Some(lsn(300)));
        // Never back: a late durable report below the keepalive position is not sent.
        assert_eq!(acks.durable(lsn(250)), None);
        assert_eq!(acks.keepalive(lsn(300), true), None, "already confirmed");
    }
}
