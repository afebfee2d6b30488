//! A body that fails when no frame arrives for a while ([`IdleTimeout`]), used for the
//! request body the gateway reads from a client and the response body it reads from the
//! upstream.
//!
//! Like tower-http's `TimeoutBody`, with two differences that the gateway needs:
//!
//! - **A timer only while the body is waiting.** tower-http arms a `Sleep` on every
//!   `poll_frame` and drops it with every frame, so a body whose frames are already
//!   buffered (almost every small request and response on a keep-alive connection)
//!   registers and clears a timer-wheel entry per frame, the end-of-stream included.
//!   Here the body is polled first and the timer is armed only when it answers
//!   `Pending`; it is dropped with the next frame. The deadline is the same: no frame for
//!   `timeout` while somebody waits for one.
//! - **A request body keeps its size hint and end-of-stream**, so a forwarded request
//!   keeps its `Content-Length` framing. A response body hides them, as tower-http's
//!   does: the response's framing stays the upstream's headers (a 304 carries the
//!   `Content-Length` of a body it does not send; an empty body's hint would make hyper
//!   drop that header).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// Which body is bounded: what its error names, and whether its framing is passed on.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// A client's request body, bounded by `server.body_read_timeout`; its size hint and
    /// end-of-stream are passed on.
    Request,
    /// The upstream's response body, bounded by the upstream timeout (or a keyed
    /// request's completion limit); its framing stays the upstream's headers.
    Response,
}

/// The error of a body that stalled: which side, and for how long.
#[derive(Debug)]
pub struct BodyStalled {
    side: Side,
    after: Duration,
}

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, setting) = match self.side {
            Side::Request => ("the request body", "server.body_read_timeout"),
            Side::Response => ("the upstream's response body", "upstream.timeout"),
        };
        write!(f, "{what} sent nothing for {} ({setting})", humantime::format_duration(self.after))
    }
}

impl std::error::Error for BodyStalled {}

/// `body`, failing with [`BodyStalled`] when it yields no frame for `timeout` while it
/// is read.
pub(crate) struct IdleTimeout<B> {
    body: B,
    timeout: Duration,
    side: Side,
    /// Armed only while the body is `Pending`; boxed so that the body stays `Unpin`.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleTimeout<B> {
    /// A client's request body, bounded by `server.body_read_timeout`.
    pub(crate) fn request(body: B, timeout: Duration) -> Self {
        Self { body, timeout, side: Side::Request, sleep: None }
    }

    /// The upstream's response body, bounded by the upstream timeout (or a keyed
    /// request's completion limit) between frames.
    pub(crate) fn response(body: B, timeout: Duration) -> Self {
        Self { body, timeout, side: Side::Response, sleep: None }
    }

    /// Whether the body's size hint and end-of-stream are passed on.
    fn framing(&self) -> bool {
        matches!(self.side, Side::Request)
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(BodyStalled { side: this.side, after: timeout }))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.framing() { self.body.size_hint() } else { SizeHint::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_ready_body_arms_no_timer_and_a_stalled_one_fails_after_the_timeout() {
        let mut ready = IdleTimeout::response(Full::new(Bytes::from_static(b"{}")), Duration::from_secs(1));
        assert_eq!(ready.size_hint().exact(), None, "a response's framing is its headers'");
        assert_eq!(
            IdleTimeout::request(Full::new(Bytes::from_static(b"{}")), Duration::from_secs(1)).size_hint().exact(),
            Some(2)
        );
        let frame = ready.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"{}"));
        assert!(ready.sleep.is_none(), "a buffered frame needs no timer");
        assert!(ready.frame().await.is_none());

        // One frame, then nothing ever again.
        let frames = futures_util::stream::iter([Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"a")))])
            .chain(futures_util::stream::pending());
        let mut stalled = IdleTimeout::request(StreamBody::new(frames), Duration::from_secs(5));
        assert!(stalled.frame().await.expect("a frame").is_ok());
        let started = tokio::time::Instant::now();
        let error = stalled.frame().await.expect("an error").expect_err("stalled");
        assert_eq!(started.elapsed(), Duration::from_secs(5), "the deadline counts from the wait");
        assert_eq!(error.to_string(), "the request body sent nothing for 5s (server.body_read_timeout)");
    }
}
