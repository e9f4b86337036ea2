//! The HNSW graph (hnsw_rs) over unit vectors. It knows internal slot numbers only.

use hnsw_rs::prelude::{DistL2, FilterT, Hnsw};

/// Measured against DistDot and DistCosine on the same unit vectors (BENCHMARKS.md, "Index"):
/// with `simdeez_f`, L2 is SIMD-dispatched at run time, and on unit vectors it ranks exactly
/// as cosine does, since |a-b|² = 2 - 2·cos.
type Dist = DistL2;

/// hnsw_rs caps the number of layers at 16; more are never used at our sizes.
const MAX_LAYERS: usize = 16;
/// Below this many points a batch is inserted on the calling thread: rayon costs more than it saves.
const PARALLEL_MIN: usize = 64;

#[derive(Debug, Clone, Copy)]
pub(crate) struct GraphParams {
    pub m: usize,
    pub ef_construction: usize,
}

pub(crate) struct Graph {
    hnsw: Hnsw<'static, f32, Dist>,
}

impl Graph {
    pub fn new(params: GraphParams, capacity: usize) -> Self {
        let hnsw = Hnsw::new(params.m, capacity.max(1024), MAX_LAYERS, params.ef_construction, Dist {});
        Graph { hnsw }
    }

    /// Inserts unit vectors under their slot numbers. Safe to run while others search.
    pub fn insert(&self, points: &[(&[f32], usize)]) {
        if points.len() >= PARALLEL_MIN {
            self.hnsw.parallel_insert_slice(&points.to_vec());
        } else {
            for &(v, slot) in points {
                self.hnsw.insert_slice((v, slot));
            }
        }
    }

    /// The nearest slots to a unit query, best first, with cosine similarity.
    pub fn search(&self, query: &[f32], k: usize, ef: usize, filter: Option<&dyn FilterT>) -> Vec<(usize, f32)> {
        self.hnsw
            .search_filter(query, k, ef, filter)
            .into_iter()
            .map(|n| (n.d_id, cosine_from_distance(n.distance)))
            .collect()
    }
}

fn cosine_from_distance(d: f32) -> f32 {
    1.0 - d * d / 2.0
}

/// Cosine of two unit vectors, for exact scans.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
