//! Batch indexing: files → bytes → tensors → embeddings → index, as one pipeline in which
//! reading, decoding (on all cores) and inference overlap through bounded channels.

mod pipeline;
mod sources;

pub use pipeline::{BuildOptions, BuildReport, Embedded, Embedder, Prepared, Rejected, build};
pub use sources::{Source, list};
