//! # An example backend, written the way a crate outside RIXL writes one
//!
//! `DELAYCOPY` copies DRAM within its own agent on a worker thread, after an optional delay.
//! It is small on purpose: it shows every piece a backend has (its parameter table, its
//! capabilities, registration, a postable transfer that completes from another thread,
//! cancellation) and nothing else. `docs/WRITING-A-BACKEND.md` walks through it.
//!
//! It depends on the `rixl` crate only, as an outside crate would: `rixl::backend` is the
//! backend contract. An application adds it to one agent with `Agent::add_backend(&FACTORY,
//! &params)`, or makes it creatable by name in the whole process with
//! `rixl::registry::add_factory(FACTORY)`.
//!
//! ## Parameters
//!
//! | Parameter | Default | Values | What it does |
//! |---|---|---|---|
//! | `delay_us` | `0` | an integer in 0..=60000000 | How long the worker waits before copying a post, in microseconds. |

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rixl::backend::{
    Backend, BackendContext, BackendFactory, BackendXfer, LocalRegion, ParamKind, ParamSpec,
    PostOutcome, XferSpec,
};
use rixl::core::{CompletionHandle, SegmentVec};
use rixl::{Capabilities, Error, MemType, Params, RegDesc, Result, XferOp};

/// The backend's name.
pub const NAME: &str = "DELAYCOPY";

/// How RIXL creates it.
pub const FACTORY: BackendFactory = BackendFactory::new(NAME, PARAMS, capabilities, create);

const PARAMS: &[ParamSpec] = &[ParamSpec::new(
    "delay_us",
    ParamKind::Int {
        min: 0,
        max: 60_000_000,
    },
    "0",
    "How long the worker waits before copying a post, in microseconds.",
)];

/// DRAM to DRAM within its own agent; no peers, no notifications.
fn capabilities() -> Capabilities {
    Capabilities::new(&[MemType::Dram])
        .moving(MemType::Dram, MemType::Dram)
        .local()
}

fn create(ctx: BackendContext) -> Result<Arc<dyn Backend>> {
    // The agent validated the values against `PARAMS`: typed access cannot fail.
    let delay = Duration::from_micros(ctx.params().int("delay_us"));
    let (jobs, rx) = mpsc::channel::<Job>();
    let worker = std::thread::Builder::new()
        .name("delaycopy".into())
        .spawn(move || run_worker(rx, delay))
        .map_err(|e| Error::from_io(rixl::ErrorKind::Backend, "cannot start the worker", &e))?;
    Ok(Arc::new(DelayCopy {
        params: ctx.params().values().clone(),
        jobs: Mutex::new(Some(jobs)),
        worker: Mutex::new(Some(worker)),
        next_token: AtomicU64::new(1),
    }))
}

/// One post handed to the worker.
struct Job {
    xfer: Arc<Shared>,
    done: CompletionHandle,
}

fn run_worker(rx: mpsc::Receiver<Job>, delay: Duration) {
    for job in rx {
        std::thread::sleep(delay);
        // The completion handle says whether this post is still the current one: a cancelled
        // post is not copied (cancel waited for us not to be inside the copy, see below).
        let _copying = job.xfer.copying.lock().unwrap_or_else(|e| e.into_inner());
        if job.xfer.cancelled.load(Ordering::Acquire) || !job.done.is_current() {
            continue;
        }
        job.xfer.copy();
        job.done.complete(Ok(()));
    }
}

/// The `DELAYCOPY` backend.
#[derive(Debug)]
struct DelayCopy {
    params: Params,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_token: AtomicU64,
}

impl Backend for DelayCopy {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    unsafe fn register(&self, mem: MemType, _desc: &RegDesc) -> Result<LocalRegion> {
        if mem != MemType::Dram {
            return Err(Error::not_supported(format!("{NAME} registers DRAM only")));
        }
        // Nothing to pin or publish: hand out distinct tokens, so that the agent never merges
        // descriptors of two regions.
        Ok(LocalRegion {
            token: self.next_token.fetch_add(1, Ordering::Relaxed),
            public: Vec::new(),
        })
    }

    fn deregister(&self, _mem: MemType, _token: u64) -> Result<()> {
        // The agent calls this only once no post uses the region any more.
        Ok(())
    }

    unsafe fn prepare_xfer(&self, spec: XferSpec<'_>) -> Result<Box<dyn BackendXfer>> {
        if !spec.loopback {
            return Err(Error::not_supported(format!(
                "{NAME} moves data within its own agent only"
            )));
        }
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::remote_disconnect("the agent was dropped"))?;
        Ok(Box::new(DelayXfer {
            shared: Arc::new(Shared {
                op: spec.op,
                local: spec.local,
                remote: spec.remote,
                cancelled: AtomicBool::new(false),
                copying: Mutex::new(()),
            }),
            jobs,
        }))
    }

    fn shutdown(&self) {
        // Stop the worker: dropping the sender ends its loop.
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = worker {
            if w.thread().id() != std::thread::current().id() {
                let _ = w.join();
            }
        }
    }
}

/// What a transfer and the worker share.
struct Shared {
    op: XferOp,
    local: SegmentVec,
    remote: SegmentVec,
    cancelled: AtomicBool,
    /// Held by the worker while it copies; `cancel` takes it to wait for a copy to end.
    copying: Mutex<()>,
}

impl Shared {
    fn copy(&self) {
        for (l, r) in self.local.iter().zip(self.remote.iter()) {
            let (src, dst) = match self.op {
                XferOp::Write => (l.addr, r.addr),
                XferOp::Read => (r.addr, l.addr),
            };
            // SAFETY: `prepare_xfer`'s contract: both segments lie inside regions registered
            // with this backend, which the agent keeps registered (so, by `register`'s
            // contract, valid) until this post has ended; the post ends only after this copy,
            // when the worker calls `complete`. `ptr::copy` allows the two ranges to overlap.
            unsafe {
                std::ptr::copy(
                    src as usize as *const u8,
                    dst as usize as *mut u8,
                    l.len as usize,
                )
            };
        }
    }
}

#[derive(Debug)]
struct DelayXfer {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("op", &self.op)
            .field("segments", &self.local.len())
            .finish_non_exhaustive()
    }
}

impl BackendXfer for DelayXfer {
    fn post(&self, _notif: Option<&[u8]>, done: CompletionHandle) -> Result<PostOutcome> {
        self.shared.cancelled.store(false, Ordering::Release);
        self.jobs
            .send(Job {
                xfer: self.shared.clone(),
                done,
            })
            .map_err(|_| Error::remote_disconnect("the agent was dropped"))?;
        Ok(PostOutcome::InProgress)
    }

    fn cancel(&self) -> Result<()> {
        self.shared.cancelled.store(true, Ordering::Release);
        // Wait for a copy in progress: when this returns, no byte of the post lands any more.
        drop(
            self.shared
                .copying
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        Ok(())
    }
}

// The parameter table in the crate docs is the one the code declares.
rixl::backend::params_doc_test!(PARAMS);
