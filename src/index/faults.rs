//! Where the index's own I/O can be made to fail, so that tests can check what a client hears
//! and what is on disk afterwards. The index asks its `Faults` before each of these steps; the
//! default answers yes to all of them.

use std::io;

/// A step of the index's I/O that a test can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Writing a record to the log.
    LogWrite,
    /// fdatasync of the log after a record.
    LogSync,
    /// Writing a snapshot's files.
    SnapshotWrite,
    /// Renaming a finished snapshot into place.
    SnapshotRename,
}

/// Decides whether a step of the index's I/O fails (an `Err` stands for the step's own error).
pub trait Faults: Send + Sync + 'static {
    fn check(&self, point: FaultPoint) -> io::Result<()>;
}

/// Fails nothing: what every index uses unless a test says otherwise.
pub struct NoFaults;

impl Faults for NoFaults {
    fn check(&self, _: FaultPoint) -> io::Result<()> {
        Ok(())
    }
}
