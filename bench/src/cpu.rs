//! CPU time of the server process and of this one around a run, from `/proc/<pid>/stat`: on a
//! two-core machine that client and server share, CPU per record is often what sets the rate.

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

/// CPU seconds spent during one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    pub server_s: f64,
    pub client_s: f64,
}

impl CpuUse {
    /// `after - before` for both processes; `None` if either reading is missing.
    pub fn between(
        before: (Option<f64>, Option<f64>),
        after: (Option<f64>, Option<f64>),
    ) -> Option<CpuUse> {
        Some(CpuUse {
            server_s: after.0? - before.0?,
            client_s: after.1? - before.1?,
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
        let d = CpuUse::between((Some(1.0), Some(2.0)), (Some(1.5), Some(2.25))).unwrap();
        assert_eq!(
            d,
            CpuUse {
                server_s: 0.5,
                client_s: 0.25
            }
        );
        assert!(CpuUse::between((None, Some(2.0)), (Some(1.5), Some(2.25))).is_none());
    }
}
