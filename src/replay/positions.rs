//! Where a replay's consumer group stands in each partition of the dead-letter topic, and
//! every rule about what may be committed.
//!
//! A dead letter is put through, skipped (not selected), or stays (still refused, held
//! behind an earlier letter of its ticket, or left undone by a halt). A letter that stays is
//! never skipped by a later run: the group's committed offset stops at the first such letter,
//! and the commit's metadata names the letters after it that are still to do and how far the
//! group has read, so the next run reads from there again and puts through exactly those,
//! writing none of the others a second time.
//!
//! The metadata is `tkb1 t<read> r<gap>+<count>,...`: the read mark and the runs of letters
//! to do, relative to the committed offset. Kafka keeps up to 4,096 bytes of it by default
//! (`offset.metadata.max.bytes`); a partition whose list would outgrow [`MAX_METADATA`] is
//! read no further in that run.

use std::collections::{BTreeMap, BTreeSet};

/// The longest metadata a partition's commit carries.
pub const MAX_METADATA: usize = 3_000;

/// Room kept in [`MAX_METADATA`] for the letters in flight when a commit is made.
const IN_FLIGHT_ROOM: usize = 800;

const VERSION: &str = "tkb1";

/// What to do with a letter just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Put it through (a new letter, or one an earlier run left to do).
    Process,
    /// An earlier run of the group put it through or passed it over: nothing to do.
    Done,
}

/// What a commit writes for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub offset: i64,
    pub metadata: String,
}

/// Every partition's position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Positions {
    parts: BTreeMap<i32, Part>,
}

#[derive(Debug, Clone, PartialEq)]
struct Part {
    /// Every offset below it has a known state: done, unless in `todo`.
    read: i64,
    /// Offsets below `read` still to put through: letters that stay, in flight, undone.
    todo: BTreeSet<i64>,
    /// The next offset the consumer should hand over: offsets skipped below it do not exist
    /// (transaction markers, compacted records).
    next: i64,
}

impl Positions {
    /// Takes the group's committed position in `partition` (its offset and metadata);
    /// returns where reading starts.
    pub fn resume(&mut self, partition: i32, offset: i64, metadata: &str) -> i64 {
        let (read, todo) = decode(offset, metadata).unwrap_or((offset, BTreeSet::new()));
        self.parts.insert(
            partition,
            Part {
                read: read.max(offset),
                todo,
                next: offset,
            },
        );
        offset
    }

    /// The consumer handed over `offset`: whether to put it through. A letter to process is
    /// counted as to do until [`Positions::done`].
    pub fn read(&mut self, partition: i32, offset: i64) -> Step {
        let part = self.parts.entry(partition).or_insert_with(|| Part {
            read: offset,
            todo: BTreeSet::new(),
            next: offset,
        });
        if offset > part.next {
            let gone: Vec<i64> = part.todo.range(part.next..offset).copied().collect();
            for o in gone {
                part.todo.remove(&o);
            }
        }
        part.next = part.next.max(offset + 1);
        if offset < part.read {
            return if part.todo.contains(&offset) {
                Step::Process
            } else {
                Step::Done
            };
        }
        part.read = offset + 1;
        part.todo.insert(offset);
        Step::Process
    }

    /// The letter at `offset` needs nothing more: put through, a duplicate, or not selected.
    /// A letter that stays, or that a halt left undone, is simply not marked done.
    pub fn done(&mut self, partition: i32, offset: i64) {
        if let Some(part) = self.parts.get_mut(&partition) {
            part.todo.remove(&offset);
        }
    }

    /// Whether `partition` keeps so many letters to do that its metadata is near its bound:
    /// it is read no further in this run.
    pub fn crowded(&self, partition: i32) -> bool {
        self.parts.get(&partition).is_some_and(|part| {
            let offset = part.todo.first().copied().unwrap_or(part.read);
            encode(offset, part).len() > MAX_METADATA - IN_FLIGHT_ROOM
        })
    }

    /// What to commit for each partition read or resumed.
    pub fn committable(&self) -> BTreeMap<i32, Commit> {
        self.parts
            .iter()
            .map(|(&p, part)| {
                let offset = part.todo.first().copied().unwrap_or(part.read);
                let metadata = encode(offset, part);
                (p, Commit { offset, metadata })
            })
            .collect()
    }

    /// Letters to do below the read mark, by partition (for the summary).
    pub fn to_do(&self) -> BTreeMap<i32, usize> {
        self.parts
            .iter()
            .filter(|(_, part)| !part.todo.is_empty())
            .map(|(&p, part)| (p, part.todo.len()))
            .collect()
    }
}

/// `tkb1 t<read - offset> r<gap>+<count>,...`; just the version and read mark when nothing is
/// to do.
fn encode(offset: i64, part: &Part) -> String {
    let mut text = format!("{VERSION} t{}", part.read - offset);
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &o in &part.todo {
        match runs.last_mut() {
            Some((start, count)) if *start + *count == o => *count += 1,
            _ => runs.push((o, 1)),
        }
    }
    if !runs.is_empty() {
        text.push_str(" r");
        let mut at = offset;
        for (i, (start, count)) in runs.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&format!("{}+{}", start - at, count));
            at = start + count;
        }
    }
    text
}

/// The read mark and the letters to do that `metadata` names, or None when it is not ours.
fn decode(offset: i64, metadata: &str) -> Option<(i64, BTreeSet<i64>)> {
    let mut fields = metadata.split(' ');
    if fields.next()? != VERSION {
        return None;
    }
    let read = offset + fields.next()?.strip_prefix('t')?.parse::<i64>().ok()?;
    let mut todo = BTreeSet::new();
    if let Some(runs) = fields.next() {
        let mut at = offset;
        for run in runs.strip_prefix('r')?.split(',') {
            let (gap, count) = run.split_once('+')?;
            let (gap, count): (i64, i64) = (gap.parse().ok()?, count.parse().ok()?);
            if gap < 0 || count < 1 {
                return None;
            }
            let start = at + gap;
            todo.extend(start..start + count);
            at = start + count;
        }
        if at > read {
            return None;
        }
    }
    Some((read, todo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(p: &Positions, partition: i32) -> (i64, String) {
        let c = &p.committable()[&partition];
        (c.offset, c.metadata.clone())
    }

    #[test]
    fn the_committed_position_waits_for_the_first_record_in_flight_or_undone() {
        let mut p = Positions::default();
        assert_eq!(p.read(0, 10), Step::Process);
        assert_eq!(p.read(0, 11), Step::Process);
        assert_eq!(p.read(1, 3), Step::Process);
        p.done(0, 11);
        assert_eq!(commit(&p, 0).0, 10);
        assert_eq!(commit(&p, 1).0, 3);
        p.done(0, 10);
        p.done(1, 3);
        assert_eq!(commit(&p, 0).0, 12);
        assert_eq!(commit(&p, 1).0, 4);
        // Left undone by a halt: never passed.
        assert_eq!(p.read(1, 4), Step::Process);
        assert_eq!(p.read(1, 5), Step::Process);
        p.done(1, 5);
        assert_eq!(commit(&p, 1).0, 4);
    }

    #[test]
    fn letters_that_stay_are_taken_up_again_and_the_others_are_not() {
        let mut p = Positions::default();
        p.resume(0, 100, "");
        // 100 stays, 101 published, 102 and 103 stay, 104 not selected, 105 in flight.
        for o in 100..106 {
            assert_eq!(p.read(0, o), Step::Process);
        }
        for o in [101, 104] {
            p.done(0, o);
        }
        let (offset, metadata) = commit(&p, 0);
        assert_eq!((offset, metadata.as_str()), (100, "tkb1 t6 r0+1,1+2,1+1"));

        // The next run resumes there: it puts through exactly the letters still to do, then
        // whatever is new.
        let mut next = Positions::default();
        assert_eq!(next.resume(0, offset, &metadata), 100);
        let steps: Vec<Step> = (100..108).map(|o| next.read(0, o)).collect();
        use Step::*;
        assert_eq!(
            steps,
            [Process, Done, Process, Process, Done, Process, Process, Process]
        );
        for o in [100, 102, 103, 105, 106, 107] {
            next.done(0, o);
        }
        assert_eq!(commit(&next, 0), (108, "tkb1 t0".to_owned()));
    }

    #[test]
    fn offsets_that_do_not_exist_are_not_waited_for() {
        let mut p = Positions::default();
        p.resume(0, 7, "tkb1 t5 r1+1,2+1");
        // 8 and 11 were to do; the consumer hands over 9, then 12: 8 is gone (compacted).
        assert_eq!(p.read(0, 9), Step::Done);
        assert_eq!(p.read(0, 11), Step::Process);
        p.done(0, 11);
        assert_eq!(commit(&p, 0), (12, "tkb1 t0".to_owned()));
    }

    #[test]
    fn metadata_that_is_not_ours_starts_at_the_committed_offset() {
        for foreign in [
            "",
            "x",
            "tkb1",
            "tkb1 tz",
            "tkb1 t2 r0+9",
            "tkb1 t5 r-1+1",
            "tkb2 t3",
        ] {
            let mut p = Positions::default();
            p.resume(0, 50, foreign);
            assert_eq!(p.read(0, 50), Step::Process, "{foreign}");
            assert_eq!(p.read(0, 51), Step::Process, "{foreign}");
        }
    }

    #[test]
    fn a_partition_whose_list_nears_the_bound_is_crowded() {
        let mut p = Positions::default();
        let mut o = 0;
        while !p.crowded(0) {
            // Every other letter stays.
            p.read(0, o);
            p.read(0, o + 1);
            p.done(0, o + 1);
            o += 2;
        }
        let (_, metadata) = commit(&p, 0);
        assert!(metadata.len() <= MAX_METADATA, "{}", metadata.len());
        assert!(o > 500, "only {o} letters before crowding");
    }
}
