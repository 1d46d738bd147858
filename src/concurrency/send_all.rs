//! `send_all`: a batch through the gate, never more in hand than it admits.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::stream::{FusedStream, FuturesUnordered};
use futures_util::Stream;
use pin_project_lite::pin_project;
use tokio::time::{sleep, Sleep};
use tower::{BoxError, Service};

use super::future::ResponseFuture;
use super::line::LineOf;
use super::queue::Admission;
use super::ConcurrencyGate;

/// How long a batch whose next request finds the gate full, with none of
/// its own in the gate to end and make room, waits before it asks again:
/// only when other callers share the gate and fill it (the batch's own
/// requests never overfill it).
const FULL_RETRY: Duration = Duration::from_millis(10);

impl<S, L> ConcurrencyGate<S, L> {
    /// Sends every request of `requests` through the gate (and the stack
    /// inside it), yielding `(index, result)` as each ends, `index` being
    /// its place in `requests` from 0.
    ///
    /// It keeps in hand at most what the gate admits, `parallelism +
    /// queue_limit` read again as each request goes (so it follows a
    /// parallelism changed by hand or [adapting](crate::ConcurrencyGateLayer::adaptive_parallelism)),
    /// and takes the next request from `requests` only when there is room:
    /// none of the batch's requests is refused with
    /// [`Error::QueueFull`](crate::Error::QueueFull), however large the
    /// batch, and a million-request stream is read as the gate drains it,
    /// not collected. If other callers share the gate and fill it, the
    /// batch's next request waits (in the stream, not the gate) for one of
    /// the batch's own to end, or, with none in the gate, asks again every
    /// 10 ms.
    ///
    /// Every request ends as one item: the response, the inner error, or
    /// one of the gate's typed errors
    /// ([`QueueTimeout`](crate::Error::QueueTimeout) with a queue timeout).
    /// Dropping the stream cancels the requests in hand and gives back
    /// their slots and places; requests not yet taken from `requests` are
    /// never sent.
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// use tollgate::testing::Script;
    /// use tollgate::Tollgate;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// let server = Script::new();
    /// let client = Tollgate::builder().parallelism(4).build(server.service())?;
    ///
    /// // 1,000 requests, 4 at once and 14 waiting: none refused.
    /// let requests = futures_util::stream::iter((0..1_000).map(|_| http::Request::new(())));
    /// let mut results = client.send_all(requests);
    /// let mut ok = 0;
    /// while let Some((_index, result)) = results.next().await {
    ///     ok += usize::from(result?.status().is_success());
    /// }
    /// assert_eq!(ok, 1_000);
    /// assert_eq!(client.handle().refused(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn send_all<St>(&self, requests: St) -> SendAll<S, L, St>
    where
        St: Stream,
        S: Service<St::Item> + Clone,
        L: LineOf<St::Item> + Clone,
    {
        SendAll {
            gate: self.clone(),
            requests,
            requests_done: false,
            next_index: 0,
            held_back: None,
            in_hand: FuturesUnordered::new(),
            ended: VecDeque::new(),
            full_wait: None,
        }
    }
}

pin_project! {
    /// The stream [`ConcurrencyGate::send_all`] returns: `(index, result)`
    /// for each request, as each ends.
    #[must_use = "streams do nothing unless polled"]
    pub struct SendAll<S, L, St>
    where
        St: Stream,
        S: Service<St::Item>,
    {
        gate: ConcurrencyGate<S, L>,
        #[pin]
        requests: St,
        requests_done: bool,
        next_index: usize,
        // A request the gate had no room for, sent when it has.
        held_back: Option<(usize, St::Item)>,
        in_hand: FuturesUnordered<Indexed<ResponseFuture<S, St::Item>>>,
        // Requests that ended, not yet yielded: each poll takes every ended
        // one out of `in_hand`, so that its slot goes back (and, for an
        // adaptive gate, its latency is read) when it ends, not when a slow
        // consumer gets to it.
        ended: VecDeque<(usize, Result<S::Response, BoxError>)>,
        // Boxed (it is rarely needed) so that the stream is `Unpin`
        // whenever `St` is, and `StreamExt::next` works on it as it is.
        full_wait: Option<Pin<Box<Sleep>>>,
    }
}

impl<S, L, St> Stream for SendAll<S, L, St>
where
    St: Stream,
    S: Service<St::Item> + Clone,
    S::Error: Into<BoxError>,
    L: LineOf<St::Item>,
{
    type Item = (usize, Result<S::Response, BoxError>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            // Fill the gate, as far as it has room (at least one: a closed
            // gate answers each request with its error, not a hang).
            let room = this
                .gate
                .gate
                .parallelism()
                .saturating_add(this.gate.gate.queue_limit())
                .max(1);
            while this.in_hand.len() < room {
                let (index, request) = match this.held_back.take() {
                    Some(held) => held,
                    None if *this.requests_done => break,
                    None => match this.requests.as_mut().poll_next(cx) {
                        Poll::Ready(Some(request)) => {
                            let index = *this.next_index;
                            *this.next_index += 1;
                            (index, request)
                        }
                        Poll::Ready(None) => {
                            *this.requests_done = true;
                            break;
                        }
                        Poll::Pending => break,
                    },
                };
                match this.gate.admit(request) {
                    (request, Admission::Full) => {
                        *this.held_back = Some((index, request));
                        break;
                    }
                    (request, admission) => {
                        let future = this.gate.future(admission, request);
                        this.in_hand.push(Indexed { index, future });
                    }
                }
            }
            while let Poll::Ready(Some(ended)) = Pin::new(&mut *this.in_hand).poll_next(cx) {
                this.ended.push_back(ended);
            }
            if let Some(ended) = this.ended.pop_front() {
                return Poll::Ready(Some(ended));
            }
            if this.held_back.is_none() || !this.in_hand.is_empty() {
                // Woken by a request ending or the stream having more.
                let done = *this.requests_done && this.held_back.is_none();
                return match done && this.in_hand.is_empty() {
                    true => Poll::Ready(None),
                    false => Poll::Pending,
                };
            }
            // Held back with nothing of ours in the gate: other callers
            // fill it. Ask again shortly.
            let wait = this
                .full_wait
                .get_or_insert_with(|| Box::pin(sleep(FULL_RETRY)));
            ready!(wait.as_mut().poll(cx));
            *this.full_wait = None;
        }
    }
}

impl<S, L, St> FusedStream for SendAll<S, L, St>
where
    St: Stream,
    S: Service<St::Item> + Clone,
    S::Error: Into<BoxError>,
    L: LineOf<St::Item>,
{
    fn is_terminated(&self) -> bool {
        self.requests_done
            && self.held_back.is_none()
            && self.in_hand.is_empty()
            && self.ended.is_empty()
    }
}

impl<S, L, St> fmt::Debug for SendAll<S, L, St>
where
    St: Stream,
    S: Service<St::Item>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendAll")
            .field("sent", &self.next_index)
            .field("in_hand", &self.in_hand.len())
            .field("ended", &self.ended.len())
            .field("requests_done", &self.requests_done)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// A response future that answers with its request's index.
    struct Indexed<F> {
        index: usize,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Indexed<F> {
    type Output = (usize, F::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.future.poll(cx));
        Poll::Ready((*this.index, output))
    }
}
