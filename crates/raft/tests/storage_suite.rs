//! openraft's storage conformance suite against our RocksDB log store and state machine.
//! Every case gets a fresh database, and its group lives on a non-zero shard of a database
//! that other shards also write to, so isolation between groups is exercised too.

use coalesce_raft::{LogStore, ShardStateMachine, TypeConfig};
use coalesce_storage::{NodeDb, ShardStore, StorageOptions};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, ShardStateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, ShardStateMachine), StorageError<TypeConfig>> {
        let io = |e: std::io::Error| {
            StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, e)
        };
        let dir = tempfile::tempdir().map_err(io)?;
        let db = NodeDb::open(dir.path(), &StorageOptions::default()).map_err(|e| io(e.into()))?;
        // A neighbour shard with rows of its own, which the suite must never see.
        let neighbour = ShardStore::new(db.clone(), 8);
        neighbour
            .log_append([(0, b"not yours".to_vec()), (1, b"nor this".to_vec())], Box::new(|_| {}))
            .map_err(|e| io(e.into()))?;
        let store = ShardStore::new(db, 7);
        let sm = ShardStateMachine::open(store.clone()).map_err(|e| io(e.into()))?;
        Ok((dir, LogStore::new(store), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await?;
    Ok(())
}
