//! Finding and loading the ONNX Runtime shared library (ort's `load-dynamic`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::EngineError;

const LIB_NAME: &str = "libonnxruntime.so";

/// How to get the library; part of every "not found" message.
pub const INSTALL_HINT: &str = "install it with `scripts/install-ort` (puts ONNX Runtime 1.31.1 from PyPI's onnxruntime wheel into .ort/), \
     or point --ort-lib / SWAV_ORT_LIB at an existing libonnxruntime.so";

/// Candidate locations, most specific first.
fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
        return out;
    }
    for var in ["SWAV_ORT_LIB", "ORT_DYLIB_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(v));
            return out;
        }
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        out.push(dir.join(LIB_NAME));
        out.push(dir.join("../lib").join(LIB_NAME));
    }
    out.push(PathBuf::from(".ort").join(LIB_NAME));
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ort").join(LIB_NAME));
    out.push(PathBuf::from("/usr/local/lib").join(LIB_NAME));
    out.push(PathBuf::from("/opt/onnxruntime/lib").join(LIB_NAME));
    out
}

/// The library path to load: the explicit one (which must exist) or the first candidate found.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, EngineError> {
    let candidates = candidates(explicit);
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let searched: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        EngineError::LibraryNotFound(searched.join(", "))
    })
}

static ENVIRONMENT: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Loads the library once per process and returns the shared ORT environment.
pub fn environment(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment, EngineError> {
    let path = resolve_library(explicit)?;
    let loaded = ENVIRONMENT.get_or_init(|| {
        let builder = ort::init_from(&path).map_err(|e| format!("{e}"))?;
        let env = builder.with_name("swav").build().map_err(|e| e.to_string())?;
        tracing::info!(library = %path.display(), "loaded ONNX Runtime");
        Ok((env, path.clone()))
    });
    match loaded {
        Ok((env, _)) => Ok(env),
        Err(e) => Err(EngineError::LibraryLoad(e.clone())),
    }
}
