//! swav: embed images, assign them to learned SwAV prototypes, and search them.
//!
//! Layers point one way: `cli` → `http` → `engine::batcher` → `engine` → `bundle`;
//! `http` and `indexer` also use `preprocess` and `index`; `metrics` is a leaf.
pub mod bundle;
pub mod cli;
pub mod dataset;
pub mod engine;
pub mod http;
pub mod index;
pub mod indexer;
pub mod metrics;
pub mod preprocess;
pub mod ui;
