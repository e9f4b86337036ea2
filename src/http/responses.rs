//! Response bodies for the image endpoints, shared by the server and the one-shot CLI commands
//! (`swav embed` / `swav assign`) so that both print the same JSON for the same files.

use serde::{Deserialize, Serialize};

use crate::bundle::Manifest;
use crate::engine::ImageOutput;

/// SwAV's training temperature; the default for assignment probabilities.
pub const DEFAULT_TEMPERATURE: f64 = 0.1;
pub const DEFAULT_TOP_K: usize = 5;

/// Which vector `/v1/embed` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    #[default]
    Embedding,
    Projection,
}

impl OutputKind {
    pub fn parse(s: Option<&str>) -> Result<OutputKind, String> {
        match s {
            None | Some("embedding") => Ok(OutputKind::Embedding),
            Some("projection") => Ok(OutputKind::Projection),
            Some(other) => Err(format!("output must be \"embedding\" or \"projection\", got {other:?}")),
        }
    }
}

/// Checked parameters of `/v1/assign`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AssignOptions {
    pub top_k: usize,
    pub temperature: f64,
}

impl AssignOptions {
    /// Fills defaults and checks ranges against the model's number of prototypes.
    pub fn new(top_k: Option<usize>, temperature: Option<f64>, num_prototypes: usize) -> Result<AssignOptions, String> {
        let top_k = top_k.unwrap_or(DEFAULT_TOP_K.min(num_prototypes));
        if top_k == 0 || top_k > num_prototypes {
            return Err(format!("top_k must be between 1 and {num_prototypes} (the number of prototypes), got {top_k}"));
        }
        let temperature = temperature.unwrap_or(DEFAULT_TEMPERATURE);
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(format!("temperature must be a positive finite number, got {temperature}"));
        }
        Ok(AssignOptions { top_k, temperature })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbedResponse {
    pub model: String,
    pub dim: usize,
    pub embeddings: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignResponse {
    pub model: String,
    pub assignments: Vec<Assignment>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    /// Index of the best prototype.
    pub cluster: usize,
    /// Its cosine score.
    pub score: f32,
    pub top: Vec<ClusterProbability>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterProbability {
    pub cluster: usize,
    pub probability: f32,
}

pub fn embed_response(manifest: &Manifest, kind: OutputKind, outputs: &[ImageOutput]) -> EmbedResponse {
    let dim = match kind {
        OutputKind::Embedding => manifest.outputs.embedding.dim,
        OutputKind::Projection => manifest.outputs.projection.as_ref().map_or(0, |o| o.dim),
    };
    let embeddings = outputs
        .iter()
        .map(|o| match kind {
            OutputKind::Embedding => l2_normalised(&o.embedding),
            OutputKind::Projection => l2_normalised(&o.projection),
        })
        .collect();
    EmbedResponse {
        model: manifest.name.clone(),
        dim,
        embeddings,
    }
}

pub fn assign_response(manifest: &Manifest, options: AssignOptions, outputs: &[ImageOutput]) -> AssignResponse {
    AssignResponse {
        model: manifest.name.clone(),
        assignments: outputs.iter().map(|o| assign(&o.prototype_scores, options)).collect(),
    }
}

/// The model already normalises; doing it again here makes the API's promise hold for any bundle.
fn l2_normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
    } else {
        v.to_vec()
    }
}

/// Argmax plus the top-k of softmax(scores / temperature), highest first (ties: lower id first).
pub fn assign(scores: &[f32], options: AssignOptions) -> Assignment {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = scores
        .iter()
        .map(|s| ((f64::from(*s) - f64::from(max)) / options.temperature).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let best = order.first().copied().unwrap_or(0);
    Assignment {
        cluster: best,
        score: scores.get(best).copied().unwrap_or(0.0),
        top: order
            .iter()
            .take(options.top_k)
            .map(|&c| ClusterProbability {
                cluster: c,
                probability: (exps[c] / total) as f32,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top_k_is_sorted_and_sums_to_one_over_all() {
        let opts = AssignOptions::new(Some(3), Some(1.0), 3).expect("valid");
        let a = assign(&[0.1, 0.9, 0.5], opts);
        assert_eq!(a.cluster, 1);
        assert!((a.score - 0.9).abs() < 1e-6);
        let ids: Vec<usize> = a.top.iter().map(|t| t.cluster).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        let sum: f32 = a.top.iter().map(|t| t.probability).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let expected = (0.9f64).exp() / [0.1f64, 0.9, 0.5].iter().map(|x| x.exp()).sum::<f64>();
        assert!((f64::from(a.top[0].probability) - expected).abs() < 1e-6);
    }

    #[test]
    fn low_temperature_sharpens() {
        let sharp = assign(&[0.1, 0.2], AssignOptions::new(Some(1), Some(0.01), 2).expect("valid"));
        let soft = assign(&[0.1, 0.2], AssignOptions::new(Some(1), Some(10.0), 2).expect("valid"));
        assert!(sharp.top[0].probability > 0.99);
        assert!(soft.top[0].probability < 0.51);
    }

    #[test]
    fn options_are_checked() {
        assert_eq!(AssignOptions::new(None, None, 3).expect("defaults").top_k, 3);
        assert!(AssignOptions::new(Some(0), None, 3).is_err());
        assert!(AssignOptions::new(Some(4), None, 3).is_err());
        assert!(AssignOptions::new(None, Some(0.0), 3).is_err());
        assert!(AssignOptions::new(None, Some(f64::NAN), 3).is_err());
        assert!(OutputKind::parse(Some("logits")).is_err());
    }

    #[test]
    fn normalises() {
        let v = l2_normalised(&[3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
    }
}
