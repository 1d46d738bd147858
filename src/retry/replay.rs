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

/// `request`, and a copy of it (method, URI, version, headers, extensions,
/// body) if its body can be replayed.
///
/// The head is cloned whole (`Parts: Clone`), not field by field into a
/// `Request::new`, whose default URI is parsed only to be dropped.
pub(crate) fn with_replay<B: ReplayBody>(
    request: http::Request<B>,
) -> (http::Request<B>, Option<http::Request<B>>) {
    let Some(body) = request.body().try_replay() else {
        return (request, None);
    };
    let (head, original) = request.into_parts();
    let copy = http::Request::from_parts(head.clone(), body);
    (http::Request::from_parts(head, original), Some(copy))
}
