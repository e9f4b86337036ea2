//! The HNSW algorithm (Malkov & Yashunin, 2018) over flat arrays: node ids are slot numbers,
//! level-0 links live in one array with a fixed stride, and distances are `1 - dot` on unit
//! vectors. This file holds no locks; `Graph` decides who may read or write.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::kernel::{Kernel, prefetch};
use super::visited::{Visited, with_visited};

/// Level of a slot that has been reserved but not yet inserted.
pub(crate) const ABSENT: u8 = u8::MAX;
/// Levels above this are never drawn at any size we serve (P ≈ M^-16).
pub(crate) const MAX_LEVEL: u8 = 15;
/// Cosine distance below which two unit vectors count as copies of one another (rounding of
/// `1 - dot` on identical vectors stays far below it; distinct embeddings stay far above).
const COPY_DISTANCE: f32 = 1e-6;
/// Links kept on record for plans made under the shared lock: far more than the threads times
/// the points per round that can be linked while one plan waits.
const RECENT: usize = 4096;

/// A node and its distance to the query, ordered by distance.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scored {
    pub dist: f32,
    pub node: u32,
}

impl Scored {
    /// Distances are `1 - cos`, so at least 0 up to rounding; clamping makes them non-negative,
    /// whose f32 bit patterns sort as the numbers do.
    #[inline]
    fn clamped(self) -> Scored {
        Scored { dist: self.dist.max(0.0), node: self.node }
    }

    /// Ordered as `Ord` orders them; only for clamped distances.
    #[inline]
    fn key(self) -> u64 {
        ((self.dist.to_bits() as u64) << 32) | (u32::MAX - self.node) as u64
    }

    #[inline]
    fn from_key(key: u64) -> Scored {
        Scored { dist: f32::from_bits((key >> 32) as u32), node: u32::MAX - key as u32 }
    }
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        // Distances are never NaN (unit vectors), so the plain comparison is a total order.
        // At equal distance the newer node (higher slot) comes first, so that a new copy of a
        // stored vector finds, and links to, the copies inserted just before it (see `select`).
        self.dist.partial_cmp(&other.dist).unwrap_or(Ordering::Equal).then(other.node.cmp(&self.node))
    }
}

/// Where a new node links, found without the write lock (see `Graph::insert_chunk`).
pub(crate) struct Plan {
    /// Per level, from level 0 up; empty when the graph had no nodes.
    levels: Vec<LevelPlan>,
    /// The reverse links, with each neighbour's list already pruned, so that the exclusive
    /// part of an insert is mostly copying. Each is applied only if the list is still `seen`.
    reverse: Vec<ReverseLink>,
    /// How many nodes had been linked when the plan was made (see `Layers::recent`).
    stamp: u64,
}

struct LevelPlan {
    /// The nodes the links were chosen from, nearest first.
    candidates: Vec<Scored>,
    /// The chosen links, nearest first.
    links: Vec<Scored>,
}

impl Plan {
    /// True when the graph was empty as the plan was made.
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }
}

struct ReverseLink {
    node: u32,
    level: usize,
    /// The list the plan saw; `None` where the link was added as the plan was brought up to
    /// date under the write lock, and is computed there.
    seen: Option<Vec<u32>>,
    new: Vec<u32>,
}

pub(crate) struct Layers {
    pub dim: usize,
    /// Link cap on levels ≥ 1, and the number of links a new node gets on each level.
    pub m: usize,
    /// Link cap on level 0 (2M, as in the paper).
    pub m0: usize,
    pub ef_construction: usize,
    pub kernel: Kernel,
    pub vectors: Vec<f32>,
    pub levels: Vec<u8>,
    /// Per node: a count, then up to `m0` neighbour ids.
    pub links0: Vec<u32>,
    /// Per node: its neighbour lists on levels 1..=level.
    pub upper: Vec<Vec<Vec<u32>>>,
    pub entry: Option<(u32, u8)>,
    pub present: usize,
    /// Slots whose item was deleted or replaced. They still route searches, but new links
    /// avoid them, and a neighbour list that holds them is repaired (see `links_with`).
    pub retired: Vec<bool>,
    /// The nodes linked most recently, oldest first, and how many were linked before the
    /// first of them: what a plan made under the shared lock has not seen (see `catch_up`).
    recent: Vec<u32>,
    recent_base: u64,
}

impl Layers {
    pub fn new(dim: usize, m: usize, ef_construction: usize) -> Layers {
        Layers {
            dim,
            m,
            m0: 2 * m,
            ef_construction,
            kernel: Kernel::detect(),
            vectors: Vec::new(),
            levels: Vec::new(),
            links0: Vec::new(),
            upper: Vec::new(),
            entry: None,
            present: 0,
            retired: Vec::new(),
            recent: Vec::new(),
            recent_base: 0,
        }
    }

    pub fn slots(&self) -> usize {
        self.levels.len()
    }

    #[inline]
    pub fn vector(&self, node: u32) -> &[f32] {
        let i = node as usize * self.dim;
        &self.vectors[i..i + self.dim]
    }

    #[inline]
    pub fn is_retired(&self, node: u32) -> bool {
        self.retired.get(node as usize).copied().unwrap_or(false)
    }

    #[inline]
    fn dist(&self, q: &[f32], node: u32) -> f32 {
        1.0 - self.kernel.dot(q, self.vector(node))
    }

    #[inline]
    pub fn neighbours(&self, node: u32, level: usize) -> &[u32] {
        if level == 0 {
            let base = node as usize * (self.m0 + 1);
            let n = self.links0[base] as usize;
            &self.links0[base + 1..base + 1 + n]
        } else {
            &self.upper[node as usize][level - 1]
        }
    }

    /// Starts loading a node's link list (every cache line of it) before it is read.
    #[inline]
    fn prefetch_links(&self, node: u32, level: usize) {
        if level == 0 {
            let base = node as usize * (self.m0 + 1);
            for line in self.links0[base..base + self.m0 + 1].chunks(16) {
                prefetch(line);
            }
        }
    }

    pub fn set_neighbours(&mut self, node: u32, level: usize, ids: &[u32]) {
        if level == 0 {
            let base = node as usize * (self.m0 + 1);
            let n = ids.len().min(self.m0);
            self.links0[base] = n as u32;
            self.links0[base + 1..base + 1 + n].copy_from_slice(&ids[..n]);
        } else {
            let list = &mut self.upper[node as usize][level - 1];
            list.clear();
            list.extend_from_slice(ids);
        }
    }

    /// Grows the arrays to hold `slot` (slots may be inserted out of order by parallel inserts).
    pub fn make_room(&mut self, slot: u32) {
        let need = slot as usize + 1;
        if self.levels.len() < need {
            self.levels.resize(need, ABSENT);
            self.vectors.resize(need * self.dim, 0.0);
            self.links0.resize(need * (self.m0 + 1), 0);
            self.upper.resize_with(need, Vec::new);
            self.retired.resize(need, false);
        }
    }

    /// Greedy descent from the entry point to `level`, through the levels above it.
    fn descend(&self, q: &[f32], level: u8) -> Option<Scored> {
        let (entry, top) = self.entry?;
        let mut best = Scored { dist: self.dist(q, entry), node: entry };
        for lc in (level as usize + 1..=top as usize).rev() {
            loop {
                let mut moved = false;
                for &n in self.neighbours(best.node, lc) {
                    let d = self.dist(q, n);
                    if d < best.dist {
                        best = Scored { dist: d, node: n };
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        Some(best)
    }

    /// Beam search on one level (the paper's SEARCH-LAYER), nearest first. With `accept`,
    /// every node is walked through but only accepted ones are returned, and the search stops
    /// early only once it holds `ef` accepted nodes (as hnswlib does with a filter).
    fn search_level(
        &self,
        visited: &mut Visited,
        q: &[f32],
        start: Scored,
        ef: usize,
        level: usize,
        accept: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<Scored> {
        let ok = |n: u32| accept.is_none_or(|f| f(n));
        // Heaps of packed (distance, node) keys: one integer compare per heap step.
        let mut candidates: BinaryHeap<Reverse<u64>> = BinaryHeap::with_capacity(ef * 4);
        let mut results: BinaryHeap<u64> = BinaryHeap::with_capacity(ef + 1);
        let start = start.clamped();
        visited.insert(start.node);
        candidates.push(Reverse(start.key()));
        if ok(start.node) {
            results.push(start.key());
        }
        let mut bound = if results.is_empty() { f32::INFINITY } else { start.dist };
        while let Some(Reverse(key)) = candidates.pop() {
            let c = Scored::from_key(key);
            if c.dist > bound && results.len() >= ef {
                break;
            }
            let links = self.neighbours(c.node, level);
            for &n in links {
                prefetch(self.vector(n));
                visited.prefetch(n);
            }
            for &n in links {
                if !visited.insert(n) {
                    continue;
                }
                let s = Scored { dist: self.dist(q, n), node: n }.clamped();
                if results.len() < ef || s.dist < bound {
                    self.prefetch_links(n, level);
                    candidates.push(Reverse(s.key()));
                    if ok(n) {
                        results.push(s.key());
                        if results.len() > ef {
                            results.pop();
                        }
                        bound = results.peek().map_or(f32::INFINITY, |&k| Scored::from_key(k).dist);
                    }
                }
            }
        }
        let mut keys = results.into_vec();
        keys.sort_unstable();
        keys.into_iter().map(Scored::from_key).collect()
    }

    /// The `ef` nearest accepted nodes to `q`, nearest first.
    pub fn search(&self, q: &[f32], ef: usize, accept: Option<&dyn Fn(u32) -> bool>) -> Vec<Scored> {
        let Some(start) = self.descend(q, 0) else { return Vec::new() };
        with_visited(self.slots(), |v| self.search_level(v, q, start, ef, 0, accept))
    }

    /// Keeps a candidate only if it is nearer to the base than to every candidate already kept:
    /// the paper's neighbour-selection heuristic, which keeps links that point in different
    /// directions. `candidates` are sorted nearest first. `pending` is a node not stored yet,
    /// with its vector.
    ///
    /// Copies of the base's own vector (distance about 0) all pass that test and, where there
    /// are more of them than a list holds, filled every copy's list with the same few: the
    /// group became an island, and its newer members were reached by nothing. So copies take at
    /// most half of the list, those nearest to `base` in slot number first: each copy links to
    /// the copies inserted just before and after it, a chain that search walks, and the rest
    /// of the list leads out of the group.
    fn select(&self, candidates: &[Scored], m: usize, pending: Option<(u32, &[f32])>, base: u32) -> Vec<u32> {
        let vector = |n: u32| match pending {
            Some((p, v)) if p == n => v,
            _ => self.vector(n),
        };
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        // Candidates come nearest first, so the copies are a prefix (empty but for copies).
        let n_copies = candidates.iter().take_while(|c| c.dist <= COPY_DISTANCE).count();
        if n_copies > 0 {
            let mut copies: Vec<u32> = candidates[..n_copies].iter().map(|c| c.node).collect();
            copies.sort_unstable_by_key(|&n| (n.abs_diff(base), n));
            kept.extend(copies.into_iter().take((m / 2).max(1)));
        }
        for c in &candidates[n_copies..] {
            if kept.len() >= m {
                break;
            }
            let v = vector(c.node);
            if kept.iter().all(|&r| 1.0 - self.kernel.dot(v, vector(r)) >= c.dist) {
                kept.push(c.node);
            }
        }
        kept
    }

    /// `node`'s links on `level` once `new` (vector `q`) joins them, pruned to the cap.
    ///
    /// A list that holds retired nodes is repaired on the way: each retired neighbour is
    /// replaced by its own live neighbours as candidates (as FreshDiskANN consolidates deletes),
    /// so the paths that ran through it survive its removal. Without this, lists filled up with
    /// tombstones, above all with copies of one vector re-added under the same ids, and a new
    /// node lost every incoming link: stored, but never found by search.
    fn links_with(&self, node: u32, level: usize, new: u32, q: &[f32]) -> Vec<u32> {
        let cap = if level == 0 { self.m0 } else { self.m };
        let current = self.neighbours(node, level);
        if current.contains(&new) {
            return current.to_vec();
        }
        let crowded = current.iter().any(|&n| self.is_retired(n));
        if current.len() < cap && !crowded {
            let mut ids = current.to_vec();
            ids.push(new);
            return ids;
        }
        let mut ids: Vec<u32> = Vec::with_capacity(if crowded { cap * 4 } else { cap });
        for &n in current {
            if self.is_retired(n) {
                ids.extend(self.neighbours(n, level).iter().filter(|&&x| x != node && !self.is_retired(x)));
            } else {
                ids.push(n);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|&x| x != new);
        let base = self.vector(node);
        let mut candidates: Vec<Scored> = ids
            .iter()
            .map(|&n| Scored { dist: self.dist(base, n), node: n })
            .chain(std::iter::once(Scored { dist: 1.0 - self.kernel.dot(base, q), node: new }))
            .collect();
        candidates.sort_unstable();
        self.select(&candidates, cap, Some((new, q)), node)
    }

    /// Finds the neighbours node `slot` (vector `q`, at `level`) should link to on each level,
    /// and how their own lists change.
    pub fn plan(&self, slot: u32, q: &[f32], level: u8) -> Plan {
        let stamp = self.linked();
        let empty = Plan { levels: Vec::new(), reverse: Vec::new(), stamp };
        let Some((_, top)) = self.entry else { return empty };
        let Some(mut start) = self.descend(q, level.min(top)) else { return empty };
        let levels = level.min(top) as usize;
        let mut plan = Plan { levels: Vec::with_capacity(levels + 1), reverse: Vec::new(), stamp };
        for lc in (0..=levels).rev() {
            let found = with_visited(self.slots(), |v| self.search_level(v, q, start, self.ef_construction, lc, None));
            start = found[0];
            // Links go to live nodes where there are any; retired ones only route.
            let live: Vec<Scored> = found.iter().copied().filter(|s| !self.is_retired(s.node)).collect();
            let candidates = if live.is_empty() { found } else { live };
            let links = self.chosen(&candidates, slot);
            for s in &links {
                let (new, seen) = (self.links_with(s.node, lc, slot, q), Some(self.neighbours(s.node, lc).to_vec()));
                plan.reverse.push(ReverseLink { node: s.node, level: lc, seen, new });
            }
            plan.levels.push(LevelPlan { candidates, links });
        }
        plan.levels.reverse();
        plan
    }

    /// `select` on a new node's candidates, keeping the distances of those chosen.
    fn chosen(&self, candidates: &[Scored], slot: u32) -> Vec<Scored> {
        let ids = self.select(candidates, self.m, None, slot);
        // `select` keeps candidates in order, copies first; both are nearest first.
        let mut links: Vec<Scored> = candidates.iter().copied().filter(|c| ids.contains(&c.node)).collect();
        links.sort_unstable();
        links
    }

    /// Nodes linked so far, counting each insert once.
    fn linked(&self) -> u64 {
        self.recent_base + self.recent.len() as u64
    }

    /// Brings a plan up to date with the nodes linked since it was made: those planned in the
    /// same round before it, and other threads' rounds. Its search could not see them, and a
    /// batch added in class order plans many points of a new class at once, each blind to the
    /// others: they all linked to the same few nodes of older classes, and the new class's
    /// first nodes held no links among themselves. A node that would have been chosen had it
    /// been seen joins the candidates and the links are chosen again; one that would not
    /// (nearly always, and checked with a few distances) changes nothing.
    fn catch_up(&self, slot: u32, q: &[f32], level: u8, mut plan: Plan) -> Plan {
        let Some(recent) = plan.stamp.checked_sub(self.recent_base).and_then(|i| self.recent.get(i as usize..)) else {
            // Older than the record of recent links: plan again.
            return self.plan(slot, q, level);
        };
        if recent.is_empty() {
            return plan;
        }
        for lc in 0..=level as usize {
            let unseen: Vec<Scored> = recent
                .iter()
                .filter(|&&n| self.levels[n as usize] as usize >= lc && !self.is_retired(n))
                .map(|&n| Scored { dist: self.dist(q, n), node: n }.clamped())
                .collect();
            if unseen.is_empty() {
                // Levels go up, and a node linked on a level is linked on those below it.
                break;
            }
            if plan.levels.len() <= lc {
                // The plan's graph did not reach this level; nodes linked since do.
                plan.levels.push(LevelPlan { candidates: Vec::new(), links: Vec::new() });
            }
            let lp = &mut plan.levels[lc];
            if !unseen.iter().any(|&r| self.would_choose(r, &lp.links)) {
                continue;
            }
            lp.candidates.extend(unseen);
            lp.candidates.sort_unstable();
            lp.links = self.chosen(&lp.candidates, slot);
            let links = &plan.levels[lc].links;
            plan.reverse.retain(|r| r.level != lc || links.iter().any(|s| s.node == r.node));
            for s in links {
                if !plan.reverse.iter().any(|r| r.level == lc && r.node == s.node) {
                    plan.reverse.push(ReverseLink { node: s.node, level: lc, seen: None, new: Vec::new() });
                }
            }
        }
        plan
    }

    /// Whether `select` would keep `r` among the candidates that gave `links`: only the links
    /// nearer than `r` were kept before it was reached. A copy of the new vector is chosen by
    /// another rule, so it always counts as chosen.
    fn would_choose(&self, r: Scored, links: &[Scored]) -> bool {
        if r.dist <= COPY_DISTANCE {
            return true;
        }
        let before = links.iter().take_while(|s| **s < r);
        if before.clone().count() >= self.m {
            return false;
        }
        let v = self.vector(r.node);
        before.into_iter().all(|s| 1.0 - self.kernel.dot(v, self.vector(s.node)) >= r.dist)
    }

    /// Puts node `slot` into the graph with the links of `plan`, brought up to date first. A
    /// reverse link whose list changed since the plan (another insert touched it) is
    /// recomputed here.
    pub fn link(&mut self, slot: u32, q: &[f32], level: u8, plan: Plan) {
        let plan = self.catch_up(slot, q, level, plan);
        self.make_room(slot);
        let start = slot as usize * self.dim;
        self.vectors[start..start + self.dim].copy_from_slice(q);
        self.levels[slot as usize] = level;
        self.upper[slot as usize] = vec![Vec::new(); level as usize];
        for (lc, lp) in plan.levels.iter().enumerate() {
            let ids: Vec<u32> = lp.links.iter().map(|s| s.node).collect();
            self.set_neighbours(slot, lc, &ids);
        }
        for r in plan.reverse {
            let new = match r.seen {
                Some(seen) if self.neighbours(r.node, r.level) == seen.as_slice() => r.new,
                _ => self.links_with(r.node, r.level, slot, q),
            };
            self.set_neighbours(r.node, r.level, &new);
        }
        self.present += 1;
        if self.entry.is_none_or(|(_, top)| level > top) {
            self.entry = Some((slot, level));
        }
        self.recent.push(slot);
        if self.recent.len() >= 2 * RECENT {
            self.recent.drain(..RECENT);
            self.recent_base += RECENT as u64;
        }
    }
}
