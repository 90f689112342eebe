//! What a caller (a guest's FUSE session) holds of a client, saved with a
//! VM snapshot and put back into a new client, on a new connection,
//! usually in another process.
//!
//! Saved: the inode numbers the caller was given, each with its parent,
//! its name and its lookup count, with every inode above them (their
//! paths); and its open files (handle, inode, open flags). Nothing the
//! server gave out is saved: node ids and server handles belong to one
//! connection. A restored inode is looked up again by path on first use,
//! and a restored file is opened again on the server on first use, as
//! after a reconnect; inode numbers and file handles keep their values.
//! An inode that its name no longer meant when it was saved (unlinked or
//! replaced while held) comes back detached: using it gives ESTALE. A file
//! deleted on the server meanwhile gives its caller ENOENT when it is
//! used, not the restore an error.
//!
//! A state comes from a file: every count, number and name is checked
//! before anything is built from it, and a bad one is an error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::files::OpenFile;
use super::{Fs, Inode, Inodes, ROOT_INO, lock};

/// Inodes a saved state may hold: far more than a guest holds (each costs
/// the guest kernel an inode too), and a bound on the work of a restore.
pub const MAX_SAVED_INODES: usize = 1 << 22;

/// The longest name a saved inode may have (as a FUSE request's).
pub const MAX_SAVED_NAME: usize = 4096;

/// One inode the caller holds, or one above those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeState {
    pub ino: u64,
    /// The directory it is in (the root's is the root).
    pub parent: u64,
    /// Its name there (empty for the root, and possibly for a detached
    /// inode).
    pub name: Vec<u8>,
    /// References the caller holds (FUSE lookup count).
    pub lookups: u64,
    /// Its name meant another file or none when saved: it cannot be found
    /// again.
    pub detached: bool,
}

/// One open file of the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub fh: u64,
    pub ino: u64,
    /// The flags it was opened with (reopened without O_CREAT, O_EXCL and
    /// O_TRUNC).
    pub flags: u32,
}

/// What [`Fs::save_state`] saves and [`Fs::restore_state`] puts back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// By inode number, the root first.
    pub inodes: Vec<InodeState>,
    /// By handle.
    pub files: Vec<FileState>,
    /// The next inode number and file handle to give out.
    pub next_ino: u64,
    pub next_fh: u64,
}

/// Why a saved state cannot be put back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the saved state holds {found} {what}, more than the {max} allowed")]
    TooMany {
        what: &'static str,
        found: usize,
        max: usize,
    },
    #[error("saved inode number {0} is not a valid one")]
    BadIno(u64),
    #[error("saved inode {0} appears twice")]
    DuplicateIno(u64),
    #[error("saved inode {ino} has a name of {len} bytes that is not a file name")]
    BadName { ino: u64, len: usize },
    #[error("the saved root inode has a parent or a name")]
    BadRoot,
    #[error("saved inodes {0} and {1} have the same name in the same directory")]
    DuplicateName(u64, u64),
    #[error("saved inode {ino} is in directory {parent}, which is not saved")]
    NoParent { ino: u64, parent: u64 },
    #[error("saved inode {0} is not below the root (its parents form a loop)")]
    Loop(u64),
    #[error("saved file handle {0} is not a valid one")]
    BadHandle(u64),
    #[error("saved file handle {0} appears twice")]
    DuplicateHandle(u64),
    #[error("saved file handle {fh} is open on inode {ino}, which is not saved")]
    FileInode { fh: u64, ino: u64 },
    #[error("the client already has {0} open files: restore into a new one")]
    InUse(usize),
}

/// Whether `name` can be a name in a directory.
fn is_file_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SAVED_NAME
        && name != b"."
        && name != b".."
        && !name.iter().any(|&c| c == b'/' || c == 0)
}

/// Checks that every inode of `state` is a valid, unique number with a
/// valid name, in a saved directory, below the root; returns the saved
/// inodes by number.
fn check_inodes(state: &FsState) -> Result<HashMap<u64, &InodeState>, StateError> {
    if state.inodes.len() > MAX_SAVED_INODES {
        return Err(StateError::TooMany {
            what: "inodes",
            found: state.inodes.len(),
            max: MAX_SAVED_INODES,
        });
    }
    let mut by_ino = HashMap::with_capacity(state.inodes.len());
    let mut names = HashMap::new();
    for i in &state.inodes {
        if i.ino == 0 || i.ino == u64::MAX {
            return Err(StateError::BadIno(i.ino));
        }
        if by_ino.insert(i.ino, i).is_some() {
            return Err(StateError::DuplicateIno(i.ino));
        }
        if i.ino == ROOT_INO {
            if i.parent != ROOT_INO || !i.name.is_empty() || i.detached {
                return Err(StateError::BadRoot);
            }
            continue;
        }
        if !(is_file_name(&i.name) || i.detached && i.name.is_empty()) {
            return Err(StateError::BadName {
                ino: i.ino,
                len: i.name.len(),
            });
        }
        if !i.detached
            && let Some(other) = names.insert((i.parent, i.name.as_slice()), i.ino)
        {
            return Err(StateError::DuplicateName(other, i.ino));
        }
    }
    // Every inode reaches the root through saved directories. Each walk
    // stops at an inode already known to reach it, so all walks together
    // take one step per inode; a walk longer than there are inodes is a
    // loop.
    let mut below_root: HashSet<u64> = HashSet::with_capacity(by_ino.len());
    below_root.insert(ROOT_INO);
    let mut path = Vec::new();
    for &start in by_ino.keys() {
        path.clear();
        let mut at = start;
        while !below_root.contains(&at) {
            if path.len() > by_ino.len() {
                return Err(StateError::Loop(start));
            }
            path.push(at);
            let i = by_ino[&at];
            if i.parent != ROOT_INO && !by_ino.contains_key(&i.parent) {
                return Err(StateError::NoParent {
                    ino: at,
                    parent: i.parent,
                });
            }
            at = i.parent;
        }
        below_root.extend(path.iter().copied());
    }
    Ok(by_ino)
}

impl Fs {
    /// What the caller holds (see the module's documentation): the inodes
    /// with a lookup count, the open files (those in `files` only, if
    /// given), and the inodes above them. Take it while no call runs.
    pub fn save_state(&self, files: Option<&HashSet<u64>>) -> FsState {
        let mut saved_files: Vec<FileState> = lock(&self.files)
            .iter()
            .filter(|(fh, _)| files.is_none_or(|only| only.contains(fh)))
            .map(|(&fh, f)| FileState {
                fh,
                ino: f.ino,
                flags: f.flags,
            })
            .collect();
        saved_files.sort_unstable_by_key(|f| f.fh);
        let t = lock(&self.inodes);
        // A file always holds its inode; one whose inode is gone could not
        // be used anyway.
        saved_files.retain(|f| t.map.contains_key(&f.ino));
        let mut keep: HashSet<u64> = HashSet::new();
        let mut todo: Vec<u64> = t
            .map
            .iter()
            .filter(|(_, i)| i.lookups > 0)
            .map(|(&ino, _)| ino)
            .chain(saved_files.iter().map(|f| f.ino))
            .chain([ROOT_INO])
            .collect();
        while let Some(ino) = todo.pop() {
            if !keep.insert(ino) {
                continue;
            }
            if ino != ROOT_INO
                && let Some(i) = t.map.get(&ino)
            {
                todo.push(i.parent);
            }
        }
        let mut inodes: Vec<InodeState> = keep
            .into_iter()
            .filter_map(|ino| {
                let i = t.map.get(&ino)?;
                let named =
                    ino == ROOT_INO || t.names.get(&(i.parent, i.name.clone())) == Some(&ino);
                Some(InodeState {
                    ino,
                    parent: i.parent,
                    name: i.name.clone(),
                    lookups: i.lookups,
                    detached: !named,
                })
            })
            .collect();
        inodes.sort_unstable_by_key(|i| i.ino);
        FsState {
            inodes,
            files: saved_files,
            next_ino: t.next,
            next_fh: self.next_fh.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Puts back what [`Fs::save_state`] saved, into a client that has no
    /// open files yet: its inode table is replaced by the saved one, and
    /// the files come back with their handles, opened on the server on
    /// first use. Returns the restored file handles. Nothing changes if
    /// the state is refused.
    pub fn restore_state(&self, state: FsState) -> Result<HashSet<u64>, StateError> {
        let by_ino = check_inodes(&state)?;
        let max_files = self.opts.max_open_files;
        if state.files.len() > max_files {
            return Err(StateError::TooMany {
                what: "open files",
                found: state.files.len(),
                max: max_files,
            });
        }
        let mut fhs = HashSet::with_capacity(state.files.len());
        for f in &state.files {
            if f.fh == 0 || f.fh == u64::MAX {
                return Err(StateError::BadHandle(f.fh));
            }
            if !fhs.insert(f.fh) {
                return Err(StateError::DuplicateHandle(f.fh));
            }
            if f.ino != ROOT_INO && !by_ino.contains_key(&f.ino) {
                return Err(StateError::FileInode {
                    fh: f.fh,
                    ino: f.ino,
                });
            }
        }
        let mut files = lock(&self.files);
        if !files.is_empty() {
            return Err(StateError::InUse(files.len()));
        }
        if !self.open_files.try_take_n(state.files.len()) {
            return Err(StateError::InUse(self.open_files.used()));
        }

        let mut t = Inodes::new(&self.opts);
        let mut max_ino = ROOT_INO;
        for i in &state.inodes {
            max_ino = max_ino.max(i.ino);
            if i.ino == ROOT_INO {
                if let Some(root) = t.map.get_mut(&ROOT_INO) {
                    root.lookups = i.lookups;
                }
                continue;
            }
            t.clock += 1;
            t.map.insert(
                i.ino,
                Inode {
                    parent: i.parent,
                    // No name: it cannot be looked up again (ESTALE).
                    name: if i.detached {
                        Vec::new()
                    } else {
                        i.name.clone()
                    },
                    node: None,
                    attr: None,
                    listing: None,
                    lookups: i.lookups,
                    children: 0,
                    opens: 0,
                    used: t.clock,
                },
            );
            if !i.detached {
                t.names.insert((i.parent, i.name.clone()), i.ino);
            }
        }
        for i in &state.inodes {
            if i.ino != ROOT_INO
                && let Some(p) = t.map.get_mut(&i.parent)
            {
                p.children += 1;
            }
        }
        let mut max_fh = 0;
        for f in &state.files {
            max_fh = max_fh.max(f.fh);
            if let Some(i) = t.map.get_mut(&f.ino) {
                i.opens += 1;
            }
            files.insert(f.fh, Arc::new(OpenFile::unopened(f.ino, f.flags)));
        }
        for i in &state.inodes {
            t.settle(i.ino);
        }
        t.trim();
        t.next = state.next_ino.max(max_ino + 1);
        *lock(&self.inodes) = t;
        self.next_fh.store(
            state.next_fh.max(max_fh + 1),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(fhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(ino: u64, parent: u64, name: &str) -> InodeState {
        InodeState {
            ino,
            parent,
            name: name.as_bytes().to_vec(),
            lookups: 1,
            detached: false,
        }
    }

    fn state(inodes: Vec<InodeState>) -> FsState {
        FsState {
            inodes,
            ..FsState::default()
        }
    }

    #[test]
    fn paths_must_reach_the_root_through_saved_directories() {
        let ok = state(vec![inode(2, 1, "d"), inode(3, 2, "f"), inode(4, 3, "g")]);
        assert!(check_inodes(&ok).is_ok());
        let lost = state(vec![inode(3, 2, "f")]);
        assert_eq!(
            check_inodes(&lost).unwrap_err(),
            StateError::NoParent { ino: 3, parent: 2 }
        );
        let looped = state(vec![inode(2, 3, "a"), inode(3, 2, "b")]);
        assert!(matches!(
            check_inodes(&looped).unwrap_err(),
            StateError::Loop(_)
        ));
        let self_parent = state(vec![inode(2, 2, "a")]);
        assert_eq!(check_inodes(&self_parent).unwrap_err(), StateError::Loop(2));
    }

    #[test]
    fn names_numbers_and_the_root_are_checked() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            let s = state(vec![inode(2, 1, bad)]);
            assert!(
                matches!(check_inodes(&s), Err(StateError::BadName { .. })),
                "{bad:?}"
            );
        }
        let long = "x".repeat(MAX_SAVED_NAME + 1);
        assert!(matches!(
            check_inodes(&state(vec![inode(2, 1, &long)])),
            Err(StateError::BadName { .. })
        ));
        for ino in [0, u64::MAX] {
            assert_eq!(
                check_inodes(&state(vec![inode(ino, 1, "a")])).unwrap_err(),
                StateError::BadIno(ino)
            );
        }
        assert_eq!(
            check_inodes(&state(vec![inode(2, 1, "a"), inode(2, 1, "b")])).unwrap_err(),
            StateError::DuplicateIno(2)
        );
        assert_eq!(
            check_inodes(&state(vec![inode(2, 1, "a"), inode(3, 1, "a")])).unwrap_err(),
            StateError::DuplicateName(2, 3)
        );
        // A detached inode keeps its old name, which another may have now,
        // or none.
        let mut old = inode(2, 1, "a");
        old.detached = true;
        assert!(check_inodes(&state(vec![old.clone(), inode(3, 1, "a")])).is_ok());
        old.name.clear();
        assert!(check_inodes(&state(vec![old.clone()])).is_ok());
        old.detached = false;
        assert!(matches!(
            check_inodes(&state(vec![old])),
            Err(StateError::BadName { ino: 2, len: 0 })
        ));
        assert_eq!(
            check_inodes(&state(vec![inode(1, 1, "r")])).unwrap_err(),
            StateError::BadRoot
        );
    }
}
