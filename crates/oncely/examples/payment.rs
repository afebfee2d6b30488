//! A payment charged once, however often the client retries.
//!
//! The browser double-submits, the load balancer retries, the mobile app retries after a
//! timeout: every one of those requests carries the same idempotency key, and the card
//! must be charged exactly once. A declined card is a final answer (stored and replayed);
//! a provider outage charged nothing (released, so a retry runs again).
//!
//! Run it with `cargo run -p oncely --example payment`.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use oncely::{ConflictMode, Executed, Failure, Fingerprint, IdempotencyKey, MemoryStore, Oncely, RunError};
use serde::{Deserialize, Serialize};

/// What the client sends. Its fingerprint ties the key to this exact request.
#[derive(Serialize, Clone)]
struct ChargeRequest {
    customer: &'static str,
    amount_cents: u64,
    card: &'static str,
}

/// A successful charge: stored once, replayed to every retry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Charge {
    id: String,
    amount_cents: u64,
}

/// Why a charge failed. Serialisable, because a failure can be the stored result too.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum PaymentError {
    Declined(String),
    ProviderDown,
}

/// A stand-in for the card processor that counts what reaches it (calls, charges).
#[derive(Default)]
struct Provider {
    calls: AtomicU32,
    charges: AtomicU32,
    outages: AtomicU32, // how many upcoming calls fail with an outage
}

impl Provider {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, PaymentError> {
        self.calls.fetch_add(1, SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await; // network latency, not synchronisation
        if self.outages.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(PaymentError::ProviderDown);
        }
        if req.card.ends_with("0002") {
            return Err(PaymentError::Declined("insufficient_funds".into()));
        }
        let n = self.charges.fetch_add(1, SeqCst) + 1;
        Ok(Charge { id: format!("ch_{n:04}"), amount_cents: req.amount_cents })
    }
}

/// The payment endpoint: one charge per key, whatever the number of requests.
async fn pay(
    oncely: &Oncely<MemoryStore>,
    provider: &Provider,
    key: &IdempotencyKey,
    req: &ChargeRequest,
) -> Result<Executed<Charge>, RunError<PaymentError>> {
    let fingerprint = Fingerprint::from_serialize(req).expect("a ChargeRequest always serialises to JSON");
    oncely
        .run(key, Some(fingerprint), || async {
            // The failure policy, per error: a decline is the answer; an outage is not.
            provider.charge(req).await.map_err(|e| match e {
                PaymentError::Declined(_) => Failure::Store(e),
                PaymentError::ProviderDown => Failure::Release(e),
            })
        })
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // Wait mode: a duplicate arriving while the first request runs waits for its result.
    let oncely = Oncely::builder(MemoryStore::new())
        .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(5) })
        .on_miss(|key| println!("  on_miss {key}: new key, calling the provider"))
        .on_hit(|key, replay| println!("  on_hit  {key}: replayed (hit #{})", replay.hits))
        .build()?;
    let provider = Arc::new(Provider::default());

    // 1. Five concurrent submissions of one checkout, then two late retries.
    println!("checkout 1: five concurrent submissions, then two retries");
    let key = IdempotencyKey::new("pay-7f3a9c")?;
    let req = ChargeRequest { customer: "cus_42", amount_cents: 1999, card: "4242424242424242" };
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let (oncely, provider, key, req) = (oncely.clone(), provider.clone(), key.clone(), req.clone());
        requests.spawn(async move { pay(&oncely, &provider, &key, &req).await });
    }
    let mut results = Vec::new();
    while let Some(result) = requests.join_next().await {
        results.push(result??);
    }
    for _ in 0..2 {
        results.push(pay(&oncely, &provider, &key, &req).await?);
    }
    assert_eq!(provider.charges.load(SeqCst), 1, "the card is charged once");
    assert_eq!(results.iter().filter(|r| !r.replayed).count(), 1, "one request ran, the rest replayed");
    assert!(results.iter().all(|r| r.value == results[0].value), "everyone got the same charge");
    assert_eq!(oncely.get(&key).await?.map(|r| r.hits()), Some(6));
    println!("-> {} charged once; 6 retries replayed it\n", results[0].value.id);

    // 2. A declined card: the decline is stored, so the retry gets it without a new call.
    println!("checkout 2: declined card, retried");
    let key = IdempotencyKey::new("pay-b81e02")?;
    let req = ChargeRequest { customer: "cus_7", amount_cents: 500, card: "4000000000000002" };
    for attempt in [false, true] {
        match pay(&oncely, &provider, &key, &req).await {
            Err(RunError::Failed { error: PaymentError::Declined(reason), replayed }) => {
                assert_eq!(replayed, attempt);
                println!("-> declined ({reason}), replayed: {replayed}");
            }
            other => panic!("expected a decline, got {other:?}"),
        }
    }
    assert_eq!(provider.calls.load(SeqCst), 2, "the provider saw the decline once");

    // 3. A provider outage: nothing was charged, the key is released, the retry runs again.
    println!("\ncheckout 3: provider outage, then a retry");
    provider.outages.store(1, SeqCst);
    let key = IdempotencyKey::new("pay-c0ffee")?;
    let req = ChargeRequest { customer: "cus_9", amount_cents: 12_000, card: "5555555555554444" };
    let first = pay(&oncely, &provider, &key, &req).await;
    assert!(matches!(first, Err(RunError::Failed { error: PaymentError::ProviderDown, replayed: false })));
    println!("-> provider down; key released");
    let retry = pay(&oncely, &provider, &key, &req).await?;
    assert!(!retry.replayed, "the retry ran the charge for real");
    println!("-> retry charged {} ({} cents)", retry.value.id, retry.value.amount_cents);
    assert_eq!((provider.charges.load(SeqCst), provider.calls.load(SeqCst)), (2, 4));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main().expect("example runs");
    }
}
