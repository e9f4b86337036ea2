//! The HNSW graph (hnsw_rs) over unit vectors. It knows internal slot numbers only.

use std::path::Path;

use hnsw_rs::prelude::{AnnT, DistL2, FilterT, Hnsw, HnswIo};

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

    /// Points in the graph (live or not).
    pub fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    /// Writes the graph as hnsw_rs's `<basename>.hnsw.graph` and `.hnsw.data` into `dir`,
    /// which must be fresh: hnsw_rs truncates in place and does not fsync, so the caller
    /// writes into a temporary directory and fsyncs it before trusting the files.
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<(), String> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.hnsw.file_dump(dir, basename)));
        match result {
            Ok(Ok(name)) if name == basename => Ok(()),
            Ok(Ok(name)) => Err(format!("hnsw_rs chose another file name ({name})")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("hnsw_rs panicked while dumping the graph".to_string()),
        }
    }

    /// Reads a graph written by [`Graph::dump`]. The caller has checked the files' checksums.
    pub fn load(dir: &Path, basename: &str) -> Result<Graph, String> {
        // hnsw_rs ties the graph's lifetime to its loader (for mmap, which we do not use);
        // the loader is a few paths, so leaking one per load is the simple way to 'static.
        let io: &'static HnswIo = Box::leak(Box::new(HnswIo::new(dir, basename)));
        let loaded = std::panic::catch_unwind(|| io.load_hnsw_with_dist::<f32, Dist>(Dist {}));
        let mut hnsw = match loaded {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("hnsw_rs panicked while loading the graph".to_string()),
        };
        // The loader turns this on; fresh graphs have it off, and later inserts should match.
        hnsw.set_extend_candidates(false);
        Ok(Graph { hnsw })
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
