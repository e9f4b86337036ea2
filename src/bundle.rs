//! The model bundle: `model.onnx` + `manifest.json`, as specified in `docs/bundle.md`.
//!
//! This is the one place that knows the bundle's on-disk format. Readers ignore unknown keys
//! (adding a field is not a schema change) and reject schema versions they do not know: this one
//! reads version 1 (every output present) and [`SCHEMA_VERSION`].

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest schema version the trainer writes now. Version 2 lets a model lack the projection
/// and the prototypes (a backbone-only import), adds k-means `centroid_scores` and weights kept in
/// an external data file (`model_data`).
pub const SCHEMA_VERSION: u32 = 2;
/// Every version this build reads.
pub const SUPPORTED_SCHEMA_VERSIONS: [u32; 2] = [1, SCHEMA_VERSION];

const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid manifest: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: manifest schema_version {found} is not supported (this swav reads versions 1 to {SCHEMA_VERSION}); \
         re-export the bundle with a matching trainer"
    )]
    SchemaVersion { path: PathBuf, found: u32 },
    #[error(
        "{path}: sha256 mismatch: manifest says {expected}, file has {actual}; the bundle is corrupt or was edited"
    )]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: invalid manifest: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A loaded, checked bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub model_path: PathBuf,
}

/// A file that `model.onnx` keeps its weights in (ONNX external data), checked like the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataFile {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_utc: Option<String>,
    pub model_file: String,
    pub model_sha256: String,
    pub input: InputSpec,
    pub outputs: Outputs,
    pub num_prototypes: usize,
    #[serde(default)]
    pub backbone: Option<String>,
    #[serde(default)]
    pub training: serde_json::Value,
    #[serde(default)]
    pub dataset: serde_json::Value,
    #[serde(default)]
    pub evaluation: Option<serde_json::Value>,
    #[serde(default)]
    pub parity: Option<serde_json::Value>,
    #[serde(default)]
    pub golden: Option<String>,
    #[serde(default)]
    pub model_data: Option<DataFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub layout: String,
    pub dtype: String,
    #[serde(default)]
    pub value_range: Option<[f32; 2]>,
    pub channels: u32,
    pub height: u32,
    pub width: u32,
    pub resize: ResizeSpec,
    pub crop: CropSpec,
    pub alpha: String,
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResizeSpec {
    pub method: String,
    pub size: u32,
    pub interpolation: String,
    pub antialias: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CropSpec {
    pub method: String,
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outputs {
    pub embedding: OutputSpec,
    /// Absent (null) in a model without the projection head.
    #[serde(default)]
    pub projection: Option<OutputSpec>,
    /// Absent (null) in a model without learned prototypes.
    #[serde(default)]
    pub prototype_scores: Option<OutputSpec>,
    /// Cosine of the embedding to k-means centroids computed at import; only in models without
    /// prototypes, whose clusters they then are.
    #[serde(default)]
    pub centroid_scores: Option<OutputSpec>,
}

/// What groups the index's items into clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterSource {
    /// The model's learned prototypes (argmax of `prototype_scores`).
    Prototypes(usize),
    /// k-means centroids of the embeddings, computed at import (argmax of `centroid_scores`).
    Centroids(usize),
    /// Neither: items are not clustered.
    None,
}

impl ClusterSource {
    /// How many clusters there are; 0 for [`ClusterSource::None`].
    pub fn count(self) -> usize {
        match self {
            ClusterSource::Prototypes(k) | ClusterSource::Centroids(k) => k,
            ClusterSource::None => 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub dim: usize,
}

impl InputSpec {
    /// Number of f32 values in one preprocessed image (C×H×W).
    pub fn tensor_len(&self) -> usize {
        self.channels as usize * self.height as usize * self.width as usize
    }
}

impl Bundle {
    /// Reads `dir/manifest.json`, checks it, and verifies the model file's sha256.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest_path).map_err(|source| BundleError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = Manifest::parse(&text, &manifest_path)?;
        let model_path = dir.join(&manifest.model_file);
        check_sha256(&model_path, &manifest.model_sha256)?;
        if let Some(data) = &manifest.model_data {
            let path = dir.join(&data.file);
            let bytes = fs::metadata(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?.len();
            if bytes != data.bytes {
                return Err(BundleError::Invalid {
                    path,
                    reason: format!("the manifest says {} bytes, the file has {bytes}", data.bytes),
                });
            }
            check_sha256(&path, &data.sha256)?;
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            model_path,
        })
    }

    /// The golden fixture file, when the bundle has one.
    pub fn golden_path(&self) -> Option<PathBuf> {
        self.manifest.golden.as_ref().map(|g| self.dir.join(g))
    }
}

fn check_sha256(path: &Path, expected: &str) -> Result<(), BundleError> {
    let actual = sha256_file(path)?;
    if actual != expected.to_ascii_lowercase() {
        return Err(BundleError::Sha256Mismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// A plain file name: no directory part, so that a manifest cannot point outside its bundle.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

impl Manifest {
    /// The learned prototypes' count, when the model has them.
    pub fn prototypes(&self) -> Option<usize> {
        self.outputs.prototype_scores.as_ref().map(|o| o.dim)
    }

    /// What `/v1/clusters` groups by.
    pub fn cluster_source(&self) -> ClusterSource {
        match (&self.outputs.prototype_scores, &self.outputs.centroid_scores) {
            (Some(p), _) => ClusterSource::Prototypes(p.dim),
            (None, Some(c)) => ClusterSource::Centroids(c.dim),
            (None, None) => ClusterSource::None,
        }
    }

    /// Parses and validates manifest text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, BundleError> {
        // Read the version first so a future schema is reported as such, not as a field error.
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let version: Version = serde_json::from_str(text).map_err(|source| BundleError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if !SUPPORTED_SCHEMA_VERSIONS.contains(&version.schema_version) {
            return Err(BundleError::SchemaVersion {
                path: path.to_path_buf(),
                found: version.schema_version,
            });
        }
        let manifest: Manifest = serde_json::from_str(text).map_err(|source| BundleError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        manifest.validate().and_then(|()| manifest.validate_outputs()).map_err(|reason| BundleError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        let input = &self.input;
        let checks: [(bool, String); 11] = [
            (is_sha256_hex(&self.model_sha256), format!("model_sha256 must be 64 hex characters, got {:?}", self.model_sha256)),
            (
                is_plain_file_name(&self.model_file),
                format!("model_file {:?} must be a file name inside the bundle", self.model_file),
            ),
            (input.layout == "NCHW", format!("input.layout {:?} is not supported (only NCHW)", input.layout)),
            (input.dtype == "float32", format!("input.dtype {:?} is not supported (only float32)", input.dtype)),
            (
                input.channels == 1 || input.channels == 3,
                format!("input.channels must be 1 or 3, got {}", input.channels),
            ),
            (
                input.height > 0 && input.width > 0 && input.height <= 4096 && input.width <= 4096,
                format!("input size {}x{} is out of range", input.height, input.width),
            ),
            (
                input.resize.method == "shorter_side" && input.resize.size > 0 && input.resize.size <= 8192,
                format!("input.resize {:?} is not supported (method shorter_side, size 1..=8192)", input.resize),
            ),
            (
                input.resize.interpolation == "bilinear",
                format!("input.resize.interpolation {:?} is not supported (only bilinear)", input.resize.interpolation),
            ),
            (
                input.crop.method == "center" && input.crop.height == input.height && input.crop.width == input.width,
                format!("input.crop {:?} must be a center crop of the input size", input.crop),
            ),
            (
                input.resize.size >= input.height.min(input.width),
                format!("input.resize.size {} is smaller than the crop", input.resize.size),
            ),
            (
                input.alpha == "composite_white",
                format!("input.alpha {:?} is not supported (only composite_white)", input.alpha),
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, reason)) => Err(reason),
            None => Ok(()),
        }
    }

    fn validate_outputs(&self) -> Result<(), String> {
        let o = &self.outputs;
        if self.schema_version == 1 && (o.projection.is_none() || o.prototype_scores.is_none()) {
            return Err("schema_version 1 needs outputs.projection and outputs.prototype_scores".into());
        }
        let present = [Some(&o.embedding), o.projection.as_ref(), o.prototype_scores.as_ref(), o.centroid_scores.as_ref()];
        if let Some(bad) = present.into_iter().flatten().find(|s| s.dim == 0 || s.name.is_empty()) {
            return Err(format!("output {:?} needs a name and a positive dim", bad.name));
        }
        if self.num_prototypes != self.prototypes().unwrap_or(0) {
            return Err(format!(
                "num_prototypes {} must equal outputs.prototype_scores.dim ({}, 0 when absent)",
                self.num_prototypes,
                self.prototypes().unwrap_or(0)
            ));
        }
        if o.prototype_scores.is_some() && (o.projection.is_none() || o.centroid_scores.is_some()) {
            return Err("outputs.prototype_scores needs outputs.projection, and excludes outputs.centroid_scores".into());
        }
        if let Some(data) = &self.model_data
            && (!is_plain_file_name(&data.file) || data.file == self.model_file || !is_sha256_hex(&data.sha256))
        {
            return Err(format!(
                "model_data {data:?} needs a file name inside the bundle, other than model_file, and a 64-hex sha256"
            ));
        }
        Ok(())
    }
}

/// Whether `s` is written as a sha256 digest: 64 hex characters.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let io_err = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "schema_version": 1, "name": "t", "model_file": "model.onnx",
            "model_sha256": "0".repeat(64),
            "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "channels": 1,
                      "height": 28, "width": 28,
                      "resize": {"method": "shorter_side", "size": 28, "interpolation": "bilinear", "antialias": true},
                      "crop": {"method": "center", "height": 28, "width": 28},
                      "alpha": "composite_white", "mean": [0.28], "std": [0.35]},
            "outputs": {"embedding": {"name": "embedding", "dim": 8},
                        "projection": {"name": "projection", "dim": 4},
                        "prototype_scores": {"name": "prototype_scores", "dim": 3}},
            "num_prototypes": 3,
            "some_future_key": {"x": 1}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest, BundleError> {
        Manifest::parse(&v.to_string(), Path::new("manifest.json"))
    }

    #[test]
    fn accepts_valid_manifest_and_ignores_unknown_keys() {
        let m = parse(&sample()).expect("valid");
        assert_eq!(m.input.tensor_len(), 28 * 28);
        assert_eq!(m.prototypes(), Some(3));
    }

    #[test]
    fn rejects_unknown_schema_version() {
        let mut v = sample();
        v["schema_version"] = 3.into();
        let err = parse(&v).unwrap_err();
        assert!(matches!(err, BundleError::SchemaVersion { found: 3, .. }), "{err}");
        assert!(err.to_string().contains("schema_version 3"));
    }

    /// A backbone-only import: no projection, no prototypes, maybe k-means centroids.
    fn headless(centroids: Option<usize>) -> serde_json::Value {
        let mut v = sample();
        v["schema_version"] = 2.into();
        v["num_prototypes"] = 0.into();
        v["outputs"]["projection"] = serde_json::Value::Null;
        v["outputs"].as_object_mut().expect("outputs").remove("prototype_scores");
        if let Some(k) = centroids {
            v["outputs"]["centroid_scores"] = serde_json::json!({"name": "centroid_scores", "dim": k});
        }
        v
    }

    #[test]
    fn version_2_may_lack_the_head_and_names_its_cluster_source() {
        assert_eq!(parse(&sample()).expect("v1").cluster_source(), ClusterSource::Prototypes(3));
        let m = parse(&headless(None)).expect("no head");
        assert_eq!((m.prototypes(), m.cluster_source()), (None, ClusterSource::None));
        let m = parse(&headless(Some(5))).expect("centroids");
        assert_eq!(m.cluster_source(), ClusterSource::Centroids(5));
        assert_eq!(m.cluster_source().count(), 5);
    }

    #[test]
    fn version_1_needs_every_output_and_prototypes_must_agree() {
        let mut v = headless(None);
        v["schema_version"] = 1.into();
        assert!(parse(&v).unwrap_err().to_string().contains("schema_version 1 needs"));
        let mut v = headless(None);
        v["num_prototypes"] = 3.into();
        assert!(parse(&v).unwrap_err().to_string().contains("num_prototypes 3"));
    }

    #[test]
    fn load_checks_the_data_file_size_and_sha256() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("model.onnx"), b"graph").expect("write");
        std::fs::write(dir.path().join("model.onnx.data"), b"weights").expect("write");
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let write = |data_sha: String, bytes: u64| {
            let mut v = headless(None);
            v["model_sha256"] = sha(b"graph").into();
            v["model_data"] = serde_json::json!({"file": "model.onnx.data", "sha256": data_sha, "bytes": bytes});
            std::fs::write(dir.path().join("manifest.json"), v.to_string()).expect("write");
        };
        write(sha(b"weights"), 7);
        assert!(Bundle::load(dir.path()).expect("loads").manifest.model_data.is_some());
        write(sha(b"other"), 7);
        assert!(matches!(Bundle::load(dir.path()), Err(BundleError::Sha256Mismatch { .. })));
        write(sha(b"weights"), 8);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("the manifest says 8 bytes, the file has 7"), "{err}");
        std::fs::remove_file(dir.path().join("model.onnx.data")).expect("rm");
        assert!(matches!(Bundle::load(dir.path()), Err(BundleError::Io { .. })));
    }

    #[test]
    fn model_data_must_stay_inside_the_bundle() {
        let data = |file: &str| serde_json::json!({"file": file, "sha256": "a".repeat(64), "bytes": 10});
        let mut v = headless(None);
        v["model_data"] = data("model.onnx.data");
        assert_eq!(parse(&v).expect("valid").model_data.expect("data").bytes, 10);
        for bad in ["../x.data", "/etc/passwd", "model.onnx", ""] {
            v["model_data"] = data(bad);
            assert!(parse(&v).unwrap_err().to_string().contains("model_data"), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_fields_with_reason() {
        let cases: [(&str, serde_json::Value, &str); 4] = [
            ("/input/channels", 2.into(), "channels"),
            ("/input/layout", "NHWC".into(), "layout"),
            ("/model_sha256", "xyz".into(), "model_sha256"),
            ("/num_prototypes", 7.into(), "num_prototypes"),
        ];
        for (pointer, value, needle) in cases {
            let mut v = sample();
            *v.pointer_mut(pointer).expect("pointer") = value;
            let err = parse(&v).unwrap_err().to_string();
            assert!(err.contains(needle), "{pointer}: {err}");
        }
    }

    #[test]
    fn missing_field_is_a_json_error() {
        let mut v = sample();
        v.as_object_mut().expect("object").remove("outputs");
        assert!(matches!(parse(&v), Err(BundleError::Json { .. })));
    }
}
