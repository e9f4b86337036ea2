//! Benchmark data shared by the index examples: Fashion-MNIST pixels projected to 128-d by a
//! fixed random Gaussian-like matrix and L2-normalised, a stand-in for model embeddings.
#![allow(dead_code)]
use std::io::Read;

use rand::{Rng, SeedableRng};

pub const DIM: usize = 128;

pub fn read_idx_images(path: &str) -> Vec<Vec<f32>> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut buf = Vec::new();
    flate2::read::GzDecoder::new(f).read_to_end(&mut buf).expect("gunzip");
    let n = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    buf[16..].chunks_exact(784).take(n).map(|p| p.iter().map(|&b| b as f32 / 255.0).collect()).collect()
}

pub fn project(images: &[Vec<f32>], proj: &[f32]) -> Vec<Vec<f32>> {
    images
        .iter()
        .map(|x| {
            let mut v: Vec<f32> = (0..DIM).map(|j| x.iter().zip(&proj[j * 784..(j + 1) * 784]).map(|(a, b)| a * b).sum()).collect();
            let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.iter_mut().for_each(|a| *a /= n);
            v
        })
        .collect()
}


/// (train 60k, test 10k) unit vectors.
pub fn fashion_vectors(dir: &str) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let proj: Vec<f32> = (0..DIM * 784).map(|_| rng.random::<f32>() - 0.5).collect();
    let base = project(&read_idx_images(&format!("{dir}/train-images-idx3-ubyte.gz")), &proj);
    let queries = project(&read_idx_images(&format!("{dir}/t10k-images-idx3-ubyte.gz")), &proj);
    (base, queries)
}
