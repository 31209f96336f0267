//! The threads that run the sled store's calls ([`CallPool`]).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use crate::store::StoreError;

/// The most threads a pool starts, whatever the core count.
const MAX_THREADS: usize = 8;

type Call = Box<dyn FnOnce() + Send>;

/// A fixed set of threads, one per core (at least two, at most [`MAX_THREADS`]), that run the
/// store's sled calls in place of tokio's blocking pool.
///
/// tokio's pool starts a thread whenever a call finds none idle and lets it go after ten idle
/// seconds, so under bursts of writes sled's allocations spread over dozens of threads, and
/// glibc's malloc keeps an arena per thread with what each freed: a server that had just
/// created 100,000 entries held 666-686 MiB with tokio's pool and 375 MiB with this one on two
/// cores, with the entries created no slower (BENCHMARKS.md). A slow call elsewhere in the
/// server (a hardware token's signature on the blocking pool) also never delays the store's.
///
/// Calls run in the order they came. A call whose caller has gone (its future dropped, as a
/// timeout does) before a thread takes it is not run. The threads stop once the pool is
/// dropped and the calls queued before have been taken.
pub(super) struct CallPool {
    calls: Sender<Call>,
}

impl CallPool {
    /// Starts one thread per core (clamped to 2 ..= [`MAX_THREADS`]).
    pub(super) fn start() -> Result<Self, StoreError> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self::with_threads(cores.clamp(2, MAX_THREADS))
    }

    /// Starts `threads` threads (at least one).
    pub(super) fn with_threads(threads: usize) -> Result<Self, StoreError> {
        let (calls, receiver) = channel::<Call>();
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads.max(1) {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("sigil-store-{n}"))
                .spawn(move || serve(&receiver))?;
        }
        Ok(Self { calls })
    }

    /// Runs `f` on one of the pool's threads and returns its result; a call that panicked is
    /// an error (the thread goes on with the next call).
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let call: Call = Box::new(move || {
            if done.is_closed() {
                return;
            }
            // `f` and what it holds are dropped before the caller is woken.
            let _ = done.send(catch_unwind(AssertUnwindSafe(f)));
        });
        self.calls.send(call).map_err(|_| StoreError::Closed)?;
        match result.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(StoreError::Io(std::io::Error::other(format!(
                "a store call panicked: {}",
                panic_message(&*panic)
            )))),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

/// The message of a panic's payload, as `panic!` gives it.
pub(super) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// One thread's loop: the next call, until the pool is gone.
fn serve(receiver: &Mutex<Receiver<Call>>) {
    loop {
        // The lock is held only while waiting for a call, not while running it.
        let call = receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        match call {
            Ok(call) => call(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_run_on_the_pools_threads_and_a_panic_is_an_error() {
        let pool = Arc::new(CallPool::with_threads(2).unwrap());
        let calls = (0..64).map(|n| {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                pool.run(move || {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    (n, std::thread::current().name().map(str::to_owned))
                })
                .await
            })
        });
        let mut threads = HashSet::new();
        for (n, call) in calls.enumerate() {
            let (echo, name) = call.await.unwrap().unwrap();
            assert_eq!(echo, n);
            threads.insert(name.unwrap());
        }
        assert!(!threads.is_empty() && threads.len() <= 2, "{threads:?}");
        assert!(threads.iter().all(|t| t.starts_with("sigil-store-")));

        let error = pool
            .run(|| -> u8 { panic!("boom in a store call") })
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("boom in a store call"),
            "{error}"
        );
        // Both threads still serve: two calls that can only end together.
        let meet = Arc::new(std::sync::Barrier::new(2));
        let call = |meet: Arc<std::sync::Barrier>| pool.run(move || meet.wait().is_leader());
        let both = async { tokio::join!(call(Arc::clone(&meet)), call(Arc::clone(&meet))) };
        let (a, b) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("two threads serve at once");
        assert_ne!(a.unwrap(), b.unwrap(), "one of the two leads");
    }

    /// A call whose caller gave up before a thread was free for it is never run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_whose_caller_is_gone_is_not_run() {
        let pool = Arc::new(CallPool::with_threads(1).unwrap());
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let busy = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move {
                pool.run(move || {
                    let _ = started.send(());
                    let _ = held.recv();
                })
                .await
            }
        });
        running.await.unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        // Queued behind the busy call, then given up on.
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            pool.run(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)),
        )
        .await;
        assert!(gave_up.is_err());
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        // A later call runs after it would have: the given-up call was skipped.
        assert_eq!(pool.run(|| 5).await.unwrap(), 5);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// The threads end when the pool is dropped (their receiver sees the sender gone).
    #[test]
    fn the_threads_stop_with_the_pool() {
        let (sender, receiver) = channel::<Call>();
        let receiver = Arc::new(Mutex::new(receiver));
        let thread = std::thread::spawn({
            let receiver = Arc::clone(&receiver);
            move || serve(&receiver)
        });
        let (ran, check) = std::sync::mpsc::channel();
        sender
            .send(Box::new(move || ran.send(()).unwrap()))
            .unwrap();
        check.recv().unwrap();
        drop(sender);
        thread.join().unwrap();
    }
}
