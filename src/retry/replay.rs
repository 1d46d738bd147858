//! Request bodies that can be sent again.

/// A request body the retry layer can copy for a later attempt.
///
/// Every `Clone` body is replayable. A body type that can be copied only
/// sometimes (a stream that may or may not be buffered) implements
/// `try_replay` itself and returns `None` when it cannot: the request is then
/// sent once, and its response (or error) returned as it is.
///
/// ```
/// use tollgate::retry::ReplayBody;
///
/// enum Upload {
///     Buffered(Vec<u8>),
///     Streaming(std::fs::File),
/// }
///
/// impl ReplayBody for Upload {
///     fn try_replay(&self) -> Option<Self> {
///         match self {
///             Upload::Buffered(bytes) => Some(Upload::Buffered(bytes.clone())),
///             Upload::Streaming(_) => None, // sent once
///         }
///     }
/// }
/// ```
pub trait ReplayBody: Sized {
    /// A copy of this body for another attempt, or `None` if there is none.
    fn try_replay(&self) -> Option<Self>;
}

impl<B: Clone> ReplayBody for B {
    fn try_replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

/// A copy of `request` (method, URI, version, headers, extensions, body), or
/// `None` if its body cannot be replayed.
pub(crate) fn try_replay_request<B: ReplayBody>(
    request: &http::Request<B>,
) -> Option<http::Request<B>> {
    let body = request.body().try_replay()?;
    let mut copy = http::Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}
