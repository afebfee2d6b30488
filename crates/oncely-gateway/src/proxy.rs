//! The reverse proxy: forwards a request to the upstream over pooled connections.
//!
//! Per RFC 9110 §7.6.1 hop-by-hop fields (and any named in `Connection`) are dropped in
//! both directions. The request gets `X-Forwarded-For`, `X-Forwarded-Host`,
//! `X-Forwarded-Proto` and `Forwarded` (appended to any the client sent). Bodies stream
//! through unless the idempotency layer needs them whole.
//!
//! The host in `Forwarded` and `X-Forwarded-Host` is the request's `Host` (or, on
//! HTTP/2, its `:authority`) only if it passes [`valid_host`]; the route table refuses
//! a request whose host does not with 400 `bad-host` before anything is forwarded or
//! stored, so a `Host` cannot add elements or parameters to those headers.
//!
//! Upstream failures, both `application/problem+json`:
//!
//! | failure | status | the key |
//! |---|---|---|
//! | connection refused, before anything was sent | 502 `upstream-unreachable` | released ([`NotProcessed`]): a retry runs again |
//! | TLS handshake failed (`https://`: unknown CA, expired, another host's name, a plain-text server) | 502 `upstream-unreachable`, the detail naming the cause | released, likewise |
//! | no connection by the timeout (a full accept queue, a stalled DNS), nothing sent | 504 `upstream-unreachable` | released, likewise |
//! | no response head within `upstream.timeout` | 504 `upstream-timeout` (from the layer's `answer_within`) | held while the call goes on, up to the route's `completion_limit`; its answer is stored |
//! | no response head within `completion_limit` | nobody is waiting any more | held as an unknown outcome ([`OutcomeUnknown`]): retries get 502 `outcome-unknown` |
//! | connection broken after the request was sent | 502 `upstream-failed` | held as an unknown outcome, likewise |
//! | response body stalls for `completion_limit` between chunks | the response is cut off (500 `handler-failed` where the layer reads the body) | held as an unknown outcome |
//!
//! Idle pooled connections are closed after 4 s, below the keep-alive timeouts of common
//! servers (Node's is 5 s), so the proxy seldom sends on a connection the upstream is
//! closing: such a send fails after the request may have been read, which costs the key
//! a lease.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector, capture_connection};
use hyper_util::rt::TokioExecutor;
use oncely_http::problem::{SHOULD_RETRY, problem_response};
use oncely_http::{NotProcessed, OutcomeUnknown, RequestBody, ResponseBody, strip_hop_by_hop};

use crate::idle_timeout::IdleTimeout;
use crate::tls::UpstreamTls;

/// The body the proxy forwards.
pub type ForwardBody = RequestBody<axum::body::Body>;

/// The connector: plain TCP for `http://`, TLS over it for `https://` (see
/// [`crate::tls`]), the whole bounded by [`CONNECT_WITHIN`].
type Connector = Bounded<HttpsConnector<HttpConnector>>;

/// How long a new upstream connection may take, TCP (at most 5 s of it) and the TLS
/// handshake together. Past it, the request was not sent: a connect error.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// The authority of the URI an `http://` upstream's requests are handed to hyper-util
/// with, in place of the upstream's `host:port`. The pool hashes its key's authority a
/// byte at a time with SipHash, three times a request: about 1,050 instructions each for
/// `127.0.0.1:8080`, about 200 for one letter.
///
/// hyper-util reads the authority for more than its pool key; each other use is closed
/// here:
/// - the connection: [`Bounded`] connects to the upstream whatever URI it is given;
/// - `Host`, which hyper-util writes from the URI when a request has none: the proxy sets
///   the upstream's own on every request, and again after removing the hop-by-hop fields
///   when a client named `Host` in `Connection`;
/// - the request target, sent in absolute form through a proxy: the connections report
///   no proxy ([`Bare`] passes on `HttpConnector`'s, which never sets one), so HTTP/1.1
///   requests go out in origin form;
/// - HTTP/2's `:authority`: `https://` keeps the real authority (its TLS server name
///   comes from the connector's upstream URI either way);
/// - hyper-util's `debug` and `trace` lines about its pool, which name the key: they read
///   `(http, u)`.
///
/// `CONNECT`, sent in authority form, keeps the real authority too.
const POOL_LABEL: http::uri::Authority = http::uri::Authority::from_static("u");

/// A connector to the one upstream, whose connections must be made within a time:
/// hyper-util bounds TCP's connect only, and an upstream that accepts TCP but never
/// answers the TLS handshake would otherwise hold a request until its timeout, reported
/// as "may have been processed".
///
/// It connects to `upstream` whatever URI the pool asks for: that URI is the pool's key,
/// which for `http://` is a label, not the upstream's address.
#[derive(Clone, Debug)]
pub struct Bounded<C> {
    inner: C,
    within: Duration,
    upstream: Uri,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower::Service<Uri> for Bounded<C>
where
    C: tower::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Bare<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, _pool_key: Uri) -> Self::Future {
        let connecting = self.inner.call(self.upstream.clone());
        let within = self.within;
        Box::pin(async move {
            match tokio::time::timeout(within, connecting).await {
                Ok(result) => result.map(Bare).map_err(Into::into),
                Err(_) => {
                    Err(format!("no connection (TCP and TLS) within {}", humantime::format_duration(within)).into())
                }
            }
        })
    }
}

/// An upstream connection that gives hyper-util no addresses to copy into each response.
///
/// A TCP connection's [`Connected`] carries `HttpInfo` (both ends' addresses), which
/// hyper-util clones into the extensions of every response it receives on it (a map and
/// a box made per response, and another clone for each keyed request's connection
/// capture). Nothing here reads them, so the connection reports only what the pool acts
/// on: whether it goes through a proxy and whether TLS chose HTTP/2.
#[derive(Debug)]
pub struct Bare<T>(T);

impl<T: Connection> Connection for Bare<T> {
    fn connected(&self) -> Connected {
        let inner = self.0.connected();
        let connected = Connected::new().proxy(inner.is_proxied());
        if inner.is_negotiated_h2() { connected.negotiated_h2() } else { connected }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Bare<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Bare<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

/// A `tower::Service` that forwards every request to one upstream. Cloning it (once per
/// keyed request) copies two pointers and a duration.
#[derive(Clone, Debug)]
pub struct Proxy {
    upstream: Arc<Upstream>,
    completion_limit: Duration,
    /// The client whose connection the requests come on, for `X-Forwarded-For` and
    /// `Forwarded`: set per connection ([`Routes::for_client`](crate::routing::Routes::for_client)).
    client: Option<ForwardedFor>,
}

/// The client a connection's requests are forwarded for, as `X-Forwarded-For` and
/// `Forwarded` write it: formatted once per connection
/// ([`Routes::for_client`](crate::routing::Routes::for_client)), not once per request.
/// Cloning it copies a pointer.
///
/// ```
/// use oncely_gateway::proxy::ForwardedFor;
///
/// // Once per connection, from its peer; then `Proxy::set_client` for each request.
/// let client = ForwardedFor::new("192.0.2.1:5000".parse().unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct ForwardedFor(Arc<ClientAddr>);

impl ForwardedFor {
    /// The client at `addr` (its port is not forwarded).
    pub fn new(addr: SocketAddr) -> Self {
        Self(Arc::new(ClientAddr::new(addr)))
    }
}

#[derive(Debug)]
struct ClientAddr {
    /// `X-Forwarded-For`'s entry: `192.0.2.1`, `2001:db8::1`.
    ip: HeaderValue,
    /// `Forwarded`'s `for` parameter: `for=192.0.2.1`, `for="[2001:db8::1]"`.
    forwarded_for: Box<str>,
}

impl ClientAddr {
    fn new(addr: SocketAddr) -> Self {
        let (ip, forwarded_for) = match addr.ip() {
            std::net::IpAddr::V4(ip) => (ip.to_string(), format!("for={ip}")),
            std::net::IpAddr::V6(ip) => (ip.to_string(), format!("for=\"[{ip}]\"")),
        };
        // An address's text is digits, dots, hex letters and colons: always a valid value.
        let ip = HeaderValue::try_from(ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { ip, forwarded_for: forwarded_for.into_boxed_str() }
    }
}

/// What every clone of a proxy shares: the connection pools and where they go.
#[derive(Clone, Debug)]
struct Upstream {
    /// One pool per [worker](crate::workers), so that a request is sent on a connection
    /// whose task runs on its own thread; the first also serves requests off the workers.
    clients: Box<[Client<Connector, ForwardBody>]>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The authority requests are handed to the pool with: [`POOL_LABEL`] for
    /// `http://`, the upstream's own for `https://`.
    pool_authority: http::uri::Authority,
    /// The upstream URL's path, without a trailing `/`: empty for most upstreams.
    base_path: String,
    timeout: Duration,
    /// `X-Forwarded-Proto` and `Forwarded: proto=`: how clients reach the gateway.
    client_proto: &'static str,
    /// The `Host` an `http://` upstream is sent, written once: what hyper-util would
    /// otherwise format on every request (host, and the port unless it is 80), and what
    /// keeps the pool's label ([`POOL_LABEL`]) from being sent. `None` for `https://`,
    /// whose connection may speak HTTP/2 (`:authority`): hyper-util decides there.
    host: Option<HeaderValue>,
}

impl Proxy {
    /// A proxy to `upstream` (`http://host:port[/base]` or `https://…`), giving up on a
    /// response head after `timeout` (and, for keyed requests, after the
    /// [completion limit](Self::with_completion_limit), which is the same by default).
    /// `tls` says how an `https://` upstream is verified; HTTP/2 is used when its ALPN
    /// offers it, HTTP/1.1 otherwise. `pools` connection pools are kept, one per
    /// [worker](crate::workers) (at least one).
    ///
    /// # Errors
    /// A message naming the upstream URL or the TLS file at fault.
    pub fn new(upstream: &str, timeout: Duration, tls: &UpstreamTls, pools: usize) -> Result<Self, String> {
        let uri: Uri = upstream.parse().map_err(|e| format!("--upstream {upstream:?}: {e}"))?;
        let scheme =
            uri.scheme().cloned().ok_or_else(|| format!("--upstream {upstream:?}: needs http:// or https://"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(format!("--upstream {upstream:?}: only http:// and https:// upstreams are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("--upstream {upstream:?}: needs a host"))?;
        let base_path = uri.path().trim_end_matches('/').to_string();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        // `https_or_http` takes TCP for http:// (then the TLS settings are unused and not
        // read); TLS needs the settings, so they are built only for https://.
        connector.enforce_http(false);
        let tls_config = if scheme == http::uri::Scheme::HTTPS {
            tls.client_config().map_err(|e| format!("--upstream {upstream:?}: {e}"))?
        } else {
            UpstreamTls::unused_config()?
        };
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector);
        let root = Uri::builder().scheme(scheme.clone()).authority(authority.clone()).path_and_query("/").build();
        let root = root.map_err(|e| format!("--upstream {upstream:?}: {e}"))?;
        let connector = Bounded { inner: connector, within: CONNECT_WITHIN, upstream: root };
        let clients = (0..pools.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(4)).build(connector.clone())
            })
            .collect();
        let host = (scheme == http::uri::Scheme::HTTP)
            .then(|| match authority.port_u16() {
                Some(80) | None => HeaderValue::from_str(authority.host()),
                Some(port) => HeaderValue::try_from(format!("{}:{port}", authority.host())),
            })
            .and_then(Result::ok);
        let pool_authority = if host.is_some() { POOL_LABEL } else { authority.clone() };
        let upstream =
            Upstream { clients, scheme, authority, pool_authority, base_path, timeout, client_proto: "http", host };
        Ok(Self { upstream: Arc::new(upstream), completion_limit: timeout, client: None })
    }

    /// The host and port of an `https://` upstream; `None` for `http://`.
    pub fn https_upstream(&self) -> Option<(String, u16)> {
        let upstream = &self.upstream;
        (upstream.scheme == http::uri::Scheme::HTTPS)
            .then(|| (upstream.authority.host().to_string(), upstream.authority.port_u16().unwrap_or(443)))
    }

    /// The same proxy, telling the upstream that clients reach the gateway over HTTPS
    /// (`X-Forwarded-Proto: https`, `Forwarded: proto=https`): for a TLS listener.
    pub fn with_https_clients(mut self) -> Self {
        Arc::make_mut(&mut self.upstream).client_proto = "https";
        self
    }

    /// The same proxy (sharing its connection pool), giving up on a keyed request's
    /// response head, or on its response body sending nothing, only after `limit`: a
    /// route's completion limit. The idempotency layer has answered the client 504 at the
    /// upstream timeout already; the call goes on so that its answer can be stored.
    /// Requests without a key give up at the upstream timeout.
    pub fn with_completion_limit(&self, limit: Duration) -> Self {
        Self { completion_limit: limit, ..self.clone() }
    }

    /// Forwards the requests as coming from `client` (`X-Forwarded-For`, `Forwarded`):
    /// the peer of the connection they arrive on. Without it, no `for=` is added.
    pub fn set_client(&mut self, client: ForwardedFor) {
        self.client = Some(client);
    }

    /// The request's target on the upstream. Without a base path, the request's own
    /// path and query are reused as they are (a reference count, no copy). A `CONNECT`
    /// names the upstream's real authority: hyper-util sends it in authority form.
    fn upstream_uri(&self, method: &http::Method, original: &Uri) -> Result<Uri, http::Error> {
        let upstream = &self.upstream;
        let authority = if method == http::Method::CONNECT { &upstream.authority } else { &upstream.pool_authority };
        let builder = Uri::builder().scheme(upstream.scheme.clone()).authority(authority.clone());
        match original.path_and_query() {
            Some(pq) if upstream.base_path.is_empty() => builder.path_and_query(pq.clone()).build(),
            pq => builder.path_and_query(format!("{}{}", upstream.base_path, pq.map_or("/", |pq| pq.as_str()))).build(),
        }
    }
}

impl Upstream {
    /// The pool of the worker this runs on.
    fn client(&self) -> &Client<Connector, ForwardBody> {
        let n = crate::workers::current().unwrap_or(0) % self.clients.len();
        &self.clients[n]
    }
}

/// Whether `host` is a `host[:port]` safe to pass on in `Forwarded` and
/// `X-Forwarded-Host`: an IPv4 address or a reg-name of unreserved characters
/// (letters, digits, `-`, `.`, `_`, `~`), or an IPv6 address in brackets, then optionally
/// `:` and a port of 1 to 5 digits up to 65535. Stricter than RFC 3986's reg-name: its
/// sub-delims (`,` `;` `=` …), percent-encoding and user info, which no DNS name uses, are
/// refused, so the value can never be read as more than one list element or parameter.
pub fn valid_host(host: &str) -> bool {
    let (name_ok, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, after)) => (ip.parse::<std::net::Ipv6Addr>().is_ok(), after),
            None => return false,
        },
        None => {
            // A table look-up per byte: this runs on every request.
            const UNRESERVED: [bool; 256] = {
                let mut table = [false; 256];
                let mut b = 0;
                while b < 256 {
                    let c = b as u8;
                    table[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
                    b += 1;
                }
                table
            };
            let bytes = host.as_bytes();
            let at = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
            let (name, port) = host.split_at(at);
            (!name.is_empty() && name.len() <= 253 && name.bytes().all(|b| UNRESERVED[usize::from(b)]), port)
        }
    };
    let port_ok = match port {
        "" => true,
        p => p.strip_prefix(':').is_some_and(|digits| {
            (1..=5).contains(&digits.len())
                && digits
                    .bytes()
                    .try_fold(0u32, |n, b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
                    .is_some_and(|n| n <= u32::from(u16::MAX))
        }),
    };
    name_ok && port_ok
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Adds `X-Forwarded-For` (appended to a prior value), `Forwarded`, `X-Forwarded-Host`
/// and `X-Forwarded-Proto`. The client's address was written once for its connection;
/// each value is copied into one buffer sized for it (no formatting per request), and
/// the names are constants (no parse per request).
fn append_forwarding(
    headers: &mut HeaderMap,
    client: Option<&ClientAddr>,
    host: Option<HeaderValue>,
    proto: &'static str,
) {
    // Only a checked host is passed on (the route table has refused the rest already).
    let host = host.filter(|h| h.to_str().is_ok_and(valid_host));
    if let Some(client) = client {
        // A prior value that is not visible ASCII is replaced, not extended.
        let prior =
            headers.get(&X_FORWARDED_FOR).filter(|v| !v.is_empty() && v.to_str().is_ok()).map(HeaderValue::as_bytes);
        let xff = match prior {
            None => Some(client.ip.clone()),
            Some(prior) => {
                let ip = client.ip.as_bytes();
                let mut xff = Vec::with_capacity(prior.len() + 2 + ip.len());
                xff.extend_from_slice(prior);
                xff.extend_from_slice(b", ");
                xff.extend_from_slice(ip);
                HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)).ok()
            }
        };
        if let Some(xff) = xff {
            headers.insert(X_FORWARDED_FOR, xff);
        }
        let host = host.as_ref().map(HeaderValue::as_bytes);
        let for_ = client.forwarded_for.as_bytes();
        let mut forwarded = Vec::with_capacity(for_.len() + 7 + proto.len() + host.map_or(0, |h| h.len() + 8));
        forwarded.extend_from_slice(for_);
        forwarded.extend_from_slice(b";proto=");
        forwarded.extend_from_slice(proto.as_bytes());
        if let Some(host) = host {
            forwarded.extend_from_slice(b";host=\"");
            forwarded.extend_from_slice(host);
            forwarded.push(b'"');
        }
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)) {
            headers.append(header::FORWARDED, value);
        }
    }
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// Whether hyper-util reports `error` as a request it gave back unsent: its error kind
/// `Canceled`, which it has no public accessor for and shows only in its `Display`
/// (`client error (Canceled)`). In hyper-util 0.1.21 (`client/legacy/client.rs`) that
/// kind is made in three places, all before anything is written: hyper returned the
/// request with the error (`take_message`), a pool checkout lost a race, and an ALPN
/// upgrade to HTTP/2. Should the text ever change, this answers false and the request is
/// held as an unknown outcome: the safe side.
fn never_sent(error: &hyper_util::client::legacy::Error) -> bool {
    error.to_string() == "client error (Canceled)"
}

/// 502 `upstream-unreachable` for a request that was never sent, releasing its key. A
/// failed TLS handshake is named in full in the log, and by its kind only in the client's
/// detail ([`crate::tls::category`]): the certificate's names may be internal hosts.
fn unreachable(error: &hyper_util::client::legacy::Error) -> Response<ResponseBody> {
    let detail = match crate::tls::tls_error(error) {
        Some(tls) => {
            tracing::error!(error = ?error, cause = %crate::tls::describe(tls), "TLS handshake with the upstream failed");
            format!("{}; the request was not sent", crate::tls::category(tls))
        }
        None => {
            tracing::warn!(error = ?error, "upstream unreachable");
            "no connection to the upstream could be made; the request was not sent".to_string()
        }
    };
    let mut response =
        upstream_problem("upstream-unreachable", "The upstream is unreachable", StatusCode::BAD_GATEWAY, &detail);
    response.headers_mut().insert(SHOULD_RETRY, HeaderValue::from_static("true"));
    response.extensions_mut().insert(NotProcessed);
    response
}

fn upstream_problem(kind: &str, title: &str, status: StatusCode, detail: &str) -> Response<ResponseBody> {
    problem_response(&format!("urn:oncely:problem:{kind}"), title, status, detail, None)
}

impl tower::Service<Request<ForwardBody>> for Proxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ForwardBody>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let uri = match self.upstream_uri(&parts.method, &parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                let response = upstream_problem(
                    "bad-request-target",
                    "Bad request target",
                    StatusCode::BAD_REQUEST,
                    &e.to_string(),
                );
                return Box::pin(std::future::ready(Ok(response)));
            }
        };
        // The layer puts the key of a keyed request in its extensions.
        let keyed = parts.extensions.get::<oncely::IdempotencyKey>().is_some();
        // The client's host, for the forwarding fields (HTTP/2 carries it in `:authority`).
        let host = match &self.upstream.host {
            Some(_) => parts.headers.get(header::HOST).cloned(),
            None => parts.headers.remove(header::HOST),
        }
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        strip_hop_by_hop(&mut parts.headers);
        // An `http://` upstream's own `Host`, set after the hop-by-hop removal (which takes
        // whatever `Connection` names, `Host` included): in the client's `Host`'s place
        // (first, where clients put it), or last when the removal took it. Never missing,
        // or hyper-util would write one from the pool's label (see `POOL_LABEL`).
        if let Some(upstream_host) = &self.upstream.host {
            parts.headers.insert(header::HOST, upstream_host.clone());
        }
        append_forwarding(&mut parts.headers, self.client.as_ref().map(|c| &*c.0), host, self.upstream.client_proto);
        parts.uri = uri;
        // The version the upstream connection speaks (HTTP/1.1, or HTTP/2 when an https
        // upstream chose it by ALPN) is the client pool's choice, whatever the client
        // spoke: hyper sends an HTTP/1.1 request over an HTTP/2 connection as HTTP/2.
        parts.version = http::Version::HTTP_11;
        let mut request = Request::from_parts(parts, body);
        // Whether a connection was ever obtained: a timeout before one was says that
        // nothing was sent, which releases a keyed request's key. Only keyed requests
        // pay for the capture.
        let connection = keyed.then(|| capture_connection(&mut request));
        let upstream = self.upstream.client().request(request);
        let timeout = if keyed { self.completion_limit } else { self.upstream.timeout };
        Box::pin(async move {
            let mut response = match tokio::time::timeout(timeout, upstream).await {
                // A body that stalls between chunks fails after the same timeout, so a
                // stuck upstream cannot hold a request (or a graceful shutdown) forever.
                Ok(Ok(response)) => response.map(|body| IdleTimeout::response(body, timeout).boxed_unsync()),
                // Nothing was sent, and the key is released, when: the connection failed
                // (TCP, or the TLS handshake); a keyed request's capture saw no
                // connection; or hyper-util gave the request back unsent (a TLS 1.3
                // server refusing a client certificate after the client's handshake,
                // before the request was written).
                Ok(Err(e))
                    if e.is_connect()
                        || never_sent(&e)
                        || connection.as_ref().is_some_and(|c| c.connection_metadata().is_none()) =>
                {
                    return Ok(unreachable(&e));
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = ?e, "upstream failed after the request was sent");
                    let detail =
                        "the upstream connection failed after the request was sent; it may have been processed";
                    let mut response =
                        upstream_problem("upstream-failed", "The upstream failed", StatusCode::BAD_GATEWAY, detail);
                    response.extensions_mut().insert(OutcomeUnknown);
                    return Ok(response);
                }
                Err(_) if connection.as_ref().is_some_and(|c| c.connection_metadata().is_none()) => {
                    tracing::warn!(?timeout, "no upstream connection in time; nothing was sent");
                    let detail = format!(
                        "no connection to the upstream within {}; the request was not sent",
                        humantime::format_duration(timeout)
                    );
                    let mut response = upstream_problem(
                        "upstream-unreachable",
                        "The upstream is unreachable",
                        StatusCode::GATEWAY_TIMEOUT,
                        &detail,
                    );
                    response.headers_mut().insert(SHOULD_RETRY, HeaderValue::from_static("true"));
                    response.extensions_mut().insert(NotProcessed);
                    return Ok(response);
                }
                Err(_) => {
                    tracing::warn!(?timeout, "upstream timed out");
                    let detail = format!(
                        "the upstream did not answer within {}; the request may have been processed",
                        humantime::format_duration(timeout)
                    );
                    let mut response = upstream_problem(
                        "upstream-timeout",
                        "The upstream timed out",
                        StatusCode::GATEWAY_TIMEOUT,
                        &detail,
                    );
                    // It may have been processed: without a key, a retry could run it again.
                    response.headers_mut().insert(SHOULD_RETRY, HeaderValue::from_static("false"));
                    response.extensions_mut().insert(OutcomeUnknown);
                    return Ok(response);
                }
            };
            strip_hop_by_hop(response.headers_mut());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ClientAddr, append_forwarding, valid_host};
    use http::{HeaderMap, HeaderValue};

    fn forwarded(
        client: &str,
        prior: Option<&'static [u8]>,
        host: Option<&'static str>,
        proto: &'static str,
    ) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(prior) = prior {
            headers.insert("x-forwarded-for", HeaderValue::from_bytes(prior).expect("a valid value"));
        }
        let client = ClientAddr::new(client.parse().expect("an address"));
        append_forwarding(&mut headers, Some(&client), host.map(HeaderValue::from_static), proto);
        headers
    }

    #[test]
    fn forwarding_headers_name_the_client_the_host_and_the_scheme() {
        let v4 = forwarded("192.0.2.1:5000", Some(b"203.0.113.9"), Some("gw.example:8080"), "http");
        assert_eq!(v4["x-forwarded-for"], "203.0.113.9, 192.0.2.1");
        assert_eq!(v4["forwarded"], r#"for=192.0.2.1;proto=http;host="gw.example:8080""#);
        assert_eq!(v4["x-forwarded-host"], "gw.example:8080");
        assert_eq!(v4["x-forwarded-proto"], "http");

        let v6 = forwarded("[2001:db8::1]:443", None, None, "https");
        assert_eq!(v6["x-forwarded-for"], "2001:db8::1");
        assert_eq!(v6["forwarded"], r#"for="[2001:db8::1]";proto=https"#);
        assert!(!v6.contains_key("x-forwarded-host"));
        assert_eq!(v6["x-forwarded-proto"], "https");

        // A prior X-Forwarded-For that is empty or not visible ASCII is replaced; a host
        // that is not a plain host is not passed on.
        for prior in [&b""[..], &b"caf\xe9"[..]] {
            let headers = forwarded("192.0.2.1:5000", Some(prior), Some("a,b"), "http");
            assert_eq!(headers["x-forwarded-for"], "192.0.2.1");
            assert_eq!(headers["forwarded"], "for=192.0.2.1;proto=http");
            assert!(!headers.contains_key("x-forwarded-host"));
        }
    }

    #[test]
    fn only_plain_hosts_are_valid() {
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:7100",
            "[::1]:80",
            "[2001:db8::1]",
            "a_b.local",
            "x",
            "h:65535",
            "h:0",
        ] {
            assert!(valid_host(good), "{good}");
        }
        for bad in [
            "",
            "a\", for=7.7.7.7;proto=https;host=\"evil",
            "evil.com, other.com",
            "a;b",
            "user@host",
            "host:",
            "host:99999",
            "host:65536",
            "host:+80",
            "host:123456",
            "\u{e9}.example",
            "host:8o",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "ex ample.com",
            "ex%41mple.com",
            ":80",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
    }
}
