//! The agent's records: one redb database in the state dir, a table of
//! VM records (id -> JSON) and one of snapshots (dir -> JSON). Every
//! write commits (and syncs) before the caller acts on it, so that a
//! SIGKILL at any moment leaves records the next start can reconcile.

use super::model::{SnapshotRecord, VmRecord};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the records database failed")]
    Db(#[from] redb::Error),
    #[error("a record cannot be read: {0}")]
    Decode(#[from] serde_json::Error),
}

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        StoreError::Db(e.into())
    }
}
impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        StoreError::Db(e.into())
    }
}

/// The records database (one writer at a time; redb locks the file, so a
/// second agent on the same state dir is refused).
pub struct Store {
    db: redb::Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = redb::Database::create(path)?;
        // Create the tables so that readers find them.
        let txn = db.begin_write()?;
        txn.open_table(VMS)?;
        txn.open_table(SNAPSHOTS)?;
        txn.commit()?;
        Ok(Store { db })
    }

    /// Writes (or replaces) a VM's record, durably.
    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(vm)?;
        let txn = self.db.begin_write()?;
        txn.open_table(VMS)?
            .insert(vm.id.as_str(), bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VMS)?;
        Ok(match table.get(id)? {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    pub fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(VMS)?.remove(id)?;
        txn.commit()?;
        Ok(())
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VMS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    pub fn put_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(s)?;
        let key = s.dir.to_string_lossy();
        let txn = self.db.begin_write()?;
        txn.open_table(SNAPSHOTS)?
            .insert(key.as_ref(), bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn delete_snapshot(&self, dir: &Path) -> Result<(), StoreError> {
        let key = dir.to_string_lossy();
        let txn = self.db.begin_write()?;
        txn.open_table(SNAPSHOTS)?.remove(key.as_ref())?;
        txn.commit()?;
        Ok(())
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    pub fn get_snapshot(&self, dir: &Path) -> Result<Option<SnapshotRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let key = dir.to_string_lossy();
        Ok(match table.get(key.as_ref())? {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::model::{Restart, VmConfig, VmState};

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let vm = VmRecord::new(
            "vm-1".into(),
            "a".into(),
            VmConfig::default(),
            Restart::Never,
            dir.path(),
        );
        {
            let store = Store::open(&path).unwrap();
            store.put_vm(&vm).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let got = store.get_vm("vm-1").unwrap().unwrap();
        assert_eq!(got.tenant, "a");
        assert_eq!(got.state, VmState::Created);
        assert_eq!(store.vms().unwrap().len(), 1);
        store.delete_vm("vm-1").unwrap();
        assert!(store.get_vm("vm-1").unwrap().is_none());
    }
}
