//! The server's own storage counters around one run (from the head's `status` document): how
//! many batches each fdatasync carried, and how many records each batch — the group-commit and
//! client-batching factors that explain a figure; and each node's own turnaround (its share of
//! a hop, from every node's stage histograms).

use serde::{Deserialize, Serialize};

/// Storage counters of one node, or their change over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageCounters {
    pub batches: u64,
    pub groups: u64,
    pub fsyncs: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub padding_bytes: u64,
    /// Spare segments written full of zeros, and deleted segments recycled as spares.
    #[serde(default)]
    pub spares_zeroed: u64,
    #[serde(default)]
    pub segments_recycled: u64,
}

/// The spare segments a node still has to zero, from its status document (a gauge, so not
/// one of the counters); `None` if the node does not report it.
pub fn spares_pending(doc: &serde_json::Value) -> Option<u64> {
    doc.get("storage")?.get("spares_pending")?.as_u64()
}

impl StorageCounters {
    /// Reads `storage.{batches,groups,...}` from a status document; `None` if the node reported
    /// no storage section (a field it lacks counts as 0, so older servers still parse).
    pub fn from_status(doc: &serde_json::Value) -> Option<StorageCounters> {
        let s = doc.get("storage")?.as_object()?;
        let f = |k: &str| s.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        Some(StorageCounters {
            batches: f("batches"),
            groups: f("groups"),
            fsyncs: f("fsyncs"),
            writes: f("writes"),
            bytes_written: f("bytes_written"),
            padding_bytes: f("padding_bytes"),
            spares_zeroed: f("spares_zeroed"),
            segments_recycled: f("segments_recycled"),
        })
    }

    /// `self - before`, saturating (a restarted server would otherwise underflow).
    pub fn since(&self, before: &StorageCounters) -> StorageCounters {
        StorageCounters {
            batches: self.batches.saturating_sub(before.batches),
            groups: self.groups.saturating_sub(before.groups),
            fsyncs: self.fsyncs.saturating_sub(before.fsyncs),
            writes: self.writes.saturating_sub(before.writes),
            bytes_written: self.bytes_written.saturating_sub(before.bytes_written),
            padding_bytes: self.padding_bytes.saturating_sub(before.padding_bytes),
            spares_zeroed: self.spares_zeroed.saturating_sub(before.spares_zeroed),
            segments_recycled: self
                .segments_recycled
                .saturating_sub(before.segments_recycled),
        }
    }

    /// Batches made durable per fdatasync (the group-commit factor); NaN with no fsync.
    pub fn batches_per_fsync(&self) -> f64 {
        if self.fsyncs == 0 {
            f64::NAN
        } else {
            self.batches as f64 / self.fsyncs as f64
        }
    }
}

/// Each node's own turnaround over a server's life (p50 µs of its `latency_us` histograms,
/// head first; `None` where a node timed nothing): a frame carrying batches read off the socket
/// → the batch handed to the successor's link, and → handed to storage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Turnaround {
    pub forward_p50_us: Vec<Option<f64>>,
    pub write_p50_us: Vec<Option<f64>>,
}

impl Turnaround {
    /// From the status documents of every node, in chain order.
    pub fn from_statuses(docs: &[serde_json::Value]) -> Turnaround {
        let p50 = |doc: &serde_json::Value, stage: &str| {
            let s = doc.get("latency_us")?.get(stage)?;
            if s.get("count")?.as_u64()? == 0 {
                return None;
            }
            s.get("p50")?.as_u64().map(|v| v as f64)
        };
        Turnaround {
            forward_p50_us: docs.iter().map(|d| p50(d, "received_to_forward")).collect(),
            write_p50_us: docs.iter().map(|d| p50(d, "received_to_write")).collect(),
        }
    }

    /// The head's read → forwarded.
    pub fn head_forward_p50_us(&self) -> Option<f64> {
        self.forward_p50_us.first().copied().flatten()
    }

    /// The middles' read → forwarded, their mean (`None` without a middle that timed it).
    pub fn middle_forward_p50_us(&self) -> Option<f64> {
        let n = self.forward_p50_us.len();
        let mids: Vec<f64> = self
            .forward_p50_us
            .get(1..n.checked_sub(1)?)?
            .iter()
            .flatten()
            .copied()
            .collect();
        (!mids.is_empty()).then(|| mids.iter().sum::<f64>() / mids.len() as f64)
    }

    /// The tail's read → handed to storage.
    pub fn tail_write_p50_us(&self) -> Option<f64> {
        self.write_p50_us.last().copied().flatten()
    }

    /// The path one batch takes through the nodes' own code: every node but the tail until it
    /// forwards, the tail until it hands the batch to storage (its write ends the round's data
    /// path). `None` unless every node timed its part.
    pub fn critical_path_p50_us(&self) -> Option<f64> {
        let n = self.write_p50_us.len();
        if n == 0 || self.forward_p50_us.len() != n {
            return None;
        }
        let forwards: Option<f64> = self.forward_p50_us[..n - 1].iter().copied().sum();
        Some(forwards? + self.tail_write_p50_us()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turnaround_reads_each_nodes_stages() {
        let stage = |count: u64, p50: u64| serde_json::json!({"count": count, "p50": p50});
        let node = |fwd: serde_json::Value, wr: serde_json::Value| serde_json::json!({"latency_us": {"received_to_forward": fwd, "received_to_write": wr}});
        let docs = [
            node(stage(10, 14), stage(10, 12)),
            node(stage(10, 13), stage(10, 11)),
            node(stage(0, 0), stage(10, 20)),
        ];
        let t = Turnaround::from_statuses(&docs);
        assert_eq!(t.forward_p50_us, vec![Some(14.0), Some(13.0), None]);
        assert_eq!(t.critical_path_p50_us(), Some(14.0 + 13.0 + 20.0));
        // A node that timed nothing (an older server) leaves the path unknown.
        let t =
            Turnaround::from_statuses(&[docs[0].clone(), serde_json::json!({}), docs[2].clone()]);
        assert_eq!(t.critical_path_p50_us(), None);
        assert_eq!(Turnaround::default().critical_path_p50_us(), None);
    }

    #[test]
    fn parses_and_diffs_status() {
        let before: serde_json::Value = serde_json::from_str(
            r#"{"storage":{"io_mode":"direct","batches":10,"groups":5,"fsyncs":5,"writes":5,"bytes_written":40960,"padding_bytes":100,"logs":[]}}"#,
        )
        .unwrap();
        let after: serde_json::Value = serde_json::from_str(
            r#"{"storage":{"batches":1010,"groups":105,"fsyncs":105,"writes":120,"bytes_written":4136960}}"#,
        )
        .unwrap();
        let d = StorageCounters::from_status(&after)
            .unwrap()
            .since(&StorageCounters::from_status(&before).unwrap());
        assert_eq!(d.batches, 1000);
        assert_eq!(d.fsyncs, 100);
        assert_eq!(d.batches_per_fsync(), 10.0);
        assert_eq!(d.padding_bytes, 0);
        assert!(StorageCounters::from_status(&serde_json::json!({"storage": null})).is_none());
        assert!(StorageCounters::default().batches_per_fsync().is_nan());
    }
}
