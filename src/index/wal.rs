//! The append-only log. Every acknowledged write is one record here, fsync'd before the
//! caller hears back.
//!
//! A record is a 12-byte header `payload_len u32 | payload_crc u32 | header_crc u32`
//! followed by the payload `seq u64 | op u8 | body`. Op 1 adds items, op 2 deletes one, op 3
//! adds items each followed by an optional thumbnail (op 1 is still written when no item of
//! the batch has one, so logs without thumbnails keep the layout older versions read). The header has its own checksum so
//! that a damaged length in the middle of the log cannot pass for a torn last record.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{ItemRecord, Reader, put_item, put_str, put_thumbnail, put_u32, put_u64};
use super::error::IndexError;
use super::faults::{FaultPoint, Faults};
use super::snapshot::sync_dir;

const HEADER_LEN: usize = 12;
/// A length above this cannot come from us, so such a header is damage, not a big write.
const MAX_PAYLOAD: u32 = 1 << 30;
const OP_ADD: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_ADD_WITH_THUMBNAILS: u8 = 3;
const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Add(Vec<ItemRecord>),
    Delete(String),
}

/// What recovery dropped from the end of the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TornTail {
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct Scan {
    pub records: Vec<(u64, Op)>,
    pub good_len: u64,
    pub torn: Option<TornTail>,
}

pub(crate) struct Wal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    /// Why writes are refused, once a write or fsync of the log has failed.
    poisoned: Option<String>,
    faults: Arc<dyn Faults>,
}

/// Everything the log files hold: the segments set aside at earlier snapshots, oldest first,
/// then the current log.
#[derive(Debug)]
pub(crate) struct Logs {
    pub records: Vec<(u64, Op)>,
    /// Bytes of whole records in the current log.
    pub good_len: u64,
    pub torn: Option<TornTail>,
}

/// `wal-<seq>.log`: the log as it was when the snapshot of `seq` was taken, kept while a
/// snapshot it could rebuild from is kept.
pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}"))
}

/// Set-aside log segments by sequence number, oldest first.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, IndexError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(IndexError::io("cannot list", dir))? {
        let entry = entry.map_err(IndexError::io("cannot list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix(SEGMENT_PREFIX).and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else { continue };
        let seq = n.parse::<u64>().map_err(|_| IndexError::corrupt(entry.path(), "log segment name is not wal-<number>.log"))?;
        out.push((seq, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Reads every log file without changing any of them. A torn tail is allowed only at the end
/// of the current log (the one appends go to); anywhere else it is corruption.
pub(crate) fn read_all(dir: &Path, log: &Path, dim: usize) -> Result<Logs, IndexError> {
    let mut records: Vec<(u64, Op)> = Vec::new();
    for (_, path) in segments(dir)? {
        let buf = std::fs::read(&path).map_err(IndexError::io("cannot read log segment", &path))?;
        let s = scan(&buf, &path, dim)?;
        if let Some(t) = s.torn {
            return Err(IndexError::corrupt(&path, format!("log segment ends in a damaged record: {}", t.reason)));
        }
        append_in_order(&mut records, s.records, &path)?;
    }
    let buf = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(IndexError::io("cannot read log", log)(e)),
    };
    let s = scan(&buf, log, dim)?;
    append_in_order(&mut records, s.records, log)?;
    Ok(Logs { records, good_len: s.good_len, torn: s.torn })
}

fn append_in_order(records: &mut Vec<(u64, Op)>, more: Vec<(u64, Op)>, path: &Path) -> Result<(), IndexError> {
    if let (Some((last, _)), Some((first, _))) = (records.last(), more.first())
        && first <= last
    {
        return Err(IndexError::corrupt(path, format!("starts at sequence {first}, after {last} in an earlier segment")));
    }
    records.extend(more);
    Ok(())
}

impl Wal {
    /// Opens (or creates) the current log for appending, cutting it to `good_len` bytes (what
    /// `read_all` found whole) if it is longer.
    pub fn open(dir: &Path, path: &Path, good_len: u64, faults: Arc<dyn Faults>) -> Result<Wal, IndexError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(IndexError::io("cannot open log", path))?;
        let on_disk = file.metadata().map_err(IndexError::io("cannot stat log", path))?.len();
        if on_disk > good_len {
            file.set_len(good_len).map_err(IndexError::io("cannot truncate torn log", path))?;
            file.sync_all().map_err(IndexError::io("cannot fsync log", path))?;
        }
        if !existed {
            // The new file's name must be as durable as the records about to go into it.
            sync_dir(dir)?;
        }
        Ok(Wal { dir: dir.to_path_buf(), path: path.to_path_buf(), file, len: good_len, poisoned: None, faults })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn refuse(&self) -> Result<(), IndexError> {
        match &self.poisoned {
            Some(why) => Err(IndexError::Poisoned(self.path.clone(), why.clone())),
            None => Ok(()),
        }
    }

    /// Appends one record and fsyncs it. Any failure poisons the log: the record is cut off
    /// again as far as that still works, and every later write is refused (see
    /// `IndexError::Poisoned`), because after a failed fsync nothing written since can be
    /// trusted to be on disk.
    pub fn append(&mut self, seq: u64, op: &Op) -> Result<(), IndexError> {
        self.refuse()?;
        let frame = encode(seq, op)?;
        let result = self
            .faults
            .check(FaultPoint::LogWrite)
            .and_then(|()| self.file.write_all_at(&frame, self.len))
            .and_then(|()| self.faults.check(FaultPoint::LogSync))
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                // A refused write must not come back at the next start: cut it off (best
                // effort; the next start also drops a torn tail).
                let _ = self.file.set_len(self.len).and_then(|()| self.file.sync_data());
                let why = format!("cannot append to {}: {e}", self.path.display());
                tracing::error!(log = %self.path.display(), error = %e, "log write failed; the index refuses writes until restarted");
                self.poisoned = Some(why);
                self.refuse()
            }
        }
    }

    /// Sets the current log aside as the segment of snapshot `seq` and starts an empty one.
    /// Records up to `seq` are then in segments only; a snapshot written afterwards makes them
    /// redundant. A failure here poisons the log as a failed append does.
    pub fn rotate(&mut self, seq: u64) -> Result<(), IndexError> {
        self.refuse()?;
        let segment = segment_path(&self.dir, seq);
        let result = std::fs::rename(&self.path, &segment)
            .and_then(|()| OpenOptions::new().read(true).write(true).create_new(true).open(&self.path))
            .map_err(|e| format!("cannot start a new log after {}: {e}", segment.display()))
            .and_then(|file| sync_dir(&self.dir).map(|()| file).map_err(|e| e.to_string()));
        match result {
            Ok(file) => {
                self.file = file;
                self.len = 0;
                Ok(())
            }
            Err(why) => {
                tracing::error!(log = %self.path.display(), error = %why, "log rotation failed; the index refuses writes until restarted");
                self.poisoned = Some(why);
                self.refuse()
            }
        }
    }
}

fn encode(seq: u64, op: &Op) -> Result<Vec<u8>, IndexError> {
    let mut payload = Vec::with_capacity(64);
    put_u64(&mut payload, seq);
    match op {
        Op::Add(items) => {
            let thumbnails = items.iter().any(|it| it.thumbnail.is_some());
            payload.push(if thumbnails { OP_ADD_WITH_THUMBNAILS } else { OP_ADD });
            put_u32(&mut payload, items.len() as u32);
            for it in items {
                put_item(&mut payload, it);
                if thumbnails {
                    put_thumbnail(&mut payload, it.thumbnail.as_deref());
                }
            }
        }
        Op::Delete(id) => {
            payload.push(OP_DELETE);
            put_str(&mut payload, id);
        }
    }
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(IndexError::InvalidInput(format!(
            "one write may hold at most {MAX_PAYLOAD} bytes; split the batch"
        )));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    put_u32(&mut frame, payload.len() as u32);
    put_u32(&mut frame, crc32fast::hash(&payload));
    let header_crc = crc32fast::hash(&frame[..8]);
    put_u32(&mut frame, header_crc);
    frame.extend_from_slice(&payload);
    Ok(frame)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads records until the end. Damage that can only be an interrupted last append is
/// reported as a torn tail; anything else is corruption.
pub(crate) fn scan(buf: &[u8], path: &Path, dim: usize) -> Result<Scan, IndexError> {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut last_seq = 0u64;
    let torn = |pos: usize, reason: String| TornTail {
        offset: pos as u64,
        bytes: (buf.len() - pos) as u64,
        reason,
    };
    while pos < buf.len() {
        let rest = &buf[pos..];
        if rest.len() < HEADER_LEN {
            let t = torn(pos, format!("incomplete record header ({} bytes)", rest.len()));
            return Ok(Scan { records, good_len: pos as u64, torn: Some(t) });
        }
        let (len, payload_crc, header_crc) = (le32(rest), le32(&rest[4..]), le32(&rest[8..]));
        if crc32fast::hash(&rest[..8]) != header_crc || len > MAX_PAYLOAD {
            if rest.iter().all(|&b| b == 0) {
                let t = torn(pos, "zero-filled tail".to_string());
                return Ok(Scan { records, good_len: pos as u64, torn: Some(t) });
            }
            return Err(IndexError::corrupt(path, format!("damaged record header at byte {pos}")));
        }
        let end = HEADER_LEN + len as usize;
        if end > rest.len() {
            let t = torn(pos, format!("last record cut short ({} of {end} bytes)", rest.len()));
            return Ok(Scan { records, good_len: pos as u64, torn: Some(t) });
        }
        let payload = &rest[HEADER_LEN..end];
        if crc32fast::hash(payload) != payload_crc {
            if end == rest.len() {
                let t = torn(pos, "last record fails its checksum".to_string());
                return Ok(Scan { records, good_len: pos as u64, torn: Some(t) });
            }
            return Err(IndexError::corrupt(
                path,
                format!("record at byte {pos} fails its checksum and is followed by more records"),
            ));
        }
        let (seq, op) = decode(payload, dim)
            .map_err(|e| IndexError::corrupt(path, format!("record at byte {pos}: {e}")))?;
        if seq <= last_seq {
            return Err(IndexError::corrupt(
                path,
                format!("record at byte {pos} has sequence {seq} after {last_seq}"),
            ));
        }
        last_seq = seq;
        records.push((seq, op));
        pos += end;
    }
    Ok(Scan { records, good_len: pos as u64, torn: None })
}

fn decode(payload: &[u8], dim: usize) -> Result<(u64, Op), String> {
    let mut r = Reader::new(payload);
    let seq = r.u64("sequence number")?;
    let op = match r.u8("operation")? {
        op @ (OP_ADD | OP_ADD_WITH_THUMBNAILS) => {
            let n = r.u32("item count")? as usize;
            let mut items = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                items.push(if op == OP_ADD { r.item(dim)? } else { r.item_with_thumbnail(dim)? });
            }
            Op::Add(items)
        }
        OP_DELETE => Op::Delete(r.string("deleted id")?),
        other => return Err(format!("unknown operation {other}")),
    };
    if !r.is_empty() {
        return Err("trailing bytes after the operation".to_string());
    }
    Ok((seq, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: &str) -> Op {
        Op::Add(vec![ItemRecord { id: id.into(), cluster: 1, metadata: None, vector: vec![1.0, 0.0], thumbnail: None }])
    }

    fn log_of(ops: &[(u64, Op)]) -> Vec<u8> {
        ops.iter().flat_map(|(s, op)| encode(*s, op).unwrap()).collect()
    }

    #[test]
    fn scan_reads_back_what_was_encoded() {
        let ops = vec![(1, add("a")), (2, Op::Delete("a".into())), (5, add("b"))];
        let s = scan(&log_of(&ops), Path::new("x"), 2).unwrap();
        assert_eq!(s.records, ops);
        assert!(s.torn.is_none());
    }

    #[test]
    fn thumbnails_use_their_own_op_and_read_back() {
        let plain = add("a");
        assert_eq!(encode(1, &plain).unwrap()[HEADER_LEN + 8], OP_ADD, "no thumbnails: the old layout");
        let Op::Add(mut items) = add("b") else { unreachable!() };
        items.push(ItemRecord { id: "c".into(), cluster: 2, metadata: None, vector: vec![0.0, 1.0], thumbnail: Some(vec![1, 2, 3]) });
        let with = Op::Add(items);
        assert_eq!(encode(2, &with).unwrap()[HEADER_LEN + 8], OP_ADD_WITH_THUMBNAILS);
        let ops = vec![(1, plain), (2, with)];
        assert_eq!(scan(&log_of(&ops), Path::new("x"), 2).unwrap().records, ops);
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail() {
        let ops = vec![(1, add("a")), (2, add("b"))];
        let buf = log_of(&ops);
        let first = encode(1, &ops[0].1).unwrap().len();
        for cut in first + 1..buf.len() {
            let s = scan(&buf[..cut], Path::new("x"), 2).unwrap();
            assert_eq!(s.records.len(), 1, "cut at {cut}");
            assert_eq!(s.good_len as usize, first);
            assert!(s.torn.is_some());
        }
    }

    #[test]
    fn flipped_byte_in_last_record_is_torn_but_in_middle_is_corrupt() {
        let ops = vec![(1, add("a")), (2, add("b")), (3, add("c"))];
        let buf = log_of(&ops);
        let rec = encode(1, &ops[0].1).unwrap().len();
        let mut last = buf.clone();
        *last.last_mut().unwrap() ^= 0xff;
        assert_eq!(scan(&last, Path::new("x"), 2).unwrap().records.len(), 2);
        let mut middle = buf.clone();
        middle[rec + HEADER_LEN + 3] ^= 0xff;
        let err = scan(&middle, Path::new("x"), 2).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let mut header = buf;
        header[rec] ^= 0x01;
        let err = scan(&header, Path::new("x"), 2).unwrap_err().to_string();
        assert!(err.contains("header"), "{err}");
    }

    #[test]
    fn zero_filled_tail_is_torn_and_sequence_must_grow() {
        let mut buf = log_of(&[(1, add("a"))]);
        buf.extend_from_slice(&[0u8; 40]);
        assert!(scan(&buf, Path::new("x"), 2).unwrap().torn.is_some());
        let back = log_of(&[(2, add("a")), (2, add("b"))]);
        assert!(scan(&back, Path::new("x"), 2).unwrap_err().to_string().contains("sequence"));
    }
}
