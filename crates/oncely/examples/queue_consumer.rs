//! A queue consumer that handles each message once, though the queue redelivers.
//!
//! At-least-once queues (SQS, Pub/Sub, RabbitMQ, Kafka after a rebalance) deliver some
//! messages twice. `first_seen(&id, window)` answers "have I seen this id in the last
//! `window`?" in one atomic store call, so even two workers racing on the same
//! redelivered message agree on who handles it.
//!
//! `first_seen` marks the id *before* the handler runs: if the handler can fail and the
//! message must then be handled again, use `Oncely::run` with `Failure::Release` instead.
//!
//! Run it with `cargo run -p oncely --example queue_consumer`.

use std::collections::HashMap;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oncely::{IdempotencyKey, MemoryStore, Oncely, Scope};
use tokio::sync::mpsc;

/// How long a message id is remembered: longer than the queue's redelivery horizon.
const DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

type BoxError = Box<dyn Error + Send + Sync>;

#[derive(Debug)]
struct Message {
    id: &'static str,
    body: &'static str,
}

/// The messages each id was handled for: what the assertions check.
type Handled = Arc<Mutex<HashMap<&'static str, u32>>>;

/// One worker: pulls messages until the queue closes; returns how many it skipped.
async fn consume(
    name: &'static str,
    dedup: Oncely<MemoryStore>,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Message>>>,
    handled: Handled,
) -> Result<u32, BoxError> {
    let mut skipped = 0;
    loop {
        let Some(message) = queue.lock().await.recv().await else { return Ok(skipped) };
        let id = IdempotencyKey::new(message.id)?; // a malformed id would go to a dead-letter queue
        if dedup.first_seen(&id, DEDUP_WINDOW).await? {
            // The real work: here, record that it happened.
            println!("{name}: handling {} ({})", message.id, message.body);
            *handled.lock().expect("no worker panics while holding the map").entry(message.id).or_default() += 1;
        } else {
            println!("{name}: skipping {} (already seen)", message.id);
            skipped += 1;
        }
        // Either way the message is acknowledged, so the queue stops redelivering it.
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // One scope per queue: the same id on another queue is another message.
    let dedup = Oncely::new(MemoryStore::new()).scoped(Scope::new("queue:order-events"));
    let handled = Handled::default();

    // The stream as the broker delivers it: m1, m2 and m3 come again after a redelivery.
    let deliveries = [
        ("m1", "order 1 created"),
        ("m2", "order 2 created"),
        ("m1", "order 1 created"),
        ("m3", "order 1 shipped"),
        ("m2", "order 2 created"),
        ("m4", "order 2 cancelled"),
        ("m1", "order 1 created"),
        ("m5", "order 3 created"),
        ("m3", "order 1 shipped"),
    ];
    let (tx, rx) = mpsc::channel(16);
    for (id, body) in deliveries {
        tx.send(Message { id, body }).await?;
    }
    drop(tx); // closing the queue lets the workers finish

    // Two workers share the queue, as two consumer instances would.
    let queue = Arc::new(tokio::sync::Mutex::new(rx));
    let workers =
        ["worker-a", "worker-b"].map(|name| tokio::spawn(consume(name, dedup.clone(), queue.clone(), handled.clone())));
    let mut skipped = 0;
    for worker in workers {
        skipped += worker.await??;
    }

    let handled = handled.lock().expect("the workers are done").clone();
    assert_eq!(handled.len(), 5, "five distinct messages");
    assert!(handled.values().all(|&n| n == 1), "each handled exactly once: {handled:?}");
    assert_eq!(skipped, 4, "four redeliveries skipped");
    println!(
        "{} deliveries: {} messages handled once each, {skipped} duplicates skipped",
        deliveries.len(),
        handled.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main().expect("example runs");
    }
}
