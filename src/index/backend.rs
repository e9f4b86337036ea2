//! The one boundary between the index's users (the HTTP routes, `swav index build|stats|search`)
//! and where items live: this process's own [`Index`] or a Milvus collection
//! ([`super::milvus`]). Callers hold an `Arc<dyn IndexBackend>` and never learn which.
//!
//! Every method blocks (disk fsyncs for the local index, network round trips for Milvus), so the
//! async server calls them from `spawn_blocking`. Each returns `Result`: a local read cannot fail,
//! but a remote one can, and [`IndexError::Unavailable`] is how a backend says "the store is down
//! or slow, try again" (503 with `Retry-After` over HTTP).

use std::collections::HashSet;
use std::sync::Arc;

use prometheus::core::Collector;
use serde::Serialize;

use super::{
    AddReport, ClusterInfo, ClusterItems, CompactReport, Hit, Index, IndexError, IndexLocation, IndexOptions, IndexStats, ItemInfo, MilvusIndex,
    MilvusOptions, ModelIdentity, NewItem,
};

/// What a backend reports about itself (`GET /v1/index`, `swav index stats`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum BackendStats {
    Local(Box<IndexStats>),
    Remote(serde_json::Value),
}

/// An item's thumbnail as a backend knows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Thumbnail {
    /// No item has this id.
    NoItem,
    /// The item exists but was stored without a thumbnail.
    NoThumbnail,
    Bytes(Arc<[u8]>),
}

pub trait IndexBackend: Send + Sync + 'static {
    /// The model whose vectors the backend holds (checked when it was opened).
    fn identity(&self) -> &ModelIdentity;

    /// Adds or replaces items; Ok means the store has acknowledged them.
    fn add(&self, items: Vec<NewItem>) -> Result<AddReport, IndexError>;

    /// Deletes an item; false if there was none.
    fn delete(&self, id: &str) -> Result<bool, IndexError>;

    fn get(&self, id: &str) -> Result<Option<ItemInfo>, IndexError>;

    /// Which of `ids` are stored (a build's resume asks this for many ids at once).
    fn present(&self, ids: &[String]) -> Result<HashSet<String>, IndexError>;

    fn thumbnail(&self, id: &str) -> Result<Thumbnail, IndexError>;

    /// The `k` nearest items to `query` by cosine, best first; `ef` is the search breadth (the
    /// backend's default when None, and never below `k`); with `cluster`, only that cluster's items.
    fn search(&self, query: &[f32], k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Vec<Hit>, IndexError>;

    /// [`IndexBackend::search`] for several queries, one result list per query in their order. A
    /// remote backend sends them in one request: each of its reads costs a round trip and, for a
    /// consistent read, a wait for the store to catch up, which one request pays once.
    fn search_many(&self, queries: &[Vec<f32>], k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Vec<Vec<Hit>>, IndexError> {
        queries.iter().map(|q| self.search(q, k, ef, cluster)).collect()
    }

    /// Like [`IndexBackend::search`] with a stored item's vector as the query, leaving the item
    /// out; None if the id is unknown.
    fn search_by_id(&self, id: &str, k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Option<Vec<Hit>>, IndexError>;

    /// Every non-empty cluster below `count` (the model's number of clusters), by id, with its
    /// size and a few member ids.
    fn clusters(&self, count: usize) -> Result<Vec<ClusterInfo>, IndexError>;

    /// A page of a cluster's members.
    fn cluster_items(&self, cluster: u32, limit: usize, offset: usize) -> Result<ClusterItems, IndexError>;

    fn stats(&self) -> Result<BackendStats, IndexError>;

    fn compact(&self) -> Result<CompactReport, IndexError>;

    /// Ok while the backend can answer requests (`/ready`).
    fn check_ready(&self) -> Result<(), IndexError>;

    /// The backend's own Prometheus metrics, registered once by the server.
    fn collectors(&self) -> Vec<Box<dyn Collector>>;

    /// Called once at shutdown, after the last request.
    fn close(&self) -> Result<(), IndexError>;
}

impl IndexBackend for Index {
    fn identity(&self) -> &ModelIdentity {
        Index::identity(self)
    }

    fn add(&self, items: Vec<NewItem>) -> Result<AddReport, IndexError> {
        Index::add(self, items)
    }

    fn delete(&self, id: &str) -> Result<bool, IndexError> {
        Index::delete(self, id)
    }

    fn get(&self, id: &str) -> Result<Option<ItemInfo>, IndexError> {
        Ok(Index::get(self, id))
    }

    fn present(&self, ids: &[String]) -> Result<HashSet<String>, IndexError> {
        Ok(ids.iter().filter(|id| self.contains(id)).cloned().collect())
    }

    fn thumbnail(&self, id: &str) -> Result<Thumbnail, IndexError> {
        Ok(match Index::thumbnail(self, id) {
            Some(bytes) => Thumbnail::Bytes(bytes),
            None if self.contains(id) => Thumbnail::NoThumbnail,
            None => Thumbnail::NoItem,
        })
    }

    fn search(&self, query: &[f32], k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Vec<Hit>, IndexError> {
        Index::search(self, query, k, ef, cluster)
    }

    fn search_by_id(&self, id: &str, k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Option<Vec<Hit>>, IndexError> {
        Ok(Index::search_by_id(self, id, k, ef, cluster))
    }

    fn clusters(&self, _count: usize) -> Result<Vec<ClusterInfo>, IndexError> {
        Ok(Index::clusters(self))
    }

    fn cluster_items(&self, cluster: u32, limit: usize, offset: usize) -> Result<ClusterItems, IndexError> {
        Ok(Index::cluster_items(self, cluster, limit, offset))
    }

    fn stats(&self) -> Result<BackendStats, IndexError> {
        Ok(BackendStats::Local(Box::new(Index::stats(self))))
    }

    fn compact(&self) -> Result<CompactReport, IndexError> {
        Index::compact(self)
    }

    /// The local index answers whenever the process does (a poisoned one still serves reads).
    fn check_ready(&self) -> Result<(), IndexError> {
        Ok(())
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        match super::IndexCollector::new(self.clone()) {
            Ok(c) => vec![Box::new(c)],
            Err(e) => {
                tracing::warn!(error = %e, "index metrics not created");
                Vec::new()
            }
        }
    }

    /// Not needed for safety (the log has every write); it makes the next start replay nothing.
    fn close(&self) -> Result<(), IndexError> {
        self.snapshot()
    }
}

/// Opens the index at `location` for the model `identity`, creating it on first use; one made
/// by another model is refused.
pub fn open_or_create(location: &IndexLocation, identity: ModelIdentity, opts: IndexOptions, milvus: MilvusOptions) -> Result<Arc<dyn IndexBackend>, IndexError> {
    Ok(match location {
        IndexLocation::Dir(dir) => Arc::new(Index::open_or_create(dir, identity, opts)?),
        IndexLocation::Milvus(address) => Arc::new(MilvusIndex::open_or_create(address, identity, opts, milvus)?),
    })
}

/// Opens an index that exists; with `identity`, refuses one made by another model. A local one
/// opened `read_only` takes no lock and writes nothing (Milvus collections are shared anyway).
pub fn open_existing(
    location: &IndexLocation,
    identity: Option<&ModelIdentity>,
    read_only: bool,
    opts: IndexOptions,
    milvus: MilvusOptions,
) -> Result<Arc<dyn IndexBackend>, IndexError> {
    Ok(match location {
        IndexLocation::Dir(dir) if read_only => Arc::new(Index::open_read_only(dir, identity, opts)?),
        IndexLocation::Dir(dir) => {
            let index = Index::open(dir, opts)?;
            if let Some(want) = identity.filter(|want| *want != index.identity()) {
                return Err(IndexError::ModelMismatch(Box::new(super::ModelMismatch {
                    dir: dir.clone(),
                    found: index.identity().clone(),
                    want: want.clone(),
                })));
            }
            Arc::new(index)
        }
        IndexLocation::Milvus(address) => Arc::new(MilvusIndex::open_existing(address, identity.cloned(), opts, milvus)?),
    })
}
