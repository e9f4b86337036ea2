//! The graph's on-disk form, stored in each snapshot as `graph.bin`: the links of every slot,
//! not the vectors (the snapshot's items hold those), in the index's framed-file layout
//! (`codec::begin_file`: magic, version, body, trailing CRC-32), written with the codec's
//! `put_*` helpers and read with its `Reader`, so that the codec alone owns the byte layout.
//! Decoding checks every id and level, so a file that passes can never make a search index
//! out of bounds.

use super::GraphParams;
use super::layers::{ABSENT, Layers, MAX_LEVEL};
use crate::index::codec::{begin_file, end_file, open_file, put_u8, put_u16, put_u32, put_u64};

pub(crate) const GRAPH_FILE: &str = "graph.bin";
const MAGIC: &[u8; 8] = b"SWAVHNS1";
const VERSION: u32 = 1;

pub(crate) fn encode(l: &Layers) -> Vec<u8> {
    let mut out = begin_file(MAGIC, VERSION, 32 + l.slots() * (2 + 4 * (l.m0 + 1)));
    put_u32(&mut out, l.dim as u32);
    put_u32(&mut out, l.m as u32);
    put_u64(&mut out, l.slots() as u64);
    let (entry, top) = l.entry.unwrap_or((u32::MAX, ABSENT));
    put_u32(&mut out, entry);
    put_u8(&mut out, top);
    for node in 0..l.slots() as u32 {
        let level = l.levels[node as usize];
        put_u8(&mut out, level);
        if level == ABSENT {
            continue;
        }
        for lc in 0..=level as usize {
            let ids = l.neighbours(node, lc);
            put_u16(&mut out, ids.len() as u16);
            for &id in ids {
                put_u32(&mut out, id);
            }
        }
    }
    end_file(out)
}

pub(crate) fn decode(bytes: &[u8], params: GraphParams, dim: usize, vectors: Vec<f32>) -> Result<Layers, String> {
    let (version, mut r) = open_file(bytes, MAGIC, "swav graph file")?;
    if version != VERSION {
        return Err(format!("unknown graph file version {version}"));
    }
    let (file_dim, m) = (r.u32("dimension")? as usize, r.u32("M")? as usize);
    if file_dim != dim || m != params.m {
        return Err(format!("graph was built with dim {file_dim} and M {m}; the index wants {dim} and {}", params.m));
    }
    let slots = r.u64("slot count")?;
    // Node ids are u32, and the slot count must match the items exactly: a count that does
    // not is damage, whatever its checksum says, and is refused before anything is allocated.
    let wanted = usize::try_from(slots).ok().and_then(|s| s.checked_mul(dim));
    if slots > u64::from(u32::MAX) || wanted != Some(vectors.len()) {
        return Err(format!("graph has {slots} slots but the items hold {} vectors", vectors.len() / dim.max(1)));
    }
    let slots = slots as usize; // ≤ u32::MAX, checked above
    let (entry, top) = (r.u32("entry point")?, r.u8("entry level")?);
    let mut l = Layers::new(dim, m, params.ef_construction);
    if let Some(last) = slots.checked_sub(1) {
        l.make_room(last as u32);
    }
    l.vectors = vectors;
    let mut lists: Vec<(u32, usize, Vec<u32>)> = Vec::new();
    for node in 0..slots as u32 {
        let level = r.u8("node level")?;
        if level == ABSENT {
            return Err(format!("slot {node} is not in the graph"));
        }
        if level > MAX_LEVEL {
            return Err(format!("slot {node} has level {level}, above the maximum {MAX_LEVEL}"));
        }
        l.levels[node as usize] = level;
        l.upper[node as usize] = vec![Vec::new(); level as usize];
        for lc in 0..=level as usize {
            let n = r.u16("link count")? as usize;
            let cap = if lc == 0 { l.m0 } else { l.m };
            if n > cap {
                return Err(format!("slot {node} has {n} links on level {lc}, above the cap {cap}"));
            }
            let ids = (0..n).map(|_| r.u32("link")).collect::<Result<Vec<_>, _>>()?;
            lists.push((node, lc, ids));
        }
    }
    r.end("graph")?;
    // Links are checked once every level is known: a link on level lc must point at a node
    // that exists on level lc.
    for (node, lc, ids) in lists {
        let exists = |id: u32| l.levels.get(id as usize).is_some_and(|&lv| lv != ABSENT && lv as usize >= lc);
        if let Some(bad) = ids.iter().find(|&&id| !exists(id)) {
            return Err(format!("slot {node} links to {bad} on level {lc}, where no such node exists"));
        }
        l.set_neighbours(node, lc, &ids);
    }
    l.present = slots;
    l.entry = match slots {
        0 => None,
        _ if l.levels.get(entry as usize) != Some(&top) => {
            return Err(format!("entry point {entry} at level {top} does not match its node"));
        }
        _ => Some((entry, top)),
    };
    Ok(l)
}
