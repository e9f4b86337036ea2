//! Snapshots: every slot of the item table (tombstones included, so that the graph's internal
//! ids stay valid) plus a dump of the graph, written to a temporary directory, fsync'd, then
//! renamed into place as `snapshot-<seq>`, where `seq` is the last log record it contains.
//!
//! `items.bin` is the authority. The graph file (`graph.bin`, links only) saves the time of
//! rebuilding the graph on start. It is used when its checksum passes and it matches the items;
//! otherwise the graph is rebuilt from the items and a warning says why.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::codec::{ItemRecord, begin_file, end_file, open_file, put_item_parts, put_thumbnail, put_u32, put_u64};
use super::error::IndexError;
use super::faults::{FaultPoint, Faults};
use super::graph::{GRAPH_FILE, Graph, GraphParams};
use super::wal;

const MAGIC: &[u8; 8] = b"SWAVSNP1";
/// Version 2 follows every slot with its optional thumbnail; version 1 (no thumbnails) still reads.
const VERSION: u32 = 2;
const ITEMS_FILE: &str = "items.bin";
const PREFIX: &str = "snapshot-";
const TMP_PREFIX: &str = ".tmp-snapshot-";
const DAMAGED_PREFIX: &str = "damaged-snapshot-";

#[derive(Debug)]
pub(crate) struct Snapshot {
    pub seq: u64,
    /// Every slot in order, with whether it is live.
    pub slots: Vec<(bool, ItemRecord)>,
    pub dir: PathBuf,
}

/// Serialises items into the snapshot file format (header, items, trailing CRC).
pub(crate) struct Encoder {
    buf: Vec<u8>,
    count: u64,
    /// Where the item count sits, recorded as it is written so that no offset is hard-coded.
    count_at: usize,
}

impl Encoder {
    pub fn new(dim: usize, seq: u64, capacity: usize) -> Self {
        let mut buf = begin_file(MAGIC, VERSION, 24 + capacity * (dim * 4 + 48));
        put_u32(&mut buf, dim as u32);
        put_u64(&mut buf, seq);
        let count_at = buf.len();
        put_u64(&mut buf, 0); // patched in finish()
        Encoder { buf, count: 0, count_at }
    }

    pub fn push(&mut self, live: bool, id: &str, cluster: u32, metadata: Option<&super::Metadata>, vector: &[f32], thumbnail: Option<&[u8]>) {
        self.buf.push(live as u8);
        put_item_parts(&mut self.buf, id, cluster, metadata, vector);
        put_thumbnail(&mut self.buf, thumbnail);
        self.count += 1;
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let count = self.count.to_le_bytes();
        self.buf[self.count_at..self.count_at + count.len()].copy_from_slice(&count);
        end_file(self.buf)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), IndexError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(IndexError::io("cannot fsync directory", dir))
}

/// Creates `path` with `bytes` and fsyncs it (the caller fsyncs the directory).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), IndexError> {
    let mut f = fs::File::create(path).map_err(IndexError::io("cannot create", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(IndexError::io("cannot write", path))
}

/// Adds (or replaces) the graph file of an existing snapshot, atomically: a crash leaves either
/// the old state or the whole new file, and a stray temporary file is never read.
pub(crate) fn store_graph(snapshot_dir: &Path, graph: &Graph) -> Result<(), IndexError> {
    let tmp = snapshot_dir.join(format!("{GRAPH_FILE}.tmp"));
    let path = snapshot_dir.join(GRAPH_FILE);
    write_synced(&tmp, &graph.encode())?;
    fs::rename(&tmp, &path).map_err(IndexError::io("cannot rename graph file into", &path))?;
    sync_dir(snapshot_dir)
}

/// The graph stored with a snapshot, if it is whole and matches its items.
pub(crate) fn load_graph(snapshot_dir: &Path, slots: &[(bool, ItemRecord)], params: GraphParams, dim: usize) -> Option<Graph> {
    if slots.is_empty() {
        return None;
    }
    let path = snapshot_dir.join(GRAPH_FILE);
    let result = fs::read(&path).map_err(|e| format!("{}: {e}", path.display())).and_then(|bytes| {
        let vectors: Vec<f32> = slots.iter().flat_map(|(_, it)| it.vector.iter().copied()).collect();
        Graph::decode(&bytes, params, dim, vectors)
    });
    match result {
        Ok(g) => Some(g),
        Err(reason) => {
            tracing::warn!(snapshot = %snapshot_dir.display(), %reason, "stored graph not used; rebuilding it from the items");
            None
        }
    }
}

/// Writes the snapshot durably and returns its directory: the files are fsynced, then their
/// directory, then it is renamed into place and the index directory fsynced. `graph` is the
/// graph's encoding (`Graph::encode`) taken together with the items.
pub(crate) fn write(index_dir: &Path, seq: u64, enc: Encoder, graph: &[u8], faults: &dyn Faults) -> Result<PathBuf, IndexError> {
    let tmp = index_dir.join(format!("{TMP_PREFIX}{seq}"));
    let result = write_into(index_dir, &tmp, seq, enc, graph, faults);
    if result.is_err() && tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_into(index_dir: &Path, tmp: &Path, seq: u64, enc: Encoder, graph: &[u8], faults: &dyn Faults) -> Result<PathBuf, IndexError> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(IndexError::io("cannot clear", tmp))?;
    }
    fs::create_dir(tmp).map_err(IndexError::io("cannot create", tmp))?;
    let items = tmp.join(ITEMS_FILE);
    faults.check(FaultPoint::SnapshotWrite).map_err(IndexError::io("cannot write", &items))?;
    write_synced(&items, &enc.finish())?;
    // The graph's links, so that opening need not rebuild them.
    write_synced(&tmp.join(GRAPH_FILE), graph)?;
    sync_dir(tmp)?;
    let dest = index_dir.join(format!("{PREFIX}{seq:020}"));
    if dest.exists() {
        // Same seq means same contents (nothing was written in between); keep the old one.
        fs::remove_dir_all(tmp).map_err(IndexError::io("cannot remove", tmp))?;
        return Ok(dest);
    }
    faults.check(FaultPoint::SnapshotRename).map_err(IndexError::io("cannot rename snapshot into", &dest))?;
    fs::rename(tmp, &dest).map_err(IndexError::io("cannot rename snapshot into", &dest))?;
    sync_dir(index_dir)?;
    Ok(dest)
}

/// Snapshot directories by sequence number, oldest first.
pub(crate) type Snapshots = Vec<(u64, PathBuf)>;

/// Snapshot directories, and leftovers of interrupted writes.
pub(crate) fn list(index_dir: &Path) -> Result<(Snapshots, Vec<PathBuf>), IndexError> {
    let mut snaps = Vec::new();
    let mut partial = Vec::new();
    let entries = fs::read_dir(index_dir).map_err(IndexError::io("cannot list", index_dir))?;
    for entry in entries {
        let entry = entry.map_err(IndexError::io("cannot list", index_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix(PREFIX) {
            let seq = n.parse::<u64>().map_err(|_| {
                IndexError::corrupt(entry.path(), "snapshot directory name is not snapshot-<number>")
            })?;
            snaps.push((seq, entry.path()));
        } else if name.starts_with(TMP_PREFIX) {
            partial.push(entry.path());
        }
    }
    snaps.sort();
    Ok((snaps, partial))
}

/// Deletes partial snapshots (never renamed into place, so never trusted by anyone).
pub(crate) fn remove_partial(partial: &[PathBuf]) -> Result<(), IndexError> {
    for p in partial {
        fs::remove_dir_all(p).map_err(IndexError::io("cannot remove partial snapshot", p))?;
    }
    Ok(())
}

/// Reads the snapshot in `dir`, which is named for sequence number `seq`.
pub(crate) fn load(dir: &Path, seq: u64, dim: usize) -> Result<Snapshot, IndexError> {
    let path = dir.join(ITEMS_FILE);
    let bytes = fs::read(&path).map_err(IndexError::io("cannot read snapshot", &path))?;
    let snap = decode(&bytes, dim, dir).map_err(|reason| IndexError::corrupt(&path, reason))?;
    if snap.seq != seq {
        return Err(IndexError::corrupt(&path, format!("holds sequence {} but is named {seq}", snap.seq)));
    }
    Ok(snap)
}

/// Renames a snapshot that could not be read out of the way (kept for inspection), so that it
/// never counts as one of the snapshots kept.
pub(crate) fn set_aside(index_dir: &Path, dir: &Path, seq: u64) -> Result<(), IndexError> {
    let to = index_dir.join(format!("{DAMAGED_PREFIX}{seq:020}"));
    fs::rename(dir, &to).map_err(IndexError::io("cannot set aside damaged snapshot", dir))?;
    sync_dir(index_dir)
}

/// Keeps the two newest snapshots and the log segments that lead from the older of them to
/// now, so that a damaged newest snapshot can fall back to the one before; removes the rest.
pub(crate) fn prune(index_dir: &Path) -> Result<(), IndexError> {
    let (snaps, _) = list(index_dir)?;
    let Some(&(floor, _)) = snaps.iter().rev().nth(1).or(snaps.last()) else { return Ok(()) };
    for (seq, dir) in &snaps {
        if *seq < floor {
            fs::remove_dir_all(dir).map_err(IndexError::io("cannot remove old snapshot", dir))?;
        }
    }
    for (seq, path) in wal::segments(index_dir)? {
        if seq <= floor {
            fs::remove_file(&path).map_err(IndexError::io("cannot remove old log segment", &path))?;
        }
    }
    sync_dir(index_dir)
}

pub(crate) fn decode(bytes: &[u8], dim: usize, dir: &Path) -> Result<Snapshot, String> {
    let (version, mut r) = open_file(bytes, MAGIC, "swav snapshot")?;
    if version != 1 && version != VERSION {
        return Err(format!("unknown snapshot version {version}"));
    }
    let file_dim = r.u32("dimension")? as usize;
    if file_dim != dim {
        return Err(format!("vectors have dimension {file_dim}, the index expects {dim}"));
    }
    let seq = r.u64("sequence number")?;
    let claimed = r.u64("item count")?;
    // Each slot takes at least its flag, three u32 fields, its vector and (version 2) a
    // thumbnail length; a count the remaining bytes cannot hold is refused before allocating.
    let min_slot = (1 + 3 * 4 + if version == 1 { 0 } else { 4 }) + dim.saturating_mul(4);
    let count = usize::try_from(claimed).ok().filter(|&c| c <= r.remaining() / min_slot);
    let count = count.ok_or_else(|| format!("item count {claimed} exceeds what the file holds"))?;
    let mut slots = Vec::with_capacity(count);
    for _ in 0..count {
        let live = match r.u8("slot flag")? {
            0 => false,
            1 => true,
            other => return Err(format!("slot flag {other} is neither 0 nor 1")),
        };
        slots.push((live, if version == 1 { r.item(dim)? } else { r.item_with_thumbnail(dim)? }));
    }
    r.end("items")?;
    Ok(Snapshot { seq, slots, dir: dir.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let item = ItemRecord { id: "x".into(), cluster: 3, metadata: None, vector: vec![0.6, 0.8], thumbnail: Some(vec![7; 5]) };
        let mut enc = Encoder::new(2, 9, 1);
        enc.push(true, &item.id, item.cluster, None, &item.vector, item.thumbnail.as_deref());
        let params = GraphParams { m: 4, ef_construction: 8 };
        let graph = Graph::new(params, 2, 1);
        graph.insert(&[(&item.vector[..], 0)]);
        let path = write(dir.path(), 9, enc, &graph.encode(), &super::super::faults::NoFaults).unwrap();
        let snap = load(&path, 9, 2).unwrap();
        assert_eq!((snap.seq, &snap.slots), (9, &vec![(true, item.clone())]));
        assert_eq!(load_graph(&path, &snap.slots, params, 2).expect("graph reloads").len(), 1);
        let two = vec![(true, item.clone()), (true, item.clone())];
        assert!(load_graph(&path, &two, params, 2).is_none(), "a graph of the wrong size must not be used");
        let other_m = GraphParams { m: 5, ef_construction: 8 };
        assert!(load_graph(&path, &snap.slots, other_m, 2).is_none(), "a graph built with another M must not be used");
        let g = path.join(GRAPH_FILE);
        let mut gbytes = fs::read(&g).unwrap();
        gbytes[10] ^= 1;
        fs::write(&g, gbytes).unwrap();
        assert!(load_graph(&path, &snap.slots, params, 2).is_none(), "a damaged graph must not be used");
        assert!(load(&path, 9, 3).unwrap_err().to_string().contains("dimension"));
        let file = path.join(ITEMS_FILE);
        let mut bytes = fs::read(&file).unwrap();
        bytes[40] ^= 1;
        fs::write(&file, bytes).unwrap();
        assert!(load(&path, 9, 2).unwrap_err().to_string().contains("checksum"));
    }

    /// A version-1 file, laid out as releases before thumbnails wrote it, still reads.
    #[test]
    fn version_1_snapshot_reads_without_thumbnails() {
        let item = ItemRecord { id: "old".into(), cluster: 1, metadata: Some(super::super::Metadata::from_value(&serde_json::json!({"a": 1}))), vector: vec![1.0, 0.0], thumbnail: None };
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        put_u32(&mut buf, 1); // the version
        put_u32(&mut buf, 2);
        put_u64(&mut buf, 4);
        put_u64(&mut buf, 1);
        buf.push(1);
        put_item_parts(&mut buf, &item.id, item.cluster, item.metadata.as_ref(), &item.vector);
        let crc = crc32fast::hash(&buf);
        put_u32(&mut buf, crc);
        let snap = decode(&buf, 2, Path::new("d")).unwrap();
        assert_eq!((snap.seq, snap.slots), (4, vec![(true, item)]));
    }

    /// The item count is patched where the decoder reads it: right after the file header, the
    /// dimension and the sequence number. Files already on disk depend on that place.
    #[test]
    fn item_count_sits_after_header_dimension_and_sequence() {
        let mut enc = Encoder::new(1, 5, 0);
        assert_eq!(enc.count_at, super::super::codec::HEADER_LEN + 4 + 8);
        for id in ["a", "b", "c"] {
            enc.push(id != "b", id, 0, None, &[1.0], None);
        }
        let bytes = enc.finish();
        assert_eq!(bytes[24..32], 3u64.to_le_bytes());
        let snap = decode(&bytes, 1, Path::new("d")).unwrap();
        assert_eq!(snap.slots.iter().map(|(live, it)| (*live, it.id.as_str())).collect::<Vec<_>>(), [(true, "a"), (false, "b"), (true, "c")]);
    }

    /// A count the file cannot hold is refused before anything is allocated for it, even when
    /// the checksum matches (CRC-32 guards against damage, not against a crafted file).
    #[test]
    fn item_count_beyond_the_files_bytes_is_refused() {
        let mut enc = Encoder::new(2, 1, 1);
        enc.push(true, "x", 0, None, &[1.0, 0.0], None);
        let mut bytes = enc.finish();
        bytes.truncate(bytes.len() - 4);
        for claimed in [2, 1 << 24, u64::MAX] {
            let mut bad = bytes.clone();
            bad[24..32].copy_from_slice(&u64::to_le_bytes(claimed));
            let crc = crc32fast::hash(&bad);
            put_u32(&mut bad, crc);
            let err = decode(&bad, 2, Path::new("d")).unwrap_err();
            assert!(err.contains(&format!("item count {claimed} exceeds")), "{claimed}: {err}");
        }
    }

    /// The stored files of earlier releases (`tests/fixtures`) decode and encode again to the
    /// same bytes: writers and readers share one layout, and it has not moved.
    #[test]
    fn fixture_files_re_encode_byte_for_byte() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // The fixtures were written with the default options and a 32-dimensional model.
        let params = GraphParams { m: super::super::IndexOptions::default().m, ef_construction: 200 };
        for (index, seq, version) in [("index_v1", 1, 1), ("index_log_v1", 1, VERSION), ("index_log_v1", 3, VERSION)] {
            let dir = fixtures.join(index).join(format!("{PREFIX}{seq:020}"));
            let snap = load(&dir, seq, 32).unwrap();
            let graph = fs::read(dir.join(GRAPH_FILE)).unwrap();
            let vectors = snap.slots.iter().flat_map(|(_, it)| it.vector.iter().copied()).collect();
            let decoded = Graph::decode(&graph, params, 32, vectors).unwrap_or_else(|e| panic!("{index}/{seq}: {e}"));
            assert_eq!(decoded.len(), snap.slots.len(), "{index}/{seq}");
            assert!(decoded.encode() == graph, "{index}/{seq}: graph.bin encodes differently");
            let items = fs::read(dir.join(ITEMS_FILE)).unwrap();
            assert_eq!(super::super::codec::read_header(&items, MAGIC), Some(version), "{index}/{seq}");
            if version == VERSION {
                let mut enc = Encoder::new(32, seq, snap.slots.len());
                for (live, it) in &snap.slots {
                    enc.push(*live, &it.id, it.cluster, it.metadata.as_ref(), &it.vector, it.thumbnail.as_deref());
                }
                assert!(enc.finish() == items, "{index}/{seq}: items.bin encodes differently");
            }
        }
    }
}
