//! [`reqwest::Client`] as a
//! `tower::Service<http::Request<B>>` (feature `reqwest`).
//!
//! tollgate's layers speak `http::Request` and `http::Response`, as hyper,
//! hyper-util and tower-http do; `reqwest::Client` is a
//! `Service<reqwest::Request>`. [`Client`] converts both ways, so the whole
//! stack wraps a reqwest client you already configured (timeouts, TLS,
//! proxies, pool):
//!
//! ```no_run
//! use tollgate::{Quota, Tollgate};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! let client = Tollgate::builder()
//!     .parallelism(10)
//!     .per_connection(Quota::per_second(20))
//!     .build(tollgate::reqwest::Client::from(reqwest::Client::new()))?;
//!
//! let request = http::Request::post("http://127.0.0.1:8080/leads")
//!     .body(bytes::Bytes::from_static(br#"{"lead":1}"#))?;
//! let response = client.oneshot(request).await?;
//! // Back to reqwest's response for its helpers (`text`, `json`, ...).
//! let text = reqwest::Response::from(response).text().await?;
//! # let _ = text;
//! # Ok(())
//! # }
//! ```
//!
//! # Why an adapter, and not `build(reqwest::Client::new())`
//!
//! `build` takes any service. Accepting a bare `reqwest::Client` as well
//! would take a conversion trait with an impl for every service *and* one
//! for `reqwest::Client`, and Rust's coherence rules refuse that pair: reqwest
//! may one day implement `Service<http::Request<_>>` itself, and the two
//! impls would then overlap. One named adapter keeps `build` generic and the
//! conversion visible.
//!
//! # Bodies
//!
//! A request body is anything `Into<reqwest::Body>`. `Bytes`, `String`,
//! `Vec<u8>`, `&'static str` and `&'static [u8]` are `Clone`, so retries
//! send them again. A stream goes in a [`Body`], which is sent once: its
//! response (or error) is returned as it is, never retried.
//!
//! # Errors
//!
//! The service fails with [`reqwest::Error`]. A request
//! reqwest cannot build (a relative URI such as `/leads`, which reqwest
//! refuses) is never retried by
//! [`DefaultClassify`](crate::retry::DefaultClassify): no wait would mend it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::Service;

use crate::retry::ReplayBody;

/// A [`reqwest::Client`] as a
/// `tower::Service<http::Request<B>>` answering
/// `http::Response<reqwest::Body>`. Cheap to clone: reqwest's client is an
/// `Arc` inside, so clones share its connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    inner: ::reqwest::Client,
}

impl Client {
    /// Wraps `client`.
    pub fn new(client: ::reqwest::Client) -> Self {
        Client { inner: client }
    }

    /// The reqwest client.
    pub fn get_ref(&self) -> &::reqwest::Client {
        &self.inner
    }

    /// The reqwest client, unwrapped.
    pub fn into_inner(self) -> ::reqwest::Client {
        self.inner
    }
}

impl From<::reqwest::Client> for Client {
    fn from(client: ::reqwest::Client) -> Self {
        Client::new(client)
    }
}

impl<B> Service<http::Request<B>> for Client
where
    B: Into<::reqwest::Body>,
{
    type Response = http::Response<::reqwest::Body>;
    type Error = ::reqwest::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest queues in its own pool; it is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> ResponseFuture {
        let state = match ::reqwest::Request::try_from(request) {
            Ok(request) => State::Sending {
                pending: self.inner.call(request),
            },
            Err(error) => State::Refused { error: Some(error) },
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response future of [`Client`].
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] pending: Pending },
        Refused { error: Option<::reqwest::Error> },
    }
}

/// What `reqwest::Client::execute` returns.
type Pending = <::reqwest::Client as Service<::reqwest::Request>>::Future;

impl Future for ResponseFuture {
    type Output = Result<http::Response<::reqwest::Body>, ::reqwest::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { pending } => pending.poll(cx).map_ok(Into::into),
            StateProj::Refused { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("ResponseFuture polled after it completed"),
            },
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// A request body for [`Client`] that is either buffered (sent again on a
/// retry) or a stream (sent once).
///
/// Buffered bodies need no `Body`: `Bytes`, `String` and `Vec<u8>` are
/// replayable as they are. `Body` is for a request type that must carry
/// either, such as an upload that streams large files and buffers small ones:
///
/// ```
/// use tollgate::reqwest::Body;
///
/// let small = Body::from("{\"lead\":1}");
/// assert!(small.is_buffered());
///
/// let chunks = reqwest::Body::from(vec![1, 2, 3]); // or reqwest::Body::wrap_stream(..)
/// assert!(Body::from(chunks).is_buffered()); // reqwest had it in memory
/// ```
pub struct Body {
    inner: BodyInner,
}

enum BodyInner {
    Buffered(Bytes),
    Streaming(::reqwest::Body),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Body::from(Bytes::new())
    }

    /// Whether retries can send this body again.
    pub fn is_buffered(&self) -> bool {
        matches!(self.inner, BodyInner::Buffered(_))
    }
}

impl ReplayBody for Body {
    fn try_replay(&self) -> Option<Self> {
        match &self.inner {
            BodyInner::Buffered(bytes) => Some(Body::from(bytes.clone())),
            BodyInner::Streaming(_) => None,
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body {
            inner: BodyInner::Buffered(bytes),
        }
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Self {
        Body::from(Bytes::from(bytes))
    }
}

impl From<String> for Body {
    fn from(text: String) -> Self {
        Body::from(Bytes::from(text))
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Self {
        Body::from(Bytes::from_static(text.as_bytes()))
    }
}

impl From<&'static [u8]> for Body {
    fn from(bytes: &'static [u8]) -> Self {
        Body::from(Bytes::from_static(bytes))
    }
}

/// A reqwest body that reqwest holds in memory is copied once and becomes
/// buffered; a stream stays a stream and is sent once.
impl From<::reqwest::Body> for Body {
    fn from(body: ::reqwest::Body) -> Self {
        let inner = match body.as_bytes() {
            Some(bytes) => BodyInner::Buffered(Bytes::copy_from_slice(bytes)),
            None => BodyInner::Streaming(body),
        };
        Body { inner }
    }
}

impl From<Body> for ::reqwest::Body {
    fn from(body: Body) -> Self {
        match body.inner {
            BodyInner::Buffered(bytes) => bytes.into(),
            BodyInner::Streaming(stream) => stream,
        }
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::empty()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            BodyInner::Buffered(bytes) => f.debug_tuple("Buffered").field(&bytes.len()).finish(),
            BodyInner::Streaming(_) => f.write_str("Streaming"),
        }
    }
}

/// Whether `error` is a reqwest error that no retry can mend: a request
/// reqwest refused to build, or a redirect loop.
pub(crate) fn is_permanent(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<::reqwest::Error>()
        .is_some_and(|error| error.is_builder() || error.is_redirect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_bodies_replay_and_streams_do_not() {
        for body in [
            Body::from("a"),
            Body::from(String::from("a")),
            Body::from(vec![b'a']),
            Body::from(Bytes::from_static(b"a")),
            Body::from(&b"a"[..]),
            Body::from(::reqwest::Body::from("a")),
        ] {
            let copy = body.try_replay().expect("a buffered body replays");
            let sent = ::reqwest::Body::from(copy);
            assert_eq!(sent.as_bytes(), Some(&b"a"[..]));
        }
        let stream = ::reqwest::Body::wrap(http_body_util::Empty::<Bytes>::new());
        let body = Body::from(stream);
        assert!(!body.is_buffered());
        assert!(body.try_replay().is_none());
        assert!(::reqwest::Body::from(body).as_bytes().is_none());
    }

    #[tokio::test]
    async fn a_request_reqwest_cannot_build_fails_at_once_and_is_permanent() {
        let mut client = Client::from(::reqwest::Client::new());
        let error = client
            .call(http::Request::new(Bytes::new())) // URI "/": not absolute
            .await
            .expect_err("reqwest needs an absolute URL");
        assert!(error.is_builder());
        assert!(is_permanent(&error));
        let io = std::io::Error::other("reset");
        assert!(!is_permanent(&io));
    }
}
