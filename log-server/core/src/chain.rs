//! The chain configuration (epoch + ordered nodes) and a node's place in it.

use crate::types::{Epoch, NodeId};
use serde::Serialize;

/// A chain: its configuration generation and its nodes in order, head first, tail last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainConfig {
    pub epoch: Epoch,
    pub nodes: Vec<NodeId>,
}

/// What a node does in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The only node: sequences, stores and answers alone.
    Single,
    /// Sequences appends and answers them once the whole chain has them durable.
    Head,
    /// Stores and forwards; acknowledges upstream what it and its successors have durable.
    Middle,
    /// Last node: acknowledges upstream what it has durable.
    Tail,
    /// Not a member of the configured chain: serves reads of what it stores, nothing else.
    Outside,
}

/// A node's position in a chain, computed once per configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub role: Role,
    pub pred: Option<NodeId>,
    pub succ: Option<NodeId>,
    pub head: Option<NodeId>,
}

impl ChainConfig {
    /// Where `node` stands. A node listed twice is a configuration error caught by `validate`.
    pub fn place(&self, node: NodeId) -> Place {
        let head = self.nodes.first().copied();
        let Some(i) = self.nodes.iter().position(|n| *n == node) else {
            return Place {
                role: Role::Outside,
                pred: None,
                succ: None,
                head,
            };
        };
        let last = self.nodes.len() - 1;
        let role = match (i == 0, i == last) {
            (true, true) => Role::Single,
            (true, false) => Role::Head,
            (false, true) => Role::Tail,
            (false, false) => Role::Middle,
        };
        Place {
            role,
            pred: if i > 0 { Some(self.nodes[i - 1]) } else { None },
            succ: self.nodes.get(i + 1).copied(),
            head,
        }
    }

    /// A chain must be non-empty and name each node once.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("chain has no nodes".into());
        }
        let mut seen = self.nodes.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.nodes.len() {
            return Err(format!("chain lists a node twice: {:?}", self.nodes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places() {
        let c = ChainConfig {
            epoch: Epoch(1),
            nodes: vec![NodeId(3), NodeId(1), NodeId(2)],
        };
        assert_eq!(c.place(NodeId(3)).role, Role::Head);
        assert_eq!(c.place(NodeId(3)).succ, Some(NodeId(1)));
        assert_eq!(c.place(NodeId(1)).role, Role::Middle);
        assert_eq!(c.place(NodeId(1)).pred, Some(NodeId(3)));
        assert_eq!(c.place(NodeId(2)).role, Role::Tail);
        assert_eq!(c.place(NodeId(2)).succ, None);
        assert_eq!(c.place(NodeId(9)).role, Role::Outside);
        let one = ChainConfig {
            epoch: Epoch(1),
            nodes: vec![NodeId(1)],
        };
        assert_eq!(one.place(NodeId(1)).role, Role::Single);
        assert!(one.validate().is_ok());
        let dup = ChainConfig {
            epoch: Epoch(1),
            nodes: vec![NodeId(1), NodeId(1)],
        };
        assert!(dup.validate().is_err());
    }
}
