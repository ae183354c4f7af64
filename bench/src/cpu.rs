//! CPU time of the server process and of this one around a run, from `/proc/<pid>/stat`: on a
//! two-core machine that client and server share, CPU per record is often what sets the rate.
//! Also the share of the machine's CPU time the hypervisor took for other guests (steal, from
//! `/proc/stat`): on a shared host a run it lands on is slower for reasons outside both.

use serde::{Deserialize, Serialize};

/// `/proc` reports utime/stime in USER_HZ ticks, fixed at 100 per second by the Linux ABI.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user, system) from one `/proc/<pid>/stat` line.
pub fn parse_stat(line: &str) -> Option<(f64, f64)> {
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime as f64 / USER_HZ, stime as f64 / USER_HZ))
}

/// Total CPU seconds (user + system, all threads) of process `pid`, or of this process for
/// `None`. `None` if /proc cannot be read (not Linux, process gone).
pub fn process_cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let (u, s) = parse_stat(&std::fs::read_to_string(path).ok()?)?;
    Some(u + s)
}

/// The machine's CPU time so far, all CPUs, in `/proc/stat` ticks: `(total, steal)`.
pub fn parse_host_ticks(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already counted in user, so the total is the first eight.
    let steal = *f.get(7)?;
    Some((f.iter().take(8).sum(), steal))
}

/// [`parse_host_ticks`] of this machine now; `None` off Linux.
pub fn host_ticks() -> Option<(u64, u64)> {
    parse_host_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Share of the machine's CPU time stolen between two [`host_ticks`] readings (0.0..=1.0).
pub fn steal_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((t0, s0), (t1, s1)) = (before?, after?);
    let total = t1.checked_sub(t0)?;
    (total > 0).then(|| s1.saturating_sub(s0) as f64 / total as f64)
}

/// CPU readings at one moment: server process, this process, the machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    pub server_s: Option<f64>,
    pub client_s: Option<f64>,
    pub host: Option<(u64, u64)>,
}

impl CpuSample {
    /// Now, for the server process `server` (and this one).
    pub fn now(server: u32) -> CpuSample {
        CpuSample {
            server_s: process_cpu_s(Some(server)),
            client_s: process_cpu_s(None),
            host: host_ticks(),
        }
    }
}

/// CPU seconds spent during one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    pub server_s: f64,
    pub client_s: f64,
    /// Share of the machine's CPU time the hypervisor gave other guests during the run
    /// (absent in older reports, or where `/proc/stat` has no steal column).
    #[serde(default)]
    pub host_steal_share: Option<f64>,
}

impl CpuUse {
    /// `after - before` for both processes; `None` if either process reading is missing.
    pub fn between(before: CpuSample, after: CpuSample) -> Option<CpuUse> {
        Some(CpuUse {
            server_s: after.server_s? - before.server_s?,
            client_s: after.client_s? - before.client_s?,
            host_steal_share: steal_share(before.host, after.host),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "4242 (tokio rt) worker) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(line), Some((2.5, 0.75)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn reads_this_process() {
        let a = process_cpu_s(None).unwrap();
        let b = process_cpu_s(Some(std::process::id())).unwrap();
        assert!(a >= 0.0 && b >= a);
        let at = |server, client, host| CpuSample {
            server_s: server,
            client_s: client,
            host,
        };
        let d = CpuUse::between(
            at(Some(1.0), Some(2.0), Some((1000, 10))),
            at(Some(1.5), Some(2.25), Some((1200, 60))),
        )
        .unwrap();
        assert_eq!(
            d,
            CpuUse {
                server_s: 0.5,
                client_s: 0.25,
                host_steal_share: Some(0.25),
            }
        );
        let no_server = at(None, Some(2.0), None);
        assert!(CpuUse::between(no_server, at(Some(1.5), Some(2.25), None)).is_none());
        let now = CpuSample::now(std::process::id());
        assert!(now.server_s.is_some() && now.client_s.is_some());
    }

    #[test]
    fn reads_steal_from_proc_stat() {
        let stat = "cpu  4079599 8663 1070200 5998624 535457 0 195597 49187 0 0\n\
                    cpu0 2041673 5156 453176 3222066 182893 0 74227 23747 0 0\n";
        let total = 4079599 + 8663 + 1070200 + 5998624 + 535457 + 195597 + 49187;
        assert_eq!(parse_host_ticks(stat), Some((total, 49187)));
        // Kernels before 2.6.11 had no steal column; a per-CPU line alone is not the total.
        assert_eq!(parse_host_ticks("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_host_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(steal_share(Some((100, 5)), Some((300, 55))), Some(0.25));
        assert_eq!(steal_share(Some((100, 5)), Some((100, 5))), None);
        assert_eq!(steal_share(None, Some((100, 5))), None);
        let (t, s) = host_ticks().unwrap();
        assert!(t > 0 && s <= t);
    }
}
