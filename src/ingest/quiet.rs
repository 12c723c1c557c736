//! Refusal log lines, at most one a second per kind of refusal: a flood of bad requests
//! costs a line a second, not a line a request. The line after a quiet spell says how many
//! were left out (`suppressed`); the metrics count every one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Refusal;

#[derive(Default)]
pub struct Quiet {
    kinds: [Kind; Refusal::ALL.len()],
}

#[derive(Default)]
struct Kind {
    /// The unix second of the last line written.
    second: AtomicU64,
    /// Lines left out since then.
    suppressed: AtomicU64,
}

impl Quiet {
    /// Whether a line about `refusal` may be written now, and if so how many were left out
    /// before it.
    pub fn admit(&self, refusal: Refusal) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        self.admit_at(refusal, now)
    }

    fn admit_at(&self, refusal: Refusal, now: u64) -> Option<u64> {
        let kind = &self.kinds[refusal as usize];
        let last = kind.second.load(Ordering::Relaxed);
        if last != now
            && kind
                .second
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(kind.suppressed.swap(0, Ordering::AcqRel));
        }
        kind.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_per_kind_and_the_count_of_the_rest() {
        let quiet = Quiet::default();
        assert_eq!(quiet.admit_at(Refusal::InvalidSignature, 100), Some(0));
        for _ in 0..999 {
            assert_eq!(quiet.admit_at(Refusal::InvalidSignature, 100), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(quiet.admit_at(Refusal::NotFound, 100), Some(0));
        assert_eq!(quiet.admit_at(Refusal::InvalidSignature, 101), Some(999));
        assert_eq!(quiet.admit_at(Refusal::InvalidSignature, 101), None);
        assert_eq!(quiet.admit_at(Refusal::InvalidSignature, 105), Some(1));
    }
}
