//! What the backend needs from an I/O engine.

use std::fmt::Debug;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::plan::Post;
use crate::region::FixedSlot;

/// An I/O engine: runs every chunk of a post on its own thread(s) and calls
/// [`Post::finish`] once all of them are accounted for.
pub(crate) trait Engine: Send + Sync + Debug {
    /// `"io_uring"` or `"threads"`, as reported by the backend's `params()`.
    fn name(&self) -> &'static str;

    /// Starts a post. Never blocks on I/O.
    fn submit(&self, post: Arc<Post>);

    /// Called after [`Post::request_cancel`]: drop the post's chunks not started yet and abort
    /// what can be aborted. The caller then waits for [`Post::finish`].
    fn cancel(&self, post: &Arc<Post>);

    /// A registered-file slot for `fd`, when the engine uses them.
    fn fixed_slot(&self, _fd: RawFd) -> Option<FixedSlot> {
        None
    }
}
