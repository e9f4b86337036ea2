//! The index's numbers as Prometheus metrics, read from [`Index::stats`] at scrape time so
//! they can never drift from the index itself. `stats` takes no lock a write holds, so a scrape
//! never waits for a write, a snapshot or a compaction.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, Opts};

use super::Index;

/// Reads one number out of the stats.
type Read = fn(&super::IndexStats) -> f64;

pub struct IndexCollector {
    index: Index,
    gauges: Vec<(Gauge, Read)>,
    counters: Vec<(Counter, Read)>,
    descs: Vec<Desc>,
}

impl IndexCollector {
    /// Metric names get the registry's prefix (`swav_`).
    pub fn new(index: Index) -> prometheus::Result<IndexCollector> {
        let gauges: Vec<(&str, &str, Read)> = vec![
            ("index_items", "Live items in the index", |s| s.items as f64),
            ("index_tombstones", "Deleted or replaced items still in the graph until compaction", |s| s.tombstones as f64),
            ("index_clusters", "Clusters with at least one item", |s| s.clusters as f64),
            ("index_log_bytes", "Bytes in the write-ahead log since the last snapshot", |s| s.log_bytes as f64),
            ("index_last_snapshot_duration_seconds", "How long the last snapshot took", |s| s.last_snapshot_seconds),
            ("index_writable", "1 while the index accepts writes; 0 once a log write or fsync failed (restart to recover)", |s| {
                if s.unavailable.is_none() && !s.read_only { 1.0 } else { 0.0 }
            }),
        ];
        let counters: Vec<(&str, &str, Read)> = vec![
            ("index_searches_total", "Nearest-neighbour searches", |s| s.searches as f64),
            ("index_snapshots_total", "Snapshots written since start", |s| s.snapshots as f64),
            ("index_snapshot_failures_total", "Snapshots that failed since start (each is retried with backoff)", |s| s.snapshot_failures as f64),
            ("index_compactions_total", "Compactions since start", |s| s.compactions as f64),
        ];
        let gauges = gauges
            .into_iter()
            .map(|(n, h, f)| Ok((Gauge::with_opts(Opts::new(n, h))?, f)))
            .collect::<prometheus::Result<Vec<_>>>()?;
        let counters = counters
            .into_iter()
            .map(|(n, h, f)| Ok((Counter::with_opts(Opts::new(n, h))?, f)))
            .collect::<prometheus::Result<Vec<_>>>()?;
        let descs = gauges
            .iter()
            .flat_map(|(g, _)| g.desc().into_iter().cloned())
            .chain(counters.iter().flat_map(|(c, _)| c.desc().into_iter().cloned()))
            .collect();
        Ok(IndexCollector { index, gauges, counters, descs })
    }
}

impl Collector for IndexCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.index.stats();
        let mut out = Vec::new();
        for (g, read) in &self.gauges {
            g.set(read(&stats));
            out.extend(g.collect());
        }
        for (c, read) in &self.counters {
            // Counters only go up; the index's own totals are monotonic, so add the difference.
            let delta = read(&stats) - c.get();
            if delta > 0.0 {
                c.inc_by(delta);
            }
            out.extend(c.collect());
        }
        out
    }
}
