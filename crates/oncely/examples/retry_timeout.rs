//! Idempotency composed with a retry and a timeout.
//!
//! (a) A retry loop *inside* `run`: a flaky provider is retried with backoff, and the
//!     whole retried operation still runs once per key.
//! (b) A client-side timeout with wait mode: the client gives up on a slow request and
//!     retries; the retry waits for the first attempt and gets its result instead of
//!     running the operation a second time.
//!
//! Run it with `cargo run -p oncely --example retry_timeout`.

use std::error::Error;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use oncely::{ConflictMode, Executed, Failure, IdempotencyKey, MemoryStore, Oncely, RunError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Receipt {
    id: String,
}

/// Calls `op` up to `attempts` times, doubling the pause between tries (10 ms, 20 ms, …).
async fn retry<T, F, Fut>(attempts: u32, mut op: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let (mut attempt, mut pause) = (1, Duration::from_millis(10));
    loop {
        match op().await {
            Err(e) if attempt < attempts => {
                println!("  attempt {attempt} failed ({e}); retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                (attempt, pause) = (attempt + 1, pause * 2);
            }
            result => return result,
        }
    }
}

/// The server side of (b): each request runs in its own task, as an HTTP server's
/// handler would, so a client that stops waiting does not cancel the operation.
///
/// (Wrapping `run` itself in a timeout would drop it midway: the operation is
/// cancelled, and its key stays blocked until the lease lapses.)
fn serve(
    oncely: &Oncely<MemoryStore>,
    key: &IdempotencyKey,
    executions: &Arc<AtomicU32>,
    provider_reply: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<Executed<Receipt>, RunError<String>>> {
    let (oncely, key, executions) = (oncely.clone(), key.clone(), executions.clone());
    tokio::spawn(async move {
        let operation = || async move {
            let n = executions.fetch_add(1, SeqCst) + 1;
            provider_reply.await; // a slow provider
            Ok::<_, Failure<String>>(Receipt { id: format!("rcpt_{n}") })
        };
        oncely.run(&key, None, operation).await
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // (a) Retry inside idempotency: the retry loop is part of the operation.
    println!("(a) retry inside run");
    let oncely = Oncely::new(MemoryStore::new());
    let calls = AtomicU32::new(0);
    let flaky_provider = || async {
        match calls.fetch_add(1, SeqCst) + 1 {
            n @ 1..=2 => Err(format!("503 from provider (call {n})")),
            n => Ok(Receipt { id: format!("rcpt_after_{n}_calls") }),
        }
    };
    let key = IdempotencyKey::new("transfer-5531")?;
    for request in 1..=2 {
        // If every attempt fails, release the key so that a later client retry may try again.
        let out = oncely.run(&key, None, || async { retry(3, flaky_provider).await.map_err(Failure::Release) }).await?;
        println!("  request {request}: {} (replayed: {})", out.value.id, out.replayed);
        assert_eq!(out.replayed, request > 1);
    }
    assert_eq!(calls.load(SeqCst), 3, "two failures and one success, then a replay with no call");

    // (b) Timeout outside idempotency, with wait mode for the client's retry.
    println!("(b) client timeout, then a retry that waits");
    let retry_met_first = Arc::new(Notify::new());
    let oncely = Oncely::builder(MemoryStore::new())
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(1) })
        .on_conflict({
            let retry_met_first = retry_met_first.clone();
            move |key, _record| {
                println!("  {key} is in progress; the retry waits for it");
                retry_met_first.notify_one();
            }
        })
        .build()?;
    let executions = Arc::new(AtomicU32::new(0));
    let key = IdempotencyKey::new("transfer-9902")?;

    // Attempt 1: the provider answers only when we say so; the client stops waiting at 100 ms.
    let (reply_tx, reply_rx) = oneshot::channel::<()>();
    let mut first = serve(&oncely, &key, &executions, async move {
        let _ = reply_rx.await;
    });
    let gave_up = tokio::time::timeout(Duration::from_millis(100), &mut first).await.is_err();
    assert!(gave_up, "the provider has not answered yet");
    println!("  attempt 1: client timed out after 100 ms (the operation keeps running)");

    // Attempt 2, same key: it meets the running claim and waits. Once it is waiting,
    // let the provider answer; the retry gets the first attempt's result.
    let second = serve(&oncely, &key, &executions, async {});
    retry_met_first.notified().await;
    reply_tx.send(()).map_err(|()| "attempt 1 ended early")?;
    let second = tokio::time::timeout(Duration::from_secs(1), second).await???;
    let first = first.await??;
    println!("  attempt 2: {} (replayed: {})", second.value.id, second.replayed);
    assert!(second.replayed && !first.replayed);
    assert_eq!(second.value, first.value);
    assert_eq!(executions.load(SeqCst), 1, "two client attempts, one execution");
    println!("two attempts, one execution: {}", first.value.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main().expect("example runs");
    }
}
