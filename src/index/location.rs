//! Where an index lives, as `--index` and `--out` name it: a directory of this process's own
//! index, or `milvus://HOST:PORT/COLLECTION` for a collection in a Milvus server.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

const MILVUS_SCHEME: &str = "milvus://";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexLocation {
    Dir(PathBuf),
    Milvus(MilvusAddress),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilvusAddress {
    pub host: String,
    pub port: u16,
    pub collection: String,
}

impl fmt::Display for MilvusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{MILVUS_SCHEME}{host}:{}/{}", self.port, self.collection)
    }
}

impl fmt::Display for IndexLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexLocation::Dir(dir) => write!(f, "{}", dir.display()),
            IndexLocation::Milvus(a) => a.fmt(f),
        }
    }
}

impl FromStr for IndexLocation {
    type Err = String;

    fn from_str(text: &str) -> Result<IndexLocation, String> {
        let Some(rest) = text.strip_prefix(MILVUS_SCHEME) else {
            if text.is_empty() {
                return Err("an empty index location".into());
            }
            return Ok(IndexLocation::Dir(PathBuf::from(text)));
        };
        let usage = || format!("expected milvus://HOST:PORT/COLLECTION, got '{text}'");
        let (authority, collection) = rest.split_once('/').ok_or_else(usage)?;
        let (host, port) = match authority.strip_prefix('[') {
            // [IPv6]:PORT
            Some(v6) => {
                let (host, port) = v6.split_once("]:").ok_or_else(usage)?;
                (host, port)
            }
            None => authority.rsplit_once(':').ok_or_else(usage)?,
        };
        if host.is_empty() {
            return Err(usage());
        }
        let port = port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| format!("{}: bad port '{port}'", usage()))?;
        check_collection_name(collection).map_err(|why| format!("{}: {why}", usage()))?;
        Ok(IndexLocation::Milvus(MilvusAddress { host: host.to_string(), port, collection: collection.to_string() }))
    }
}

/// Milvus's own rule for collection names: a letter or underscore, then letters, digits and
/// underscores, at most 255 characters.
fn check_collection_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') || name.len() > 255 {
        return Err(format!(
            "collection name '{name}' must start with a letter or '_' and hold only letters, digits and '_' (at most 255)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milvus(host: &str, port: u16, collection: &str) -> IndexLocation {
        IndexLocation::Milvus(MilvusAddress { host: host.into(), port, collection: collection.into() })
    }

    #[test]
    fn parses_directories_and_milvus_addresses() {
        assert_eq!("var/index".parse(), Ok(IndexLocation::Dir("var/index".into())));
        assert_eq!("milvus://127.0.0.1:19530/swav_items".parse(), Ok(milvus("127.0.0.1", 19530, "swav_items")));
        assert_eq!("milvus://milvus.internal:1/_c2".parse(), Ok(milvus("milvus.internal", 1, "_c2")));
        assert_eq!("milvus://[::1]:19530/c".parse(), Ok(milvus("::1", 19530, "c")));
        assert_eq!(milvus("::1", 19530, "c").to_string(), "milvus://[::1]:19530/c");
        assert_eq!(milvus("localhost", 19530, "c").to_string(), "milvus://localhost:19530/c");
    }

    #[test]
    fn refuses_malformed_milvus_addresses() {
        for bad in [
            "milvus://",
            "milvus://host/coll",
            "milvus://host:19530",
            "milvus://host:19530/",
            "milvus://:19530/c",
            "milvus://host:0/c",
            "milvus://host:99999/c",
            "milvus://host:port/c",
            "milvus://host:19530/9lives",
            "milvus://host:19530/a-b",
            "milvus://host:19530/a/b",
            "",
        ] {
            assert!(bad.parse::<IndexLocation>().is_err(), "{bad:?} was accepted");
        }
    }
}
