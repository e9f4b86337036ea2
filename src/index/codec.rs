//! The binary layouts shared by the index's files: the header every file starts with, the frame
//! of a whole file (snapshot items, graph), the frame of a record in an append-only file (the
//! log), one item (log and snapshots), and the one bounds-checked reader all of them decode with.
//!
//! Every file starts with `magic (8 bytes) | version u32`. A framed file is that header, a body
//! and `crc32 u32`, the CRC over every byte before it. The log is the header followed by
//! records, each `payload_len u32 | payload_crc u32 | header_crc u32 | payload`, where
//! `header_crc` covers the two fields before it. All integers are little-endian. An item is:
//! `id_len u32 | id utf-8 | cluster u32 | meta_len u32 (u32::MAX = none) | meta json | dim × f32`.
//! Where a format carries thumbnails (log op 3, snapshot version 2), each item is followed by
//! `thumb_len u32 (u32::MAX = none) | encoded image bytes`.

use super::Metadata;

/// An item as it is written to disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ItemRecord {
    pub id: String,
    pub cluster: u32,
    pub metadata: Option<Metadata>,
    pub vector: Vec<f32>,
    /// A small encoded image (PNG, JPEG or WebP) of the item, when one was kept.
    pub thumbnail: Option<Vec<u8>>,
}

const NO_METADATA: u32 = u32::MAX;

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_item(out: &mut Vec<u8>, item: &ItemRecord) {
    put_item_parts(out, &item.id, item.cluster, item.metadata.as_ref(), &item.vector);
}

pub(crate) fn put_item_parts(out: &mut Vec<u8>, id: &str, cluster: u32, metadata: Option<&Metadata>, vector: &[f32]) {
    put_str(out, id);
    put_u32(out, cluster);
    match metadata {
        None => put_u32(out, NO_METADATA),
        Some(m) => {
            put_u32(out, m.get().len() as u32);
            out.extend_from_slice(m.get().as_bytes());
        }
    }
    out.reserve(vector.len() * 4);
    for x in vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Writes the optional thumbnail that follows an item in the formats that carry one.
pub(crate) fn put_thumbnail(out: &mut Vec<u8>, thumbnail: Option<&[u8]>) {
    match thumbnail {
        None => put_u32(out, NO_METADATA),
        Some(b) => {
            put_u32(out, b.len() as u32);
            out.extend_from_slice(b);
        }
    }
}

/// Bytes of a file's header: magic and version.
pub(crate) const HEADER_LEN: usize = 8 + 4;

/// Bytes of a framed file besides its body: header and CRC.
const FRAME_OVERHEAD: usize = HEADER_LEN + 4;

/// Writes the header every swav file starts with: its magic and version.
pub(crate) fn put_header(out: &mut Vec<u8>, magic: &[u8; 8], version: u32) {
    out.extend_from_slice(magic);
    put_u32(out, version);
}

/// The version in a header of `magic` at the start of `bytes`, if a whole one is there.
pub(crate) fn read_header(bytes: &[u8], magic: &[u8; 8]) -> Option<u32> {
    let mut r = Reader::new(bytes);
    if r.bytes(8, "magic").ok()? != magic {
        return None;
    }
    r.u32("version").ok()
}

/// Starts a framed file: its header, with room for `body` more bytes.
pub(crate) fn begin_file(magic: &[u8; 8], version: u32, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.saturating_add(FRAME_OVERHEAD));
    put_header(&mut out, magic, version);
    out
}

/// Ends a framed file begun with [`begin_file`]: appends the CRC of everything written.
pub(crate) fn end_file(mut out: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&out);
    put_u32(&mut out, crc);
    out
}

/// Checks a framed file's length, magic and CRC, and returns its version and a reader of its
/// body. `what` names the file in errors ("swav snapshot").
pub(crate) fn open_file<'a>(bytes: &'a [u8], magic: &[u8; 8], what: &str) -> Result<(u32, Reader<'a>), String> {
    let version = read_header(bytes, magic).filter(|_| bytes.len() >= FRAME_OVERHEAD);
    let version = version.ok_or_else(|| format!("not a {what} (bad magic)"))?;
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != Reader::new(crc).u32("checksum")? {
        return Err(format!("{what} fails its checksum"));
    }
    Ok((version, Reader::new(&body[HEADER_LEN..])))
}

/// Bytes of a record's header: `payload_len u32 | payload_crc u32 | header_crc u32`.
pub(crate) const RECORD_HEADER_LEN: usize = 12;
/// The largest payload a record may hold. A header claiming more is damage, not a big write.
pub(crate) const MAX_RECORD: u32 = 1 << 30;

/// Appends `payload` as one record of an append-only file (the log). The header carries the
/// payload's length and CRC and a CRC of its own, so that a damaged length in the middle of a
/// file cannot pass for a record cut short at its end.
pub(crate) fn put_record(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), String> {
    let len = u32::try_from(payload.len()).ok().filter(|&n| n <= MAX_RECORD);
    let len = len.ok_or_else(|| format!("a record may hold at most {MAX_RECORD} bytes, not {}", payload.len()))?;
    let start = out.len();
    out.reserve(RECORD_HEADER_LEN + payload.len());
    put_u32(out, len);
    put_u32(out, crc32fast::hash(payload));
    let header_crc = crc32fast::hash(&out[start..]);
    put_u32(out, header_crc);
    out.extend_from_slice(payload);
    Ok(())
}

/// What lies at the start of `buf`, read as a record written by [`put_record`].
#[derive(Debug, PartialEq)]
pub(crate) enum Record<'a> {
    /// A whole record: its payload, and the bytes it takes with its header.
    Whole { payload: &'a [u8], size: usize },
    /// Fewer bytes than a header.
    ShortHeader,
    /// A sound header whose payload runs past the end: `have` of `need` bytes.
    Short { have: usize, need: usize },
    /// A header that fails its own CRC or claims more than [`MAX_RECORD`].
    BadHeader,
    /// A sound header and a whole payload that fails its CRC; `size` as for `Whole`.
    BadPayload { size: usize },
}

/// Reads the record at the start of `buf`, checking every length against what is there.
pub(crate) fn read_record(buf: &[u8]) -> Record<'_> {
    let mut r = Reader::new(buf);
    let (Ok(len), Ok(payload_crc), Ok(header_crc)) = (r.u32("length"), r.u32("checksum"), r.u32("header checksum")) else {
        return Record::ShortHeader;
    };
    if buf.get(..8).map(crc32fast::hash) != Some(header_crc) || len > MAX_RECORD {
        return Record::BadHeader;
    }
    let Some(size) = (len as usize).checked_add(RECORD_HEADER_LEN) else { return Record::BadHeader };
    let Ok(payload) = r.bytes(len as usize, "payload") else {
        return Record::Short { have: buf.len(), need: size };
    };
    if crc32fast::hash(payload) != payload_crc {
        return Record::BadPayload { size };
    }
    Record::Whole { payload, size }
}

/// A bounds-checked reader; every error names what it was reading.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Bytes not yet read: a bound on what a count read from the data may claim.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("{what} runs past the end of the data"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Ok when every byte was read: `what` names what the data should end with.
    pub fn end(&self, what: &str) -> Result<(), String> {
        if self.is_empty() { Ok(()) } else { Err(format!("trailing bytes after the {what}")) }
    }

    pub fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    pub fn item(&mut self, dim: usize) -> Result<ItemRecord, String> {
        let id = self.string("item id")?;
        let cluster = self.u32("item cluster")?;
        let meta_len = self.u32("metadata length")?;
        let metadata = if meta_len == NO_METADATA {
            None
        } else {
            let b = self.bytes(meta_len as usize, "metadata")?;
            let text = String::from_utf8(b.to_vec()).map_err(|_| format!("metadata of '{id}' is not UTF-8"))?;
            Some(Metadata::from_json(text).map_err(|e| format!("metadata of '{id}' is not JSON: {e}"))?)
        };
        let len = dim.checked_mul(4).ok_or_else(|| format!("dimension {dim} is too large"))?;
        let raw = self.bytes(len, "vector")?;
        let vector: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if vector.iter().any(|x| !x.is_finite()) {
            return Err(format!("vector of '{id}' holds NaN or infinity"));
        }
        Ok(ItemRecord { id, cluster, metadata, vector, thumbnail: None })
    }

    /// An item followed by its optional thumbnail.
    pub fn item_with_thumbnail(&mut self, dim: usize) -> Result<ItemRecord, String> {
        let mut item = self.item(dim)?;
        let len = self.u32("thumbnail length")?;
        if len != NO_METADATA {
            item.thumbnail = Some(self.bytes(len as usize, "thumbnail")?.to_vec());
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_file_round_trips_and_refuses_damage() {
        let mut out = begin_file(b"TESTFIL1", 7, 4);
        put_u32(&mut out, 42);
        let file = end_file(out);
        assert_eq!(file.len(), 8 + 4 + 4 + 4);
        let (version, mut r) = open_file(&file, b"TESTFIL1", "test file").unwrap();
        assert_eq!((version, r.u32("x").unwrap()), (7, 42));
        assert!(r.end("x").is_ok());
        assert!(open_file(&file, b"OTHERFIL", "test file").unwrap_err().contains("bad magic"));
        for cut in 0..file.len() {
            assert!(open_file(&file[..cut], b"TESTFIL1", "test file").is_err(), "cut at {cut}");
        }
        for i in 8..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x10;
            assert!(open_file(&bad, b"TESTFIL1", "test file").unwrap_err().contains("checksum"), "flip at {i}");
        }
        let mut r = Reader::new(&[1, 0, 2]);
        assert_eq!(r.u16("a").unwrap(), 1);
        assert!(r.end("a").unwrap_err().contains("trailing"));
        assert!(r.u16("b").unwrap_err().contains("b runs past the end"));
    }

    #[test]
    fn header_reads_only_whole_and_with_its_magic() {
        let mut h = Vec::new();
        put_header(&mut h, b"TESTFIL1", 3);
        assert_eq!(read_header(&h, b"TESTFIL1"), Some(3));
        assert_eq!(read_header(&h, b"OTHERFIL"), None);
        for cut in 0..HEADER_LEN {
            assert_eq!(read_header(&h[..cut], b"TESTFIL1"), None, "cut at {cut}");
        }
    }

    #[test]
    fn records_round_trip_and_every_damage_is_classified() {
        let mut buf = Vec::new();
        put_record(&mut buf, b"hello").unwrap();
        put_record(&mut buf, b"").unwrap();
        let size = RECORD_HEADER_LEN + 5;
        assert_eq!(read_record(&buf), Record::Whole { payload: &b"hello"[..], size });
        assert_eq!(read_record(&buf[size..]), Record::Whole { payload: &[][..], size: RECORD_HEADER_LEN });
        for cut in 0..RECORD_HEADER_LEN {
            assert_eq!(read_record(&buf[..cut]), Record::ShortHeader, "cut at {cut}");
        }
        for cut in RECORD_HEADER_LEN..size {
            assert_eq!(read_record(&buf[..cut]), Record::Short { have: cut, need: size }, "cut at {cut}");
        }
        for i in 0..size {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            let want = if i < RECORD_HEADER_LEN { Record::BadHeader } else { Record::BadPayload { size } };
            assert_eq!(read_record(&bad), want, "flip at {i}");
        }
        // Lengths over the limit are damage even when the header's checksum matches them.
        for len in [MAX_RECORD + 1, u32::MAX] {
            let mut over = Vec::new();
            put_u32(&mut over, len);
            put_u32(&mut over, 0);
            let crc = crc32fast::hash(&over);
            put_u32(&mut over, crc);
            assert_eq!(read_record(&over), Record::BadHeader, "length {len}");
        }
    }

    #[test]
    fn item_round_trips_with_and_without_metadata() {
        let items = [
            ItemRecord { id: "a/b.png".into(), cluster: 7, metadata: None, vector: vec![0.5, -1.0, 2.0], thumbnail: None },
            ItemRecord {
                id: "ü".into(),
                cluster: 0,
                metadata: Some(Metadata::from_value(&serde_json::json!({"k": [1, 2]}))),
                vector: vec![0.0, 1.0, 0.0],
                thumbnail: None,
            },
        ];
        let mut buf = Vec::new();
        for it in &items {
            put_item(&mut buf, it);
        }
        let mut r = Reader::new(&buf);
        assert_eq!(r.item(3).unwrap(), items[0]);
        assert_eq!(r.item(3).unwrap(), items[1]);
        assert!(r.is_empty());
        assert!(Reader::new(&buf[..buf.len() - 1]).item(3).is_ok());
        let mut short = Reader::new(&buf[..5]);
        assert!(short.item(3).unwrap_err().contains("past the end"));
    }

    #[test]
    fn item_with_thumbnail_round_trips_and_checks_its_length() {
        let with = ItemRecord { id: "t".into(), cluster: 1, metadata: None, vector: vec![1.0], thumbnail: Some(vec![9, 8, 7]) };
        let without = ItemRecord { thumbnail: None, ..with.clone() };
        let mut buf = Vec::new();
        for it in [&with, &without] {
            put_item(&mut buf, it);
            put_thumbnail(&mut buf, it.thumbnail.as_deref());
        }
        let mut r = Reader::new(&buf);
        assert_eq!(r.item_with_thumbnail(1).unwrap(), with);
        assert_eq!(r.item_with_thumbnail(1).unwrap(), without);
        assert!(r.is_empty());
        // A length that points past the end is an error, not a panic.
        let mut bad = Vec::new();
        put_item(&mut bad, &without);
        put_u32(&mut bad, 1000);
        assert!(Reader::new(&bad).item_with_thumbnail(1).unwrap_err().contains("thumbnail"));
    }
}
