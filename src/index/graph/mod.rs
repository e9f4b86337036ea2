//! The HNSW graph over unit vectors. It knows internal slot numbers only.
//!
//! This is our own HNSW, not hnsw_rs's. On the model's embeddings hnsw_rs searched and built
//! several times slower than hnswlib at equal recall (figures: BENCHMARKS.md, "Index" and "What
//! was tried and dropped"): its search allocates per candidate, hashes its visited set and locks
//! every neighbour list.
//! Here the links are flat arrays, the visited set is a stamp array, and the distance kernel is
//! picked once for the CPU. The benchmark example still runs hnsw_rs beside it.
//!
//! Concurrency: one RwLock. Searches share it. An insert finds its neighbours under the shared
//! lock (the expensive part, so parallel inserts overlap) and takes the exclusive lock only to
//! link itself in.

mod kernel;
mod layers;
mod persist;
mod visited;

use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};
use rayon::prelude::*;

use layers::{Layers, MAX_LEVEL};

pub(crate) use kernel::prefetch;
pub(crate) use persist::{GRAPH_FILE, decode, encode};

/// Below this many points a batch is inserted on the calling thread: rayon costs more than it saves.
const PARALLEL_MIN: usize = 64;
/// Points planned together per lock round. Their searches do not see each other (nor the other
/// threads' rounds); `Layers::link` brings each plan up to date with what was linked since.
const CHUNK: usize = 8;
/// Graphs smaller than this grow one point at a time.
const SERIAL_BELOW: usize = 1024;
/// Fixed, so that a rebuilt graph draws the same levels for the same slots.
const LEVEL_SEED: u64 = 0x5357_4156_4853_4e57;

#[derive(Debug, Clone, Copy)]
pub(crate) struct GraphParams {
    pub m: usize,
    pub ef_construction: usize,
}

pub(crate) struct Graph {
    layers: RwLock<Layers>,
    /// 1 / ln(M): the paper's level normalisation.
    level_scale: f64,
}

impl Graph {
    pub fn new(params: GraphParams, dim: usize, capacity: usize) -> Self {
        let mut layers = Layers::new(dim, params.m, params.ef_construction);
        layers.vectors.reserve(capacity * dim);
        Graph::from_layers(layers)
    }

    fn from_layers(layers: Layers) -> Self {
        let level_scale = 1.0 / (layers.m.max(2) as f64).ln();
        Graph { layers: RwLock::new(layers), level_scale }
    }

    /// Points in the graph (live or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.layers.read().present
    }

    /// Inserts unit vectors under their slot numbers. Safe to run while others search.
    pub fn insert(&self, points: &[(&[f32], usize)]) {
        // A small graph is built one point at a time: points planned together cannot link to
        // each other, which matters only while the graph has few nodes.
        let serial = points.len().min(SERIAL_BELOW.saturating_sub(self.layers.read().present));
        for chunk in points[..serial].chunks(1) {
            self.insert_chunk(chunk);
        }
        let rest = &points[serial..];
        if rest.len() >= PARALLEL_MIN {
            rest.par_chunks(CHUNK).for_each(|chunk| self.insert_chunk(chunk));
        } else {
            rest.chunks(CHUNK).for_each(|chunk| self.insert_chunk(chunk));
        }
    }

    /// Plans a few points under one shared lock, then links them under one exclusive lock:
    /// taking the exclusive lock per point made parallel inserts wait on each other's whole
    /// search, leaving cores idle.
    fn insert_chunk(&self, chunk: &[(&[f32], usize)]) {
        let planned: Vec<_> = {
            let l = self.layers.read();
            chunk
                .iter()
                .map(|&(v, slot)| {
                    let (slot, level) = (slot as u32, self.level_for(slot as u32));
                    (v, slot, level, l.plan(slot, v, level))
                })
                .collect()
        };
        let mut l = self.layers.write();
        for (v, slot, level, plan) in planned {
            // The graph was empty when planned: plan again against what is there now
            // rather than leave this node unlinked. Otherwise `link` brings the plan up to
            // date with the nodes linked since it was made.
            let plan = if plan.is_empty() && l.entry.is_some() { l.plan(slot, v, level) } else { plan };
            l.link(slot, v, level, plan);
        }
    }

    /// Marks a slot whose item was deleted or replaced: it keeps routing searches, but new
    /// links avoid it and lists that hold it are repaired as they change.
    pub fn retire(&self, slot: usize) {
        let mut l = self.layers.write();
        if slot >= l.retired.len() {
            l.make_room(slot as u32);
        }
        l.retired[slot] = true;
        // Searches start at the entry point. A retired one keeps its lists as they were, and as
        // its neighbours are retired too it can end up in a closed group of retired nodes: the
        // entry moves to the live node on the highest level instead.
        if l.entry.is_some_and(|(e, _)| e as usize == slot) {
            let best = (0..l.slots())
                .filter(|&n| l.levels[n] != layers::ABSENT && !l.retired[n])
                .max_by_key(|&n| (l.levels[n], std::cmp::Reverse(n)));
            if let Some(n) = best {
                l.entry = Some((n as u32, l.levels[n]));
            }
        }
    }

    /// Checks the graph's shape: every list within its cap, no self-links, repeats or links to
    /// nodes missing on that level, and every node `live` accepts reachable from the entry
    /// point on level 0. Qdrant's connectivity test, as a function for the tests.
    #[cfg(test)]
    pub fn check(&self, live: &dyn Fn(usize) -> bool) -> Result<(), String> {
        let l = self.layers.read();
        for node in 0..l.slots() as u32 {
            let level = l.levels[node as usize];
            if level == layers::ABSENT {
                continue;
            }
            for lc in 0..=level as usize {
                let ids = l.neighbours(node, lc);
                let cap = if lc == 0 { l.m0 } else { l.m };
                if ids.len() > cap {
                    return Err(format!("node {node} has {} links on level {lc}, above {cap}", ids.len()));
                }
                let mut seen = std::collections::HashSet::new();
                for &id in ids {
                    let there = l.levels.get(id as usize).is_some_and(|&lv| lv != layers::ABSENT && lv as usize >= lc);
                    if id == node || !there || !seen.insert(id) {
                        return Err(format!("node {node} has a bad link to {id} on level {lc}"));
                    }
                }
            }
        }
        let Some((entry, _)) = l.entry else {
            return match (0..l.slots()).find(|&s| live(s)) {
                Some(s) => Err(format!("no entry point, but node {s} is live")),
                None => Ok(()),
            };
        };
        let mut reached = vec![false; l.slots()];
        let mut stack = vec![entry];
        reached[entry as usize] = true;
        while let Some(n) = stack.pop() {
            for &x in l.neighbours(n, 0) {
                if !std::mem::replace(&mut reached[x as usize], true) {
                    stack.push(x);
                }
            }
        }
        let lost: Vec<usize> = (0..l.slots()).filter(|&s| live(s) && !reached[s]).collect();
        if lost.is_empty() { Ok(()) } else { Err(format!("{} live nodes unreachable from the entry point: {:?}", lost.len(), &lost[..lost.len().min(10)])) }
    }

    /// The paper's level draw, floor(-ln(U) / ln M), made a pure function of the slot.
    fn level_for(&self, slot: u32) -> u8 {
        let mut z = (slot as u64).wrapping_add(LEVEL_SEED).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64; // in (0, 1]
        ((-u.ln() * self.level_scale).floor() as u64).min(MAX_LEVEL as u64) as u8
    }

    /// The `k` nearest slots to a unit query that `accept` lets through, best first, with
    /// cosine similarity. `ef` is the search beam (raised to `k`).
    pub fn search(&self, query: &[f32], k: usize, ef: usize, accept: Option<&dyn Fn(usize) -> bool>) -> Vec<(usize, f32)> {
        let l = self.layers.read();
        let accept_node = accept.map(|f| move |n: u32| f(n as usize));
        let accept_dyn: Option<&dyn Fn(u32) -> bool> = accept_node.as_ref().map(|f| f as &dyn Fn(u32) -> bool);
        let mut found = l.search(query, ef.max(k), accept_dyn);
        found.truncate(k);
        found.into_iter().map(|s| (s.node as usize, 1.0 - s.dist)).collect()
    }

    /// The inserted vectors, read-locked until dropped (the index keeps no other copy).
    pub fn vectors(&self) -> Vectors<'_> {
        let guard = self.layers.read();
        let dim = guard.dim;
        Vectors { floats: RwLockReadGuard::map(guard, |l| &l.vectors[..]), dim }
    }

    /// The graph's links in the snapshot format (see `persist`).
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.layers.read())
    }

    /// Rebuilds a graph from `encode`'s bytes and the slots' vectors (which the snapshot's
    /// items hold, so the graph file does not repeat them).
    pub fn decode(bytes: &[u8], params: GraphParams, dim: usize, vectors: Vec<f32>) -> Result<Graph, String> {
        decode(bytes, params, dim, vectors).map(Graph::from_layers)
    }
}

/// Read access to the graph's vectors by slot; inserts wait while one is held.
pub(crate) struct Vectors<'a> {
    floats: MappedRwLockReadGuard<'a, [f32]>,
    dim: usize,
}

impl Vectors<'_> {
    /// Every slot's vector, one after another.
    pub fn all(&self) -> &[f32] {
        &self.floats
    }

    /// The unit vector of an inserted slot.
    pub fn get(&self, slot: usize) -> &[f32] {
        &self.floats[slot * self.dim..(slot + 1) * self.dim]
    }
}

/// Cosine of two unit vectors, for exact scans.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    kernel::dot_portable(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dim: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect();
        let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.into_iter().map(|a| a / n).collect()
    }

    fn exact(points: &[Vec<f32>], q: &[f32], k: usize, accept: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut s: Vec<(usize, f32)> =
            points.iter().enumerate().filter(|(i, _)| accept(*i)).map(|(i, p)| (i, dot(p, q))).collect();
        s.sort_by(|a, b| b.1.total_cmp(&a.1));
        s.into_iter().take(k).map(|(i, _)| i).collect()
    }

    fn build(n: usize, dim: usize) -> (Graph, Vec<Vec<f32>>) {
        let points: Vec<Vec<f32>> = (0..n as u64).map(|i| unit(i + 1, dim)).collect();
        let g = Graph::new(GraphParams { m: 8, ef_construction: 64 }, dim, n);
        let refs: Vec<(&[f32], usize)> = points.iter().enumerate().map(|(i, p)| (&p[..], i)).collect();
        g.insert(&refs);
        (g, points)
    }

    fn recall(g: &Graph, points: &[Vec<f32>], ef: usize, accept: &dyn Fn(usize) -> bool, filtered: bool) -> f64 {
        let mut hit = 0;
        let queries = 100;
        for qi in 0..queries {
            let q = unit(100_000 + qi, points[0].len());
            let want = exact(points, &q, 10, accept);
            let got = g.search(&q, 10, ef, filtered.then_some(accept));
            assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "results must be best first");
            hit += got.iter().filter(|(s, _)| want.contains(s)).count();
        }
        hit as f64 / (queries * 10) as f64
    }

    #[test]
    fn search_finds_the_exact_neighbours_with_a_wide_beam() {
        let (g, points) = build(2000, 16);
        assert_eq!(g.len(), 2000);
        let r = recall(&g, &points, 200, &|_| true, false);
        assert!(r >= 0.99, "recall@10 at ef 200 was {r}");
        let q = &points[1234];
        let top = g.search(q, 1, 16, None);
        assert_eq!(top[0].0, 1234, "a stored vector finds itself");
        assert!((top[0].1 - 1.0).abs() < 1e-5);
    }

    #[test]
    fn filtered_search_returns_only_accepted_nodes_and_keeps_recall() {
        let (g, points) = build(2000, 16);
        let even = |s: usize| s.is_multiple_of(2);
        let r = recall(&g, &points, 100, &even, true);
        assert!(r >= 0.95, "filtered recall@10 was {r}");
        let got = g.search(&points[3], 10, 50, Some(&even));
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|(s, _)| s.is_multiple_of(2)));
    }

    #[test]
    fn parallel_and_serial_inserts_both_give_a_searchable_graph() {
        let dim = 8;
        let points: Vec<Vec<f32>> = (0..500u64).map(|i| unit(i + 7, dim)).collect();
        let g = Graph::new(GraphParams { m: 6, ef_construction: 40 }, dim, 0);
        // Out of slot order, in small serial batches and one parallel batch.
        let refs: Vec<(&[f32], usize)> = points.iter().enumerate().rev().map(|(i, p)| (&p[..], i)).collect();
        for chunk in refs[..100].chunks(10) {
            g.insert(chunk);
        }
        g.insert(&refs[100..]);
        assert_eq!(g.len(), 500);
        for (i, p) in points.iter().enumerate() {
            assert_eq!(g.search(p, 1, 32, None)[0].0, i, "point {i} must find itself");
        }
    }

    #[test]
    fn points_planned_in_one_round_link_to_each_other() {
        // Issue 21: a tight group inserted in one round used to link only to older nodes, none
        // of its members having seen the others, so the group held no links among itself.
        let dim = 16;
        let (g, mut points) = build(SERIAL_BELOW + 100, dim);
        let centre = unit(999_999, dim);
        let group: Vec<Vec<f32>> = (0..CHUNK as u64)
            .map(|i| {
                let noise = unit(500_000 + i, dim);
                let v: Vec<f32> = centre.iter().zip(&noise).map(|(c, n)| c + 0.05 * n).collect();
                let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                v.into_iter().map(|a| a / n).collect()
            })
            .collect();
        let first = points.len();
        let refs: Vec<(&[f32], usize)> = group.iter().enumerate().map(|(i, p)| (&p[..], first + i)).collect();
        g.insert(&refs);
        points.extend(group);
        let members = first as u32..(first + CHUNK) as u32;
        for node in members.clone() {
            let linked = g.layers.read().neighbours(node, 0).iter().filter(|n| members.contains(n)).count();
            assert!(linked > 0, "node {node} has no link to the others of its round");
            let top = g.search(&points[node as usize], 1, 16, None);
            assert_eq!(top[0].0, node as usize, "node {node} must find itself");
        }
        g.check(&|_| true).unwrap();
    }

    #[test]
    fn encode_decode_round_trip_gives_identical_answers() {
        let (g, points) = build(300, 12);
        let bytes = g.encode();
        let vectors: Vec<f32> = points.iter().flatten().copied().collect();
        let params = GraphParams { m: 8, ef_construction: 64 };
        let back = Graph::decode(&bytes, params, 12, vectors.clone()).expect("decodes");
        for p in points.iter().take(50) {
            assert_eq!(g.search(p, 5, 20, None), back.search(p, 5, 20, None));
        }
        assert!(Graph::decode(&bytes, params, 12, vectors[..12 * 299].to_vec()).is_err(), "too few vectors");
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(Graph::decode(&bad, params, 12, vectors).is_err(), "a flipped byte must be caught");
    }

    #[test]
    fn empty_graph_answers_nothing() {
        let g = Graph::new(GraphParams { m: 4, ef_construction: 8 }, 3, 0);
        assert!(g.search(&[1.0, 0.0, 0.0], 5, 10, None).is_empty());
        assert_eq!(g.len(), 0);
        let back = Graph::decode(&g.encode(), GraphParams { m: 4, ef_construction: 8 }, 3, Vec::new()).unwrap();
        assert_eq!(back.len(), 0);
    }

    #[test]
    fn levels_follow_the_papers_distribution() {
        let g = Graph::new(GraphParams { m: 16, ef_construction: 32 }, 2, 0);
        let n = 100_000u32;
        let above0 = (0..n).filter(|&s| g.level_for(s) > 0).count() as f64 / n as f64;
        // P(level ≥ 1) = 1/M.
        assert!((above0 - 1.0 / 16.0).abs() < 0.005, "{above0}");
        assert_eq!(g.level_for(42), g.level_for(42));
    }
}

