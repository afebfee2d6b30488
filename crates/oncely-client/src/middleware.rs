//! The middleware, its settings, and the plain function for clients without middleware.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderName, Method};
use oncely::IdempotencyKey;
use reqwest::{Client, Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::call::{Attempt, BoxFuture, RetryEvent, run};
use crate::error::{Error, ErrorKind, StopReason};
use crate::key::{KeyFormat, KeySource};
use crate::policy::RetryPolicy;

type RetryHook = dyn Fn(&RetryEvent) + Send + Sync;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) format: KeyFormat,
    pub(crate) keys: KeySource,
    pub(crate) retry: RetryPolicy,
    pub(crate) replayed_header: HeaderName,
    pub(crate) on_retry: Option<Arc<RetryHook>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            header: HeaderName::from_static("idempotency-key"),
            format: KeyFormat::default(),
            keys: KeySource::default(),
            retry: RetryPolicy::default(),
            replayed_header: HeaderName::from_static("idempotent-replayed"),
            on_retry: None,
        }
    }
}

/// The client half of idempotency, as [`reqwest_middleware`] middleware.
///
/// For each request of a covered method (POST and PATCH by default) it attaches an
/// `Idempotency-Key`, sends the request, and retries it with the same key while a retry
/// can help: connection failures, time-outs, 409 (the first attempt is still running),
/// 425, 429, and 5xx other than 501 and 505, honouring `Retry-After` and
/// `Stripe-Should-Retry`, within a [`RetryPolicy`]. Requests of other methods pass
/// through untouched.
///
/// The key is, in order of preference: an `Idempotency-Key` header the caller set itself;
/// an [`IdempotencyKey`] the caller put in the request's extensions
/// ([`with_extension`](reqwest_middleware::RequestBuilder::with_extension)); a new one
/// from the [`KeySource`] (UUID v7 by default). A caller that must survive its own crash
/// makes the key, stores it with its intent, then sends; after a crash it sends again
/// with the stored key and gets the first answer back.
///
/// What happened is in the response's [`CallOutcome`](crate::CallOutcome) extension
/// (key, attempts, replay); a call that ends without a usable response is an [`Error`]
/// inside `reqwest_middleware::Error::Middleware` (see [`Error::find`]).
///
/// ```no_run
/// use oncely::IdempotencyKey;
/// use oncely_client::{CallOutcome, IdempotencyMiddleware, RetryPolicy};
/// use reqwest_middleware::ClientBuilder;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(IdempotencyMiddleware::new().retry(RetryPolicy::default().with_max_attempts(4)))
///     .build();
///
/// let key = IdempotencyKey::uuid_v7(); // store it with the order before sending
/// let response = client
///     .post("http://127.0.0.1:7100/payments")
///     .header("content-type", "application/json")
///     .body(r#"{"amount":1999}"#)
///     .with_extension(key.clone())
///     .send()
///     .await?;
/// let outcome = response.extensions().get::<CallOutcome>().expect("POST is covered");
/// assert_eq!(outcome.key, key);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct IdempotencyMiddleware {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyMiddleware")
            .field("methods", &c.methods)
            .field("header", &c.header)
            .field("format", &c.format)
            .field("keys", &c.keys)
            .field("retry", &c.retry)
            .field("replayed_header", &c.replayed_header)
            .field("on_retry", &c.on_retry.is_some())
            .finish()
    }
}

impl IdempotencyMiddleware {
    /// The defaults: POST and PATCH covered, `Idempotency-Key` as an sf-string, UUID v7
    /// keys, [`RetryPolicy::default`] (5 attempts, 250 ms base, 5 s cap, 30 s deadline).
    pub fn new() -> Self {
        Self::default()
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The methods that get a key and retries (default POST and PATCH).
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.with(|c| c.methods = methods.into_iter().collect())
    }

    /// The header carrying the key (default `Idempotency-Key`).
    pub fn header_name(self, name: HeaderName) -> Self {
        self.with(|c| c.header = name)
    }

    /// How the key is written: an sf-string (default) or a bare token. See [`KeyFormat`].
    pub fn key_format(self, format: KeyFormat) -> Self {
        self.with(|c| c.format = format)
    }

    /// Where keys come from when the caller gives none (default UUID v7).
    pub fn keys(self, source: KeySource) -> Self {
        self.with(|c| c.keys = source)
    }

    /// The retry policy.
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.with(|c| c.retry = policy)
    }

    /// The response header that marks a replay (default `Idempotent-Replayed`, as Stripe
    /// and Oncely send it).
    pub fn replayed_header(self, name: HeaderName) -> Self {
        self.with(|c| c.replayed_header = name)
    }

    /// Called before each retry's wait, with the key, the failed attempt, the wait and the
    /// cause: for metrics or logs beyond the `tracing` events.
    pub fn on_retry(self, hook: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.with(|c| c.on_retry = Some(Arc::new(hook)))
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.config.retry
    }

    fn covers(&self, method: &Method) -> bool {
        self.config.methods.contains(method)
    }

    /// The same as the middleware, for a plain [`reqwest::Client`]: sends `request` with a
    /// key and retries (a request of an uncovered method is sent once, as it is).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), oncely_client::Error> {
    /// use oncely_client::IdempotencyMiddleware;
    ///
    /// let client = reqwest::Client::new();
    /// let request = client.post("http://127.0.0.1:7100/payments").body("{}").build().expect("valid request");
    /// let response = IdempotencyMiddleware::new().send(&client, request).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error`] when the call ends without a usable response.
    pub async fn send(&self, client: &Client, request: Request) -> Result<Response, Error> {
        self.send_inner(client, request, None).await
    }

    /// [`send`](Self::send) with the caller's key (one it stored before the call).
    ///
    /// # Errors
    /// [`Error`] when the call ends without a usable response.
    pub async fn send_with_key(
        &self,
        client: &Client,
        request: Request,
        key: IdempotencyKey,
    ) -> Result<Response, Error> {
        self.send_inner(client, request, Some(key)).await
    }

    async fn send_inner(
        &self,
        client: &Client,
        request: Request,
        key: Option<IdempotencyKey>,
    ) -> Result<Response, Error> {
        let mut via = ViaClient(client);
        if !self.covers(request.method()) {
            return via.send(request).await.map_err(|e| Error {
                kind: ErrorKind::Transport(e),
                key: None,
                attempts: 1,
                replayed: false,
                stop: StopReason::NotRetryable,
                elapsed: Duration::ZERO,
            });
        }
        run(&self.config, request, key, &mut via).await
    }
}

/// [`IdempotencyMiddleware::send`] with the default settings.
///
/// # Errors
/// [`Error`] when the call ends without a usable response.
pub async fn send(client: &Client, request: Request) -> Result<Response, Error> {
    IdempotencyMiddleware::new().send(client, request).await
}

struct ViaClient<'c>(&'c Client);

impl Attempt for ViaClient<'_> {
    fn send(&mut self, request: Request) -> BoxFuture<'_, Result<Response, reqwest_middleware::Error>> {
        let client = self.0;
        Box::pin(async move { client.execute(request).await.map_err(reqwest_middleware::Error::Reqwest) })
    }
}

struct ViaNext<'n, 'e> {
    next: Next<'n>,
    extensions: &'e mut Extensions,
}

impl Attempt for ViaNext<'_, '_> {
    fn send(&mut self, request: Request) -> BoxFuture<'_, Result<Response, reqwest_middleware::Error>> {
        self.next.clone().run(request, self.extensions)
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.covers(request.method()) {
            return next.run(request, extensions).await;
        }
        let given = extensions.get::<IdempotencyKey>().cloned();
        let mut via = ViaNext { next, extensions };
        run(&self.config, request, given, &mut via).await.map_err(reqwest_middleware::Error::middleware)
    }
}
