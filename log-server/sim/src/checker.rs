//! The invariants, stated once and checked as the run goes: every copy of an offset holds the
//! same bytes (so each log is a prefix of its predecessor's on their common range and replicas
//! agree byte for byte below the committed end), offsets are dense, an acknowledged append is
//! durable on every replica when acknowledged and never changes, committed ends never go back
//! and are durable everywhere, each request gets at most one reply, reads return only
//! committed, correct bytes.

use crate::disk::{Removed, SimDisk, StoredBatch};
use bytes::Bytes;
use chainlog_core::record::{BatchHeader, HEADER_LEN};
use chainlog_core::{ErrorCode, LogId, Offset, ReplicaStatus};
use std::collections::{BTreeMap, BTreeSet};

/// One offset range as some node holds it; `holders` counts the nodes holding it now.
#[derive(Clone, Debug)]
struct Truth {
    end: Offset,
    bytes: Bytes,
    holders: u32,
}

/// A violated invariant, with what was seen.
pub type Violation = String;

#[derive(Default)]
pub struct Checker {
    truth: BTreeMap<LogId, BTreeMap<Offset, Truth>>,
    /// Acknowledged appends: base → end, per log.
    pub acked: BTreeMap<LogId, BTreeMap<Offset, Offset>>,
    /// (log, producer, seq) → base given in the first `AppendOk`.
    producer_acks: BTreeMap<(LogId, u64, u64), Offset>,
    replied: BTreeSet<u64>,
    /// Committed end last reported by each node (reset when it restarts).
    committed: BTreeMap<(usize, LogId), Offset>,
    /// Largest committed end any node ever reported.
    pub max_committed: BTreeMap<LogId, Offset>,
    /// Batches trims deleted from every replica. Only committed offsets are trimmed and a
    /// committed offset never gets other bytes, so a read that storage served just before the
    /// trim is still checked against them.
    trimmed: BTreeMap<LogId, BTreeMap<Offset, Truth>>,
}

impl Checker {
    /// A node stored batches: each must match every other copy of those offsets.
    pub fn on_write(
        &mut self,
        node: usize,
        log: LogId,
        stored: &[StoredBatch],
    ) -> Result<(), Violation> {
        let t = self.truth.entry(log).or_default();
        for s in stored {
            if let Some((&base, prev)) = t.range(..s.base).next_back() {
                if prev.end > s.base {
                    return Err(format!(
                        "node {} wrote {log} batch at {} inside another copy's batch {base}..{}",
                        node + 1,
                        s.base,
                        prev.end
                    ));
                }
            }
            match t.get_mut(&s.base) {
                Some(existing) => {
                    if existing.bytes != s.bytes || existing.end != s.end {
                        return Err(format!(
                            "divergence: node {} wrote different bytes at {log} offset {} than \
                             another replica holds",
                            node + 1,
                            s.base
                        ));
                    }
                    existing.holders += 1;
                }
                None => {
                    if let Some((&next, _)) = t.range(s.base..).next() {
                        if next < s.end {
                            return Err(format!(
                                "node {} wrote {log} batch {}..{} overlapping another copy at {next}",
                                node + 1,
                                s.base,
                                s.end
                            ));
                        }
                    }
                    t.insert(
                        s.base,
                        Truth {
                            end: s.end,
                            bytes: s.bytes.clone(),
                            holders: 1,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Batches a node no longer holds (crash, recovery cut, or a trim when `trim`).
    pub fn on_removed(&mut self, removed: &Removed, trim: bool) {
        for (log, b) in removed {
            let Some(t) = self.truth.get_mut(log) else {
                continue;
            };
            let Some(e) = t.get_mut(&b.base) else {
                continue;
            };
            e.holders = e.holders.saturating_sub(1);
            if e.holders == 0 {
                if let Some(e) = t.remove(&b.base) {
                    if trim {
                        self.trimmed.entry(*log).or_default().insert(b.base, e);
                    }
                }
            }
        }
    }

    /// A reply left a node; `push` marks subscription pushes, which may repeat.
    pub fn on_reply(&mut self, rid: u64, push: bool) -> Result<(), Violation> {
        if push {
            return Ok(());
        }
        if !self.replied.insert(rid) {
            return Err(format!("request {rid} got a second reply"));
        }
        Ok(())
    }

    /// An `AppendOk` left the head: the batch must be durable, intact, on every replica.
    #[allow(clippy::too_many_arguments)]
    pub fn on_append_ok(
        &mut self,
        log: LogId,
        base: Offset,
        record_count: u32,
        sent: &Bytes,
        disks: &[&SimDisk],
        damaged: &[bool],
    ) -> Result<(), Violation> {
        let sent_h = BatchHeader::decode(sent).map_err(|e| format!("client batch: {e}"))?;
        if sent_h.record_count != record_count {
            return Err(format!(
                "AppendOk for {record_count} records of a {}-record batch",
                sent_h.record_count
            ));
        }
        let end = base.plus(u64::from(record_count));
        for (i, d) in disks.iter().enumerate() {
            if damaged[i] {
                continue;
            }
            let l = d
                .logs
                .get(&log)
                .ok_or_else(|| format!("acked append to {log} but node {} lacks the log", i + 1))?;
            if base < l.start {
                continue; // a retry answered after a trim took the batch
            }
            let idx = l.find(base).ok_or_else(|| {
                format!(
                    "acked append {log}@{base} is not stored on node {} (its log ends at {})",
                    i + 1,
                    l.end()
                )
            })?;
            if idx >= l.synced {
                return Err(format!(
                    "acked append {log}@{base} is not durable on node {} (durable end {})",
                    i + 1,
                    l.synced_end()
                ));
            }
            let s = &l.batches[idx];
            if s.end != end || s.bytes[HEADER_LEN..] != sent[HEADER_LEN..sent_h.batch_len()] {
                return Err(format!(
                    "acked append {log}@{base} on node {} holds other records",
                    i + 1
                ));
            }
        }
        if let Some(prev) = self.acked.entry(log).or_default().insert(base, end) {
            if prev != end {
                return Err(format!("{log}@{base} acked with two lengths"));
            }
        }
        if sent_h.producer_id.0 != 0 {
            let key = (log, sent_h.producer_id.0, sent_h.producer_seq);
            match self.producer_acks.get(&key) {
                Some(b) if *b != base => {
                    return Err(format!(
                        "producer {} seq {} acked at {b} and again at {base}",
                        key.1, key.2
                    ))
                }
                Some(_) => {}
                None => {
                    self.producer_acks.insert(key, base);
                }
            }
        }
        Ok(())
    }

    /// Batches a node served to a reader: committed, dense, and the bytes every replica holds.
    pub fn check_served(
        &self,
        node: usize,
        log: LogId,
        from: Offset,
        committed_end: Offset,
        batches: &[Bytes],
    ) -> Result<Option<Offset>, Violation> {
        let mut expect: Option<Offset> = None;
        for (i, b) in batches.iter().enumerate() {
            let h = BatchHeader::decode(b).map_err(|e| format!("served a bad batch: {e}"))?;
            if b.len() != h.batch_len() {
                return Err(format!("node {} served a batch with padding", node + 1));
            }
            if i == 0 && (h.base_offset > from || h.end_offset() <= from) {
                return Err(format!(
                    "node {} answered a read at {from} with a batch {}..{}",
                    node + 1,
                    h.base_offset,
                    h.end_offset()
                ));
            }
            if let Some(e) = expect {
                if h.base_offset != e {
                    return Err(format!("node {} served a gap at {e}", node + 1));
                }
            }
            if h.end_offset() > committed_end {
                return Err(format!(
                    "node {} served {log}@{} past its committed end {committed_end}",
                    node + 1,
                    h.base_offset
                ));
            }
            let truth = self
                .truth
                .get(&log)
                .and_then(|t| t.get(&h.base_offset))
                .or_else(|| self.trimmed.get(&log).and_then(|t| t.get(&h.base_offset)))
                .ok_or_else(|| {
                    format!(
                        "node {} served {log}@{} which no replica holds",
                        node + 1,
                        h.base_offset
                    )
                })?;
            if truth.bytes != *b {
                return Err(format!(
                    "node {} served other bytes at {log}@{}",
                    node + 1,
                    h.base_offset
                ));
            }
            expect = Some(h.end_offset());
        }
        Ok(expect)
    }

    /// After a node handled an event: its committed ends never go back within its lifetime
    /// and are durable on every intact replica.
    pub fn on_status(
        &mut self,
        node: usize,
        status: &ReplicaStatus,
        disks: &[&SimDisk],
        damaged: &[bool],
    ) -> Result<(), Violation> {
        for l in &status.logs {
            let c = l.committed_end;
            let prev = self.committed.entry((node, l.log)).or_default();
            if c < *prev {
                return Err(format!(
                    "node {} committed end of {} went back from {} to {c}",
                    node + 1,
                    l.name,
                    prev
                ));
            }
            if c == *prev {
                continue;
            }
            *prev = c;
            let m = self.max_committed.entry(l.log).or_default();
            *m = (*m).max(c);
            for (i, d) in disks.iter().enumerate() {
                if damaged[i] {
                    continue;
                }
                let durable = d.logs.get(&l.log).map_or(Offset::ZERO, |x| x.synced_end());
                if durable < c {
                    return Err(format!(
                        "node {} knows {} committed up to {c} but node {} has it durable only \
                         up to {durable}",
                        node + 1,
                        l.name,
                        i + 1
                    ));
                }
            }
        }
        Ok(())
    }

    /// An append refused with a code that proves it stored nothing (`StorageFull`, `NotHead`,
    /// ...: `ErrorCode::proves_not_stored`) is held by no replica: the client may
    /// give its producer sequence to other records, which dedup would then answer with these
    /// offsets. (Unsequenced batches carry producer 0 semantics: nothing to check.)
    pub fn refused_is_stored_nowhere(
        sent: &Bytes,
        code: ErrorCode,
        disks: &[&SimDisk],
    ) -> Result<(), Violation> {
        let h = BatchHeader::decode(sent).map_err(|e| format!("client batch: {e}"))?;
        if h.producer_id.0 == 0 {
            return Ok(());
        }
        for (i, d) in disks.iter().enumerate() {
            let Some(l) = d.logs.get(&h.log_id) else {
                continue;
            };
            for b in &l.batches {
                let Ok(s) = BatchHeader::decode(&b.bytes) else {
                    continue;
                };
                if s.producer_id == h.producer_id && s.producer_seq == h.producer_seq {
                    return Err(format!(
                        "append of producer {} seq {} refused with {code:?} while node {} \
                         holds it at {}",
                        h.producer_id,
                        h.producer_seq,
                        i + 1,
                        s.base_offset
                    ));
                }
            }
        }
        Ok(())
    }

    /// No replica starts a log past its predecessor (disks in chain order): a node tells its
    /// successor only a start it holds durably, so a predecessor can always fetch what it lacks.
    pub fn starts_in_chain_order(disks: &[&SimDisk]) -> Result<(), Violation> {
        for (i, w) in disks.windows(2).enumerate() {
            for (log, l) in &w[1].logs {
                if let Some(p) = w[0].logs.get(log) {
                    if l.start > p.start {
                        return Err(format!(
                            "node {} starts {log} at {}, past its predecessor's start {}",
                            i + 2,
                            l.start,
                            p.start
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A node restarted: its committed ends start again from its saved hint.
    pub fn on_restart(&mut self, node: usize) {
        self.committed.retain(|(n, _), _| *n != node);
    }

    /// Whether a damaged node holds every committed offset again.
    pub fn repaired(&self, disk: &SimDisk) -> bool {
        self.max_committed
            .iter()
            .all(|(log, c)| disk.logs.get(log).is_some_and(|l| l.synced_end() >= *c))
    }

    /// Largest acknowledged end per log.
    pub fn acked_end(&self, log: LogId) -> Offset {
        self.acked
            .get(&log)
            .and_then(|m| m.values().max().copied())
            .unwrap_or(Offset::ZERO)
    }

    /// End of the run: every log is dense from its start, which no trim asked by a client
    /// lies below; every intact replica holds every acknowledged append at or past its start,
    /// durably and unchanged; no idempotent producer's sequence is in a log twice.
    pub fn check_final_disks(
        &self,
        disks: &[&SimDisk],
        trim_asked: &BTreeMap<LogId, Offset>,
    ) -> Result<(), Violation> {
        for (i, d) in disks.iter().enumerate() {
            for (log, l) in &d.logs {
                let asked = trim_asked.get(log).copied().unwrap_or(Offset::ZERO);
                if l.start > asked {
                    return Err(format!(
                        "node {} starts {log} at {}, past every trim asked ({asked})",
                        i + 1,
                        l.start
                    ));
                }
                let mut seen = BTreeSet::new();
                let mut next = l.start;
                for b in &l.batches {
                    let h = BatchHeader::decode(&b.bytes)
                        .map_err(|e| format!("node {} holds a bad batch: {e}", i + 1))?;
                    if h.base_offset != next || b.base != next {
                        return Err(format!(
                            "node {} holds {log} with a hole: {} where {next} was due",
                            i + 1,
                            h.base_offset
                        ));
                    }
                    next = h.end_offset();
                    if h.producer_id.0 != 0 && !seen.insert((h.producer_id, h.producer_seq)) {
                        return Err(format!(
                            "node {} holds producer {} sequence {} twice in {log}",
                            i + 1,
                            h.producer_id,
                            h.producer_seq
                        ));
                    }
                }
            }
        }
        for (log, acked) in &self.acked {
            for (i, d) in disks.iter().enumerate() {
                let l = d
                    .logs
                    .get(log)
                    .ok_or_else(|| format!("node {} lost log {log}", i + 1))?;
                for (base, end) in acked {
                    if *base < l.start {
                        continue; // trimmed: asked for by a client
                    }
                    let idx = l.find(*base).ok_or_else(|| {
                        format!(
                            "node {} lost acked {log}@{base} (ends at {})",
                            i + 1,
                            l.end()
                        )
                    })?;
                    if idx >= l.synced || l.batches[idx].end != *end {
                        return Err(format!("node {} holds acked {log}@{base} badly", i + 1));
                    }
                    let t = self.truth.get(log).and_then(|t| t.get(base));
                    if t.is_none_or(|t| t.bytes != l.batches[idx].bytes) {
                        return Err(format!("node {} changed acked {log}@{base}", i + 1));
                    }
                }
            }
        }
        Ok(())
    }
}
