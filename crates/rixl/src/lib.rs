//! # rixl
//!
//! RIXL moves bytes point to point between agents — KV-cache pages between prefill and decode
//! workers, above all — across DRAM, VRAM, files, block devices and object stores, through
//! pluggable backends. It implements the model of NVIDIA's NIXL (agents, registrations, a
//! metadata blob, one-sided READ/WRITE requests with notifications) with a Rust API, and fixes
//! what hurts NIXL's users: per-descriptor cost, busy polling, hangs on peer death, stale handles
//! and opaque errors.
//!
//! ```
//! use rixl::{Agent, AgentConfig, MemType, RegDesc, RegDescList, XferDescList, Desc, XferOp, XferOptions};
//!
//! let agent = Agent::new("worker-0", AgentConfig::default().backend("LOOPBACK"))?;
//! let src = vec![7u8; 4096];
//! let mut dst = vec![0u8; 4096];
//! let regs = RegDescList::from_descs(MemType::Dram, vec![
//!     RegDesc::new(src.as_ptr() as u64, 4096, 0),
//!     RegDesc::new(dst.as_mut_ptr() as u64, 4096, 0),
//! ]);
//! // SAFETY: both buffers outlive their registration and are not touched during the transfer.
//! unsafe { agent.register_mem(&regs, &[])? };
//! let local = XferDescList::from_descs(MemType::Dram, vec![Desc::new(src.as_ptr() as u64, 4096, 0)]);
//! let target = XferDescList::from_descs(MemType::Dram, vec![Desc::new(dst.as_ptr() as u64, 4096, 0)]);
//! let req = agent.create_xfer_req(XferOp::Write, &local, &target, "worker-0", &XferOptions::with_notif("done"))?;
//! req.post()?;
//! req.wait(None)?;
//! assert_eq!(dst, src);
//! assert_eq!(agent.get_notifs(&[])?[0].msg, b"done");
//! # Ok::<(), rixl::Error>(())
//! ```
//!
//! Memory the agent can own needs no `unsafe`: [`Agent::register_owned`] takes a `Vec<u8>` or
//! `Box<[u8]>` and returns an [`OwnedRegion`] that deregisters (waiting for posts in flight)
//! before it frees or gives back the buffer; [`Agent::register`] and
//! [`Agent::register_storage`] return a [`Registration`] handle that deregisters on drop.
//!
//! The API is blocking and runtime-free, with async forms that need no runtime either:
//! [`XferRequest::completion`] is an [`XferFuture`] that honours the request's deadline, the
//! peer's invalidation and drives the backend like `status()`, and [`Agent::notifications`] is
//! a [`NotifStream`] of received notifications; both work under any executor.
//!
//! Layout: [`Agent`] (notifications, teardown) in `agent`, and its parts in their own modules:
//! the created backends in `backends`, local registrations in `registration`, the remote
//! metadata cache in `remote` (publishing and loading metadata in `metadata`); registration
//! handles in `owned`; prepared lists and requests in `xfer`, their future in `future` (woken
//! at deadlines by the process-wide thread in `timer`); the notification stream in `stream`;
//! built-in backends in `registry` (the in-process `LOOPBACK` backend lives here, the others in
//! their own crates). Types shared with backends come from `rixl-core` and `rixl-backend` and
//! are re-exported.

#![warn(missing_docs)]

mod agent;
mod backends;
pub mod config;
mod fence;
mod future;
pub mod listener;
mod loopback;
mod metadata;
mod owned;
mod prepared;
mod registration;
pub mod registry;
mod remote;
mod request;
mod stream;
mod timer;
mod xfer;

pub use agent::{Agent, INIT_AGENT, INIT_AGENT_NAME};
pub use config::{AgentConfig, DEFAULT_DEREGISTER_TIMEOUT};
pub use future::XferFuture;
pub use listener::DEFAULT_PORT;
pub use owned::{DeregisterError, OwnedRegion, RegisterableBuffer, Registration};
pub use prepared::PreparedList;
pub use request::{XferRequest, XferTelemetry};
pub use rixl_backend::{self as backend, BackendFactory, RequestExt};
pub use rixl_core::{
    self as core, Capabilities, CostEstimate, CostMethod, Desc, Error, ErrorKind, MemType,
    NotifLimits, Notification, Params, RegDesc, RegDescList, Result, StridedDesc, XferDescList,
    XferOp, XferStatus,
};
pub use stream::NotifStream;
pub use xfer::XferOptions;
