//! The one back-pressure rule of every client adapter (see [`MessageBacklog`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The one back-pressure rule of every client adapter, shared by the task that drives a
/// [`ClientDriver`](super::ClientDriver) and the application's message receiver.
///
/// The adapter hands each message to the application as soon as it arrives
/// ([`MessageBacklog::handed`]); the receiver reports each one it gives the application
/// ([`MessageBacklog::taken`]). While [`ClientOptions::message_buffer`](super::ClientOptions::message_buffer) messages are untaken,
/// [`ClientDriver::is_reading`](super::ClientDriver::is_reading) is false and the adapter stops reading from the network, so a
/// slow application slows the broker down (QUIC flow control, TCP windows, and past those the
/// broker's own per-client limit) instead of growing the client's memory. When the application
/// catches up, the task waiting on [`MessageBacklog::room`] wakes and reads again. Once the
/// application drops its receiver ([`MessageBacklog::detach`]) nothing is counted any more:
/// messages nobody can take are discarded, and the connection keeps going.
#[derive(Debug, Clone)]
pub struct MessageBacklog(Arc<BacklogInner>);

#[derive(Debug)]
struct BacklogInner {
    limit: usize,
    unread: AtomicUsize,
    detached: AtomicBool,
    /// The driving task, waiting for room.
    waiting: Mutex<Option<Waker>>,
}

impl MessageBacklog {
    /// Room for `limit` untaken messages (at least one).
    pub fn new(limit: usize) -> MessageBacklog {
        MessageBacklog(Arc::new(BacklogInner {
            limit: limit.max(1),
            unread: AtomicUsize::new(0),
            detached: AtomicBool::new(false),
            waiting: Mutex::new(None),
        }))
    }

    /// The most untaken messages before reading stops.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Messages handed to the application and not taken yet.
    pub fn unread(&self) -> usize {
        self.0.unread.load(Ordering::Acquire)
    }

    /// Whether the application can take more (or has gone, and takes nothing any more).
    pub fn has_room(&self) -> bool {
        self.0.detached.load(Ordering::Acquire) || self.unread() < self.0.limit
    }

    /// The adapter put a message where the application takes it from.
    pub fn handed(&self) {
        if !self.0.detached.load(Ordering::Acquire) {
            self.0.unread.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The application took a message: wakes the driving task if that made room.
    pub fn taken(&self) {
        let _ = self.0.unread.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if self.has_room() {
            self.wake();
        }
    }

    /// The application dropped its receiver: nothing waits to be taken any more.
    pub fn detach(&self) {
        self.0.detached.store(true, Ordering::Release);
        self.0.unread.store(0, Ordering::Release);
        self.wake();
    }

    /// Whether the application dropped its receiver.
    pub fn is_detached(&self) -> bool {
        self.0.detached.load(Ordering::Acquire)
    }

    /// Resolves once there is room (at once if there is): what a driving task waits on while
    /// it does not read. Runtime-agnostic: any executor's waker will do.
    pub fn room(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let backlog = self.clone();
        std::future::poll_fn(move |cx| backlog.poll_room(cx))
    }

    /// [`MessageBacklog::room`] as a poll: registers `cx`'s waker while there is none.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_room() {
            return Poll::Ready(());
        }
        self.register(cx.waker());
        // Taken between the check and the registration: do not sleep through it.
        if self.has_room() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Registers the waker to wake when room comes back (replacing any earlier one): for
    /// drivers that are not futures, such as a thread waiting in a `mio::Poll`.
    pub fn register(&self, waker: &Waker) {
        if let Ok(mut w) = self.0.waiting.lock() {
            match &*w {
                Some(old) if old.will_wake(waker) => {}
                _ => *w = Some(waker.clone()),
            }
        }
    }

    fn wake(&self) {
        if let Some(w) = self.0.waiting.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_backlog_stops_reading_at_its_limit_and_wakes_the_driver_when_room_comes_back() {
        let backlog = MessageBacklog::new(2);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        backlog.handed();
        assert!(backlog.has_room());
        backlog.handed();
        assert!(!backlog.has_room());
        assert!(backlog.poll_room(&mut cx).is_pending());
        backlog.taken();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once there is room");
        assert!(backlog.poll_room(&mut cx).is_ready());
        // An application that dropped its receiver holds nothing up any more.
        backlog.handed();
        backlog.detach();
        backlog.handed();
        assert!(backlog.has_room());
        assert_eq!(backlog.unread(), 0);
    }
}
