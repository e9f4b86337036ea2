//! The model bundle: `model.onnx` + `manifest.json`, as specified in `docs/bundle.md`.
//!
//! This is the one place that knows the bundle's on-disk format. Readers ignore unknown keys
//! (adding a field is not a schema change) and reject any schema version but [`SCHEMA_VERSION`].

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only manifest schema version this build understands.
pub const SCHEMA_VERSION: u32 = 1;

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
        "{path}: manifest schema_version {found} is not supported (this swav reads version {SCHEMA_VERSION}); \
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
    pub projection: OutputSpec,
    pub prototype_scores: OutputSpec,
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
        let actual = sha256_file(&model_path)?;
        if actual != manifest.model_sha256.to_ascii_lowercase() {
            return Err(BundleError::Sha256Mismatch {
                path: model_path,
                expected: manifest.model_sha256.clone(),
                actual,
            });
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

impl Manifest {
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
        if version.schema_version != SCHEMA_VERSION {
            return Err(BundleError::SchemaVersion {
                path: path.to_path_buf(),
                found: version.schema_version,
            });
        }
        let manifest: Manifest = serde_json::from_str(text).map_err(|source| BundleError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        manifest.validate().map_err(|reason| BundleError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        let input = &self.input;
        let is_hex = self.model_sha256.len() == 64 && self.model_sha256.chars().all(|c| c.is_ascii_hexdigit());
        let checks: [(bool, String); 12] = [
            (is_hex, format!("model_sha256 must be 64 hex characters, got {:?}", self.model_sha256)),
            (
                !self.model_file.is_empty() && !self.model_file.contains(".."),
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
            (
                self.num_prototypes == self.outputs.prototype_scores.dim
                    && self.outputs.embedding.dim > 0
                    && self.outputs.projection.dim > 0,
                format!(
                    "num_prototypes {} must equal outputs.prototype_scores.dim {} and dims must be positive",
                    self.num_prototypes, self.outputs.prototype_scores.dim
                ),
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, reason)) => Err(reason),
            None => Ok(()),
        }
    }
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
        assert_eq!(m.outputs.prototype_scores.dim, 3);
    }

    #[test]
    fn rejects_unknown_schema_version() {
        let mut v = sample();
        v["schema_version"] = 2.into();
        let err = parse(&v).unwrap_err();
        assert!(matches!(err, BundleError::SchemaVersion { found: 2, .. }), "{err}");
        assert!(err.to_string().contains("schema_version 2"));
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
