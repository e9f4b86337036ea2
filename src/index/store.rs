//! The in-memory item table: slots (internal ids used by the graph), the id map, clusters,
//! and the graph itself. The `Index` guards it with one RwLock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::Metadata;
use super::codec::ItemRecord;
use super::graph::{Graph, GraphParams};

#[derive(Clone)]
pub(crate) struct Slot {
    pub id: Arc<str>,
    pub cluster: u32,
    pub metadata: Option<Metadata>,
    /// Dropped when the item is deleted or replaced.
    pub thumbnail: Option<Arc<[u8]>>,
    /// False until the graph insert finished (so searches never return a half-inserted item)
    /// and again once deleted or replaced (a tombstone).
    pub live: bool,
}

pub(crate) struct State {
    /// Also holds every slot's unit vector (for snapshots, exact scans and search-by-id).
    pub graph: Arc<Graph>,
    pub slots: Vec<Slot>,
    pub by_id: HashMap<Arc<str>, usize>,
    pub clusters: BTreeMap<u32, BTreeSet<Arc<str>>>,
    pub tombstones: usize,
    /// Slots reserved but not yet published.
    pub pending: usize,
}

impl State {
    /// The state a snapshot describes. With the snapshot's graph, every slot is kept (its
    /// internal ids are the slot numbers); without it, tombstones are dropped and the graph is
    /// built from the live items in parallel.
    pub fn restore(dim: usize, params: GraphParams, slots: Vec<(bool, ItemRecord)>, graph: Option<Graph>) -> State {
        let (slots, graph) = match graph {
            Some(g) => (slots, g),
            None => {
                let live: Vec<_> = slots.into_iter().filter(|(live, _)| *live).collect();
                let g = Graph::new(params, dim, live.len());
                let points: Vec<(&[f32], usize)> = live.iter().enumerate().map(|(i, (_, it))| (&it.vector[..], i)).collect();
                g.insert(&points);
                (live, g)
            }
        };
        let mut st = State {
            graph: Arc::new(graph),
            slots: Vec::with_capacity(slots.len()),
            by_id: HashMap::with_capacity(slots.len()),
            clusters: BTreeMap::new(),
            tombstones: 0,
            pending: 0,
        };
        for (live, it) in slots {
            let slot = st.reserve(std::slice::from_ref(&it));
            if live {
                st.publish(slot);
            } else {
                st.pending -= 1;
                st.tombstones += 1;
                st.graph.retire(slot);
            }
        }
        st
    }

    /// Adds items in one go (graph insert under the caller's exclusive access): for replay.
    pub fn add_now(&mut self, items: &[ItemRecord]) {
        let base = self.reserve(items);
        let points: Vec<(&[f32], usize)> = items.iter().enumerate().map(|(i, it)| (&it.vector[..], base + i)).collect();
        self.graph.insert(&points);
        for slot in base..base + items.len() {
            self.publish(slot);
        }
    }

    /// Appends slots for `items`, not yet visible; returns the first slot number.
    pub fn reserve(&mut self, items: &[ItemRecord]) -> usize {
        let base = self.slots.len();
        for it in items {
            // The version being replaced stops attracting links now; searches still see it
            // until the new one is published.
            if let Some(&old) = self.by_id.get(it.id.as_str()) {
                self.graph.retire(old);
            }
            self.slots.push(Slot {
                id: Arc::from(it.id.as_str()),
                cluster: it.cluster,
                metadata: it.metadata.clone(),
                thumbnail: it.thumbnail.as_deref().map(Arc::from),
                live: false,
            });
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
        self.graph.retire(slot);
        let s = &mut self.slots[slot];
        s.live = false;
        s.thumbnail = None;
        if let Some(members) = self.clusters.get_mut(&s.cluster) {
            members.remove(id);
            if members.is_empty() {
                self.clusters.remove(&s.cluster);
            }
        }
        self.tombstones += 1;
        true
    }

    pub fn live_len(&self) -> usize {
        self.by_id.len()
    }

    /// Live items in slot order, as snapshot slots (for compaction).
    pub fn live_slots(&self) -> Vec<(bool, ItemRecord)> {
        let vectors = self.graph.vectors();
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live)
            .map(|(i, s)| (true, ItemRecord {
                id: s.id.to_string(),
                cluster: s.cluster,
                metadata: s.metadata.clone(),
                vector: vectors.get(i).to_vec(),
                thumbnail: s.thumbnail.as_deref().map(<[u8]>::to_vec),
            }))
            .collect()
    }
}
