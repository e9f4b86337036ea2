//! Structured logs to stderr (stdout is kept for machine-readable output).

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info`, `debug` (one line per request), or `swav=debug,ort=warn`.
    #[arg(long, global = true, env = "SWAV_LOG", default_value = "info,ort=warn")]
    pub log: String,
    /// Log line format.
    #[arg(long, global = true, env = "SWAV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArgs {
    pub fn init(&self) -> anyhow::Result<()> {
        let filter = EnvFilter::try_new(&self.log).map_err(|e| anyhow::anyhow!("invalid --log filter {:?}: {e}", self.log))?;
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        let result = match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        result.map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
    }
}
