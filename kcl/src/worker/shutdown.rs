//! Graceful shutdown.

use tokio_util::sync::CancellationToken;

/// Stops a [`crate::Worker`] gracefully: it stops taking leases, lets every processor run
/// `shutdown_requested` (where it may checkpoint), releases its leases in the table so other
/// workers take them at once, and then `run()` returns. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    token: CancellationToken,
}

impl ShutdownHandle {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self { token }
    }

    /// Asks the worker to stop. Returns at once; await `run()` to know when it stopped.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// True once shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        self.token.is_cancelled()
    }
}
