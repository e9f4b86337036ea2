use std::path::PathBuf;

use super::ModelIdentity;

/// Which model made the index, and which one tried to open it.
#[derive(Debug)]
pub struct ModelMismatch {
    pub dir: PathBuf,
    pub found: ModelIdentity,
    pub want: ModelIdentity,
}

/// Everything that can go wrong in the index. Callers map `InvalidInput` to a client error;
/// the others are the server's or the disk's fault.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The caller sent something the index cannot store or search (bad dimension, empty id, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// The directory holds an index made by another model.
    #[error(
        "index {} was built with model '{}' (sha256 {}, dim {}), but model '{}' (sha256 {}, dim {}) is loaded; \
         use the matching bundle or another index directory",
        .0.dir.display(), .0.found.name, .0.found.sha256, .0.found.dim, .0.want.name, .0.want.sha256, .0.want.dim
    )]
    ModelMismatch(Box<ModelMismatch>),
    /// Data on disk is damaged in a way that cannot be a torn last write. Nothing was modified.
    #[error("index {path} is corrupt: {reason}; refusing to start so that nothing is overwritten")]
    Corrupt { path: PathBuf, reason: String },
    /// Another process holds the index.
    #[error("index {0} is in use by another process")]
    Locked(PathBuf),
    /// A previous write failed half-way and could not be rolled back; the index refuses writes.
    #[error("index {0} refuses writes after an earlier I/O failure; restart to recover from the log")]
    Poisoned(PathBuf),
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl IndexError {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> IndexError {
        let path = path.into();
        move |source| IndexError::Io { context, path, source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> IndexError {
        IndexError::Corrupt { path: path.into(), reason: reason.into() }
    }
}
