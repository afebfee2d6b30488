//! Order creation: one order per intent, keys from parts or from content, and scopes.
//!
//! - A key built from the parts that identify the intent (`order:<customer>:<cart>`).
//! - A key derived from the request body, for clients that send no key at all.
//! - Reusing a key for a *different* body is a client bug: `Error::Mismatch`, not a replay.
//! - Scopes: two customers that happen to send the same key get two orders.
//!
//! Run it with `cargo run -p oncely --example orders`.

use std::error::Error;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use oncely::{Executed, Failure, Fingerprint, IdempotencyKey, MemoryStore, Oncely, RunError, Scope};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Serialize, Clone)]
struct OrderRequest {
    cart: &'static str,
    sku: &'static str,
    quantity: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Order {
    id: u32,
    sku: String,
    quantity: u32,
}

/// A stand-in for the orders table: counts the rows inserted.
#[derive(Default)]
struct OrdersDb {
    inserted: AtomicU32,
}

impl OrdersDb {
    /// The `POST /orders` handler: inserts the order once per key.
    async fn create(
        &self,
        oncely: &Oncely<MemoryStore>,
        key: &IdempotencyKey,
        req: &OrderRequest,
    ) -> Result<Executed<Order>, RunError<String>> {
        // The fingerprint is what makes a retry "the same request" as the first one.
        let fingerprint = Fingerprint::from_serialize(req).expect("an OrderRequest always serialises to JSON");
        oncely
            .run(key, Some(fingerprint), || async {
                let id = self.inserted.fetch_add(1, SeqCst) + 1;
                Ok::<_, Failure<String>>(Order { id, sku: req.sku.into(), quantity: req.quantity })
            })
            .await
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let oncely = Oncely::new(MemoryStore::new());
    let db = OrdersDb::default();

    // 1. A key from parts: the same customer and cart name the same order.
    let req = OrderRequest { cart: "cart-881", sku: "MUG-01", quantity: 2 };
    let key = IdempotencyKey::from_parts(&[&"order", &"cus_42", &req.cart])?;
    let first = db.create(&oncely, &key, &req).await?;
    let retry = db.create(&oncely, &key, &req).await?;
    assert!(!first.replayed && retry.replayed);
    assert_eq!(retry.value, first.value);
    println!("{key}: order #{} created, retry replayed it", first.value.id);

    // 2. The same key with a different body: refused, nothing inserted.
    let changed = OrderRequest { quantity: 20, ..req.clone() };
    match db.create(&oncely, &key, &changed).await {
        Err(RunError::Idempotency(oncely::Error::Mismatch)) => println!("{key}: reused for another body -> Mismatch"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(db.inserted.load(SeqCst), 1);

    // 3. No key from the client: derive one from the content. Field order and
    //    whitespace do not matter, since the content is hashed as canonical JSON.
    let body = OrderRequest { cart: "cart-990", sku: "TEA-07", quantity: 1 };
    let resent = json!({ "quantity": 1, "sku": "TEA-07", "cart": "cart-990" });
    let key = IdempotencyKey::from_content("order", &body)?;
    assert_eq!(key, IdempotencyKey::from_content("order", &resent)?);
    let first = db.create(&oncely, &key, &body).await?;
    let resubmitted = db.create(&oncely, &key, &body).await?;
    assert!(resubmitted.replayed);
    println!("{}…: content key, order #{} created once", &key.as_str()[..18], first.value.id);
    assert_eq!(db.inserted.load(SeqCst), 2);

    // 4. Scopes: both customers' apps send the key "checkout-1". Each scope has its own
    //    records, so each customer gets their own order, and their own replay.
    let key = IdempotencyKey::new("checkout-1")?;
    let alice = oncely.scoped(Scope::new("customer-a"));
    let bob = oncely.scoped(Scope::new("customer-b"));
    let alice_req = OrderRequest { cart: "cart-a", sku: "PEN-10", quantity: 3 };
    let bob_req = OrderRequest { cart: "cart-b", sku: "INK-02", quantity: 1 };
    let a = db.create(&alice, &key, &alice_req).await?;
    let b = db.create(&bob, &key, &bob_req).await?;
    assert!(!a.replayed && !b.replayed, "no scope sees the other's record");
    assert_ne!(a.value.id, b.value.id);
    assert_eq!(db.create(&alice, &key, &alice_req).await?.value, a.value);
    assert_eq!(db.create(&bob, &key, &bob_req).await?.value, b.value);
    println!("{key}: customer-a got order #{}, customer-b got order #{}", a.value.id, b.value.id);

    assert_eq!(db.inserted.load(SeqCst), 4, "four intents, four orders");
    println!("4 orders inserted for 9 requests");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main().expect("example runs");
    }
}
