//! Idempotent producers: per-log memory of each producer's recent batches, so a retry is
//! answered with its original offsets instead of being appended twice.
//!
//! The table mirrors what the log holds: it is rebuilt from the log at recovery
//! (`RecoveredLog::producers`) and updated on every local write (head and replicas alike), so
//! dedup survives restarts and needs no time window.

use crate::effects::{ProducerBatch, PRODUCER_BATCHES_KEPT};
use crate::types::{Offset, ProducerId};
use std::collections::{BTreeMap, VecDeque};

/// Producers remembered per log; the least recently seen is forgotten beyond this.
pub const PRODUCERS_PER_LOG_MAX: usize = 10_000;

/// What to do with a producer's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dedup {
    /// Not seen: append it.
    New,
    /// A retry of a batch already in the log at `base_offset`.
    Duplicate {
        base_offset: Offset,
        record_count: u32,
    },
    /// Out of order: the producer's next sequence is `expected` (or the batch reuses a
    /// sequence with another record count).
    Gap { expected: u64 },
}

#[derive(Clone, Debug)]
struct Producer {
    batches: VecDeque<ProducerBatch>,
    stamp: u64,
}

/// Recent batches of every producer of one log.
#[derive(Clone, Debug)]
pub struct ProducerTable {
    producers: BTreeMap<ProducerId, Producer>,
    /// Least-recently-used order for eviction: stamp → producer.
    lru: BTreeMap<u64, ProducerId>,
    stamp: u64,
    producers_max: usize,
}

impl ProducerTable {
    pub fn new(producers_max: usize) -> ProducerTable {
        assert!(producers_max > 0);
        ProducerTable {
            producers: BTreeMap::new(),
            lru: BTreeMap::new(),
            stamp: 0,
            producers_max,
        }
    }

    /// Rebuilds the table from recovered batches (oldest first per producer).
    pub fn from_recovered(batches: &[ProducerBatch], producers_max: usize) -> ProducerTable {
        let mut t = ProducerTable::new(producers_max);
        for b in batches {
            t.record(b.producer, b.seq, b.record_count, b.base_offset);
        }
        t
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Classifies a batch of `record_count` records whose first sequence is `seq`.
    pub fn check(&self, producer: ProducerId, seq: u64, record_count: u32) -> Dedup {
        if producer.0 == 0 {
            return Dedup::New;
        }
        let Some(p) = self.producers.get(&producer) else {
            // Unknown (new, or forgotten): nothing to compare against.
            return Dedup::New;
        };
        if let Some(b) = p.batches.iter().find(|b| b.seq == seq) {
            if b.record_count == record_count {
                return Dedup::Duplicate {
                    base_offset: b.base_offset,
                    record_count,
                };
            }
            return Dedup::Gap {
                expected: next_seq(b),
            };
        }
        let last = p.batches.back().map(next_seq).unwrap_or(seq);
        if seq == last {
            Dedup::New
        } else {
            Dedup::Gap { expected: last }
        }
    }

    /// Forgets every batch at or past `end` (the log lost them: a failed write), and producers
    /// left with none, as a rebuild from the log would.
    pub fn forget_from(&mut self, end: Offset) {
        let mut gone = Vec::new();
        for (id, p) in self.producers.iter_mut() {
            while p.batches.back().is_some_and(|b| b.base_offset >= end) {
                p.batches.pop_back();
            }
            if p.batches.is_empty() {
                gone.push((*id, p.stamp));
            }
        }
        for (id, stamp) in gone {
            self.producers.remove(&id);
            self.lru.remove(&stamp);
        }
        assert_eq!(self.lru.len(), self.producers.len());
    }

    /// Remembers a batch written to the log.
    pub fn record(&mut self, producer: ProducerId, seq: u64, record_count: u32, base: Offset) {
        if producer.0 == 0 {
            return;
        }
        self.stamp += 1;
        let stamp = self.stamp;
        let p = self.producers.entry(producer).or_insert_with(|| Producer {
            batches: VecDeque::new(),
            stamp,
        });
        self.lru.remove(&p.stamp);
        p.stamp = stamp;
        self.lru.insert(stamp, producer);
        p.batches.push_back(ProducerBatch {
            producer,
            seq,
            record_count,
            base_offset: base,
        });
        while p.batches.len() > PRODUCER_BATCHES_KEPT {
            p.batches.pop_front();
        }
        while self.producers.len() > self.producers_max {
            let Some((_, oldest)) = self.lru.pop_first() else {
                break;
            };
            self.producers.remove(&oldest);
        }
        assert_eq!(self.lru.len(), self.producers.len());
    }
}

fn next_seq(b: &ProducerBatch) -> u64 {
    b.seq.saturating_add(u64::from(b.record_count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_rules() {
        let mut t = ProducerTable::new(10);
        let p = ProducerId(7);
        assert_eq!(t.check(p, 0, 2), Dedup::New);
        t.record(p, 0, 2, Offset(10));
        assert_eq!(
            t.check(p, 0, 2),
            Dedup::Duplicate {
                base_offset: Offset(10),
                record_count: 2
            }
        );
        assert_eq!(t.check(p, 2, 1), Dedup::New);
        assert_eq!(t.check(p, 3, 1), Dedup::Gap { expected: 2 });
        assert_eq!(t.check(p, 0, 3), Dedup::Gap { expected: 2 });
        assert_eq!(t.check(ProducerId(0), 0, 2), Dedup::New);
        let kept = PRODUCER_BATCHES_KEPT as u64;
        for i in 1..kept + 5 {
            t.record(p, 2 * i, 2, Offset(10 + 2 * i));
        }
        // Only the last PRODUCER_BATCHES_KEPT are remembered: an older retry is out of order...
        assert!(matches!(t.check(p, 0, 2), Dedup::Gap { .. }));
        assert!(matches!(
            t.check(p, 2 * (kept + 4), 2),
            Dedup::Duplicate { .. }
        ));
        // ... but a retry of every batch of a producer's widest window is answered from dedup.
        for i in 5..kept + 5 {
            assert_eq!(
                t.check(p, 2 * i, 2),
                Dedup::Duplicate {
                    base_offset: Offset(10 + 2 * i),
                    record_count: 2
                },
                "batch {i} of a full window"
            );
        }
    }

    #[test]
    fn table_is_bounded() {
        let mut t = ProducerTable::new(3);
        for i in 1..=5u64 {
            t.record(ProducerId(i), 0, 1, Offset(i));
        }
        assert_eq!(t.len(), 3);
        // The oldest two were forgotten; a forgotten producer starts afresh.
        assert_eq!(t.check(ProducerId(1), 5, 1), Dedup::New);
        assert!(matches!(
            t.check(ProducerId(5), 0, 1),
            Dedup::Duplicate { .. }
        ));
    }

    #[test]
    fn rebuilt_from_recovery() {
        let rec = vec![
            ProducerBatch {
                producer: ProducerId(1),
                seq: 0,
                record_count: 3,
                base_offset: Offset(0),
            },
            ProducerBatch {
                producer: ProducerId(1),
                seq: 3,
                record_count: 1,
                base_offset: Offset(5),
            },
        ];
        let t = ProducerTable::from_recovered(&rec, 10);
        assert_eq!(t.check(ProducerId(1), 4, 1), Dedup::New);
        assert_eq!(
            t.check(ProducerId(1), 3, 1),
            Dedup::Duplicate {
                base_offset: Offset(5),
                record_count: 1
            }
        );
    }
}
