//! What a request's stream carries, and the channel that carries it.
//!
//! The channel is ours rather than `std::sync::mpsc` because the receiving
//! side must serve both worlds: blocking threads (`recv`) and async tasks
//! (`poll_recv` / `next`, woken through a `Waker`), without this crate
//! depending on an async runtime. The engine also needs to see when the
//! receiver is gone (a client disconnected) so it can abort the request.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Identifies a request for its whole life; ids grow with arrival.
pub type RequestId = u64;

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached, or the sequence filled the model's context (or
    /// the whole KV pool).
    Length,
    /// `abort` was called.
    Abort,
}

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// How likely one prompt token was, given the prompt tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    pub token: u32,
    /// Log-probability of `token` under the model's raw distribution (no
    /// penalty or temperature: the prompt was not sampled).
    pub logprob: f32,
    /// The most likely `(token, logprob)` pairs at that position, most
    /// likely first (as many as requested).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// One item of a request's output stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Scores of consecutive prompt tokens, from prompt index `first` on
    /// (at least 1: the first prompt token has no context to be scored
    /// in). Sent only when prompt log-probabilities were requested, in
    /// order and each index once, all before the first `Token`.
    PromptLogprobs {
        first: usize,
        entries: Vec<PromptLogprob>,
    },
    /// A generated token, with the text that became final with it (empty
    /// while a multi-byte character or a possible stop string is held back;
    /// the last token's text includes everything released at the end).
    Token {
        id: u32,
        text: String,
        /// Log-probability of `id`, when logprobs were requested.
        logprob: Option<f32>,
        /// The most likely `(token, logprob)` pairs, when requested.
        top_logprobs: Vec<(u32, f32)>,
    },
    /// The request ended; nothing follows.
    Finished { reason: FinishReason, usage: Usage },
    /// The request failed (e.g. the device reported an error); nothing follows.
    Error { message: String },
}

struct State {
    queue: VecDeque<Event>,
    sender_alive: bool,
    receiver_alive: bool,
    waker: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shared {
    /// A panic elsewhere while holding the lock must not poison the stream:
    /// the queue itself is always in a consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A new event stream.
pub fn channel() -> (EventSender, EventReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            sender_alive: true,
            receiver_alive: true,
            waker: None,
        }),
        ready: Condvar::new(),
    });
    (
        EventSender {
            shared: shared.clone(),
        },
        EventReceiver { shared },
    )
}

/// The engine's end of a stream. Dropping it ends the stream.
pub struct EventSender {
    shared: Arc<Shared>,
}

impl EventSender {
    /// Queues an event; false when the receiver is gone.
    pub fn send(&self, event: Event) -> bool {
        let waker = {
            let mut st = self.shared.lock();
            if !st.receiver_alive {
                return false;
            }
            st.queue.push_back(event);
            st.waker.take()
        };
        self.shared.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Whether the receiver was dropped (nobody listens any more).
    pub fn is_closed(&self) -> bool {
        !self.shared.lock().receiver_alive
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            st.sender_alive = false;
            st.waker.take()
        };
        self.shared.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The caller's end of a stream: blocking, non-blocking and async receive.
/// Dropping it aborts the request at the engine's next step.
pub struct EventReceiver {
    shared: Arc<Shared>,
}

impl EventReceiver {
    /// Waits for the next event; `None` once the stream has ended.
    pub fn recv(&self) -> Option<Event> {
        let mut st = self.shared.lock();
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some(e);
            }
            if !st.sender_alive {
                return None;
            }
            st = self.shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        let mut st = self.shared.lock();
        match st.queue.pop_front() {
            Some(e) => Ok(e),
            None if st.sender_alive => Err(TryRecvError::Empty),
            None => Err(TryRecvError::Disconnected),
        }
    }

    /// Waits at most `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Ok(e);
            }
            if !st.sender_alive {
                return Err(RecvTimeoutError::Disconnected);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvTimeoutError::Timeout);
            }
            st = self
                .shared
                .ready
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Async receive: `Ready(None)` once the stream has ended. Only the
    /// latest task to poll is woken.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut st = self.shared.lock();
        if let Some(e) = st.queue.pop_front() {
            return Poll::Ready(Some(e));
        }
        if !st.sender_alive {
            return Poll::Ready(None);
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// `recv` for async code: `while let Some(ev) = rx.next().await`.
    pub fn next(&self) -> Next<'_> {
        Next { rx: self }
    }

    /// Blocking iterator over the remaining events.
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        std::iter::from_fn(|| self.recv())
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receiver_alive = false;
        st.queue.clear();
    }
}

/// Future of [`EventReceiver::next`].
pub struct Next<'a> {
    rx: &'a EventReceiver,
}

impl Future for Next<'_> {
    type Output = Option<Event>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    fn finished() -> Event {
        Event::Finished {
            reason: FinishReason::Stop,
            usage: Usage::default(),
        }
    }

    #[test]
    fn events_arrive_in_order_then_the_stream_ends() {
        let (tx, rx) = channel();
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert!(tx.send(Event::Error { message: "a".into() }));
        assert!(tx.send(finished()));
        drop(tx);
        assert_eq!(rx.recv(), Some(Event::Error { message: "a".into() }));
        assert_eq!(rx.try_recv(), Ok(finished()));
        assert_eq!(rx.recv(), None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn blocking_receive_wakes_on_send_from_another_thread() {
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(finished());
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(finished()));
        t.join().unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn dropped_receiver_closes_the_sender() {
        let (tx, rx) = channel();
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert!(!tx.send(finished()));
    }

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn async_poll_registers_a_waker_that_send_wakes() {
        let (tx, rx) = channel();
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut next = rx.next();
        assert_eq!(Pin::new(&mut next).poll(&mut cx), Poll::Pending);
        tx.send(finished());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(Pin::new(&mut next).poll(&mut cx), Poll::Ready(Some(finished())));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }
}
