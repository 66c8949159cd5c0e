//! Mapping of `rixl::Error` onto the NIXL exception classes defined in `rixl._bindings`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use rixl::{Error, ErrorKind};

/// Exception class names, in `ErrorKind::ALL` order (status codes -1 … -12, then RIXL's timeout).
const NAMES: [&str; 13] = [
    "nixlNotPostedError",
    "nixlInvalidParamError",
    "nixlBackendError",
    "nixlNotFoundError",
    "nixlMismatchError",
    "nixlNotAllowedError",
    "nixlRepostActiveError",
    "nixlUnknownError",
    "nixlNotSupportedError",
    "nixlRemoteDisconnectError",
    "nixlCancelledError",
    "nixlNoTelemetryError",
    "rixlTimeoutError",
];

static CLASSES: [PyOnceLock<Py<PyType>>; 13] = [const { PyOnceLock::new() }; 13];

fn class_index(kind: ErrorKind) -> usize {
    ErrorKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(7 /* Unknown */)
}

/// The Python exception for `e`: the class of its kind, message = `Display` (starts with the
/// NIXL status name, then the cause and context).
pub fn to_py(e: Error) -> PyErr {
    Python::attach(|py| {
        let i = class_index(e.kind());
        match CLASSES[i].import(py, "rixl._bindings", NAMES[i]) {
            Ok(ty) => PyErr::from_type(ty.clone(), e.to_string()),
            // The package is not importable (the extension used on its own): still raise.
            Err(_) => PyRuntimeError::new_err(e.to_string()),
        }
    })
}

/// An error of `kind` with `msg` as cause.
pub fn err(kind: ErrorKind, msg: impl Into<String>) -> PyErr {
    to_py(Error::new(kind, msg))
}

/// Extension trait: `.py()?` maps a `rixl::Result` to a `PyResult`.
pub trait IntoPy<T> {
    /// Maps the error to its Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for rixl::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
