//! # rixl-core
//!
//! The pure core of RIXL: types and logic with no I/O, shared by the agent (`rixl`), every
//! backend crate and the bindings. It holds
//!
//! - [`MemType`], [`XferOp`], descriptors and descriptor lists ([`Desc`], [`RegDesc`],
//!   [`StridedDesc`], [`XferDescList`], [`RegDescList`]);
//! - [`Error`] / [`ErrorKind`], one-to-one with NIXL's status codes, plus context;
//! - the [`RegIndex`] that finds the registration covering a descriptor by binary search;
//! - the metadata blob ([`AgentMetadata`]) and the bounds-checked [`codec`] under it;
//! - the request [`Completion`] cell and the [`NotifQueue`];
//! - plain data shared with backends: [`Params`], [`Capabilities`], resolved [`Segment`]s and
//!   [`CostEstimate`]s.
//!
//! The crate forbids `unsafe`: everything that touches memory by address lives in a backend.
//! The `Backend` trait itself is in `rixl-backend`, since its address-taking calls are
//! `unsafe fn`s.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod backend;
pub mod codec;
pub mod completion;
pub mod desc;
pub mod error;
pub mod index;
pub mod mem;
pub mod metadata;
pub mod notif;
pub mod op;
pub mod resolve;
pub mod segments;

pub use backend::{Capabilities, CostEstimate, CostMethod, Params, Segment};
pub use completion::{Completion, CompletionFuture, CompletionHandle, XferStatus};
pub use desc::{Desc, RegDesc, RegDescList, StridedDesc, XferDescList};
pub use error::{Error, ErrorKind, Result};
pub use index::{RegEntry, RegIndex};
pub use mem::MemType;
pub use metadata::{AgentMetadata, ConnInfo, MetadataSection, PublishedRegion};
pub use notif::{NotifLimits, NotifQueue, NotifSender, Notification, Popped};
pub use op::XferOp;
pub use segments::SegmentVec;
