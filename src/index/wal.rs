//! The append-only log. Every acknowledged write is one record here, fsync'd before the
//! caller hears back.
//!
//! A log file is the header shared by swav's files (`codec::put_header`: magic `SWAVWAL1`,
//! version 2) followed by records framed by `codec::put_record`, whose header has its own
//! checksum so that a damaged length in the middle of the log cannot pass for a torn last
//! record. The file header goes out with the first record, so an empty log is an empty file.
//! A record's payload is `seq u64 | op u8 | body`. Op 1 adds items, op 2 deletes one, op 3 adds
//! items each followed by an optional thumbnail (op 1 is still written when no item of the
//! batch has one).
//!
//! Version 1 (index format 1) framed records the same way but had no file header. Such logs
//! are read from byte 0 with the same record decoder, and [`upgrade`] rewrites them with the
//! header the first time the index is opened for writing; read-only opens read them as they are.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{
    HEADER_LEN, ItemRecord, MAX_RECORD, Reader, Record, put_header, put_item, put_record, put_str, put_thumbnail,
    put_u32, put_u64, read_header, read_record,
};
use super::error::IndexError;
use super::faults::{FaultPoint, Faults};
use super::snapshot::sync_dir;

const MAGIC: &[u8; 8] = b"SWAVWAL1";
/// Version 1 is the headerless framing of index format 1 (see the module doc).
const VERSION: u32 = 2;
const OP_ADD: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_ADD_WITH_THUMBNAILS: u8 = 3;
const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
/// Added to a log's name while its upgraded copy is written.
const UPGRADE_SUFFIX: &str = ".upgrade";

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
    /// Whether the file is in the headerless version-1 framing.
    pub legacy: bool,
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
    /// Bytes of whole records (and the header before them) in the current log.
    pub good_len: u64,
    pub torn: Option<TornTail>,
    /// Files in the version-1 framing, each with its bytes of whole records: what [`upgrade`]
    /// rewrites.
    pub legacy: Vec<(PathBuf, u64)>,
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
/// of the current log (the one appends go to); anywhere else it is corruption. Files in the
/// version-1 framing are read only where `legacy` allows them (an index of format 1).
pub(crate) fn read_all(dir: &Path, log: &Path, dim: usize, legacy: bool) -> Result<Logs, IndexError> {
    let mut records: Vec<(u64, Op)> = Vec::new();
    let mut old = Vec::new();
    for (_, path) in segments(dir)? {
        let buf = std::fs::read(&path).map_err(IndexError::io("cannot read log segment", &path))?;
        let s = scan_file(&buf, &path, dim, legacy)?;
        if let Some(t) = s.torn {
            return Err(IndexError::corrupt(&path, format!("log segment ends in a damaged record: {}", t.reason)));
        }
        if s.legacy {
            old.push((path.clone(), s.good_len));
        }
        append_in_order(&mut records, s.records, &path)?;
    }
    let buf = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(IndexError::io("cannot read log", log)(e)),
    };
    let s = scan_file(&buf, log, dim, legacy)?;
    if s.legacy {
        old.push((log.to_path_buf(), s.good_len));
    }
    append_in_order(&mut records, s.records, log)?;
    Ok(Logs { records, good_len: s.good_len, torn: s.torn, legacy: old })
}

/// Rewrites the version-1 logs that [`read_all`] found with the file header before their
/// whole records; a torn tail is left out, as [`Wal::open`] would cut it off. Each file is
/// replaced by renaming a fsync'd copy over it, so a crash leaves it old or new, and both read
/// (the index stays format 1 until every log is rewritten). Returns the current log's new
/// length of whole records.
pub(crate) fn upgrade(dir: &Path, log: &Path, legacy: &[(PathBuf, u64)], mut good_len: u64) -> Result<u64, IndexError> {
    for (path, whole) in legacy {
        let old = std::fs::read(path).map_err(IndexError::io("cannot read log", path))?;
        let records = usize::try_from(*whole).ok().and_then(|n| old.get(..n));
        let records = records.ok_or_else(|| IndexError::corrupt(path, "the log changed while the index was opened"))?;
        let mut new = Vec::with_capacity(records.len().saturating_add(HEADER_LEN));
        if !records.is_empty() {
            put_header(&mut new, MAGIC, VERSION);
            new.extend_from_slice(records);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(UPGRADE_SUFFIX);
        let tmp = PathBuf::from(tmp);
        File::create(&tmp)
            .and_then(|mut f| f.write_all(&new).and_then(|()| f.sync_all()))
            .map_err(IndexError::io("cannot write upgraded log", &tmp))?;
        std::fs::rename(&tmp, path).map_err(IndexError::io("cannot rename upgraded log into", path))?;
        if path == log {
            good_len = new.len() as u64;
        }
    }
    if !legacy.is_empty() {
        sync_dir(dir)?;
    }
    Ok(good_len)
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
    /// `read_all` found whole) if it is longer. With `good_len` 0 the log is empty, and the
    /// file header goes out with the first append.
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
        let frame = encode(seq, op, self.len == 0)?;
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

/// One record, preceded by the file header when it is the first of its file.
fn encode(seq: u64, op: &Op, first: bool) -> Result<Vec<u8>, IndexError> {
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
    if payload.len() > MAX_RECORD as usize {
        return Err(IndexError::InvalidInput(format!("one write may hold at most {MAX_RECORD} bytes; split the batch")));
    }
    let mut frame = Vec::new();
    if first {
        put_header(&mut frame, MAGIC, VERSION);
    }
    put_record(&mut frame, &payload).map_err(IndexError::InvalidInput)?;
    Ok(frame)
}

/// Reads a log file in the current framing (header, then records) until the end. Damage that
/// can only be an interrupted last append is reported as a torn tail; anything else is
/// corruption.
#[cfg(test)]
pub(crate) fn scan(buf: &[u8], path: &Path, dim: usize) -> Result<Scan, IndexError> {
    scan_file(buf, path, dim, false)
}

/// As [`scan`], and with `legacy` also a file in the version-1 framing (records from byte 0).
fn scan_file(buf: &[u8], path: &Path, dim: usize, legacy: bool) -> Result<Scan, IndexError> {
    match read_header(buf, MAGIC) {
        Some(VERSION) => return scan_records(buf, HEADER_LEN, path, dim, false),
        Some(other) => return Err(IndexError::corrupt(path, format!("unknown log version {other}"))),
        None => {}
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    put_header(&mut header, MAGIC, VERSION);
    // What a crash while the first record went out can leave (a version-1 log never starts
    // with the magic: as a record length it is over MAX_RECORD).
    let reason = if buf.is_empty() {
        return Ok(Scan { records: Vec::new(), good_len: 0, torn: None, legacy: false });
    } else if header.starts_with(buf) {
        format!("incomplete log header ({} bytes)", buf.len())
    } else if buf.iter().all(|&b| b == 0) {
        "zero-filled tail".to_string()
    } else if legacy {
        return scan_records(buf, 0, path, dim, true);
    } else {
        return Err(IndexError::corrupt(path, "does not start with the swav log header"));
    };
    Ok(torn_at(Vec::new(), buf, 0, reason, false))
}

fn torn_at(records: Vec<(u64, Op)>, buf: &[u8], pos: usize, reason: String, legacy: bool) -> Scan {
    let bytes = buf.len().saturating_sub(pos) as u64;
    Scan { records, good_len: pos as u64, torn: Some(TornTail { offset: pos as u64, bytes, reason }), legacy }
}

/// Reads the records from byte `start` to the end.
fn scan_records(buf: &[u8], start: usize, path: &Path, dim: usize, legacy: bool) -> Result<Scan, IndexError> {
    let mut records = Vec::new();
    let mut pos = start;
    let mut last_seq = 0u64;
    while let Some(rest) = buf.get(pos..).filter(|r| !r.is_empty()) {
        let (payload, size) = match read_record(rest) {
            Record::Whole { payload, size } => (payload, size),
            Record::ShortHeader => {
                let reason = format!("incomplete record header ({} bytes)", rest.len());
                return Ok(torn_at(records, buf, pos, reason, legacy));
            }
            Record::Short { have, need } => {
                let reason = format!("last record cut short ({have} of {need} bytes)");
                return Ok(torn_at(records, buf, pos, reason, legacy));
            }
            Record::BadHeader if rest.iter().all(|&b| b == 0) => {
                return Ok(torn_at(records, buf, pos, "zero-filled tail".to_string(), legacy));
            }
            Record::BadHeader => return Err(IndexError::corrupt(path, format!("damaged record header at byte {pos}"))),
            Record::BadPayload { size } if size == rest.len() => {
                return Ok(torn_at(records, buf, pos, "last record fails its checksum".to_string(), legacy));
            }
            Record::BadPayload { .. } => {
                return Err(IndexError::corrupt(
                    path,
                    format!("record at byte {pos} fails its checksum and is followed by more records"),
                ));
            }
        };
        let (seq, op) =
            decode(payload, dim).map_err(|e| IndexError::corrupt(path, format!("record at byte {pos}: {e}")))?;
        if seq <= last_seq {
            return Err(IndexError::corrupt(path, format!("record at byte {pos} has sequence {seq} after {last_seq}")));
        }
        last_seq = seq;
        records.push((seq, op));
        pos = pos.saturating_add(size);
    }
    Ok(Scan { records, good_len: pos as u64, torn: None, legacy })
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
    use super::super::codec::RECORD_HEADER_LEN;
    use super::*;

    fn add(id: &str) -> Op {
        Op::Add(vec![ItemRecord { id: id.into(), cluster: 1, metadata: None, vector: vec![1.0, 0.0], thumbnail: None }])
    }

    /// A log file as `Wal::append` writes it: the header with the first record.
    fn log_of(ops: &[(u64, Op)]) -> Vec<u8> {
        ops.iter().enumerate().flat_map(|(i, (s, op))| encode(*s, op, i == 0).unwrap()).collect()
    }

    /// The same records in the version-1 framing: no file header.
    fn v1_log_of(ops: &[(u64, Op)]) -> Vec<u8> {
        log_of(ops)[HEADER_LEN..].to_vec()
    }

    /// Where each record ends in `log_of(ops)`.
    fn ends(ops: &[(u64, Op)]) -> Vec<usize> {
        let mut at = HEADER_LEN;
        ops.iter().map(|(s, op)| { at += encode(*s, op, false).unwrap().len(); at }).collect()
    }

    #[test]
    fn scan_reads_back_what_was_encoded() {
        let ops = vec![(1, add("a")), (2, Op::Delete("a".into())), (5, add("b"))];
        let buf = log_of(&ops);
        assert_eq!(&buf[..8], MAGIC);
        let s = scan(&buf, Path::new("x"), 2).unwrap();
        assert_eq!(s.records, ops);
        assert!(s.torn.is_none() && !s.legacy);
        assert_eq!(s.good_len as usize, buf.len());
        let empty = scan(&[], Path::new("x"), 2).unwrap();
        assert!(empty.records.is_empty() && empty.torn.is_none() && empty.good_len == 0);
    }

    #[test]
    fn thumbnails_use_their_own_op_and_read_back() {
        let plain = add("a");
        assert_eq!(encode(1, &plain, false).unwrap()[RECORD_HEADER_LEN + 8], OP_ADD, "no thumbnails: op 1");
        let Op::Add(mut items) = add("b") else { unreachable!() };
        items.push(ItemRecord { id: "c".into(), cluster: 2, metadata: None, vector: vec![0.0, 1.0], thumbnail: Some(vec![1, 2, 3]) });
        let with = Op::Add(items);
        assert_eq!(encode(2, &with, false).unwrap()[RECORD_HEADER_LEN + 8], OP_ADD_WITH_THUMBNAILS);
        let ops = vec![(1, plain), (2, with)];
        assert_eq!(scan(&log_of(&ops), Path::new("x"), 2).unwrap().records, ops);
    }

    /// A crash can stop an append after any byte, the file header's included: every cut reads
    /// as the whole records before it plus, off a record boundary, a torn tail.
    #[test]
    fn every_cut_is_whole_records_and_a_torn_tail() {
        let ops = vec![(1, add("a")), (2, Op::Delete("a".into())), (3, add("b"))];
        let buf = log_of(&ops);
        let ends = ends(&ops);
        for cut in 0..=buf.len() {
            let s = scan(&buf[..cut], Path::new("x"), 2).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(s.records, ops[..whole], "cut at {cut}");
            let good = if cut < HEADER_LEN { 0 } else { ends[..whole].last().copied().unwrap_or(HEADER_LEN) };
            assert_eq!(s.good_len as usize, good, "cut at {cut}");
            assert_eq!(s.torn.is_some(), cut != good, "cut at {cut}");
        }
        assert!(scan(&buf[..5], Path::new("x"), 2).unwrap().torn.unwrap().reason.contains("log header"));
    }

    /// Every byte flipped in every way: an error, or the records before the damage with the
    /// damaged last record as a torn tail; never a panic and never a record that was not written.
    #[test]
    fn every_flipped_byte_is_an_error_or_a_torn_last_record() {
        let ops = vec![(1, add("a")), (2, Op::Delete("a".into())), (3, add("b"))];
        let buf = log_of(&ops);
        let ends = ends(&ops);
        let last_start = ends[ends.len() - 2];
        for i in 0..buf.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = buf.clone();
                bad[i] ^= mask;
                match scan(&bad, Path::new("x"), 2) {
                    Ok(s) => {
                        assert!(i >= last_start + RECORD_HEADER_LEN, "byte {i} ^ {mask:#x} outside the last payload went unnoticed");
                        assert_eq!(s.records, ops[..2], "byte {i} ^ {mask:#x}");
                        assert_eq!(s.torn.unwrap().offset as usize, last_start);
                    }
                    Err(e) => assert!(matches!(e, IndexError::Corrupt { .. }), "byte {i}: {e}"),
                }
            }
        }
        let mut magic = buf.clone();
        magic[0] ^= 1;
        assert!(scan(&magic, Path::new("x"), 2).unwrap_err().to_string().contains("header"));
        let mut version = buf;
        version[8] = 9;
        assert!(scan(&version, Path::new("x"), 2).unwrap_err().to_string().contains("unknown log version 9"));
    }

    #[test]
    fn flipped_byte_in_last_record_is_torn_but_in_middle_is_corrupt() {
        let ops = vec![(1, add("a")), (2, add("b")), (3, add("c"))];
        let buf = log_of(&ops);
        let second = ends(&ops)[0];
        let mut last = buf.clone();
        *last.last_mut().unwrap() ^= 0xff;
        assert_eq!(scan(&last, Path::new("x"), 2).unwrap().records.len(), 2);
        let mut middle = buf.clone();
        middle[second + RECORD_HEADER_LEN + 3] ^= 0xff;
        let err = scan(&middle, Path::new("x"), 2).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let mut header = buf;
        header[second] ^= 0x01;
        let err = scan(&header, Path::new("x"), 2).unwrap_err().to_string();
        assert!(err.contains("header"), "{err}");
    }

    #[test]
    fn zero_filled_tail_is_torn_and_sequence_must_grow() {
        let mut buf = log_of(&[(1, add("a"))]);
        buf.extend_from_slice(&[0u8; 40]);
        assert!(scan(&buf, Path::new("x"), 2).unwrap().torn.is_some());
        let zeros = scan(&[0u8; 40], Path::new("x"), 2).unwrap();
        assert_eq!((zeros.good_len, zeros.torn.unwrap().reason.as_str()), (0, "zero-filled tail"));
        let back = log_of(&[(2, add("a")), (2, add("b"))]);
        assert!(scan(&back, Path::new("x"), 2).unwrap_err().to_string().contains("sequence"));
    }

    /// Lengths read from a damaged file are checked before anything is sized by them.
    #[test]
    fn lengths_that_overrun_are_errors_not_panics_or_huge_allocations() {
        // A record whose header is sound but claims 1 GiB: a record cut short.
        let mut huge = Vec::new();
        put_header(&mut huge, MAGIC, VERSION);
        put_u32(&mut huge, MAX_RECORD);
        put_u32(&mut huge, 0);
        let crc = crc32fast::hash(&huge[HEADER_LEN..]);
        put_u32(&mut huge, crc);
        let t = scan(&huge, Path::new("x"), 2).unwrap().torn.unwrap();
        assert!(t.reason.contains("cut short") && t.offset as usize == HEADER_LEN, "{}", t.reason);
        // Over the limit, with a matching header checksum: damage.
        let mut over = huge[..HEADER_LEN].to_vec();
        put_u32(&mut over, u32::MAX);
        put_u32(&mut over, 0);
        let crc = crc32fast::hash(&over[HEADER_LEN..]);
        put_u32(&mut over, crc);
        over.extend_from_slice(&log_of(&[(1, add("a"))])[HEADER_LEN..]);
        assert!(scan(&over, Path::new("x"), 2).unwrap_err().to_string().contains("damaged record header"));
        // Payloads whose counts and lengths run past their end.
        let mut items = Vec::new();
        put_u64(&mut items, 1);
        items.push(OP_ADD);
        put_u32(&mut items, u32::MAX);
        assert!(decode(&items, 2).unwrap_err().contains("past the end"));
        let mut id = Vec::new();
        put_u64(&mut id, 1);
        id.push(OP_DELETE);
        put_u32(&mut id, u32::MAX);
        assert!(decode(&id, 2).unwrap_err().contains("past the end"));
        assert!(decode(&log_of(&[(1, add("a"))])[HEADER_LEN + RECORD_HEADER_LEN..], usize::MAX).is_err());
        assert!(decode(&[1, 2, 3], 2).unwrap_err().contains("sequence"));
        let mut op = vec![0u8; 8];
        op.push(9);
        assert!(decode(&op, 2).unwrap_err().contains("unknown operation 9"));
    }

    #[test]
    fn a_version_1_log_reads_only_where_allowed() {
        let ops = vec![(1, add("a")), (2, Op::Delete("a".into()))];
        let mut old = v1_log_of(&ops);
        assert!(scan(&old, Path::new("x"), 2).unwrap_err().to_string().contains("header"));
        let s = scan_file(&old, Path::new("x"), 2, true).unwrap();
        assert_eq!((s.records, s.legacy, s.good_len as usize), (ops.clone(), true, old.len()));
        let whole = old.len();
        old.extend_from_slice(&[7; 5]);
        let s = scan_file(&old, Path::new("x"), 2, true).unwrap();
        assert_eq!((s.records.len(), s.good_len as usize, s.legacy), (2, whole, true));
        // A current log reads the same whether or not version 1 is allowed.
        let new = scan_file(&log_of(&ops), Path::new("x"), 2, true).unwrap();
        assert_eq!((new.records, new.legacy), (ops, false));
    }

    /// The upgrade keeps every whole record of every log, drops a torn tail, and leaves files
    /// that read without version 1; a directory where it was interrupted (one file done) reads too.
    #[test]
    fn upgrade_rewrites_version_1_logs_with_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("wal.log");
        let early = vec![(1, add("a")), (2, add("b"))];
        let late = vec![(3, Op::Delete("a".into())), (4, add("c"))];
        fs_write(&segment_path(dir.path(), 2), &v1_log_of(&early));
        let mut current = v1_log_of(&late);
        current.extend_from_slice(&[1, 2, 3]);
        fs_write(&log, &current);
        assert!(read_all(dir.path(), &log, 2, false).is_err(), "version 1 read where not allowed");
        let logs = read_all(dir.path(), &log, 2, true).unwrap();
        assert_eq!(logs.legacy.len(), 2);
        assert!(logs.torn.is_some());
        let all: Vec<(u64, Op)> = early.iter().chain(&late).cloned().collect();
        assert_eq!(logs.records, all);
        // Interrupted after the segment: one file new, one old.
        upgrade(dir.path(), &log, &logs.legacy[..1], logs.good_len).unwrap();
        let half = read_all(dir.path(), &log, 2, true).unwrap();
        assert_eq!((half.records.clone(), half.legacy.len()), (all.clone(), 1));
        let good = upgrade(dir.path(), &log, &half.legacy, half.good_len).unwrap();
        assert_eq!(good, std::fs::metadata(&log).unwrap().len());
        let after = read_all(dir.path(), &log, 2, false).unwrap();
        assert_eq!((after.records, after.good_len, after.torn, after.legacy.len()), (all, good, None, 0));
        assert_eq!(std::fs::read(&log).unwrap(), log_of(&late));
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.ends_with(UPGRADE_SUFFIX)), "{names:?}");
    }

    fn fs_write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn appends_start_a_log_with_its_header_and_continue_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("wal.log");
        let mut wal = Wal::open(dir.path(), &log, 0, Arc::new(super::super::faults::NoFaults)).unwrap();
        assert_eq!(wal.len(), 0);
        wal.append(1, &add("a")).unwrap();
        wal.append(2, &add("b")).unwrap();
        let ops = vec![(1, add("a")), (2, add("b"))];
        assert_eq!(std::fs::read(&log).unwrap(), log_of(&ops));
        assert_eq!(wal.len() as usize, log_of(&ops).len());
        wal.rotate(2).unwrap();
        wal.append(3, &add("c")).unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), log_of(&[(3, add("c"))]), "a rotated log starts with the header");
        assert_eq!(read_all(dir.path(), &log, 2, false).unwrap().records.len(), 3);
    }
}
