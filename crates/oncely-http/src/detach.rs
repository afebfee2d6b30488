//! A keyed request's work, run in the request's own task, and in a task of its own only
//! when the client goes away.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

/// Polls `work` in place and, when dropped before `work` is done (the client hung up, so
/// hyper dropped the request's future), moves it into a task of its own. With a tracker,
/// `work` is tracked from the start, in place or in its task: the tracker counts it
/// (`oncely_operations_in_flight`) and a graceful shutdown waits for it.
///
/// Invariant, stated here because [`crate::service`] relies on it: once polled, `work`
/// runs to completion unless it panics or the runtime shuts down, exactly as if it had
/// been spawned at once and its handle awaited, which is what the layer did before. A
/// claim half made (a store may commit a claim whose caller has gone) or an operation
/// begun is never abandoned. Awaited to the end, it costs no task and no hand-off.
///
/// A panic in `work` while polled in place is caught and returned, as a spawned task's
/// `JoinError` would be.
pub(crate) struct Detachable<T: Send + 'static> {
    work: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    /// What counts `work` in the tracker, in place and then in its task.
    token: Option<TaskTrackerToken>,
    /// The runtime the work started on, where it goes on if dropped.
    runtime: Option<Handle>,
}

impl<T: Send + 'static> Detachable<T> {
    /// `work` comes boxed: a keyed request's work is a large future, and built in its
    /// box by the caller it is not copied again on its way in.
    pub(crate) fn new(work: Pin<Box<dyn Future<Output = T> + Send>>, tracker: Option<&TaskTracker>) -> Self {
        Self { work: Some(work), token: tracker.map(TaskTracker::token), runtime: Handle::try_current().ok() }
    }
}

impl<T: Send + 'static> Future for Detachable<T> {
    type Output = std::thread::Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Done already: nothing more will come (a future is not polled after `Ready`).
        let Some(work) = this.work.as_mut() else { return Poll::Pending };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                this.work = None;
                this.token = None;
                Poll::Ready(Ok(output))
            }
            Err(panic) => {
                // A panicked future must not be polled again, nor handed to a task.
                this.work = None;
                this.token = None;
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else { return };
        match &self.runtime {
            // On a runtime that is shutting down the task is dropped, as a task spawned
            // at the start would have been.
            Some(runtime) => {
                let token = self.token.take();
                drop(runtime.spawn(async move {
                    drop(work.await);
                    drop(token);
                }));
            }
            None => tracing::warn!("a keyed request's work was created outside a Tokio runtime and dropped unfinished"),
        }
    }
}
