//! DESIGN §2.6: the heartbeat is independent of processing. A processor that blocks its
//! runtime's only thread (synchronous work, blocking I/O) for twice the lease duration must not
//! cost its worker the lease: a peer on another thread watches the lease the whole time and
//! must never find it expired.
//!
//! Run with: `cargo test -p kcl --features testkit --test worker_heartbeat`
#![cfg(feature = "testkit")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl::testkit::{MemBackends, NoopProcessor};
use kcl::{
    async_trait, Checkpointer, Heartbeat, ProcessorError, RecordBatch, RecordProcessor, Worker,
};

const LEASE: Duration = Duration::from_millis(1500);

#[derive(Default)]
struct Seen {
    records: Mutex<Vec<Vec<u8>>>,
    lost: AtomicUsize,
}

/// Blocks the thread (not the task: the whole runtime) for 2 × the lease on its first batch.
struct Blocking(Arc<Seen>);

#[async_trait]
impl RecordProcessor for Blocking {
    async fn process_records(
        &mut self,
        batch: &RecordBatch,
        cp: &mut Checkpointer,
    ) -> Result<(), ProcessorError> {
        let first = {
            let mut seen = self.0.records.lock().expect("not poisoned");
            let first = seen.is_empty();
            seen.extend(batch.records.iter().map(|r| r.data.to_vec()));
            first
        };
        if first {
            std::thread::sleep(LEASE * 2);
        }
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }

    async fn lease_lost(&mut self) {
        self.0.lost.fetch_add(1, Ordering::Relaxed);
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), ProcessorError> {
        cp.checkpoint().await.map_err(ProcessorError::retryable)
    }
}

fn blocked_worker_keeps_its_lease(heartbeat: Heartbeat) -> (usize, usize, Option<String>) {
    let backends = MemBackends::new();
    backends.kinesis().create_stream("orders", 1);
    for i in 0..10 {
        backends.kinesis().put("orders", "k", format!("{i}"));
    }
    let seen = Arc::new(Seen::default());
    let build = |id: &str, seen: Option<Arc<Seen>>| {
        let b = Worker::builder()
            .application_name("heartbeat-app")
            .stream("orders")
            .worker_id(id)
            .backends(backends.clone())
            .lease_duration(LEASE)
            .taker_interval(Duration::from_millis(100))
            .heartbeat(heartbeat);
        match seen {
            Some(seen) => b.processor(move || Blocking(seen.clone())).build(),
            None => b.processor(|| NoopProcessor).build(),
        }
        .expect("valid config")
    };

    // The blocked worker, alone on a current-thread runtime of its own.
    let blocked = build("blocked", Some(seen.clone()));
    let stop_blocked = blocked.shutdown_handle();
    let blocked_thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(blocked.run())
    });
    // The peer, on another runtime, joins once the lease is held and the processor is stuck.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let owner = rt.block_on(async {
        while seen.records.lock().expect("not poisoned").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let peer = build("peer", None);
        let stop_peer = peer.shutdown_handle();
        let peer_run = tokio::spawn(peer.run());
        // The processor is blocked for 2 × the lease; the peer looks the whole time.
        tokio::time::sleep(LEASE * 2 + Duration::from_millis(500)).await;
        let owner = backends.leases().leases()[0]
            .owner
            .as_ref()
            .map(|o| o.to_string());
        stop_peer.shutdown();
        peer_run.await.expect("peer").expect("peer run");
        owner
    });
    stop_blocked.shutdown();
    blocked_thread.join().expect("no panic").expect("run");
    let delivered = seen.records.lock().expect("not poisoned").len();
    (seen.lost.load(Ordering::Relaxed), delivered, owner)
}

#[test]
fn a_processor_blocking_its_runtime_does_not_lose_the_lease() {
    let (lost, delivered, owner) = blocked_worker_keeps_its_lease(Heartbeat::Thread);
    assert_eq!(owner.as_deref(), Some("blocked"), "the peer took the lease");
    assert_eq!(lost, 0, "lease_lost called");
    assert_eq!(delivered, 10, "every record once, none again");
}

/// The same on the caller's runtime: the blocked thread starves the heartbeat and the peer
/// takes the lease. (Shows the test above can fail.)
#[test]
fn on_the_blocked_runtime_the_heartbeat_starves() {
    let (lost, _, owner) = blocked_worker_keeps_its_lease(Heartbeat::Task);
    assert!(
        owner.as_deref() == Some("peer") || lost > 0,
        "expected the lease to be lost: owner {owner:?}, lost {lost}"
    );
}
