//! Positions in the source's write-ahead log.

use std::fmt;
use std::str::FromStr;

/// A Postgres log sequence number: a byte position in the WAL. Ordered; shown the way
/// Postgres prints it (`16/B374D848`). Stored in the lake's `_lsn` columns and `txn`
/// versions as an `i64` (WAL positions stay far below 2^63).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

impl Lsn {
    /// Before any change: "nothing yet".
    pub const ZERO: Lsn = Lsn(0);

    pub const fn new(position: u64) -> Lsn {
        Lsn(position)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The value of a lake `_lsn` column or `txn` version.
    pub const fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// From a lake `_lsn` column or `txn` version; negative values (none) are zero.
    pub const fn from_i64(value: i64) -> Lsn {
        Lsn(if value < 0 { 0 } else { value as u64 })
    }

    /// The position just before this one (zero stays zero).
    pub const fn prev(self) -> Lsn {
        Lsn(self.0.saturating_sub(1))
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `X/Y` text that is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an LSN (expected hexadecimal `X/Y`, e.g. `16/B374D848`)")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let part = |p: &str| {
            (!p.is_empty() && p.len() <= 8)
                .then(|| u32::from_str_radix(p, 16).ok())
                .flatten()
                .ok_or_else(err)
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(l: pgwire_replication::Lsn) -> Lsn {
        Lsn(l.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(l: Lsn) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn::from_u64(l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_as_postgres_does() {
        let l = Lsn::new(0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(l));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(
            pgwire_replication::Lsn::from(l).to_pg_string(),
            l.to_string()
        );
        for bad in ["", "16", "x/1", "1/", "/1", "123456789/0", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
        assert_eq!(Lsn::from_i64(-1), Lsn::ZERO);
        assert_eq!(Lsn::new(5).prev(), Lsn::new(4));
        assert_eq!(Lsn::ZERO.prev(), Lsn::ZERO);
    }
}
