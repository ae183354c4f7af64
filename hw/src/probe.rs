//! Start-up capability probe: can we use io_uring, and does O_DIRECT work on the data
//! directory's filesystem? Each answer comes with a reason a human can act on; tests skip
//! from the same probe and print that reason.

use crate::buf::{AlignedBuf, PAGE_BYTES};
use io_uring::{opcode, IoUring};
use serde::Serialize;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the probe found.
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    /// io_uring can be set up and supports every opcode storage uses.
    pub uring_ok: bool,
    pub uring_reason: String,
    /// `io_uring_enter` accepts a timeout argument (`IORING_FEAT_EXT_ARG`, Linux 5.11).
    pub uring_ext_arg: bool,
    /// An aligned O_DIRECT write and read worked in the directory.
    pub direct_ok: bool,
    pub direct_reason: String,
    /// Smallest O_DIRECT write size that worked (512 or 4096), if any.
    pub logical_block_bytes: Option<u32>,
}

impl Capabilities {
    /// `Some(reason)` if io_uring cannot be used.
    pub fn uring_unavailable(&self) -> Option<&str> {
        (!self.uring_ok).then_some(self.uring_reason.as_str())
    }

    /// `Some(reason)` if O_DIRECT cannot be used in the probed directory.
    pub fn direct_unavailable(&self) -> Option<&str> {
        (!self.direct_ok).then_some(self.direct_reason.as_str())
    }
}

/// Probes io_uring and O_DIRECT in `dir` (which must exist and be writable).
pub fn probe(dir: &Path) -> Capabilities {
    let (uring_ok, uring_reason, uring_ext_arg) = probe_uring();
    let (direct_ok, direct_reason, logical_block_bytes) = probe_direct(dir);
    Capabilities {
        uring_ok,
        uring_reason,
        uring_ext_arg,
        direct_ok,
        direct_reason,
        logical_block_bytes,
    }
}

fn probe_uring() -> (bool, String, bool) {
    let ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            return (
                false,
                format!(
                "io_uring_setup failed: {e}; check `sysctl kernel.io_uring_disabled` (must be 0), \
                     container seccomp policy (docker: --security-opt seccomp=unconfined), and \
                     that the kernel is >= 5.11 with CONFIG_IO_URING=y"
            ),
                false,
            )
        }
    };
    let ext_arg = ring.params().is_feature_ext_arg();
    let mut p = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut p) {
        return (
            false,
            format!("io_uring opcode probe failed: {e} (kernel older than 5.6?)"),
            ext_arg,
        );
    }
    let needed = [
        ("WRITEV", opcode::Writev::CODE),
        ("WRITE", opcode::Write::CODE),
        ("READ", opcode::Read::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("FALLOCATE", opcode::Fallocate::CODE),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, c)| !p.is_supported(*c))
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        return (
            false,
            format!("io_uring lacks opcodes {missing:?}; upgrade to Linux >= 5.11"),
            ext_arg,
        );
    }
    if !ext_arg {
        return (
            false,
            "io_uring lacks IORING_FEAT_EXT_ARG (timed waits); upgrade to Linux >= 5.11".into(),
            ext_arg,
        );
    }
    (
        true,
        "io_uring set up; all needed opcodes supported".into(),
        ext_arg,
    )
}

static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

fn probe_direct(dir: &Path) -> (bool, String, Option<u32>) {
    let name = format!(
        ".chainlog-probe-{}-{}",
        std::process::id(),
        PROBE_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    let r = probe_direct_at(&path);
    let _ = std::fs::remove_file(&path);
    match r {
        Ok(block) => (
            true,
            format!(
                "O_DIRECT {block}-byte aligned write and read worked in {}",
                dir.display()
            ),
            Some(block),
        ),
        Err(why) => (false, why, None),
    }
}

fn probe_direct_at(path: &Path) -> Result<u32, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            format!(
                "open(O_DIRECT) in {} failed: {e}; the filesystem does not support direct I/O \
                 (tmpfs, some FUSE/overlay setups): use io_mode = \"buffered\" or put the data \
                 dir on ext4/xfs",
                path.parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        })?;
    let mut buf = AlignedBuf::new_unpooled(PAGE_BYTES);
    buf.set_len(PAGE_BYTES);
    buf.as_mut_slice()[..8].copy_from_slice(b"chainlog");
    f.write_all_at(buf.as_slice(), 0).map_err(|e| {
        format!("O_DIRECT {PAGE_BYTES}-byte aligned write failed: {e}; use io_mode = \"buffered\"")
    })?;
    let mut back = AlignedBuf::new_unpooled(PAGE_BYTES);
    back.set_len(PAGE_BYTES);
    f.read_exact_at(back.as_mut_slice(), 0).map_err(|e| {
        format!("O_DIRECT {PAGE_BYTES}-byte aligned read failed: {e}; use io_mode = \"buffered\"")
    })?;
    if &back.as_slice()[..8] != b"chainlog" {
        return Err("O_DIRECT read returned other bytes than written".into());
    }
    // A 512-byte write succeeding means a 512-byte logical block; EINVAL means 4096.
    let small = f.write_at(&buf.as_slice()[..512], 0);
    Ok(if small.is_ok() {
        512
    } else {
        PAGE_BYTES as u32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let c = probe(dir.path());
        assert!(!c.uring_reason.is_empty());
        assert!(!c.direct_reason.is_empty());
        if c.direct_ok {
            assert!(matches!(c.logical_block_bytes, Some(512) | Some(4096)));
        }
        // No probe file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        eprintln!("{c:?}");
    }
}
