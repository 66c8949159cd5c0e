//! One error type for the whole library.
//!
//! NIXL reports failures as a bare `nixl_status_t`; users then have to guess which descriptor,
//! backend or peer was at fault. RIXL keeps the status (as [`ErrorKind`], one-to-one with NIXL's
//! codes so that the Python and C layers can map it back) and attaches the context that explains
//! it. The error is boxed so that `Result<T>` stays one word wide on the hot path.

use std::fmt;
use std::sync::Arc;

use crate::mem::MemType;
use crate::op::XferOp;

/// The class of a failure. Each variant maps onto one `nixl_status_t` value (see [`ErrorKind::code`]);
/// [`ErrorKind::Timeout`] is RIXL's own addition for deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Status or telemetry asked for before the first post (`NIXL_ERR_NOT_POSTED`).
    NotPosted,
    /// Bad arguments (`NIXL_ERR_INVALID_PARAM`).
    InvalidParam,
    /// A backend failed (`NIXL_ERR_BACKEND`).
    Backend,
    /// Unknown agent, backend, handle, or descriptors not covered by registrations (`NIXL_ERR_NOT_FOUND`).
    NotFound,
    /// Malformed metadata or serialized data (`NIXL_ERR_MISMATCH`).
    Mismatch,
    /// The operation is forbidden in this state (`NIXL_ERR_NOT_ALLOWED`).
    NotAllowed,
    /// A post is still in progress on this request (`NIXL_ERR_REPOST_ACTIVE`).
    RepostActive,
    /// Internal error (`NIXL_ERR_UNKNOWN`).
    Unknown,
    /// The backend does not implement this optional operation (`NIXL_ERR_NOT_SUPPORTED`).
    NotSupported,
    /// The peer failed or went away (`NIXL_ERR_REMOTE_DISCONNECT`).
    RemoteDisconnect,
    /// The request was cancelled (`NIXL_ERR_CANCELED`).
    Canceled,
    /// Telemetry was asked for but is disabled (`NIXL_ERR_NO_TELEMETRY`).
    NoTelemetry,
    /// A deadline passed before the operation finished (RIXL only).
    Timeout,
}

impl ErrorKind {
    /// Every kind, in status-code order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::NotPosted,
        ErrorKind::InvalidParam,
        ErrorKind::Backend,
        ErrorKind::NotFound,
        ErrorKind::Mismatch,
        ErrorKind::NotAllowed,
        ErrorKind::RepostActive,
        ErrorKind::Unknown,
        ErrorKind::NotSupported,
        ErrorKind::RemoteDisconnect,
        ErrorKind::Canceled,
        ErrorKind::NoTelemetry,
        ErrorKind::Timeout,
    ];

    /// The `nixl_status_t` value. `Timeout` has no NIXL equivalent and uses -13.
    pub const fn code(self) -> i32 {
        match self {
            ErrorKind::NotPosted => -1,
            ErrorKind::InvalidParam => -2,
            ErrorKind::Backend => -3,
            ErrorKind::NotFound => -4,
            ErrorKind::Mismatch => -5,
            ErrorKind::NotAllowed => -6,
            ErrorKind::RepostActive => -7,
            ErrorKind::Unknown => -8,
            ErrorKind::NotSupported => -9,
            ErrorKind::RemoteDisconnect => -10,
            ErrorKind::Canceled => -11,
            ErrorKind::NoTelemetry => -12,
            ErrorKind::Timeout => -13,
        }
    }

    /// The inverse of [`ErrorKind::code`].
    pub fn from_code(code: i32) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// NIXL's status name, e.g. `NIXL_ERR_NOT_FOUND`; every error message starts with it.
    pub const fn status_name(self) -> &'static str {
        match self {
            ErrorKind::NotPosted => "NIXL_ERR_NOT_POSTED",
            ErrorKind::InvalidParam => "NIXL_ERR_INVALID_PARAM",
            ErrorKind::Backend => "NIXL_ERR_BACKEND",
            ErrorKind::NotFound => "NIXL_ERR_NOT_FOUND",
            ErrorKind::Mismatch => "NIXL_ERR_MISMATCH",
            ErrorKind::NotAllowed => "NIXL_ERR_NOT_ALLOWED",
            ErrorKind::RepostActive => "NIXL_ERR_REPOST_ACTIVE",
            ErrorKind::Unknown => "NIXL_ERR_UNKNOWN",
            ErrorKind::NotSupported => "NIXL_ERR_NOT_SUPPORTED",
            ErrorKind::RemoteDisconnect => "NIXL_ERR_REMOTE_DISCONNECT",
            ErrorKind::Canceled => "NIXL_ERR_CANCELED",
            ErrorKind::NoTelemetry => "NIXL_ERR_NO_TELEMETRY",
            ErrorKind::Timeout => "RIXL_ERR_TIMEOUT",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.status_name())
    }
}

/// A failure with its kind and the context that explains it.
///
/// Build one with a constructor named after the kind ([`Error::not_found`], ...) and add context
/// with the `with_*` methods. Its `Display` starts with NIXL's status name, then the cause, then
/// the context, e.g. `NIXL_ERR_NOT_FOUND: descriptor 3 is not covered by a registration
/// (backend LOOPBACK, peer "decode-0", mem DRAM, op WRITE)`.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    backend: Option<String>,
    peer: Option<String>,
    mem: Option<MemType>,
    op: Option<XferOp>,
    os_error: Option<i32>,
    /// The lower-level failure behind this one (an I/O error, an HTTP or UCX status), shared so
    /// that errors stay cheap to clone.
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! kind_constructors {
    ($($(#[$doc:meta])* $fn_name:ident => $kind:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $fn_name(message: impl Into<String>) -> Error {
                Error::new(ErrorKind::$kind, message)
            }
        )*
    };
}

impl Error {
    /// An error of `kind` whose cause is `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            backend: None,
            peer: None,
            mem: None,
            op: None,
            os_error: None,
            source: None,
        }))
    }

    kind_constructors! {
        /// [`ErrorKind::NotPosted`].
        not_posted => NotPosted,
        /// [`ErrorKind::InvalidParam`].
        invalid_param => InvalidParam,
        /// [`ErrorKind::Backend`].
        backend => Backend,
        /// [`ErrorKind::NotFound`].
        not_found => NotFound,
        /// [`ErrorKind::Mismatch`].
        mismatch => Mismatch,
        /// [`ErrorKind::NotAllowed`].
        not_allowed => NotAllowed,
        /// [`ErrorKind::RepostActive`].
        repost_active => RepostActive,
        /// [`ErrorKind::Unknown`].
        unknown => Unknown,
        /// [`ErrorKind::NotSupported`].
        not_supported => NotSupported,
        /// [`ErrorKind::RemoteDisconnect`].
        remote_disconnect => RemoteDisconnect,
        /// [`ErrorKind::Canceled`].
        canceled => Canceled,
        /// [`ErrorKind::NoTelemetry`].
        no_telemetry => NoTelemetry,
        /// [`ErrorKind::Timeout`].
        timeout => Timeout,
    }

    /// A backend error carrying an operating-system error. The message includes the I/O
    /// error's text, and [`std::error::Error::source`] gives an equivalent `io::Error`.
    pub fn from_io(kind: ErrorKind, message: impl Into<String>, err: &std::io::Error) -> Error {
        let mut e = Error::new(kind, format!("{}: {err}", message.into()));
        e.0.os_error = err.raw_os_error();
        let copy = match err.raw_os_error() {
            Some(errno) => std::io::Error::from_raw_os_error(errno),
            None => std::io::Error::new(err.kind(), err.to_string()),
        };
        e.0.source = Some(Arc::new(copy));
        e
    }

    /// Attaches the lower-level failure behind this one (kept if one is already attached),
    /// reachable through [`std::error::Error::source`]. The message should still say what
    /// went wrong in RIXL's terms; the source keeps the original for programs that inspect it.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        if self.0.source.is_none() {
            self.0.source = Some(Arc::new(source));
        }
        self
    }

    /// The class of this failure.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The cause, without the status name or context.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The backend involved, if known.
    pub fn backend_name(&self) -> Option<&str> {
        self.0.backend.as_deref()
    }

    /// The remote agent involved, if known.
    pub fn peer(&self) -> Option<&str> {
        self.0.peer.as_deref()
    }

    /// The memory type involved, if known.
    pub fn mem(&self) -> Option<MemType> {
        self.0.mem
    }

    /// The transfer operation involved, if known.
    pub fn op(&self) -> Option<XferOp> {
        self.0.op
    }

    /// The `errno` behind this failure, if any.
    pub fn os_error(&self) -> Option<i32> {
        self.0.os_error
    }

    /// Names the backend (kept if already set: the innermost context wins).
    pub fn with_backend(mut self, backend: &str) -> Error {
        self.0.backend.get_or_insert_with(|| backend.to_owned());
        self
    }

    /// Names the remote agent (kept if already set).
    pub fn with_peer(mut self, peer: &str) -> Error {
        self.0.peer.get_or_insert_with(|| peer.to_owned());
        self
    }

    /// Names the memory type (kept if already set).
    pub fn with_mem(mut self, mem: MemType) -> Error {
        self.0.mem.get_or_insert(mem);
        self
    }

    /// Names the operation (kept if already set).
    pub fn with_op(mut self, op: XferOp) -> Error {
        self.0.op.get_or_insert(op);
        self
    }

    /// Records an `errno` (kept if already set).
    pub fn with_os_error(mut self, errno: i32) -> Error {
        self.0.os_error.get_or_insert(errno);
        self
    }
}

impl Clone for Error {
    fn clone(&self) -> Error {
        Error(Box::new(Inner {
            kind: self.0.kind,
            message: self.0.message.clone(),
            backend: self.0.backend.clone(),
            peer: self.0.peer.clone(),
            mem: self.0.mem,
            op: self.0.op,
            os_error: self.0.os_error,
            source: self.0.source.clone(),
        }))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.0;
        write!(f, "{}", i.kind.status_name())?;
        if !i.message.is_empty() {
            write!(f, ": {}", i.message)?;
        }
        let mut parts: Vec<String> = Vec::new();
        if let Some(b) = &i.backend {
            parts.push(format!("backend {b}"));
        }
        if let Some(p) = &i.peer {
            parts.push(format!("peer {p:?}"));
        }
        if let Some(m) = i.mem {
            parts.push(format!("mem {m}"));
        }
        if let Some(o) = i.op {
            parts.push(format!("op {o}"));
        }
        if let Some(e) = i.os_error {
            parts.push(format!("os error {e}"));
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({self})")
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_code(k.code()), Some(k));
        }
        assert_eq!(ErrorKind::from_code(0), None);
        assert_eq!(ErrorKind::NotFound.code(), -4);
        assert_eq!(ErrorKind::Canceled.code(), -11);
    }

    #[test]
    fn display_starts_with_status_and_names_context() {
        let e = Error::not_found("descriptor 3 is not covered")
            .with_backend("LOOPBACK")
            .with_peer("p")
            .with_mem(MemType::Dram)
            .with_op(XferOp::Write)
            .with_backend("OTHER");
        let s = e.to_string();
        assert!(s.starts_with("NIXL_ERR_NOT_FOUND: descriptor 3"), "{s}");
        assert!(s.contains("backend LOOPBACK"), "{s}");
        assert!(!s.contains("OTHER"), "{s}");
        assert!(s.contains("peer \"p\""), "{s}");
        assert!(s.contains("mem DRAM") && s.contains("op WRITE"), "{s}");
        assert_eq!(e.clone().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn source_is_kept_through_clone_and_context() {
        use std::error::Error as _;
        let io = std::io::Error::from_raw_os_error(28);
        let e = Error::from_io(ErrorKind::Backend, "writing the file", &io).with_peer("p");
        let src = e.clone().source().expect("an I/O source").to_string();
        assert_eq!(src, io.to_string());
        #[derive(Debug)]
        struct Http(u16);
        impl fmt::Display for Http {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "HTTP {}", self.0)
            }
        }
        impl std::error::Error for Http {}
        let e = Error::backend("PUT failed").with_source(Http(503));
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("HTTP 503")
        );
        assert!(Error::backend("plain").source().is_none());
    }
}
