//! Which files an indexing run reads, and the id each one gets.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The item id: the path relative to the input root, with `/` separators.
    pub id: String,
    pub path: PathBuf,
}

/// A directory is walked recursively (hidden entries skipped, sorted for a stable order);
/// any other file is a list of paths, one per line, relative to the list's directory.
pub fn list(input: &Path) -> anyhow::Result<Vec<Source>> {
    let meta = fs::metadata(input).map_err(|e| anyhow::anyhow!("cannot read input {}: {e}", input.display()))?;
    if meta.is_dir() {
        let mut out = Vec::new();
        walk(input, input, &mut out)?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    } else {
        from_list(input)
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Source>) -> anyhow::Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| anyhow::anyhow!("cannot list {}: {e}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks, so a linked folder of images is indexed like a real one.
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(root, &path, out)?,
            _ => out.push(Source { id: relative_id(root, &path), path }),
        }
    }
    Ok(())
}

fn relative_id(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

fn from_list(list: &Path) -> anyhow::Result<Vec<Source>> {
    let text = fs::read_to_string(list).map_err(|e| anyhow::anyhow!("cannot read file list {}: {e}", list.display()))?;
    let base = list.parent().unwrap_or(Path::new("."));
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Source { id: l.trim_start_matches("./").to_string(), path: base.join(l) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_ids_are_relative_sorted_and_skip_hidden() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("b/c")).unwrap();
        fs::create_dir_all(d.path().join(".git")).unwrap();
        for f in ["b/c/z.png", "a.png", ".hidden.png", ".git/x.png"] {
            fs::write(d.path().join(f), b"x").unwrap();
        }
        let ids: Vec<String> = list(d.path()).unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["a.png", "b/c/z.png"]);
    }

    #[test]
    fn file_list_paths_are_relative_to_the_list() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("list.txt"), "# comment\n./x/a.png\n\n  b.png \n").unwrap();
        let got = list(&d.path().join("list.txt")).unwrap();
        assert_eq!(got.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["x/a.png", "b.png"]);
        assert_eq!(got[1].path, d.path().join("b.png"));
        assert!(list(&d.path().join("missing")).unwrap_err().to_string().contains("missing"));
    }
}
