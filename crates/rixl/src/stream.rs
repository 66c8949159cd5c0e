//! [`NotifStream`]: the agent's notifications as an async stream.
//!
//! The stream takes notifications one at a time from the same queue that
//! [`Agent::get_notifs`] drains, so it yields them in arrival order and competes fairly with
//! the blocking calls (a notification goes to whoever takes it first). Each poll does what
//! `get_notifs` does before it looks: when the queue is empty it lets every notification
//! backend deliver what has already arrived (`poll_notifs`, never blocking). If the queue is
//! still empty the task's waker is registered with the queue under the lock a delivery takes,
//! so the next delivery wakes the task (see `rixl_core::notif`); nothing polls in between.
//!
//! The stream holds only a `Weak` reference to the agent, so it never keeps the agent alive;
//! dropping the agent closes the queue, which wakes the stream, and it ends (`None`). Requests
//! may keep the agent's internals alive longer, which is why the end is signalled by the queue
//! rather than by the weak reference alone. Notifications still queued at that point are not
//! yielded.
//!
//! There is no dependency on an async runtime or on the `futures` crates: [`NotifStream`] has
//! an inherent [`poll_next`](NotifStream::poll_next) and [`next`](NotifStream::next); with the
//! `stream` feature it also implements `futures_core::Stream`.

use std::future::poll_fn;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use rixl_core::{NotifQueue, Notification, Popped};

use crate::agent::{Agent, AgentInner};

/// An async stream of the agent's notifications, from [`Agent::notifications`]. See the
/// module documentation of `stream`.
#[must_use = "streams do nothing unless polled"]
#[derive(Debug)]
pub struct NotifStream {
    agent: Weak<AgentInner>,
    queue: Arc<NotifQueue>,
    id: u64,
    ended: bool,
}

impl Agent {
    /// The notifications this agent receives (from every notification backend), as an async
    /// stream yielding them in arrival order. It takes from the same queue as
    /// [`Agent::get_notifs`]: each notification is returned by one of them. The stream does
    /// not keep the agent alive and ends when the agent is dropped.
    pub fn notifications(&self) -> NotifStream {
        NotifStream {
            agent: Arc::downgrade(&self.inner),
            queue: self.inner.notifs().clone(),
            id: self.inner.notifs().new_consumer(),
            ended: false,
        }
    }
}

impl NotifStream {
    /// The next notification if one is there, `Pending` (with the task woken by the next
    /// delivery) if not, `None` once the agent is dropped.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Some(agent) = self.agent.upgrade() else {
            return self.end();
        };
        if self.queue.is_empty() {
            // Let backends deliver what already arrived, as `get_notifs` does (SHM's rings are
            // read here; a backend thread would otherwise have to be woken for it).
            agent.backends().visit(crate::backends::poll_notifs);
        }
        drop(agent);
        match self.queue.pop_or_register(self.id, cx.waker()) {
            Popped::Item(n) => Poll::Ready(Some(n)),
            Popped::Empty => Poll::Pending,
            Popped::Closed => self.end(),
        }
    }

    /// The next notification; `None` once the agent is dropped.
    pub async fn next(&mut self) -> Option<Notification> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    fn end(&mut self) -> Poll<Option<Notification>> {
        if !self.ended {
            self.ended = true;
            self.queue.unregister(self.id);
        }
        Poll::Ready(None)
    }
}

impl Drop for NotifStream {
    fn drop(&mut self) {
        if !self.ended {
            self.queue.unregister(self.id);
        }
    }
}

#[cfg(feature = "stream")]
impl futures_core::Stream for NotifStream {
    type Item = Notification;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Notification>> {
        NotifStream::poll_next(self.get_mut(), cx)
    }
}

#[cfg(feature = "stream")]
impl futures_core::FusedStream for NotifStream {
    fn is_terminated(&self) -> bool {
        self.ended
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is<T: Send + Sync + Unpin>() {}
    is::<NotifStream>();
}

#[cfg(all(test, feature = "stream"))]
mod tests {
    use super::*;
    use crate::AgentConfig;
    use futures_core::{FusedStream, Stream};
    use std::task::Waker;

    #[test]
    fn implements_futures_core_stream() {
        let a = Agent::new("stream-feature", AgentConfig::default().backend("LOOPBACK")).unwrap();
        let mut s = a.notifications();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Stream::poll_next(std::pin::Pin::new(&mut s), &mut cx).is_pending());
        a.send_notif("stream-feature", b"hi", None).unwrap();
        match Stream::poll_next(std::pin::Pin::new(&mut s), &mut cx) {
            Poll::Ready(Some(n)) => assert_eq!(n.msg, b"hi"),
            other => panic!("{other:?}"),
        }
        assert!(!s.is_terminated());
        drop(a);
        assert!(matches!(
            Stream::poll_next(std::pin::Pin::new(&mut s), &mut cx),
            Poll::Ready(None)
        ));
        assert!(s.is_terminated());
    }
}
