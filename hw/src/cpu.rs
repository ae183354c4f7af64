//! CPU placement: parse a CPU list ("1", "0,2-3") and pin the calling thread to it, so that the
//! threads it starts afterwards inherit the set (as `taskset -c` does for a whole process).
//!
//! Why a service wants this: on a small VM every wake-up of a thread on another vCPU is an
//! inter-processor interrupt, and a halted vCPU must first be rescheduled by the host. On the
//! 2-vCPU machine we develop on, a loopback ping-pong between two threads on different vCPUs
//! takes about four times as long as between two threads on one. A local chain whose nodes,
//! client and disk completions share one CPU skips those wake-ups on every hop.

use crate::error::{HwError, Result};
use std::io;

/// Most CPUs a list may name (the kernel's `cpu_set_t` holds 1024).
pub const CPUS_MAX: usize = 1024;

/// Parses a CPU list: comma-separated CPU numbers and inclusive ranges (`0,2-3`), as in
/// `taskset -c` and `/sys/devices/system/cpu/online`. Returns the CPUs sorted, without repeats.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>> {
    let bad = |why: &str| HwError::Invalid(format!("CPU list {s:?}: {why}"));
    let num = |t: &str| -> Result<usize> {
        let n: usize = t
            .trim()
            .parse()
            .map_err(|_| bad(&format!("{t:?} is not a CPU number")))?;
        if n >= CPUS_MAX {
            return Err(bad(&format!("CPU {n} is past the limit of {CPUS_MAX}")));
        }
        Ok(n)
    };
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("empty entry"));
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad(&format!("range {a}-{b} runs backwards")));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Restricts the calling thread to `cpus`; threads it creates afterwards start with the same
/// set. Fails (and changes nothing) if the set is empty or names no CPU this process may use.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        return Err(HwError::Invalid("empty CPU set".into()));
    }
    // SAFETY: cpu_set_t is plain bytes; all zeros is the empty set (what CPU_ZERO makes).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= CPUS_MAX {
            return Err(HwError::Invalid(format!(
                "CPU {c} is past the limit of {CPUS_MAX}"
            )));
        }
        // SAFETY: `c` < CPUS_MAX, the number of CPUs a cpu_set_t holds, so the bit is inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t for the duration of the call and its size is passed;
    // pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(HwError::io(
            "sched_setaffinity (are these CPUs online and allowed?)",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The CPUs the calling thread may run on now.
pub fn current_thread_cpus() -> Result<Vec<usize>> {
    // SAFETY: as in `pin_current_thread`: all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid and writable for the call and its size is passed; pid 0 is the
    // calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(HwError::io("sched_getaffinity", io::Error::last_os_error()));
    }
    Ok((0..CPUS_MAX)
        .filter(|&c| {
            // SAFETY: every index is < CPUS_MAX, inside `set`.
            unsafe { libc::CPU_ISSET(c, &set) }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_like_taskset() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_cpu_list(" 3 , 1-2,2 ").unwrap(), vec![1, 2, 3]);
        for bad in ["", "a", "1,", "3-1", "-1", "1-", "5000"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pinning_restricts_this_thread_and_its_children() {
        // On a thread of its own: the test harness's other threads keep their placement.
        std::thread::spawn(|| {
            let allowed = current_thread_cpus().unwrap();
            let one = allowed[allowed.len() - 1];
            pin_current_thread(&[one]).unwrap();
            assert_eq!(current_thread_cpus().unwrap(), vec![one]);
            let child = std::thread::spawn(|| current_thread_cpus().unwrap());
            assert_eq!(child.join().unwrap(), vec![one]);
            // An empty set, or one naming no usable CPU, is refused and changes nothing.
            assert!(pin_current_thread(&[]).is_err());
            assert!(pin_current_thread(&[CPUS_MAX - 1]).is_err());
            assert_eq!(current_thread_cpus().unwrap(), vec![one]);
        })
        .join()
        .unwrap();
    }
}
