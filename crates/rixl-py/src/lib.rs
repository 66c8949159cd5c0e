//! `rixl._rixl`: the native part of the `rixl` Python package.
//!
//! Python programs use the pure-Python modules `rixl._api`, `rixl._bindings`, `rixl._utils` and
//! `rixl.logging` (NIXL's layout); this extension provides the low-level agent, the descriptor
//! lists and the test-memory helpers they are built on. Errors become the NIXL exception classes
//! defined in `rixl._bindings`; no Rust panic crosses into Python (PyO3 turns one into
//! `PanicException`, and no code path here panics by design).

#![allow(non_snake_case)]

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

mod agent;
mod array;
mod dlist;
mod errors;
mod slab;

/// Allocates `size` bytes aligned to 4096 (NIXL's test helper); returns the address.
#[pyfunction]
fn malloc_passthru(size: usize) -> PyResult<usize> {
    let mut p: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: posix_memalign writes a pointer to `p` on success; alignment 4096 is a power of
    // two and a multiple of the pointer size.
    let rc = unsafe { libc::posix_memalign(&mut p, 4096, size.max(1)) };
    if rc != 0 || p.is_null() {
        return Err(PyMemoryError::new_err(format!(
            "cannot allocate {size} bytes"
        )));
    }
    Ok(p as usize)
}

/// Frees memory from `malloc_passthru`.
#[pyfunction]
fn free_passthru(addr: usize) {
    // SAFETY: the caller hands back an address `malloc_passthru` returned (NIXL's contract);
    // free(NULL) is a no-op.
    unsafe { libc::free(addr as *mut libc::c_void) }
}

/// Fills `size` bytes at `addr` with 0xBA.
#[pyfunction]
fn ba_buf(py: Python<'_>, addr: usize, size: usize) -> PyResult<()> {
    if addr == 0 && size > 0 {
        return Err(PyValueError::new_err("null address"));
    }
    // SAFETY: the caller passes memory of this process it owns, of at least `size` bytes
    // (NIXL's test-helper contract).
    py.detach(|| unsafe { std::ptr::write_bytes(addr as *mut u8, 0xBA, size) });
    Ok(())
}

/// Asserts that `size` bytes at `a` and `b` are equal (`AssertionError` otherwise).
#[pyfunction]
fn verify_transfer(py: Python<'_>, a: usize, b: usize, size: usize) -> PyResult<()> {
    if size == 0 {
        return Ok(());
    }
    if a == 0 || b == 0 {
        return Err(PyValueError::new_err("null address"));
    }
    // SAFETY: the caller passes two readable ranges of `size` bytes of this process (NIXL's
    // test-helper contract).
    let same = py.detach(|| unsafe {
        std::slice::from_raw_parts(a as *const u8, size)
            == std::slice::from_raw_parts(b as *const u8, size)
    });
    if same {
        Ok(())
    } else {
        Err(pyo3::exceptions::PyAssertionError::new_err(
            "transfer verification failed: buffers differ",
        ))
    }
}

/// Builds a bytes object from `size` bytes at `addr` (test helper).
#[pyfunction]
fn read_bytes<'py>(
    py: Python<'py>,
    addr: usize,
    size: usize,
) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    if addr == 0 && size > 0 {
        return Err(PyValueError::new_err("null address"));
    }
    // SAFETY: the caller passes a readable range of `size` bytes of this process.
    let s = unsafe { std::slice::from_raw_parts(addr as *const u8, size) };
    Ok(pyo3::types::PyBytes::new(py, s))
}

/// Writes `data` at `addr` (test helper).
#[pyfunction]
fn write_bytes(addr: usize, data: &[u8]) -> PyResult<()> {
    if addr == 0 && !data.is_empty() {
        return Err(PyValueError::new_err("null address"));
    }
    // SAFETY: the caller passes a writable range of `data.len()` bytes of this process.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
    Ok(())
}

/// Names of the backends this build can create (NIXL's plugin list).
#[pyfunction]
fn available_plugins() -> Vec<&'static str> {
    rixl::Agent::available_backends()
}

#[pymodule]
fn _rixl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<dlist::XferDList>()?;
    m.add_class::<dlist::RegDList>()?;
    m.add_class::<dlist::RemoteDList>()?;
    m.add_class::<agent::Config>()?;
    m.add_class::<agent::LowAgent>()?;
    m.add_class::<agent::Telemetry>()?;
    m.add_function(wrap_pyfunction!(dlist::deserialize_descs, m)?)?;
    m.add_function(wrap_pyfunction!(dlist::strided_xfer_dlist, m)?)?;
    m.add_function(wrap_pyfunction!(available_plugins, m)?)?;
    m.add_function(wrap_pyfunction!(malloc_passthru, m)?)?;
    m.add_function(wrap_pyfunction!(free_passthru, m)?)?;
    m.add_function(wrap_pyfunction!(ba_buf, m)?)?;
    m.add_function(wrap_pyfunction!(verify_transfer, m)?)?;
    m.add_function(wrap_pyfunction!(read_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(write_bytes, m)?)?;
    m.add("DEFAULT_COMM_PORT", rixl::DEFAULT_PORT)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
