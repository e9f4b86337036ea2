//! The visited set of one search: a stamp per node, so starting a search is O(1) instead of
//! clearing or allocating a set. One per thread, reused across searches and indexes.

use std::cell::RefCell;

pub(crate) struct Visited {
    stamps: Vec<u32>,
    current: u32,
}

impl Visited {
    /// Marks `node` visited; true if it was not yet.
    #[inline]
    pub fn insert(&mut self, node: u32) -> bool {
        let s = &mut self.stamps[node as usize];
        let fresh = *s != self.current;
        *s = self.current;
        fresh
    }

    #[inline]
    pub fn prefetch(&self, node: u32) {
        if let Some(s) = self.stamps.get(node as usize..node as usize + 1) {
            super::kernel::prefetch(s);
        }
    }

    fn reset(&mut self, nodes: usize) {
        if self.stamps.len() < nodes {
            self.stamps.resize(nodes, 0);
        }
        self.current = self.current.wrapping_add(1);
        if self.current == 0 {
            // After 2^32 searches on this thread old stamps could collide with new ones.
            self.stamps.fill(0);
            self.current = 1;
        }
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = const { RefCell::new(Visited { stamps: Vec::new(), current: 0 }) };
}

/// Runs `f` with this thread's visited set, emptied, for node ids below `nodes`.
pub(crate) fn with_visited<R>(nodes: usize, f: impl FnOnce(&mut Visited) -> R) -> R {
    VISITED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            v.reset(nodes);
            f(&mut v)
        }
        // Only reachable if a search ran inside another on one thread; give it its own set.
        Err(_) => {
            let mut v = Visited { stamps: Vec::new(), current: 0 };
            v.reset(nodes);
            f(&mut v)
        }
    })
}
