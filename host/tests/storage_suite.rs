//! openraft's storage conformance suite against the fjall log store and
//! state machine.

use flagstone::raft::{LogStore, StateMachineStore, StorageError, TypeConfig, open_storage};
use openraft::testing::{StoreBuilder, Suite};

struct FjallBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for FjallBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open_storage(dir.path()).expect("open storage");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(FjallBuilder).expect("storage suite");
}
