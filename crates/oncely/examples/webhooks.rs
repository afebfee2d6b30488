//! Webhook processing in reject mode.
//!
//! Webhook senders redeliver when they do not get a 2xx fast enough, so a redelivery
//! can arrive while the first delivery is still being processed. In reject mode (the
//! default is to wait) it gets `Error::Conflict { retry_after }` at once (answer 409 with a
//! `Retry-After` header) and the sender tries later; once the first delivery is done, a
//! redelivery gets the stored acknowledgement and the event is not applied twice.
//!
//! Run it with `cargo run -p oncely --example webhooks`.

use std::error::Error;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use oncely::{ConflictMode, Executed, Failure, IdempotencyKey, MemoryStore, Oncely, RunError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// An event as the sender delivers it; `id` is the same on every redelivery.
#[derive(Clone, Debug)]
struct Event {
    id: &'static str,
    kind: &'static str,
}

impl Event {
    /// The idempotency key of an event: its id, which the sender keeps across
    /// redeliveries. A malformed id fails here (a real endpoint answers 400).
    fn key(&self) -> Result<IdempotencyKey, oncely::KeyError> {
        IdempotencyKey::from_parts(&[&"webhook", &self.id])
    }
}

/// What the handler answers, stored and replayed to redeliveries.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Ack {
    event: String,
    applied_as: u32,
}

/// The webhook endpoint. `slow_part` stands for the slow work inside the handler; the
/// example uses it to hold the first delivery in progress for as long as it likes.
async fn handle(
    oncely: &Oncely<MemoryStore>,
    applied: &AtomicU32,
    key: &IdempotencyKey,
    event: &Event,
    slow_part: impl Future<Output = ()>,
) -> Result<Executed<Ack>, RunError<String>> {
    oncely
        .run(key, None, || async {
            slow_part.await;
            let n = applied.fetch_add(1, SeqCst) + 1; // the side effect: apply the event
            Ok::<_, Failure<String>>(Ack { event: event.id.into(), applied_as: n })
        })
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let oncely = Oncely::builder(MemoryStore::new()).conflict_mode(ConflictMode::Reject).build()?;
    let applied = Arc::new(AtomicU32::new(0));
    let event = Event { id: "evt_1NVa2x", kind: "invoice.paid" };
    let key = event.key()?;

    // The first delivery tells us when it is processing, then waits for our go-ahead.
    // Channels, not sleeps, decide the order, so the overlap happens on every run.
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = tokio::spawn({
        let (oncely, applied, key, event) = (oncely.clone(), applied.clone(), key.clone(), event.clone());
        async move {
            let slow_part = async move {
                let _ = started_tx.send(());
                let _ = finish_rx.await; // returns when we send, or if main gave up
            };
            handle(&oncely, &applied, &key, &event, slow_part).await
        }
    });
    started_rx.await?; // the first delivery now holds the key
    println!("delivery 1 of {} ({}) is processing", event.id, event.kind);

    // A redelivery while the first is running: rejected with a retry-after hint.
    match handle(&oncely, &applied, &key, &event, async {}).await {
        Err(RunError::Idempotency(oncely::Error::Conflict { retry_after })) => {
            println!("delivery 2 -> 409 Conflict, Retry-After: {}s", retry_after.as_secs());
            assert!(retry_after.as_secs() >= 1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(applied.load(SeqCst), 0, "the redelivery did not run the handler");

    // Let the first delivery finish.
    finish_tx.send(()).map_err(|()| "the first delivery ended early")?;
    let first = first.await??;
    assert!(!first.replayed);
    println!("delivery 1 -> 200 OK, applied as #{}", first.value.applied_as);

    // The sender retries after Retry-After: now it gets the stored acknowledgement.
    let third = handle(&oncely, &applied, &key, &event, async {}).await?;
    assert!(third.replayed);
    assert_eq!(third.value, first.value);
    println!("delivery 3 -> 200 OK (replayed), applied as #{}", third.value.applied_as);

    assert_eq!(applied.load(SeqCst), 1, "three deliveries, applied once");
    println!("3 deliveries, event applied once");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main().expect("example runs");
    }
}
