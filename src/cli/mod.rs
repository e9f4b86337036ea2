//! The `swav` command line: one file per subcommand.
//!
//! Adding a subcommand: declare its module here, add a variant to [`Command`] and an arm in
//! [`run`]. Every flag has a `SWAV_…` environment variable fallback.

mod dataset;
mod import;
mod index;
mod logging;
mod model;
mod oneshot;
mod serve;
mod train;

use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};
use clap::builder::BoolishValueParser;

use crate::index::ReadConsistency;

pub use model::ModelArgs;

/// Whether added items keep a thumbnail; shared by `serve` and `index build`.
#[derive(Debug, Clone, Args)]
pub struct ThumbnailArgs {
    /// Keep a small thumbnail (the preprocessed image, at most 128 px) of every item added to the
    /// index, for the web page. `--thumbnails=false` keeps no image content in the index.
    #[arg(long, env = "SWAV_THUMBNAILS", value_name = "BOOL", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub thumbnails: bool,
}

/// How to reach an index kept in Milvus (`--index milvus://HOST:PORT/COLLECTION`).
#[derive(Clone, Args)]
pub struct StoreArgs {
    /// Seconds each request to Milvus may take before it counts as unavailable (HTTP 503).
    #[arg(long, env = "SWAV_MILVUS_TIMEOUT", value_name = "SECONDS", default_value_t = 5.0, value_parser = positive_seconds)]
    pub milvus_timeout: f64,
    /// Milvus credentials: `user:password` or an API token (prefer the environment variable).
    #[arg(long, env = "SWAV_MILVUS_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub milvus_token: Option<String>,
    /// Consistency of the reads that serve requests (get, search, clusters, counts). `strong`: every
    /// write acknowledged before, through any replica, at the cost of a wait for Milvus's time tick
    /// (about 200 ms a read); `session`: this process's own writes at once, other replicas' a
    /// moment later; `bounded`: may miss the last few seconds of writes; `eventually`: no
    /// guarantee. A build's check for ids already present and a delete's existence check are
    /// Strong at every level.
    #[arg(long, env = "SWAV_MILVUS_CONSISTENCY", value_enum, value_name = "LEVEL", default_value_t = ReadConsistency::Strong)]
    pub milvus_consistency: ReadConsistency,
}

/// The token shows only as set or not, so that no log or panic message carries it.
impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreArgs")
            .field("milvus_timeout", &self.milvus_timeout)
            .field("milvus_token", &self.milvus_token.as_ref().map(|_| "***"))
            .field("milvus_consistency", &self.milvus_consistency)
            .finish()
    }
}

impl StoreArgs {
    pub fn options(&self) -> crate::index::MilvusOptions {
        crate::index::MilvusOptions {
            timeout: std::time::Duration::from_secs_f64(self.milvus_timeout),
            token: self.milvus_token.clone(),
            consistency: self.milvus_consistency,
        }
    }
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 3600.0 => Ok(s),
        _ => Err(format!("expected seconds between 0 and 3600, got '{text}'")),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "swav",
    version,
    about = "Embed images, assign them to learned SwAV prototypes, and serve both over HTTP",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub logging: logging::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over HTTP (embed, assign, model, health, ready, metrics).
    Serve(serve::ServeArgs),
    /// Print embeddings of image files as JSON (the body `POST /v1/embed` would return).
    Embed(oneshot::EmbedArgs),
    /// Print prototype assignments of image files as JSON (the body `POST /v1/assign` would return).
    Assign(oneshot::AssignArgs),
    /// Build, inspect, search and compact a nearest-neighbour index of images.
    Index(index::IndexArgs),
    /// Export datasets as image folders (Fashion-MNIST as PNGs by class).
    Dataset(dataset::DatasetArgs),
    /// Train a model with the Python trainer (arguments after the launcher's own go to `swav_train train`).
    Train(train::TrainArgs),
    /// Turn a released SwAV checkpoint (the paper's ImageNet models) into a bundle, with the Python importer.
    Import(import::ImportArgs),
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve::run(args),
        Command::Embed(args) => oneshot::embed(args),
        Command::Assign(args) => oneshot::assign(args),
        Command::Index(args) => index::run(args),
        Command::Dataset(args) => dataset::run(args),
        Command::Train(args) => train::run(args),
        Command::Import(args) => import::run(args),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.logging.init() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod store_args_tests {
    use clap::Parser;

    use super::{Cli, Command, StoreArgs};
    use crate::index::ReadConsistency;

    #[test]
    fn the_milvus_token_never_shows_in_debug_output() {
        let args = StoreArgs { milvus_timeout: 5.0, milvus_token: Some("s3cret-token".into()), milvus_consistency: Default::default() };
        let shown = format!("{args:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    #[test]
    fn milvus_consistency_takes_the_four_levels_and_refuses_others() {
        let level = |extra: &[&str]| {
            let args = [&["swav", "index", "stats", "milvus://h:1/c"], extra].concat();
            match Cli::try_parse_from(args).map(|cli| cli.command) {
                Ok(Command::Index(super::index::IndexArgs { command: super::index::IndexCommand::Stats(a) })) => Ok(a.store.milvus_consistency),
                Ok(other) => panic!("parsed as {other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(level(&[]), Ok(ReadConsistency::Strong));
        assert_eq!(level(&["--milvus-consistency", "session"]), Ok(ReadConsistency::Session));
        assert_eq!(level(&["--milvus-consistency=bounded"]), Ok(ReadConsistency::Bounded));
        assert_eq!(level(&["--milvus-consistency", "eventually"]), Ok(ReadConsistency::Eventually));
        let err = level(&["--milvus-consistency", "weak"]).unwrap_err();
        assert!(err.contains("invalid value 'weak'") && err.contains("strong, session, bounded, eventually"), "{err}");
    }
}
