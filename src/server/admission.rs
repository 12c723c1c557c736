//! The counts the accept loop and the connections share, as small steps over atomics, each
//! decision and its count one compare-and-swap: HTTP/2 streams admitted beyond a
//! connection's first, and whether a connection has been asked to give its slot up.
//!
//! The steps are generic over [`Counter`] so that the tests can run them on loom's atomics,
//! which explore every interleaving of the threads that share them.

use std::sync::atomic::{AtomicUsize, Ordering};

/// An atomic count, as the steps below use it.
pub trait Counter {
    fn get(&self) -> usize;
    /// Sets `new` if the count is `current`; returns the count seen.
    fn swap_if(&self, current: usize, new: usize) -> Result<usize, usize>;
}

impl Counter for AtomicUsize {
    fn get(&self) -> usize {
        self.load(Ordering::Acquire)
    }

    fn swap_if(&self, current: usize, new: usize) -> Result<usize, usize> {
        self.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
    }
}

/// Adds one if the count is below `max`.
fn increment_below<C: Counter>(count: &C, max: usize) -> bool {
    let mut seen = count.get();
    loop {
        if seen >= max {
            return false;
        }
        match count.swap_if(seen, seen + 1) {
            Ok(_) => return true,
            Err(now) => seen = now,
        }
    }
}

fn increment<C: Counter>(count: &C) {
    increment_below(count, usize::MAX);
}

/// Takes one off; never below zero (a debug build says so loudly).
fn decrement<C: Counter>(count: &C) {
    let mut seen = count.get();
    loop {
        debug_assert!(seen > 0, "a count went below zero");
        if seen == 0 {
            return;
        }
        match count.swap_if(seen, seen - 1) {
            Ok(_) => return,
            Err(now) => seen = now,
        }
    }
}

/// A request starts on a connection that has `mine` requests in progress; `extra` counts
/// those beyond the first of every connection, at most `max`. False when it would be one
/// beyond the first and `extra` is at its bound: a refusal leaves `mine` alone.
///
/// `extra` is never below the sum over connections of their requests beyond the first: it is
/// raised before `mine` and lowered after, and only by the step that moves `mine` across the
/// first.
pub fn admit<C: Counter>(mine: &C, extra: &C, max: usize) -> bool {
    let mut seen = mine.get();
    loop {
        if seen == 0 {
            match mine.swap_if(0, 1) {
                Ok(_) => return true,
                Err(now) => {
                    seen = now;
                    continue;
                }
            }
        }
        if !increment_below(extra, max) {
            return false;
        }
        match mine.swap_if(seen, seen + 1) {
            Ok(_) => return true,
            Err(now) => {
                // Another request on this connection started or ended meanwhile: decide again.
                decrement(extra);
                seen = now;
            }
        }
    }
}

/// A request admitted by [`admit`] has ended: whichever of a connection's requests ends, the
/// others keep one of them as the first.
pub fn release<C: Counter>(mine: &C, extra: &C) {
    let mut seen = mine.get();
    loop {
        debug_assert!(seen > 0, "a request ended that never started");
        if seen == 0 {
            return;
        }
        match mine.swap_if(seen, seen - 1) {
            Ok(_) => break,
            Err(now) => seen = now,
        }
    }
    if seen >= 2 {
        decrement(extra);
    }
}

/// A connection's place at the bound: open, asked to give its slot up, or closed.
pub const OPEN: usize = 0;
pub const ASKED: usize = 1;
pub const CLOSED: usize = 2;

/// Asks an open connection to give its slot up, counting it in `closing` (connections asked
/// that have not closed yet); false when it is closed or was asked already.
pub fn ask<C: Counter>(state: &C, closing: &C) -> bool {
    // Counted first: whoever sees the connection asked can take it off again.
    increment(closing);
    if state.swap_if(OPEN, ASKED).is_ok() {
        true
    } else {
        decrement(closing);
        false
    }
}

/// A connection asked to close keeps its slot (it is processing a request); false when it
/// was not asked.
pub fn stay<C: Counter>(state: &C, closing: &C) -> bool {
    if state.swap_if(ASKED, OPEN).is_ok() {
        decrement(closing);
        true
    } else {
        false
    }
}

/// A connection has closed; it can no longer be asked.
pub fn close<C: Counter>(state: &C, closing: &C) {
    let mut seen = state.get();
    loop {
        match state.swap_if(seen, CLOSED) {
            Ok(ASKED) => return decrement(closing),
            Ok(_) => return,
            Err(now) => seen = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize as LoomUsize;
    use loom::sync::Arc;
    use loom::thread;

    struct Loom(LoomUsize);

    impl Counter for Loom {
        fn get(&self) -> usize {
            self.0.load(Ordering::Acquire)
        }

        fn swap_if(&self, current: usize, new: usize) -> Result<usize, usize> {
            self.0
                .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
        }
    }

    fn count(n: usize) -> Arc<Loom> {
        Arc::new(Loom(LoomUsize::new(n)))
    }

    /// A connection with one stream in progress; a second stream arrives while the bound of
    /// streams beyond the first is full, as the first ends on another worker. In every
    /// interleaving the refusal leaves the counts alone, and both end at the truth.
    #[test]
    fn a_refused_stream_never_touches_the_counts_of_one_that_ends() {
        loom::model(|| {
            let (mine, extra) = (count(1), count(1));
            let ending = {
                let (mine, extra) = (mine.clone(), extra.clone());
                thread::spawn(move || release(&*mine, &*extra))
            };
            let second = admit(&*mine, &*extra, 1);
            ending.join().unwrap();
            if second {
                // The first had ended: the second is the only one.
                assert_eq!(mine.get(), 1);
                release(&*mine, &*extra);
            }
            assert_eq!(mine.get(), 0);
            assert_eq!(extra.get(), 1, "the other connection's stream only");
        });
    }

    /// Two streams beyond the first race for the last place under the bound while the first
    /// ends: the bound is never passed, and every count returns to zero.
    #[test]
    fn streams_racing_for_the_last_place_never_pass_the_bound_nor_drift() {
        // Three threads: every interleaving with up to three preemptions (tokio's models
        // use the same bound).
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let (mine, extra) = (count(1), count(0));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (mine, extra) = (mine.clone(), extra.clone());
                    thread::spawn(move || {
                        if admit(&*mine, &*extra, 1) {
                            assert!(extra.get() <= 1, "the bound passed");
                            release(&*mine, &*extra);
                        }
                    })
                })
                .collect();
            release(&*mine, &*extra);
            for racer in racers {
                racer.join().unwrap();
            }
            assert_eq!(mine.get(), 0);
            assert_eq!(extra.get(), 0);
        });
    }

    /// The accept loop asks a connection to close while it closes on its own or decides to
    /// stay: `closing` ends at zero in every interleaving, and never goes below it.
    #[test]
    fn asking_a_connection_that_closes_or_stays_leaves_no_count_behind() {
        loom::model(|| {
            let (state, closing) = (count(OPEN), count(0));
            let connection = {
                let (state, closing) = (state.clone(), closing.clone());
                thread::spawn(move || {
                    stay(&*state, &*closing);
                    close(&*state, &*closing);
                })
            };
            let asked = ask(&*state, &*closing);
            connection.join().unwrap();
            assert_eq!(closing.get(), 0, "asked: {asked}");
            assert_eq!(state.get(), CLOSED);
            assert!(
                !ask(&*state, &*closing),
                "a closed connection cannot be asked"
            );
            assert_eq!(closing.get(), 0);
        });
    }
}
