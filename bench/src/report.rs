//! The suite's report: per-round results, medians over rounds, the ratios to the floors measured
//! in the same rounds, and the markdown/JSON renderings with revision, host and configuration.

use crate::floor::{DiskFloor, FloorRun, Layout};
use crate::loopback::LoopbackResult;
use crate::service::ServiceFloor;
use crate::storage_stats::{StorageCounters, Turnaround};
use crate::workload::AppendResult;
use chainlog_core::record::{HEADER_LEN, RECORD_OVERHEAD};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Target: a figure within this factor of its floor.
pub const TARGET_RATIO_MAX: f64 = 1.5;

/// Everything one interleaved round measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundResult {
    pub round: usize,
    /// One per in-flight level, in level order.
    pub floors: Vec<DiskFloor>,
    /// One per in-flight level, in level order (absent in reports from before it existed).
    #[serde(default)]
    pub service: Vec<ServiceFloor>,
    /// The same through a chain of as many minimal services as the chain has nodes.
    #[serde(default)]
    pub service_chain: Vec<ServiceFloor>,
    pub loopback: LoopbackResult,
    pub single: Vec<AppendResult>,
    pub chain: Vec<AppendResult>,
    /// The head's storage counters over each run (None if its status had none).
    pub single_storage: Vec<Option<StorageCounters>>,
    pub chain_storage: Vec<Option<StorageCounters>>,
    /// CPU seconds of the server process(es) and of the load generator over each run.
    pub single_cpu: Vec<Option<crate::cpu::CpuUse>>,
    pub chain_cpu: Vec<Option<crate::cpu::CpuUse>>,
    /// The head's status document after each run (None if the server did not answer).
    pub single_status: Vec<Option<serde_json::Value>>,
    pub chain_status: Vec<Option<serde_json::Value>>,
    /// Every chain node's own turnaround over each run (absent in older reports).
    #[serde(default)]
    pub chain_turnaround: Vec<Option<Turnaround>>,
    /// The chain at the top level in the steady state of a log under retention (filled past
    /// it first, so its rolls recycle segments instead of zeroing new ones).
    #[serde(default)]
    pub chain_retained: Option<AppendResult>,
    #[serde(default)]
    pub chain_retained_storage: Option<StorageCounters>,
    #[serde(default)]
    pub chain_retained_cpu: Option<crate::cpu::CpuUse>,
    /// At the top level: the service chain with its files growing as a growing log's do, once
    /// per way of growing them ([`crate::service::Space`]: pre-zeroed, unwritten).
    #[serde(default)]
    pub service_chain_growing: Vec<ServiceFloor>,
}

/// Revision, host and configuration of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub git_rev: String,
    pub started_unix_s: u64,
    pub host_nproc: usize,
    pub host_kernel: String,
    pub host_cpu: String,
    pub io_mode: String,
    pub floor_direct: bool,
    pub record_bytes: usize,
    pub levels: Vec<usize>,
    pub rounds: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub chain_nodes: usize,
    pub server_bin: String,
    pub data_dir: String,
    pub client_linger_us: u64,
    pub client_batches_in_flight_max: usize,
    /// Load-generator runtime: 0 = current-thread tokio, N = multi-thread with N workers.
    #[serde(default)]
    pub client_threads: usize,
    /// CPU list every measured process ran on (`--cpus`); None: wherever the OS put them.
    #[serde(default)]
    pub cpus: Option<String>,
}

/// Serde default for a figure a report written by an older version did not have.
fn nan() -> f64 {
    f64::NAN
}

/// Medians over rounds at one in-flight level.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LevelSummary {
    pub inflight: usize,
    pub floor_records_per_s: f64,
    pub floor_p50_us: f64,
    /// The layouts' own medians (NaN where a layout was not measured).
    pub floor_per_batch_records_per_s: f64,
    pub floor_per_batch_p50_us: f64,
    pub floor_packed_records_per_s: f64,
    pub floor_packed_p50_us: f64,
    pub floor_per_batch_cpu_us_per_record: f64,
    pub floor_packed_cpu_us_per_record: f64,
    #[serde(default = "nan")]
    pub floor_packed_dsync_records_per_s: f64,
    #[serde(default = "nan")]
    pub floor_packed_dsync_p50_us: f64,
    #[serde(default = "nan")]
    pub floor_packed_dsync_cpu_us_per_record: f64,
    pub single_records_per_s: f64,
    pub single_mb_per_s: f64,
    pub single_p50_us: f64,
    pub single_p99_us: f64,
    pub single_p999_us: f64,
    pub single_max_us: f64,
    pub chain_records_per_s: f64,
    pub chain_mb_per_s: f64,
    pub chain_p50_us: f64,
    pub chain_p99_us: f64,
    pub chain_p999_us: f64,
    pub chain_max_us: f64,
    /// Median over rounds of floor ÷ single (records/s); <= 1.5 meets the single-node target.
    pub single_vs_floor: f64,
    /// Median over rounds of (floor / nodes) ÷ chain (records/s).
    pub chain_vs_floor: f64,
    /// From the head's storage counters: client batching and group commit.
    pub single_records_per_batch: f64,
    pub single_batches_per_fsync: f64,
    pub chain_records_per_batch: f64,
    pub chain_batches_per_fsync: f64,
    /// CPU microseconds per acknowledged record (server process; load generator).
    pub single_server_cpu_us_per_record: f64,
    pub single_client_cpu_us_per_record: f64,
    pub chain_server_cpu_us_per_record: f64,
    pub chain_client_cpu_us_per_record: f64,
    /// Per-round values of the two ratios, for the spread.
    pub single_vs_floor_rounds: Vec<f64>,
    pub chain_vs_floor_rounds: Vec<f64>,
    /// The same two ratios against the N-page-aligned-writes layout alone (the floor as the
    /// issue first defined it: writes per sync = appends in flight).
    pub single_vs_per_batch_floor: f64,
    pub chain_vs_per_batch_floor: f64,
    /// The service floor (a minimal blocking service: loopback round trip + group commit).
    #[serde(default)]
    pub service_records_per_s: f64,
    #[serde(default)]
    pub service_p50_us: f64,
    /// Median over rounds of disk floor ÷ service floor: how far the round trip alone keeps
    /// any service from the disk floor.
    #[serde(default)]
    pub service_vs_floor: f64,
    /// Median over rounds of service floor ÷ single: what chainlog's own software costs.
    #[serde(default)]
    pub single_vs_service: f64,
    #[serde(default)]
    pub single_vs_service_rounds: Vec<f64>,
    /// The chain of minimal services, and the same ratios for the chain.
    #[serde(default)]
    pub service_chain_records_per_s: f64,
    #[serde(default)]
    pub service_chain_p50_us: f64,
    /// Median over rounds of (disk floor / nodes) ÷ service chain.
    #[serde(default)]
    pub service_chain_vs_floor: f64,
    /// Median over rounds of service chain ÷ chain.
    #[serde(default)]
    pub chain_vs_service: f64,
    #[serde(default)]
    pub chain_vs_service_rounds: Vec<f64>,
    /// Medians over rounds of each chain node's own turnaround (p50 µs): the head and the
    /// middle (mean over middles) until they forward a batch, the tail until it hands it to
    /// storage; and that path's share of the chain's p50 (median of per-round ratios).
    #[serde(default = "nan")]
    pub chain_head_forward_p50_us: f64,
    #[serde(default = "nan")]
    pub chain_middle_forward_p50_us: f64,
    #[serde(default = "nan")]
    pub chain_tail_write_p50_us: f64,
    #[serde(default = "nan")]
    pub chain_turnaround_share: f64,
}

/// The latency target at 1 in flight: chain p50 against one fdatasync plus `nodes` loopback
/// round trips.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyTarget {
    pub fsync_p50_us: f64,
    pub loopback_p50_us: f64,
    pub floor_us: f64,
    pub chain_p50_us: f64,
    /// Median over rounds of chain p50 ÷ (fsync p50 + nodes × loopback p50).
    pub ratio: f64,
    pub ratio_rounds: Vec<f64>,
}

/// The chain at the top level in the steady state of a log under retention, next to the
/// growing log's chain of the same rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RetainedSummary {
    pub inflight: usize,
    pub records_per_s: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Median over rounds of (disk floor / nodes) ÷ this chain (records/s).
    pub vs_floor: f64,
    pub vs_floor_rounds: Vec<f64>,
    /// Median over rounds of this chain ÷ the growing log's chain (records/s).
    pub vs_growing: f64,
    /// Medians over rounds of the head's spare segments zeroed during the measured run: the
    /// growing log's chain, and this one (and the segments this one recycled).
    pub growing_spares_zeroed: f64,
    pub spares_zeroed: f64,
    pub segments_recycled: f64,
}

/// The service chain at the top level with its files growing (the least a growing log's chain
/// can cost on this disk and file system), next to the growing log's chain of the same rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GrowingServiceSummary {
    pub inflight: usize,
    /// Medians over rounds, records/s, of each way of growing the files.
    pub prezeroed_records_per_s: f64,
    pub unwritten_records_per_s: f64,
    /// Median over rounds of (disk floor / nodes) ÷ the faster of the two in that round.
    pub vs_floor: f64,
    pub vs_floor_rounds: Vec<f64>,
    /// Median over rounds of the service chain writing in place ÷ the faster growing one.
    pub in_place_vs_growing: f64,
    /// Median over rounds of the faster growing service chain ÷ the growing log's chain.
    pub chain_vs_it: f64,
    pub chain_vs_it_rounds: Vec<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuiteReport {
    pub meta: Meta,
    pub levels: Vec<LevelSummary>,
    pub latency_target: Option<LatencyTarget>,
    /// Absent in reports from before the steady-state run existed.
    #[serde(default)]
    pub retained: Option<RetainedSummary>,
    /// Absent in reports from before the growing service chain was measured.
    #[serde(default)]
    pub growing_service: Option<GrowingServiceSummary>,
    pub rounds: Vec<RoundResult>,
}

/// Median of `xs` (mean of the middle two for an even count); NaN for none. NaNs sort last.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `floor ÷ measured` for throughputs: how many times slower than the floor (1.0 = at it).
pub fn slowdown(floor_per_s: f64, measured_per_s: f64) -> f64 {
    if measured_per_s > 0.0 {
        floor_per_s / measured_per_s
    } else {
        f64::INFINITY
    }
}

fn at<T>(v: &[T], i: usize) -> Option<&T> {
    v.get(i)
}

fn layout_run(r: &RoundResult, i: usize, layout: Layout) -> Option<&FloorRun> {
    at(&r.floors, i)?.runs.iter().find(|f| f.layout == layout)
}

/// `(server, client)` CPU µs per record of run `i`.
fn cpu_per_record(
    runs: &[AppendResult],
    cpu: &[Option<crate::cpu::CpuUse>],
    i: usize,
) -> Option<(f64, f64)> {
    let c = at(cpu, i)?.as_ref()?;
    let n = at(runs, i)?.records_total;
    if n == 0 {
        return None;
    }
    let per = 1e6 / n as f64;
    Some((c.server_s * per, c.client_s * per))
}

/// The chain nodes' turnaround in run `i` (None if not measured).
fn turnaround(r: &RoundResult, i: usize) -> Option<&Turnaround> {
    at(&r.chain_turnaround, i)?.as_ref()
}

/// `(records per batch, batches per fsync)` of run `i` from the head's counters.
fn batching(
    runs: &[AppendResult],
    storage: &[Option<StorageCounters>],
    i: usize,
) -> Option<(f64, f64)> {
    let d = at(storage, i)?.as_ref()?;
    let r = at(runs, i)?;
    if d.batches == 0 {
        return None;
    }
    Some((
        r.records_total as f64 / d.batches as f64,
        d.batches_per_fsync(),
    ))
}

/// Medians and ratios over `rounds` for each level in `levels`. A round missing a figure (a
/// failed run) is left out of that figure's median.
pub fn summarize(
    levels: &[usize],
    nodes: usize,
    rounds: &[RoundResult],
) -> (Vec<LevelSummary>, Option<LatencyTarget>) {
    let mut out = Vec::new();
    let col = |f: &dyn Fn(&RoundResult) -> Option<f64>| -> Vec<f64> {
        rounds.iter().filter_map(f).collect()
    };
    for (i, &inflight) in levels.iter().enumerate() {
        let floor = |r: &RoundResult| at(&r.floors, i).map(|f| f.records_per_s);
        let single = |r: &RoundResult| at(&r.single, i).map(|a| a.records_per_s);
        let chain = |r: &RoundResult| at(&r.chain, i).map(|a| a.records_per_s);
        let sv: Vec<f64> = col(&|r| Some(slowdown(floor(r)?, single(r)?)));
        let cv: Vec<f64> = col(&|r| Some(slowdown(floor(r)? / nodes as f64, chain(r)?)));
        let per_batch =
            |r: &RoundResult| layout_run(r, i, Layout::PerBatch).map(|f| f.records_per_s);
        let spv: Vec<f64> = col(&|r| Some(slowdown(per_batch(r)?, single(r)?)));
        let cpv: Vec<f64> = col(&|r| Some(slowdown(per_batch(r)? / nodes as f64, chain(r)?)));
        let service = |r: &RoundResult| at(&r.service, i).map(|f| f.records_per_s);
        let svs: Vec<f64> = col(&|r| Some(slowdown(service(r)?, single(r)?)));
        let service_chain = |r: &RoundResult| at(&r.service_chain, i).map(|f| f.records_per_s);
        let cvs: Vec<f64> = col(&|r| Some(slowdown(service_chain(r)?, chain(r)?)));
        // One figure of one floor layout, median over rounds.
        let layout_median = |layout: Layout, f: &dyn Fn(&FloorRun) -> Option<f64>| {
            median(&col(&|r| layout_run(r, i, layout).and_then(f)))
        };
        out.push(LevelSummary {
            inflight,
            floor_records_per_s: median(&col(&floor)),
            floor_p50_us: median(&col(&|r| at(&r.floors, i).map(|f| f.p50_us))),
            floor_per_batch_records_per_s: layout_median(Layout::PerBatch, &|f| {
                Some(f.records_per_s)
            }),
            floor_per_batch_p50_us: layout_median(Layout::PerBatch, &|f| Some(f.p50_us)),
            floor_packed_records_per_s: layout_median(Layout::Packed, &|f| Some(f.records_per_s)),
            floor_packed_p50_us: layout_median(Layout::Packed, &|f| Some(f.p50_us)),
            floor_per_batch_cpu_us_per_record: layout_median(Layout::PerBatch, &|f| {
                f.cpu_us_per_record
            }),
            floor_packed_cpu_us_per_record: layout_median(Layout::Packed, &|f| f.cpu_us_per_record),
            floor_packed_dsync_records_per_s: layout_median(Layout::PackedDsync, &|f| {
                Some(f.records_per_s)
            }),
            floor_packed_dsync_p50_us: layout_median(Layout::PackedDsync, &|f| Some(f.p50_us)),
            floor_packed_dsync_cpu_us_per_record: layout_median(Layout::PackedDsync, &|f| {
                f.cpu_us_per_record
            }),
            single_records_per_s: median(&col(&single)),
            single_mb_per_s: median(&col(&|r| at(&r.single, i).map(|a| a.mb_per_s))),
            single_p50_us: median(&col(&|r| at(&r.single, i).map(|a| a.latency.p50_us))),
            single_p99_us: median(&col(&|r| at(&r.single, i).map(|a| a.latency.p99_us))),
            single_p999_us: median(&col(&|r| at(&r.single, i).map(|a| a.latency.p999_us))),
            single_max_us: median(&col(&|r| at(&r.single, i).map(|a| a.latency.max_us))),
            chain_records_per_s: median(&col(&chain)),
            chain_mb_per_s: median(&col(&|r| at(&r.chain, i).map(|a| a.mb_per_s))),
            chain_p50_us: median(&col(&|r| at(&r.chain, i).map(|a| a.latency.p50_us))),
            chain_p99_us: median(&col(&|r| at(&r.chain, i).map(|a| a.latency.p99_us))),
            chain_p999_us: median(&col(&|r| at(&r.chain, i).map(|a| a.latency.p999_us))),
            chain_max_us: median(&col(&|r| at(&r.chain, i).map(|a| a.latency.max_us))),
            single_records_per_batch: median(&col(&|r| {
                batching(&r.single, &r.single_storage, i).map(|b| b.0)
            })),
            single_batches_per_fsync: median(&col(&|r| {
                batching(&r.single, &r.single_storage, i).map(|b| b.1)
            })),
            chain_records_per_batch: median(&col(&|r| {
                batching(&r.chain, &r.chain_storage, i).map(|b| b.0)
            })),
            chain_batches_per_fsync: median(&col(&|r| {
                batching(&r.chain, &r.chain_storage, i).map(|b| b.1)
            })),
            single_server_cpu_us_per_record: median(&col(&|r| {
                cpu_per_record(&r.single, &r.single_cpu, i).map(|c| c.0)
            })),
            single_client_cpu_us_per_record: median(&col(&|r| {
                cpu_per_record(&r.single, &r.single_cpu, i).map(|c| c.1)
            })),
            chain_server_cpu_us_per_record: median(&col(&|r| {
                cpu_per_record(&r.chain, &r.chain_cpu, i).map(|c| c.0)
            })),
            chain_client_cpu_us_per_record: median(&col(&|r| {
                cpu_per_record(&r.chain, &r.chain_cpu, i).map(|c| c.1)
            })),
            single_vs_floor: median(&sv),
            chain_vs_floor: median(&cv),
            single_vs_floor_rounds: sv,
            chain_vs_floor_rounds: cv,
            single_vs_per_batch_floor: median(&spv),
            chain_vs_per_batch_floor: median(&cpv),
            service_records_per_s: median(&col(&service)),
            service_p50_us: median(&col(&|r| at(&r.service, i).map(|f| f.latency.p50_us))),
            service_vs_floor: median(&col(&|r| Some(slowdown(floor(r)?, service(r)?)))),
            single_vs_service: median(&svs),
            single_vs_service_rounds: svs,
            service_chain_records_per_s: median(&col(&service_chain)),
            service_chain_p50_us: median(&col(&|r| {
                at(&r.service_chain, i).map(|f| f.latency.p50_us)
            })),
            service_chain_vs_floor: median(&col(&|r| {
                Some(slowdown(floor(r)? / nodes as f64, service_chain(r)?))
            })),
            chain_vs_service: median(&cvs),
            chain_vs_service_rounds: cvs,
            chain_head_forward_p50_us: median(&col(&|r| turnaround(r, i)?.head_forward_p50_us())),
            chain_middle_forward_p50_us: median(&col(&|r| {
                turnaround(r, i)?.middle_forward_p50_us()
            })),
            chain_tail_write_p50_us: median(&col(&|r| turnaround(r, i)?.tail_write_p50_us())),
            chain_turnaround_share: median(&col(&|r| {
                Some(turnaround(r, i)?.critical_path_p50_us()? / at(&r.chain, i)?.latency.p50_us)
            })),
        });
    }
    // The latency target is defined at 1 in flight.
    let target = levels.iter().position(|&l| l == 1).map(|i| {
        let fsync = |r: &RoundResult| at(&r.floors, i).map(|f| f.p50_us);
        let lb = |r: &RoundResult| Some(r.loopback.rtt.p50_us);
        let chain = |r: &RoundResult| at(&r.chain, i).map(|a| a.latency.p50_us);
        let ratios = col(&|r| {
            let floor_us = fsync(r)? + nodes as f64 * lb(r)?;
            Some(chain(r)? / floor_us)
        });
        let fsync_p50_us = median(&col(&fsync));
        let loopback_p50_us = median(&col(&lb));
        LatencyTarget {
            fsync_p50_us,
            loopback_p50_us,
            floor_us: fsync_p50_us + nodes as f64 * loopback_p50_us,
            chain_p50_us: median(&col(&chain)),
            ratio: median(&ratios),
            ratio_rounds: ratios,
        }
    });
    (out, target)
}

/// Medians of the steady-state chain runs (at the top level); None if no round has one.
pub fn summarize_retained(
    levels: &[usize],
    nodes: usize,
    rounds: &[RoundResult],
) -> Option<RetainedSummary> {
    let (i, &inflight) = levels.iter().enumerate().max_by_key(|(_, &l)| l)?;
    let col = |f: &dyn Fn(&RoundResult) -> Option<f64>| -> Vec<f64> {
        rounds.iter().filter_map(f).collect()
    };
    let ret = |r: &RoundResult| r.chain_retained.as_ref().map(|a| a.records_per_s);
    if col(&ret).is_empty() {
        return None;
    }
    let floor = |r: &RoundResult| at(&r.floors, i).map(|f| f.records_per_s);
    let growing = |r: &RoundResult| at(&r.chain, i).map(|a| a.records_per_s);
    let vs_floor_rounds = col(&|r| Some(slowdown(floor(r)? / nodes as f64, ret(r)?)));
    let lat = |f: fn(&AppendResult) -> f64| {
        median(&col(&|r: &RoundResult| r.chain_retained.as_ref().map(f)))
    };
    Some(RetainedSummary {
        inflight,
        records_per_s: median(&col(&ret)),
        mb_per_s: lat(|a| a.mb_per_s),
        p50_us: lat(|a| a.latency.p50_us),
        p99_us: lat(|a| a.latency.p99_us),
        p999_us: lat(|a| a.latency.p999_us),
        vs_floor: median(&vs_floor_rounds),
        vs_floor_rounds,
        vs_growing: median(&col(&|r| Some(ret(r)? / growing(r)?))),
        growing_spares_zeroed: median(&col(&|r| {
            at(&r.chain_storage, i)?.map(|c| c.spares_zeroed as f64)
        })),
        spares_zeroed: median(&col(&|r| {
            r.chain_retained_storage.map(|c| c.spares_zeroed as f64)
        })),
        segments_recycled: median(&col(&|r| {
            r.chain_retained_storage.map(|c| c.segments_recycled as f64)
        })),
    })
}

/// Medians of the growing service chains (at the top level); None if no round has one.
pub fn summarize_growing_service(
    levels: &[usize],
    nodes: usize,
    rounds: &[RoundResult],
) -> Option<GrowingServiceSummary> {
    use crate::service::Space;
    let (i, &inflight) = levels.iter().enumerate().max_by_key(|(_, &l)| l)?;
    let col = |f: &dyn Fn(&RoundResult) -> Option<f64>| -> Vec<f64> {
        rounds.iter().filter_map(f).collect()
    };
    let of = |r: &RoundResult, space: Space| {
        r.service_chain_growing
            .iter()
            .find(|f| f.space == space)
            .map(|f| f.records_per_s)
    };
    // The faster way of growing in this round: the floor is the least any way costs.
    let best = |r: &RoundResult| {
        [Space::Prezeroed, Space::Unwritten]
            .into_iter()
            .filter_map(|sp| of(r, sp))
            .reduce(f64::max)
    };
    if col(&best).is_empty() {
        return None;
    }
    let floor = |r: &RoundResult| at(&r.floors, i).map(|f| f.records_per_s);
    let chain = |r: &RoundResult| at(&r.chain, i).map(|a| a.records_per_s);
    let in_place = |r: &RoundResult| at(&r.service_chain, i).map(|f| f.records_per_s);
    let vs_floor_rounds = col(&|r| Some(slowdown(floor(r)? / nodes as f64, best(r)?)));
    let chain_vs_it_rounds = col(&|r| Some(slowdown(best(r)?, chain(r)?)));
    Some(GrowingServiceSummary {
        inflight,
        prezeroed_records_per_s: median(&col(&|r| of(r, Space::Prezeroed))),
        unwritten_records_per_s: median(&col(&|r| of(r, Space::Unwritten))),
        vs_floor: median(&vs_floor_rounds),
        vs_floor_rounds,
        in_place_vs_growing: median(&col(&|r| Some(slowdown(in_place(r)?, best(r)?)))),
        chain_vs_it: median(&chain_vs_it_rounds),
        chain_vs_it_rounds,
    })
}

fn verdict(ratio: f64) -> &'static str {
    if ratio.is_finite() && ratio <= TARGET_RATIO_MAX {
        "met"
    } else if ratio.is_nan() {
        "not measured"
    } else {
        "missed"
    }
}

fn rounds_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A share as a whole percentage (`7%`); `–` when not measured.
pub fn percent(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{:.0}%", 100.0 * x),
        _ => "–".into(),
    }
}

/// Per round, the steal shares of the disk floor and of one server run at level `i`, as
/// `floor / run` pairs: the runs a round's ratio compares, and how much CPU the host took from
/// each.
fn steal_pairs(
    rounds: &[RoundResult],
    i: usize,
    run: &dyn Fn(&RoundResult) -> Option<f64>,
) -> String {
    rounds
        .iter()
        .map(|r| {
            let floor = at(&r.floors, i).and_then(|f| f.host_steal_share);
            format!("{} / {}", percent(floor), percent(run(r)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Integer-ish rendering for rates and microseconds.
fn n(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 || x == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// A median of counts: whole unless it fell between two (even number of rounds).
fn count(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

impl SuiteReport {
    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let nodes = m.chain_nodes;
        let mut s = String::new();
        let _ = writeln!(s, "# chainlog durable-append benchmark\n");
        let _ = writeln!(
            s,
            "rev `{}` · host: {} cpus, Linux {}, {} · placement: {} · server io-mode `{}` (floor O_DIRECT: {}) · {} B records · client linger {} µs, {} batches in flight, {} · {} rounds × {} s (+{} s warm-up) per run · median over rounds\n",
            m.git_rev, m.host_nproc, m.host_kernel, m.host_cpu,
            match &m.cpus {
                Some(c) => format!("every process measured (servers, load generator, floors) pinned to CPUs `{c}`"),
                None => "the OS's (nothing pinned)".to_string(),
            },
            m.io_mode, m.floor_direct, m.record_bytes, m.client_linger_us, m.client_batches_in_flight_max,
            match m.client_threads {
                0 => "current-thread client runtime".to_string(),
                n => format!("{n}-worker client runtime"),
            } + ", closed loop = one producer with N sends outstanding",
            m.rounds, m.duration_s, m.warmup_s
        );
        let _ = writeln!(s, "## Throughput (records/s; MB/s of payload)\n");
        let _ = writeln!(
            s,
            "| in flight | disk floor | single node | MB/s | floor ÷ single | {nodes}-node chain | MB/s | (floor/{nodes}) ÷ chain |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &self.levels {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.2} | {} | {:.1} | {:.2} |",
                l.inflight,
                n(l.floor_records_per_s),
                n(l.single_records_per_s),
                l.single_mb_per_s,
                l.single_vs_floor,
                n(l.chain_records_per_s),
                l.chain_mb_per_s,
                l.chain_vs_floor
            );
        }
        let _ = writeln!(
            s,
            "\nDisk floor at N in flight: N single-record batches ({} B each) made durable at once; the floor is the best of N page-aligned writes + fdatasync, one packed write + fdatasync, and (O_DIRECT) one packed RWF_DSYNC write, the server's own way (all below). The chain's floor is it ÷ {nodes} (all replicas share the disk). Each round runs, per level, the floor, a fresh single node and a fresh chain back to back (order rotated per round; a fresh server is measured once its nodes have zeroed their start-up spare segments); ratios are medians of per-round ratios.",
            m.record_bytes + HEADER_LEN + RECORD_OVERHEAD
        );
        let _ = writeln!(
            s,
            "\n## Disk floor by layout (records/s; p50 µs per durable round; CPU µs per record of the floor process)\n"
        );
        let _ = writeln!(
            s,
            "| in flight | N writes + fdatasync | p50 | CPU µs/rec | 1 packed write + fdatasync | p50 | CPU µs/rec | 1 packed RWF_DSYNC write | p50 | CPU µs/rec |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &self.levels {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l.inflight,
                n(l.floor_per_batch_records_per_s),
                n(l.floor_per_batch_p50_us),
                n(l.floor_per_batch_cpu_us_per_record),
                n(l.floor_packed_records_per_s),
                n(l.floor_packed_p50_us),
                n(l.floor_packed_cpu_us_per_record),
                n(l.floor_packed_dsync_records_per_s),
                n(l.floor_packed_dsync_p50_us),
                n(l.floor_packed_dsync_cpu_us_per_record)
            );
        }
        if self
            .levels
            .iter()
            .any(|l| !l.service_records_per_s.is_nan())
        {
            let _ = writeln!(
                s,
                "\n## Service floor (records/s; p50 µs): the least any service with a network hop pays\n"
            );
            let _ = writeln!(
                s,
                "| in flight | disk floor | service floor | p50 | floor ÷ service | single node | service ÷ single | {nodes}-service chain | p50 | (floor/{nodes}) ÷ it | {nodes}-node chain | service chain ÷ chain |"
            );
            let _ = writeln!(
                s,
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for l in &self.levels {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.2} | {} | {:.2} | {} | {} | {:.2} | {} | {:.2} |",
                    l.inflight,
                    n(l.floor_records_per_s),
                    n(l.service_records_per_s),
                    n(l.service_p50_us),
                    l.service_vs_floor,
                    n(l.single_records_per_s),
                    l.single_vs_service,
                    n(l.service_chain_records_per_s),
                    n(l.service_chain_p50_us),
                    l.service_chain_vs_floor,
                    n(l.chain_records_per_s),
                    l.chain_vs_service
                );
            }
            let _ = writeln!(
                s,
                "\nService floor: one blocking thread reads the in-flight appends' batch bytes from a loopback TCP socket straight into an aligned buffer, makes them durable with one io_uring write (RWF_DSYNC with O_DIRECT, as the server does; else write + linked fdatasync) and acknowledges; the load is a blocking closed loop with all appends in flight in one request. No protocol, no checks, no event loop: only the disk, the round trip and the wake-ups between them. The service chain puts such services in a line (each forwards before its own write and acknowledges once durable and acknowledged by its successor; files on the same disk). When floor ÷ service is above 1.5, no service with a network hop can meet a 1.5× target against the disk floor on this machine."
            );
        }
        let _ = writeln!(
            s,
            "\n## Latency (µs, closed loop; floor = one durable round of the best layout)\n"
        );
        let _ = writeln!(
            s,
            "| in flight | floor p50 | single p50 | p99 | p99.9 | max | chain p50 | p99 | p99.9 | max |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &self.levels {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l.inflight,
                n(l.floor_p50_us),
                n(l.single_p50_us),
                n(l.single_p99_us),
                n(l.single_p999_us),
                n(l.single_max_us),
                n(l.chain_p50_us),
                n(l.chain_p99_us),
                n(l.chain_p999_us),
                n(l.chain_max_us)
            );
        }
        let _ = writeln!(
            s,
            "\n## Batching at the head, and CPU per record (server process; load generator)\n"
        );
        let _ = writeln!(
            s,
            "| in flight | single records/batch | batches/fsync | CPU µs/rec server | client | chain records/batch | batches/fsync | CPU µs/rec server (all nodes) | client |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &self.levels {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l.inflight,
                n(l.single_records_per_batch),
                n(l.single_batches_per_fsync),
                n(l.single_server_cpu_us_per_record),
                n(l.single_client_cpu_us_per_record),
                n(l.chain_records_per_batch),
                n(l.chain_batches_per_fsync),
                n(l.chain_server_cpu_us_per_record),
                n(l.chain_client_cpu_us_per_record)
            );
        }
        if self
            .levels
            .iter()
            .any(|l| !l.chain_turnaround_share.is_nan())
        {
            let _ = writeln!(
                s,
                "\n## Each chain node's own share of a hop (p50 µs, from every node's stage histograms)\n"
            );
            let _ = writeln!(
                s,
                "| in flight | head: read → forwarded | middle: read → forwarded | tail: read → to storage | sum | share of chain p50 |"
            );
            let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
            for l in &self.levels {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    l.inflight,
                    n(l.chain_head_forward_p50_us),
                    n(l.chain_middle_forward_p50_us),
                    n(l.chain_tail_write_p50_us),
                    n(l.chain_head_forward_p50_us
                        + l.chain_middle_forward_p50_us
                        + l.chain_tail_write_p50_us),
                    if l.chain_turnaround_share.is_nan() {
                        "–".to_string()
                    } else {
                        format!("{:.1}%", 100.0 * l.chain_turnaround_share)
                    }
                );
            }
            let _ = writeln!(
                s,
                "\nFrom the moment a node has read a frame carrying a batch off its socket (before decoding and checking it) to the moment it hands the batch to its successor's link (the tail: to its storage writer). These are the parts of a batch's path that run in chainlog's own code; the rest of the round is the kernel (socket copies, wake-ups, the disk) and the acknowledgements. Each node's histogram covers its whole run, warm-up included; the share is the median of per-round ratios to the chain's p50."
            );
        }
        let _ = writeln!(s, "\n## Targets (≤ {TARGET_RATIO_MAX}×)\n");
        let top = self
            .levels
            .iter()
            .enumerate()
            .max_by_key(|(_, l)| l.inflight);
        if let Some((top_i, top)) = top {
            let _ = writeln!(
                s,
                "- single node at {} in flight: floor ÷ single = **{:.2}** → {} (rounds: {}; against the N-writes layout alone: {:.2})",
                top.inflight,
                top.single_vs_floor,
                verdict(top.single_vs_floor),
                rounds_list(&top.single_vs_floor_rounds),
                top.single_vs_per_batch_floor
            );
            if !top.service_records_per_s.is_nan() {
                let _ = writeln!(
                    s,
                    "  - the service floor itself is {:.2}× from the disk floor; single node against the service floor: **{:.2}** (rounds: {})",
                    top.service_vs_floor,
                    top.single_vs_service,
                    rounds_list(&top.single_vs_service_rounds)
                );
            }
            let _ = writeln!(
                s,
                "- {nodes}-node chain at {} in flight: (floor/{nodes}) ÷ chain = **{:.2}** → {} (rounds: {}; against the N-writes layout alone: {:.2})",
                top.inflight,
                top.chain_vs_floor,
                verdict(top.chain_vs_floor),
                rounds_list(&top.chain_vs_floor_rounds),
                top.chain_vs_per_batch_floor
            );
            let _ = writeln!(
                s,
                "  - CPU time the hypervisor gave other guests (steal) in each round, disk floor / chain run: {}",
                steal_pairs(&self.rounds, top_i, &|r| {
                    at(&r.chain_cpu, top_i)?.as_ref()?.host_steal_share
                })
            );
            if !top.service_chain_records_per_s.is_nan() {
                let _ = writeln!(
                    s,
                    "  - the {nodes}-service chain itself is {:.2}× from floor/{nodes}; chain against it: **{:.2}** (rounds: {})",
                    top.service_chain_vs_floor,
                    top.chain_vs_service,
                    rounds_list(&top.chain_vs_service_rounds)
                );
            }
            if let Some(g) = self
                .growing_service
                .as_ref()
                .filter(|g| g.inflight == top.inflight)
            {
                let _ = writeln!(
                    s,
                    "  - a growing log's {nodes}-service chain (files that grow: pre-zeroed meanwhile by the server's spare preparer {} rec/s, or only allocated, so every durable write also commits its extents' conversion, {} rec/s; the faster counts) is **{:.2}×** from floor/{nodes} (rounds: {}){}; the service chain writing in place is {:.2}× faster; chain against it: **{:.2}** (rounds: {})",
                    n(g.prezeroed_records_per_s),
                    n(g.unwritten_records_per_s),
                    g.vs_floor,
                    rounds_list(&g.vs_floor_rounds),
                    if g.vs_floor > TARGET_RATIO_MAX {
                        format!(": above {TARGET_RATIO_MAX}×, so no service with a network hop meets the target on a growing log on this disk and file system")
                    } else {
                        String::new()
                    },
                    g.in_place_vs_growing,
                    g.chain_vs_it,
                    rounds_list(&g.chain_vs_it_rounds)
                );
            }
        }
        if let Some(t) = &self.latency_target {
            let _ = writeln!(
                s,
                "- chain p50 at 1 in flight: {} µs vs fdatasync p50 {} + {nodes} × loopback p50 {} = {} µs: **{:.2}** → {} (rounds: {})",
                n(t.chain_p50_us),
                n(t.fsync_p50_us),
                n(t.loopback_p50_us),
                n(t.floor_us),
                t.ratio,
                verdict(t.ratio),
                rounds_list(&t.ratio_rounds)
            );
        }
        if let Some(t) = &self.retained {
            let _ = writeln!(
                s,
                "- {nodes}-node chain at {} in flight in the steady state of a log under retention: (floor/{nodes}) ÷ it = **{:.2}** → {} (rounds: {}); {:.2}× the growing log's chain; p50 {} p99 {} p99.9 {} µs",
                t.inflight,
                t.vs_floor,
                verdict(t.vs_floor),
                rounds_list(&t.vs_floor_rounds),
                t.vs_growing,
                n(t.p50_us),
                n(t.p99_us),
                n(t.p999_us)
            );
            let _ = writeln!(
                s,
                "  - spare segments the head zeroed during a run: growing log {}, under retention {} (it recycled {}). A growing log's segments must be written twice on this file system (zeros first, so that later durable writes need no metadata commit); a log under retention reuses the segments it deletes. Retention: {} MiB per log, filled until the head had recycled {} segments before the measured run.",
                count(t.growing_spares_zeroed),
                count(t.spares_zeroed),
                count(t.segments_recycled),
                crate::suite::RETAINED_RETENTION_BYTES >> 20,
                crate::suite::FILL_RECYCLED_MIN
            );
            if let Some(i) = self.levels.iter().position(|l| l.inflight == t.inflight) {
                let _ = writeln!(
                    s,
                    "  - steal in each round, disk floor / chain under retention: {}",
                    steal_pairs(&self.rounds, i, &|r| r.chain_retained_cpu?.host_steal_share)
                );
            }
        }
        let failed: Vec<String> = self
            .rounds
            .iter()
            .flat_map(|r| {
                let round = r.round;
                r.single
                    .iter()
                    .map(move |a| ("single", round, a))
                    .chain(r.chain.iter().map(move |a| ("chain", round, a)))
                    .chain(
                        r.chain_retained
                            .iter()
                            .map(move |a| ("chain under retention", round, a)),
                    )
            })
            .filter(|(_, _, a)| a.errors > 0)
            .map(|(what, round, a)| {
                format!(
                    "- round {round} {what} @{}: {} failed appends (first: {})",
                    a.inflight,
                    a.errors,
                    a.first_error.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(s, "\n## Errors\n\n{}", failed.join("\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::LatencySummary;

    fn floor(inflight: usize, rps: f64, p50: f64) -> DiskFloor {
        DiskFloor {
            inflight,
            record_bytes: 1024,
            batch_bytes: 1108,
            layout: Layout::Packed,
            runs: [(Layout::PerBatch, rps / 2.0), (Layout::Packed, rps)]
                .into_iter()
                .map(|(layout, records_per_s)| crate::floor::FloorRun {
                    layout,
                    writes_per_sync: 1,
                    write_bytes: 1108,
                    rounds: 10,
                    direct: true,
                    records_per_s,
                    p50_us: p50,
                    p99_us: p50,
                    max_us: p50,
                    cpu_us_per_record: None,
                })
                .collect(),
            rounds: 10,
            direct: true,
            records_per_s: rps,
            mb_per_s: rps * 1024.0 / 1e6,
            p50_us: p50,
            p99_us: p50 * 2.0,
            max_us: p50 * 3.0,
            host_steal_share: Some(0.02),
        }
    }

    fn run(inflight: usize, rps: f64, p50: f64) -> AppendResult {
        AppendResult {
            mode: "closed".into(),
            inflight,
            record_bytes: 1024,
            rate_per_s: None,
            duration_s: 5.0,
            records: (rps * 5.0) as u64,
            records_total: (rps * 6.0) as u64,
            records_per_s: rps,
            mb_per_s: rps * 1024.0 / 1e6,
            latency: LatencySummary {
                count: 1,
                p50_us: p50,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
                p9999_us: p50 * 4.0,
                max_us: p50 * 5.0,
                mean_us: p50,
            },
            send_lag: None,
            errors: 0,
            first_error: None,
        }
    }

    fn svc(inflight: usize, rps: f64, p50: f64) -> ServiceFloor {
        ServiceFloor {
            inflight,
            requests: 1,
            nodes: 1,
            record_bytes: 1024,
            space: crate::service::Space::InPlace,
            records_per_s: rps,
            requests_per_sync: 1.0,
            rolls: 0,
            latency: LatencySummary {
                p50_us: p50,
                ..LatencySummary::default()
            },
        }
    }

    fn round(i: usize, floor_scale: f64, lb_p50: f64) -> RoundResult {
        RoundResult {
            round: i,
            // The service floor drifts with the disk floor (two thirds of it at 128).
            service: vec![
                svc(1, 2500.0 * floor_scale, 380.0),
                svc(128, 60_000.0 * floor_scale, 700.0),
            ],
            service_chain: vec![
                svc(1, 1000.0 * floor_scale, 500.0),
                svc(128, 24_000.0 * floor_scale, 900.0),
            ],
            floors: vec![
                floor(1, 4000.0 * floor_scale, 200.0),
                floor(128, 90_000.0 * floor_scale, 500.0),
            ],
            loopback: LoopbackResult {
                frame_bytes: 64,
                round_trips: 100,
                rtt: LatencySummary {
                    p50_us: lb_p50,
                    ..LatencySummary::default()
                },
            },
            single: vec![run(1, 3000.0, 300.0), run(128, 60_000.0, 2000.0)],
            chain: vec![run(1, 1500.0, 390.0), run(128, 20_000.0, 6000.0)],
            single_storage: vec![
                None,
                Some(StorageCounters {
                    batches: 18_000,
                    fsyncs: 3_000,
                    ..StorageCounters::default()
                }),
            ],
            chain_storage: vec![],
            single_cpu: vec![
                None,
                Some(crate::cpu::CpuUse {
                    server_s: 3.6,
                    client_s: 1.8,
                    host_steal_share: None,
                }),
            ],
            chain_cpu: vec![
                None,
                Some(crate::cpu::CpuUse {
                    server_s: 4.0,
                    client_s: 1.0,
                    host_steal_share: Some(0.01 * i as f64),
                }),
            ],
            single_status: vec![],
            chain_status: vec![],
            // The head's own turnaround drifts with the round; the others stay put.
            chain_turnaround: vec![
                None,
                Some(Turnaround {
                    forward_p50_us: vec![Some(10.0 * floor_scale), Some(12.0), None],
                    write_p50_us: vec![Some(9.0), Some(11.0), Some(30.0)],
                }),
            ],
            chain_retained: Some(run(128, 25_000.0, 4000.0)),
            chain_retained_storage: Some(StorageCounters {
                segments_recycled: 6,
                ..StorageCounters::default()
            }),
            chain_retained_cpu: None,
            // Pre-zeroed beats unwritten in every round but the middle one.
            service_chain_growing: vec![
                ServiceFloor {
                    space: crate::service::Space::Prezeroed,
                    ..svc(128, if i == 1 { 10_000.0 } else { 20_000.0 }, 1000.0)
                },
                ServiceFloor {
                    space: crate::service::Space::Unwritten,
                    ..svc(128, 15_000.0, 1200.0)
                },
            ],
        }
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn slowdown_is_floor_over_measured() {
        assert_eq!(slowdown(90_000.0, 60_000.0), 1.5);
        assert!(slowdown(1.0, 0.0).is_infinite());
    }

    #[test]
    fn ratios_are_per_round_then_median() {
        // Floors drift between rounds (1x, 2x, 0.5x) while the server stays put: per-round
        // ratios follow the drift and the median picks the middle round.
        let rounds = vec![
            round(0, 1.0, 20.0),
            round(1, 2.0, 20.0),
            round(2, 0.5, 30.0),
        ];
        let (levels, target) = summarize(&[1, 128], 3, &rounds);
        let top = &levels[1];
        assert_eq!(top.floor_records_per_s, 90_000.0);
        assert_eq!(top.floor_packed_records_per_s, 90_000.0);
        assert_eq!(top.floor_per_batch_records_per_s, 45_000.0);
        assert_eq!(top.single_vs_per_batch_floor, 0.75);
        assert_eq!(top.single_vs_floor_rounds, vec![1.5, 3.0, 0.75]);
        assert_eq!(top.single_vs_floor, 1.5);
        // chain: (90k / 3) / 20k = 1.5 in the middle round.
        assert_eq!(top.chain_vs_floor, 1.5);
        assert_eq!(top.single_p99_us, 4000.0);
        // Service floor: 90k / 60k = 1.5 every round; single ÷ it follows the drift.
        assert_eq!(top.service_records_per_s, 60_000.0);
        assert_eq!(top.service_vs_floor, 1.5);
        assert_eq!(top.single_vs_service_rounds, vec![1.0, 2.0, 0.5]);
        assert_eq!(top.single_vs_service, 1.0);
        assert_eq!(top.service_p50_us, 700.0);
        // Service chain: (90k / 3) / 24k = 1.25; it ÷ the chain: 24k·scale / 20k.
        assert_eq!(top.service_chain_vs_floor, 1.25);
        assert_eq!(top.chain_vs_service_rounds, vec![1.2, 2.4, 0.6]);
        assert_eq!(top.chain_vs_service, 1.2);
        assert_eq!(top.service_chain_p50_us, 900.0);
        // 360k records in 18k batches, 6 batches per fsync; nothing reported for the chain.
        assert_eq!(top.single_records_per_batch, 20.0);
        assert_eq!(top.single_batches_per_fsync, 6.0);
        assert!(top.chain_batches_per_fsync.is_nan());
        assert!(levels[0].single_records_per_batch.is_nan());
        // Turnaround: head 10, 20, 5 µs over the rounds; the path 10 + 12 + 30 of a 6000 µs p50.
        assert_eq!(top.chain_head_forward_p50_us, 10.0);
        assert_eq!(top.chain_middle_forward_p50_us, 12.0);
        assert_eq!(top.chain_tail_write_p50_us, 30.0);
        assert_eq!(top.chain_turnaround_share, 52.0 / 6000.0);
        assert!(levels[0].chain_turnaround_share.is_nan());
        // 3.6 s of server CPU over 360k records.
        assert_eq!(top.single_server_cpu_us_per_record, 10.0);
        assert_eq!(top.single_client_cpu_us_per_record, 5.0);
        let t = target.unwrap();
        assert_eq!(t.fsync_p50_us, 200.0);
        assert_eq!(t.loopback_p50_us, 20.0);
        assert_eq!(t.floor_us, 260.0);
        // 390 / (200 + 3*20) = 1.5; 390 / (200 + 90) = 1.3448...
        assert_eq!(t.ratio_rounds[0], 1.5);
        assert!((t.ratio - 1.5).abs() < 1e-12);
        let mut report = SuiteReport {
            meta: Meta {
                chain_nodes: 3,
                ..Meta::default()
            },
            levels,
            latency_target: Some(t),
            retained: summarize_retained(&[1, 128], 3, &rounds),
            growing_service: summarize_growing_service(&[1, 128], 3, &rounds),
            rounds,
        };
        assert!(report
            .markdown()
            .contains("placement: the OS's (nothing pinned)"));
        report.meta.cpus = Some("1".into());
        let md = report.markdown();
        assert!(
            md.contains("placement: every process measured (servers, load generator, floors) pinned to CPUs `1`"),
            "{md}"
        );
        // (90k / 3) / 25k = 1.2 in the middle round; 25k / 20k = 1.25 every round.
        assert!(
            md.contains("steady state of a log under retention: (floor/3) ÷ it = **1.20** → met (rounds: 1.20, 2.40, 0.60); 1.25× the growing log's chain"),
            "{md}"
        );
        assert!(md.contains("under retention 0 (it recycled 6)"), "{md}");
        // Round i's chain lost i% to steal, every floor 2%; the retained runs were not sampled.
        assert!(
            md.contains("(steal) in each round, disk floor / chain run: 2% / 0%, 2% / 1%, 2% / 2%"),
            "{md}"
        );
        assert!(
            md.contains("disk floor / chain under retention: 2% / –, 2% / –, 2% / –"),
            "{md}"
        );
        // Best growing per round: 20k, 15k, 20k against floor/3 of 30k, 60k, 15k and the
        // chain's 20k; the in-place service chain's 24k, 48k, 12k.
        let g = report.growing_service.as_ref().unwrap();
        assert_eq!(g.vs_floor_rounds, vec![1.5, 4.0, 0.75]);
        assert_eq!(g.chain_vs_it_rounds, vec![1.0, 0.75, 1.0]);
        assert_eq!(
            (g.prezeroed_records_per_s, g.unwritten_records_per_s),
            (20_000.0, 15_000.0)
        );
        assert_eq!(g.in_place_vs_growing, 1.2);
        assert!(
            md.contains("pre-zeroed meanwhile by the server's spare preparer 20000 rec/s, or only allocated, so every durable write also commits its extents' conversion, 15000 rec/s; the faster counts) is **1.50×** from floor/3 (rounds: 1.50, 4.00, 0.75); the service chain writing in place is 1.20× faster; chain against it: **1.00** (rounds: 1.00, 0.75, 1.00)"),
            "{md}"
        );
        assert!(
            md.contains("| 128 | 90000 | 60000 | 61.4 | 1.50 | 20000 | 20.5 | 1.50 |"),
            "{md}"
        );
        assert!(md.contains("floor ÷ single = **1.50** → met"), "{md}");
        assert!(
            md.contains(
                "| 128 | 90000 | 60000 | 700 | 1.50 | 60000 | 1.00 | 24000 | 900 | 1.25 | 20000 | 1.20 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("service floor itself is 1.50× from the disk floor; single node against the service floor: **1.00**"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | – | – | – | – | – |\n| 128 | 10.0 | 12.0 | 30.0 | 52.0 | 0.9% |"),
            "{md}"
        );
        assert!(!md.contains("## Errors"));
    }

    #[test]
    fn missing_runs_are_left_out_not_zeroed() {
        let mut r = round(0, 1.0, 20.0);
        r.chain.clear();
        let (levels, _) = summarize(&[1, 128], 3, &[r, round(1, 1.0, 20.0)]);
        assert_eq!(levels[1].chain_records_per_s, 20_000.0);
        assert_eq!(levels[1].chain_vs_floor_rounds.len(), 1);
        assert_eq!(verdict(f64::NAN), "not measured");
        assert_eq!(verdict(2.0), "missed");
    }
}
