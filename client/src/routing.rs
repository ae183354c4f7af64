//! Which node gets a request: appends to the (learned) head, reads round-robin or pinned, and
//! the `NotHead` redirect parsing.

use crate::conn::Conn;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Most node addresses a client tracks (configured plus learned from redirects), so a
/// misbehaving server cannot grow the list without bound.
pub(crate) const NODES_MAX: usize = 64;

/// One node address and its (lazily opened, reopened after failure) connection.
pub(crate) struct Slot {
    pub addr: String,
    pub conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

pub(crate) struct Nodes {
    slots: Mutex<Vec<Arc<Slot>>>,
    head: AtomicUsize,
    read_next: AtomicUsize,
}

impl Nodes {
    pub(crate) fn new(addrs: &[String]) -> Nodes {
        assert!(!addrs.is_empty() && addrs.len() <= NODES_MAX);
        Nodes {
            slots: Mutex::new(
                addrs
                    .iter()
                    .map(|a| {
                        Arc::new(Slot {
                            addr: a.clone(),
                            conn: tokio::sync::Mutex::new(None),
                        })
                    })
                    .collect(),
            ),
            head: AtomicUsize::new(0),
            read_next: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(crate) fn addrs(&self) -> Vec<String> {
        self.lock().iter().map(|s| s.addr.clone()).collect()
    }

    pub(crate) fn get(&self, index: usize) -> Option<Arc<Slot>> {
        self.lock().get(index).cloned()
    }

    /// The node appends go to (the head as far as this client knows).
    pub(crate) fn head(&self) -> (usize, Arc<Slot>) {
        let slots = self.lock();
        let i = self.head.load(Ordering::Relaxed) % slots.len();
        (i, slots[i].clone())
    }

    /// The node for the next read: the pinned one, else the next in round-robin order.
    /// A pin past the known nodes is the caller's mistake, not another node to read from.
    pub(crate) fn for_read(&self, pinned: Option<usize>) -> Result<(usize, Arc<Slot>)> {
        let slots = self.lock();
        let i = match pinned {
            Some(p) if p >= slots.len() => {
                return Err(Error::InvalidArgument(format!(
                    "node {p} pinned for reading, but only {} addresses are known",
                    slots.len()
                )))
            }
            Some(p) => p,
            None => self.read_next.fetch_add(1, Ordering::Relaxed) % slots.len(),
        };
        Ok((i, slots[i].clone()))
    }

    /// The nodes a read or subscription tries, in order: the pinned one alone, else every
    /// node once, from the next in round-robin order on.
    pub(crate) fn read_order(&self, pinned: Option<usize>) -> Result<Vec<(usize, Arc<Slot>)>> {
        let (first, _) = self.for_read(pinned)?;
        let slots = self.lock();
        let tries = if pinned.is_some() { 1 } else { slots.len() };
        Ok((0..tries)
            .map(|k| {
                let i = (first + k) % slots.len();
                (i, slots[i].clone())
            })
            .collect())
    }

    /// A `NotHead` answer: go to the named head (tracking it if new), else try the next node.
    /// `from` is the index that answered, so concurrent redirects do not skip nodes twice.
    pub(crate) fn redirect(&self, from: usize, message: &str) {
        match parse_not_head(message) {
            Some(addr) => {
                let mut slots = self.lock();
                let i = match slots.iter().position(|s| s.addr == addr) {
                    Some(i) => i,
                    None if slots.len() < NODES_MAX => {
                        slots.push(Arc::new(Slot {
                            addr: addr.to_string(),
                            conn: tokio::sync::Mutex::new(None),
                        }));
                        slots.len() - 1
                    }
                    // Full: fall back to probing the nodes we know.
                    None => (from + 1) % slots.len(),
                };
                self.head.store(i, Ordering::Relaxed);
            }
            None => self.rotate_head(from),
        }
    }

    /// The head did not answer: the chain may have a new head; try the next node (a non-head
    /// answers `NotHead` naming the real one).
    pub(crate) fn rotate_head(&self, from: usize) {
        let n = self.len();
        let _ =
            self.head
                .compare_exchange(from, (from + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The head's client address in a `NotHead` message ("not head; head is node N at HOST:PORT"):
/// the token after the word `at`, if any.
pub(crate) fn parse_not_head(message: &str) -> Option<&str> {
    let mut words = message.split_whitespace();
    while let Some(w) = words.next() {
        if w == "at" {
            let addr = words
                .next()?
                .trim_end_matches([',', ';', ')', '.', '"', '\'']);
            return (!addr.is_empty() && addr.contains(':')).then_some(addr);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_address() {
        assert_eq!(
            parse_not_head("not head; head is node 2 at 10.0.0.2:7400"),
            Some("10.0.0.2:7400")
        );
        assert_eq!(
            parse_not_head("not head; head is node 2 at [::1]:7400."),
            Some("[::1]:7400")
        );
        assert_eq!(parse_not_head("not head; head unknown"), None);
        assert_eq!(parse_not_head("not head; at"), None);
    }

    #[test]
    fn redirects_and_rotation() {
        let n = Nodes::new(&["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(n.head().0, 0);
        n.redirect(0, "not head; head is node 7 at b:2");
        assert_eq!(n.head().1.addr, "b:2");
        n.redirect(1, "not head; head is node 9 at c:3");
        assert_eq!(n.head().1.addr, "c:3");
        assert_eq!(n.len(), 3);
        n.rotate_head(2);
        assert_eq!(n.head().0, 0);
        // A stale rotation (someone already moved the head) does nothing.
        n.rotate_head(2);
        assert_eq!(n.head().0, 0);
        n.redirect(0, "not head");
        assert_eq!(n.head().0, 1);
    }

    #[test]
    fn reads_round_robin_or_pinned() {
        let n = Nodes::new(&["a:1".to_string(), "b:2".to_string(), "c:3".to_string()]);
        let got: Vec<usize> = (0..6).map(|_| n.for_read(None).unwrap().0).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(n.for_read(Some(1)).unwrap().0, 1);
        assert_eq!(n.for_read(Some(1)).unwrap().0, 1);
        // Out of range is refused, not wrapped round to another node (5 % 3 read from 2).
        assert!(matches!(
            n.for_read(Some(3)),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            n.for_read(Some(5)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn learned_nodes_are_bounded() {
        let n = Nodes::new(&["a:1".to_string()]);
        for i in 0..200 {
            n.redirect(0, &format!("not head; head is node {i} at h{i}:1"));
        }
        assert!(n.len() <= NODES_MAX);
    }
}
