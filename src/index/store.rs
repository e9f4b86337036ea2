//! The in-memory item table: slots (internal ids used by the graph), the id map, clusters,
//! and the graph itself. The `Index` guards it with one RwLock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::codec::ItemRecord;
use super::graph::{Graph, GraphParams};

pub(crate) struct Slot {
    pub id: Arc<str>,
    pub cluster: u32,
    pub metadata: Option<Arc<Value>>,
    /// False until the graph insert finished (so searches never return a half-inserted item)
    /// and again once deleted or replaced (a tombstone).
    pub live: bool,
}

pub(crate) struct State {
    pub dim: usize,
    pub graph: Arc<Graph>,
    pub slots: Vec<Slot>,
    /// `dim` floats per slot, unit length; kept for snapshots, exact scans and search-by-id.
    pub vectors: Vec<f32>,
    pub by_id: HashMap<Arc<str>, usize>,
    pub clusters: BTreeMap<u32, BTreeSet<Arc<str>>>,
    pub tombstones: usize,
    /// Slots reserved but not yet published.
    pub pending: usize,
}

impl State {
    /// A fresh state holding `items` (all live), with the graph built in parallel.
    pub fn build(dim: usize, params: GraphParams, items: Vec<ItemRecord>) -> State {
        let graph = Graph::new(params, items.len());
        let mut st = State {
            dim,
            graph: Arc::new(graph),
            slots: Vec::with_capacity(items.len()),
            vectors: Vec::with_capacity(items.len() * dim),
            by_id: HashMap::with_capacity(items.len()),
            clusters: BTreeMap::new(),
            tombstones: 0,
            pending: 0,
        };
        let base = st.reserve(&items);
        let points: Vec<(&[f32], usize)> = items.iter().enumerate().map(|(i, it)| (&it.vector[..], base + i)).collect();
        st.graph.insert(&points);
        for slot in base..base + items.len() {
            st.publish(slot);
        }
        st
    }

    /// Appends slots for `items`, not yet visible; returns the first slot number.
    pub fn reserve(&mut self, items: &[ItemRecord]) -> usize {
        let base = self.slots.len();
        for it in items {
            self.slots.push(Slot {
                id: Arc::from(it.id.as_str()),
                cluster: it.cluster,
                metadata: it.metadata.clone().map(Arc::new),
                live: false,
            });
            self.vectors.extend_from_slice(&it.vector);
        }
        self.pending += items.len();
        base
    }

    /// Makes a reserved slot visible, tombstoning the item it replaces.
    pub fn publish(&mut self, slot: usize) {
        let id = Arc::clone(&self.slots[slot].id);
        self.remove(&id);
        let s = &mut self.slots[slot];
        s.live = true;
        self.clusters.entry(s.cluster).or_default().insert(Arc::clone(&id));
        self.by_id.insert(id, slot);
        self.pending -= 1;
    }

    /// Tombstones the live item with this id; false if there is none.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(slot) = self.by_id.remove(id) else { return false };
        let s = &mut self.slots[slot];
        s.live = false;
        if let Some(members) = self.clusters.get_mut(&s.cluster) {
            members.remove(id);
            if members.is_empty() {
                self.clusters.remove(&s.cluster);
            }
        }
        self.tombstones += 1;
        true
    }

    pub fn vector(&self, slot: usize) -> &[f32] {
        &self.vectors[slot * self.dim..(slot + 1) * self.dim]
    }

    pub fn live_len(&self) -> usize {
        self.by_id.len()
    }

    /// Live items in slot order, as records (for compaction).
    pub fn live_records(&self) -> Vec<ItemRecord> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live)
            .map(|(i, s)| ItemRecord {
                id: s.id.to_string(),
                cluster: s.cluster,
                metadata: s.metadata.as_deref().cloned(),
                vector: self.vector(i).to_vec(),
            })
            .collect()
    }
}
