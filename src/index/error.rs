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
    /// A write or fsync of the log failed. After a failed fsync the kernel may have dropped
    /// the dirty pages, so no later success could prove anything: the index refuses every
    /// write until it is reopened, and keeps answering reads.
    #[error("index {0} refuses writes after an I/O error on its log ({1}); reads still work; restart to recover from disk")]
    Poisoned(PathBuf, String),
    /// A compaction is already running; `done` of `total` items are in its new graph.
    #[error("a compaction is already running ({done} of {total} items rebuilt); try again when it has finished")]
    CompactionRunning { done: usize, total: usize },
    /// The index was opened read-only (`swav index stats|search`).
    #[error("index {0} is open read-only")]
    ReadOnly(PathBuf),
    /// The remote store (Milvus) is unreachable, or did not answer within the request timeout.
    /// Nothing is known to have changed; retrying later may succeed.
    #[error("the index store is unavailable: {0}")]
    Unavailable(String),
    /// The remote store answered with an error that retrying will not cure.
    #[error("the index store refused the request: {0}")]
    Store(String),
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
