//! [`WhenWoken`]: a future polled only when it has asked to be.
//!
//! A connection's task is woken for every read and write of its socket, and on each
//! wake-up it used to poll its watchdog's timer and its graceful-shutdown signal too,
//! though neither had anything to say: about 550 instructions of a replay's 45,000
//! (`bench/instructions.sh`). Wrapped in `WhenWoken`, each is polled on the wake-ups it
//! caused itself, and otherwise costs a flag check.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// Polls `F` only on its first poll and after `F` has woken its waker; answers
    /// `Pending` without polling it otherwise.
    ///
    /// `F` is given a waker of its own, which marks it woken and then wakes the task
    /// that polls this future.
    ///
    /// **Invariant (no lost wake-up):** `poll` registers the task's waker *before* it
    /// reads and clears the mark. A wake-up of `F` that comes before that read is seen
    /// by it, so `F` is polled now; one that comes after it sets the mark again and
    /// wakes the registered waker, so the task polls again and `F` with it. A future only
    /// has to be polled after it has woken its waker, so skipping the other polls changes
    /// nothing it can observe.
    pub(crate) struct WhenWoken<F> {
        #[pin]
        inner: F,
        mark: Arc<Mark>,
        waker: Waker,
    }
}

/// Whether the inner future has woken since it was last polled, and whom to tell.
struct Mark {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release: pairs with the Acquire of the `swap` in `poll`, so what the waker's
        // caller did before waking is seen by the poll it causes.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    /// Wraps `inner`; its first poll goes through.
    pub(crate) fn new(inner: F) -> Self {
        let mark = Arc::new(Mark { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        let waker = Waker::from(Arc::clone(&mark));
        Self { inner, mark, waker }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered first: see the invariant above.
        this.mark.task.register(cx.waker());
        if !this.mark.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::WhenWoken;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_timer_fires_through_it_while_other_wake_ups_come_and_go() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let mut sleep = std::pin::pin!(WhenWoken::new(tokio::time::sleep(Duration::from_secs(5))));
        let sender = tokio::spawn(async move {
            for i in 0.. {
                if tx.send(i).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        // The task is woken by every message; the timer, only once, at 5 s.
        let mut received = 0;
        loop {
            tokio::select! {
                biased;
                () = &mut sleep => break,
                Some(_) = rx.recv() => {
                    received += 1;
                    assert!(received < 1_000, "the timer never fired");
                }
            }
        }
        drop(rx);
        let _ = sender.await;
        assert!((49..=51).contains(&received), "the timer fired after {received} messages, not at 5 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_signal_sent_from_another_thread_is_not_lost() {
        for _ in 0..1_000 {
            let (tx, mut rx) = tokio::sync::watch::channel(());
            let changed = WhenWoken::new(async move { rx.changed().await.is_ok() });
            let sender = tokio::spawn(async move { tx.send(()) });
            assert!(changed.await);
            assert!(sender.await.is_ok_and(|sent| sent.is_ok()));
        }
    }
}
