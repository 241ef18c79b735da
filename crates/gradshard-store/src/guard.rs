//! The data-safety guard: one check for every path a command writes, so that no
//! output (a score directory, an index Parquet file, a JSON report, a model, a
//! gradient directory, a merged store) lands on, in, or over a store.
//!
//! A directory is recognised as a store by any of the files a store holds
//! ([`is_store_dir`]): `samples.log`, a `shards/` directory, the `UNFINISHED` marker,
//! or a `manifest.json` that names a `store_id` — so a store whose manifest or log
//! is damaged or missing is still recognised and still protected.
//!
//! Paths are resolved before they are judged: relative paths against the working
//! directory, `..` and symlinks by canonicalising the nearest existing ancestor (the
//! components below it do not exist yet, so they are neither links nor stores).
//! Then the path is refused when
//! - it is a store, or lies inside one (any ancestor is a store), or
//! - it is an existing directory that holds a store within [`DOWN_DEPTH`] levels
//!   (or holds more than [`DOWN_DIRS`] directories to search: a tree too large to
//!   check is not written over either).
//!
//! A command that writes inside its own store (e.g. `collect` writing `stats/`) does
//! so through the store's own code, not through this guard; [`check_store_target`]
//! is the check for a path that is to *be* a store (a new one, or one to resume).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::{log_path, shards_dir, MANIFEST_FILE, UNFINISHED_FILE};

/// How many directory levels below an output directory are searched for stores.
pub const DOWN_DEPTH: usize = 4;
/// How many directories below an output directory are searched, at most (files are
/// passed over at no cost: a directory of a million gradient files is fine).
pub const DOWN_DIRS: usize = 10_000;

/// Whether `dir` is (what is left of) a gradshard store.
pub fn is_store_dir(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    if log_path(dir).is_file() || shards_dir(dir).is_dir() || dir.join(UNFINISHED_FILE).is_file() {
        return true;
    }
    let m = dir.join(MANIFEST_FILE);
    if !m.is_file() {
        return false;
    }
    // A manifest of a store names its store id near its top; 64 KiB is more than any
    // manifest's head. A manifest.json of something else (a web app, a dataset) does not.
    let mut head = Vec::new();
    match std::fs::File::open(&m) {
        Ok(f) => {
            let _ = f.take(64 << 10).read_to_end(&mut head);
        }
        // Unreadable: assume the worst.
        Err(_) => return true,
    }
    String::from_utf8_lossy(&head).contains("\"store_id\"")
}

/// `p` made absolute, with symlinks and `..` resolved: the nearest existing ancestor
/// is canonicalised, the rest (which does not exist) is appended lexically.
pub fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|source| Error::Io {
            path: PathBuf::from("."),
            source,
        })?;
        cwd.join(p)
    };
    let mut base = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let canon = loop {
        match base.canonicalize() {
            Ok(c) => break c,
            Err(_) => {
                let Some(name) = base.file_name().map(|n| n.to_os_string()) else {
                    // `..` or `.` at the end, or the root: take the parent lexically.
                    match base.components().next_back() {
                        Some(Component::ParentDir) | Some(Component::CurDir) => {
                            rest.push(
                                base.components()
                                    .next_back()
                                    .unwrap()
                                    .as_os_str()
                                    .to_os_string(),
                            );
                            if !base.pop() {
                                break PathBuf::from("/");
                            }
                            continue;
                        }
                        _ => break base.clone(),
                    }
                };
                rest.push(name);
                if !base.pop() {
                    break PathBuf::from("/");
                }
            }
        }
    };
    let mut out = canon;
    for c in rest.into_iter().rev() {
        if c == ".." {
            out.pop();
        } else if c != "." {
            out.push(c);
        }
    }
    Ok(out)
}

fn refused(flag: &str, path: &Path, why: String) -> Error {
    Error::Refused {
        path: path.to_path_buf(),
        why: format!("{flag}: {why}"),
    }
}

/// The store that `p` (resolved) is or lies in, if any: the nearest ancestor that is one.
pub fn enclosing_store(p: &Path) -> Option<PathBuf> {
    let mut a = Some(p);
    while let Some(d) = a {
        if is_store_dir(d) {
            return Some(d.to_path_buf());
        }
        a = d.parent();
    }
    None
}

/// A store inside the existing directory `dir` (not `dir` itself), searched
/// [`DOWN_DEPTH`] levels down without following symlinks. `Err(n)` when more than
/// [`DOWN_DIRS`] directories would have to be searched.
fn store_below(dir: &Path) -> std::result::Result<Option<PathBuf>, usize> {
    let mut level = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    for _ in 0..DOWN_DEPTH {
        let mut next = Vec::new();
        for d in &level {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(t) = e.file_type() else { continue };
                if t.is_dir() {
                    seen += 1;
                    if seen > DOWN_DIRS {
                        return Err(seen);
                    }
                    let p = e.path();
                    if is_store_dir(&p) {
                        return Ok(Some(p));
                    }
                    next.push(p);
                } else if t.is_symlink() {
                    // A link to a store inside the output would be followed by a writer
                    // that writes through it; a replacing writer removes only the link.
                    if let Ok(target) = e.path().canonicalize() {
                        if target.is_dir() && is_store_dir(&target) {
                            return Ok(Some(e.path()));
                        }
                    }
                }
            }
        }
        level = next;
    }
    Ok(None)
}

/// Checks an output path that a command writes (a file, or a directory it creates or
/// replaces): refuses one that is a store, lies inside a store, or is a directory
/// holding a store. `flag` names the option in the message (e.g. `--out`). Returns
/// the resolved path.
pub fn check_output(flag: &str, path: &Path) -> Result<PathBuf> {
    let r = resolve(path)?;
    if let Some(s) = enclosing_store(&r) {
        let why = if s == r {
            format!(
                "{} is a gradshard store; writing there would destroy it (choose a path outside every store)",
                s.display()
            )
        } else {
            format!(
                "{} lies inside the gradshard store {}; writing there would damage it (choose a path outside every store)",
                r.display(),
                s.display()
            )
        };
        return Err(refused(flag, path, why));
    }
    if r.is_dir() {
        match store_below(&r) {
            Ok(None) => {}
            Ok(Some(s)) => {
                return Err(refused(
                    flag,
                    path,
                    format!(
                        "{} holds the gradshard store {}; writing over it would destroy the store (choose a path outside every store)",
                        r.display(),
                        s.display()
                    ),
                ))
            }
            Err(n) => {
                return Err(refused(
                    flag,
                    path,
                    format!(
                        "{} holds more than {n} directories; it is not searched through for stores and not written over (choose a new or empty path)",
                        r.display()
                    ),
                ))
            }
        }
    }
    Ok(r)
}

/// Checks a path that is to be a store (created, or resumed when it is one): refuses
/// one inside another store, one that is an existing file, and a directory that is
/// not a store but holds one. Returns the resolved path.
pub fn check_store_target(flag: &str, path: &Path) -> Result<PathBuf> {
    let r = resolve(path)?;
    if r.exists() && !r.is_dir() {
        return Err(refused(
            flag,
            path,
            format!(
                "{} exists and is not a directory (a store is a directory)",
                r.display()
            ),
        ));
    }
    if let Some(parent) = r.parent() {
        if let Some(s) = enclosing_store(parent) {
            return Err(refused(
                flag,
                path,
                format!(
                    "{} lies inside the gradshard store {}; a store there would damage it (choose a path outside every store)",
                    r.display(),
                    s.display()
                ),
            ));
        }
    }
    if r.is_dir() && !is_store_dir(&r) {
        if let Ok(Some(s)) = store_below(&r) {
            return Err(refused(
                flag,
                path,
                format!(
                    "{} is not a store but holds the gradshard store {} (name that store, or a new directory)",
                    r.display(),
                    s.display()
                ),
            ));
        }
    }
    Ok(r)
}

/// Checks that `dir` names a store directory: an error that says what the path is
/// instead (missing, not a directory, a directory without a store) otherwise. A
/// directory with some of a store's files but no manifest is a (damaged) store and
/// passes.
pub fn require_store_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoStore {
            path: dir.to_path_buf(),
            why: crate::error::NoStoreWhy::Missing,
        }),
        Err(e) if e.raw_os_error() == Some(libc_enotdir()) => Err(Error::NoStore {
            path: dir.to_path_buf(),
            why: crate::error::NoStoreWhy::NotADirectory,
        }),
        Err(source) => Err(Error::Io {
            path: dir.to_path_buf(),
            source,
        }),
        Ok(m) if !m.is_dir() => Err(Error::NoStore {
            path: dir.to_path_buf(),
            why: crate::error::NoStoreWhy::NotADirectory,
        }),
        Ok(_) if !is_store_dir(dir) => Err(Error::NoStore {
            path: dir.to_path_buf(),
            why: crate::error::NoStoreWhy::NotAStore,
        }),
        Ok(_) => Ok(()),
    }
}

/// ENOTDIR (a path component is a file), without a libc dependency.
fn libc_enotdir() -> i32 {
    20
}

/// The holder of the writer lock of the store at `dir` (what its LOCK file says,
/// e.g. `pid 4242`), or `None` when no writer holds it. Does not create the lock file.
pub fn lock_holder(dir: &Path) -> Result<Option<String>> {
    let path = crate::lock_path(dir);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Io { path, source }),
    };
    match f.try_lock_shared() {
        Ok(()) => {
            let _ = f.unlock();
            Ok(None)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Ok(Some(if holder.trim().is_empty() {
                "an unknown process".into()
            } else {
                holder.trim().to_string()
            }))
        }
        Err(std::fs::TryLockError::Error(source)) => Err(Error::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_store(dir: &Path) {
        std::fs::create_dir_all(dir.join("shards")).unwrap();
        std::fs::write(dir.join("samples.log"), b"x").unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), br#"{"store_id": "00"}"#).unwrap();
    }

    #[test]
    fn resolves_dotdot_and_missing_tails() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("a")).unwrap();
        assert_eq!(resolve(&base.join("a/../b/c")).unwrap(), base.join("b/c"));
        assert_eq!(resolve(&base.join("a/x/../y")).unwrap(), base.join("a/y"));
        assert_eq!(resolve(&base.join("a/.")).unwrap(), base.join("a"));
    }

    #[test]
    fn refuses_store_inside_and_parent() {
        let t = tempfile::tempdir().unwrap();
        let st = t.path().join("proj/st");
        fake_store(&st);
        for p in [
            st.clone(),
            st.join("manifest.json"),
            st.join("shards"),
            st.join("shards/shard-000000.gss"),
            st.join("new/deeper"),
            t.path().join("proj"),
            t.path().to_path_buf(),
            st.join("shards/../../st"),
        ] {
            let e = check_output("--out", &p).unwrap_err();
            assert!(matches!(e, Error::Refused { .. }), "{p:?}: {e}");
        }
        check_output("--out", &t.path().join("proj/other")).unwrap();
        check_output("--out", &t.path().join("elsewhere/x.json")).unwrap();
    }

    #[test]
    fn symlinks_are_followed() {
        let t = tempfile::tempdir().unwrap();
        let st = t.path().join("st");
        fake_store(&st);
        std::os::unix::fs::symlink(&st, t.path().join("link")).unwrap();
        assert!(check_output("--out", &t.path().join("link/manifest.json")).is_err());
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&st, out.join("l")).unwrap();
        assert!(check_output("--out", &out).is_err());
    }

    #[test]
    fn store_targets() {
        let t = tempfile::tempdir().unwrap();
        let st = t.path().join("st");
        fake_store(&st);
        check_store_target("--store", &st).unwrap();
        check_store_target("--store", &t.path().join("new")).unwrap();
        assert!(check_store_target("--store", &st.join("shards")).is_err());
        assert!(check_store_target("--store", t.path()).is_err());
    }

    #[test]
    fn what_a_store_path_is() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("file");
        std::fs::write(&f, "x").unwrap();
        let why = |p: &Path| match require_store_dir(p) {
            Err(Error::NoStore { why, .. }) => Some(why),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        };
        use crate::error::NoStoreWhy::*;
        assert_eq!(why(&t.path().join("nope")), Some(Missing));
        assert_eq!(why(&f), Some(NotADirectory));
        assert_eq!(why(&f.join("x")), Some(NotADirectory));
        assert_eq!(why(t.path()), Some(NotAStore));
        fake_store(&t.path().join("s"));
        assert_eq!(why(&t.path().join("s")), None);
    }
}
