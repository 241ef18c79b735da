//! Exit codes: one table for every command (docs/errors.md). A failure's code comes
//! from the type of its error (store, collect, export, I/O) or from a [`Categorized`]
//! error a command raises itself.

use gradshard_store::NoStoreWhy;

/// Anything not listed below (a bad input file, an unsupported model, an I/O error).
pub const FAILURE: u8 = 1;
/// Damage found in a store (`verify`, or a store that cannot be read because a
/// manifest, log, shard or statistics file is damaged or missing); `salvage` mends it.
pub const DAMAGE: u8 = 2;
/// Does not fit: not enough disk space (`plan`, a full disk) or memory.
pub const NO_FIT: u8 = 3;
/// A named path does not exist.
pub const NOT_FOUND: u8 = 4;
/// A path exists but is the wrong kind: a file where a directory (a store) is
/// wanted, or a directory that is not a store.
pub const NOT_A_STORE: u8 = 5;
/// Refused to write: the path is, lies in or holds a store, or is an existing output
/// that is not replaced (no `--overwrite`, or not a previous score output).
pub const REFUSED: u8 = 6;
/// A store is locked by a writer that is still running.
pub const BUSY: u8 = 7;
/// Bad arguments (the message comes from the argument parser, before any I/O).
pub const USAGE: u8 = 64;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Failure,
    Damage,
    NoFit,
    NotFound,
    NotAStore,
    Refused,
    Busy,
}

impl Category {
    pub fn code(self) -> u8 {
        match self {
            Category::Failure => FAILURE,
            Category::Damage => DAMAGE,
            Category::NoFit => NO_FIT,
            Category::NotFound => NOT_FOUND,
            Category::NotAStore => NOT_A_STORE,
            Category::Refused => REFUSED,
            Category::Busy => BUSY,
        }
    }
}

/// An error a command raises with its category.
#[derive(Debug)]
pub struct Categorized {
    pub category: Category,
    pub message: String,
}

impl std::fmt::Display for Categorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Categorized {}

/// An error of `category` saying `message`.
pub fn fail(category: Category, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Categorized {
        category,
        message: message.into(),
    })
}

fn io(e: &std::io::Error) -> Category {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => Category::NotFound,
        K::NotADirectory => Category::NotAStore,
        K::StorageFull | K::QuotaExceeded | K::OutOfMemory | K::FileTooLarge => Category::NoFit,
        _ => Category::Failure,
    }
}

fn store(e: &gradshard_store::Error) -> Category {
    use gradshard_store::Error as E;
    match e {
        E::NoStore { why, .. } => match why {
            NoStoreWhy::Missing => Category::NotFound,
            _ => Category::NotAStore,
        },
        E::Refused { .. } => Category::Refused,
        E::Locked { .. } => Category::Busy,
        E::Manifest { .. }
        | E::Corrupt { .. }
        | E::Format { .. }
        | E::Stats { .. }
        | E::StatsWithoutChecksum { .. } => Category::Damage,
        E::Io { source, .. } => io(source),
        E::Input { what, .. } if what == "no such store directory" => Category::NotFound,
        E::Input { what, .. } if what.contains("store is unfinished") => Category::Damage,
        _ => Category::Failure,
    }
}

fn one(c: &(dyn std::error::Error + 'static)) -> Category {
    if let Some(x) = c.downcast_ref::<Categorized>() {
        return x.category;
    }
    if let Some(x) = c.downcast_ref::<gradshard_store::Error>() {
        return store(x);
    }
    if let Some(x) = c.downcast_ref::<gradshard_collect::Error>() {
        use gradshard_collect::Error as E;
        return match x {
            E::Store(s) => store(s),
            E::Io { source, .. } => io(source),
            _ => Category::Failure,
        };
    }
    if let Some(x) = c.downcast_ref::<gradshard_export::Error>() {
        return match x {
            gradshard_export::Error::OutputExists(_) => Category::Refused,
            gradshard_export::Error::NotAScoreOutput { .. } => Category::Refused,
            gradshard_export::Error::Io { source, .. } => io(source),
            _ => Category::Failure,
        };
    }
    if let Some(x) = c.downcast_ref::<std::io::Error>() {
        return io(x);
    }
    Category::Failure
}

/// The category of an error: that of the first cause in its chain that has one.
pub fn classify(e: &anyhow::Error) -> Category {
    e.chain()
        .map(one)
        .find(|c| *c != Category::Failure)
        .unwrap_or(Category::Failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let mut c = [
            FAILURE,
            DAMAGE,
            NO_FIT,
            NOT_FOUND,
            NOT_A_STORE,
            REFUSED,
            BUSY,
            USAGE,
        ];
        c.sort();
        assert!(c.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn store_errors_through_context_and_collect() {
        let e = anyhow::Error::new(gradshard_store::Error::NoStore {
            path: "x".into(),
            why: NoStoreWhy::NotADirectory,
        })
        .context("inspect x");
        assert_eq!(classify(&e), Category::NotAStore);
        let e = anyhow::Error::new(gradshard_collect::Error::from(
            gradshard_store::Error::Refused {
                path: "x".into(),
                why: "y".into(),
            },
        ));
        assert_eq!(classify(&e), Category::Refused);
        let e = fail(Category::Busy, "locked").context("merge");
        assert_eq!(classify(&e).code(), BUSY);
        assert_eq!(classify(&anyhow::anyhow!("other")), Category::Failure);
    }
}
