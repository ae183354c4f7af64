//! The producer table storage rebuilds at recovery: the last few batches of each idempotent
//! producer, so deduplication of client retries survives a restart.

use chainlog_core::effects::{ProducerBatch, PRODUCER_BATCHES_KEPT};
use chainlog_core::ProducerId;
use std::collections::{BTreeMap, VecDeque};

/// Most producers remembered per log; beyond it the one that wrote least recently is
/// forgotten (its retries of old batches are then no longer recognised). Bounds the table in
/// memory and in every sealed segment's index file (16 Ki x 5 x 32 bytes = 2.5 MiB at most).
pub const PRODUCERS_MAX: usize = 16 * 1024;

#[derive(Clone, Debug, Default)]
pub struct ProducerTable {
    map: BTreeMap<ProducerId, VecDeque<ProducerBatch>>,
}

impl ProducerTable {
    /// Records a batch (producer 0 means "not idempotent" and is ignored; a batch at or below
    /// the producer's newest known batch is already known and ignored).
    pub fn add(&mut self, b: ProducerBatch) {
        if b.producer.0 == 0 {
            return;
        }
        let q = self.map.entry(b.producer).or_default();
        if q.back()
            .is_some_and(|last| last.base_offset >= b.base_offset)
        {
            return;
        }
        q.push_back(b);
        while q.len() > PRODUCER_BATCHES_KEPT {
            q.pop_front();
        }
        if self.map.len() > PRODUCERS_MAX {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, q)| q.back().map(|b| b.base_offset))
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.map.remove(&p);
            }
        }
    }

    /// Replaces the table with a snapshot (from a sealed segment's index).
    pub fn reset_to(&mut self, batches: &[ProducerBatch]) {
        self.map.clear();
        for b in batches {
            self.add(b.clone());
        }
    }

    /// Every remembered batch, oldest first.
    pub fn to_vec(&self) -> Vec<ProducerBatch> {
        let mut v: Vec<ProducerBatch> = self.map.values().flatten().cloned().collect();
        v.sort_by_key(|b| b.base_offset);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chainlog_core::Offset;

    fn pb(p: u64, base: u64) -> ProducerBatch {
        ProducerBatch {
            producer: ProducerId(p),
            seq: base * 10,
            record_count: 1,
            base_offset: Offset(base),
        }
    }

    #[test]
    fn keeps_last_batches_per_producer() {
        let mut t = ProducerTable::default();
        let n = PRODUCER_BATCHES_KEPT as u64 + 5;
        for i in 0..n {
            t.add(pb(1, i));
            t.add(pb(0, i));
        }
        t.add(pb(1, n - 3)); // already known: ignored
        let v = t.to_vec();
        assert_eq!(v.len(), PRODUCER_BATCHES_KEPT);
        assert_eq!(v[0].base_offset, Offset(5));
        assert_eq!(v[PRODUCER_BATCHES_KEPT - 1].base_offset, Offset(n - 1));
    }
}
