//! Shared by the index tests: seeded clustered data, exact search, and index set-up.
#![allow(dead_code)]

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand::rngs::StdRng;
use swav::index::{Index, IndexOptions, ModelIdentity, NewItem};

pub const DIM: usize = 32;

pub fn identity() -> ModelIdentity {
    ModelIdentity { name: "test-model".into(), sha256: "ab".repeat(32), dim: DIM }
}

pub fn open(dir: &Path) -> Index {
    Index::open_or_create(dir, identity(), IndexOptions::default()).expect("open index")
}

/// `n` unit vectors around `clusters` random centres; the centre number is the cluster.
pub fn clustered(n: usize, clusters: u32, spread: f32, seed: u64) -> Vec<(Vec<f32>, u32)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| unit((0..DIM).map(|_| rng.random::<f32>() - 0.5).collect())).collect();
    (0..n)
        .map(|i| {
            let c = (i as u32) % clusters;
            let v = centres[c as usize].iter().map(|x| x + spread * (rng.random::<f32>() - 0.5)).collect();
            (unit(v), c)
        })
        .collect()
}

pub fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

pub fn items(data: &[(Vec<f32>, u32)], prefix: &str) -> Vec<NewItem> {
    data.iter()
        .enumerate()
        .map(|(i, (v, c))| NewItem { id: format!("{prefix}{i}"), vector: v.clone(), cluster: *c, metadata: None, thumbnail: None })
        .collect()
}

/// Indices of the `k` most similar vectors by cosine, exactly.
pub fn exact_top(data: &[(Vec<f32>, u32)], q: &[f32], k: usize, cluster: Option<u32>) -> Vec<usize> {
    let mut scored: Vec<(usize, f32)> = data
        .iter()
        .enumerate()
        .filter(|(_, (_, c))| cluster.is_none_or(|want| *c == want))
        .map(|(i, (v, _))| (i, v.iter().zip(q).map(|(a, b)| a * b).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.into_iter().take(k).map(|x| x.0).collect()
}
