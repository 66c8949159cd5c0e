//! Reading numpy (or any `__array_interface__`) arrays without a Python loop and without
//! linking numpy: the interface gives the data pointer, shape, strides and dtype.

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// A borrowed view of an array. The array object is kept alive by `_owner` for as long as the
/// view exists, so `ptr` stays valid.
pub struct ArrayView<'py> {
    _owner: Bound<'py, PyAny>,
    pub ptr: usize,
    pub shape: Vec<usize>,
    /// Byte strides, one per dimension (computed for C order when the interface gives none).
    pub strides: Vec<isize>,
    /// `b'i'`, `b'u'`, `b'f'`, `b'b'`, ...
    pub kind: u8,
    pub itemsize: usize,
    /// False for big-endian data.
    pub native: bool,
}

/// The array behind `obj`, if `obj` exposes `__array_interface__` with a data pointer.
pub fn view<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<ArrayView<'py>>> {
    let py = obj.py();
    let Ok(ai) = obj.getattr(intern!(py, "__array_interface__")) else {
        return Ok(None);
    };
    let Ok(ai) = ai.cast_into::<PyDict>() else {
        return Ok(None);
    };
    let Some(data) = ai.get_item(intern!(py, "data"))? else {
        return Ok(None);
    };
    let Ok(data) = data.cast_into::<PyTuple>() else {
        return Ok(None);
    };
    let ptr: usize = data.get_item(0)?.extract()?;
    let shape: Vec<usize> = match ai.get_item(intern!(py, "shape"))? {
        Some(s) => s.extract()?,
        None => return Ok(None),
    };
    let typestr: String = match ai.get_item(intern!(py, "typestr"))? {
        Some(s) => s.extract()?,
        None => return Ok(None),
    };
    let tb = typestr.as_bytes();
    if tb.len() < 3 {
        return Err(PyValueError::new_err(format!(
            "unsupported dtype {typestr:?}"
        )));
    }
    let native = match tb[0] {
        b'<' | b'|' | b'=' => cfg!(target_endian = "little") || tb[0] != b'<',
        b'>' => cfg!(target_endian = "big"),
        _ => false,
    };
    let kind = tb[1];
    let itemsize: usize = typestr[2..].parse().unwrap_or(0);
    let strides: Vec<isize> = match ai.get_item(intern!(py, "strides"))? {
        Some(s) if !s.is_none() => s.extract()?,
        _ => {
            let mut st = vec![0isize; shape.len()];
            let mut acc = itemsize as isize;
            for d in (0..shape.len()).rev() {
                st[d] = acc;
                acc *= shape[d] as isize;
            }
            st
        }
    };
    Ok(Some(ArrayView {
        _owner: obj.clone(),
        ptr,
        shape,
        strides,
        kind,
        itemsize,
        native,
    }))
}

impl ArrayView<'_> {
    /// True when rows of `cols` 8-byte items are laid out contiguously in C order.
    pub fn is_c_contiguous(&self) -> bool {
        if self.shape.len() != 2 {
            return false;
        }
        let rows = self.shape[0];
        (rows <= 1 || self.strides[0] == (self.shape[1] * self.itemsize) as isize)
            && (self.shape[1] <= 1 || self.strides[1] == self.itemsize as isize)
    }

    /// Checks an `N x cols` uint64/int64 C-contiguous array (NIXL's `ValueError` cases).
    pub fn check_matrix(&self, cols: usize) -> PyResult<()> {
        if !matches!(self.kind, b'u' | b'i') || self.itemsize != 8 || !self.native {
            return Err(PyValueError::new_err(
                "descriptor arrays must have dtype uint64 or int64",
            ));
        }
        if self.shape.len() != 2 || self.shape[1] != cols {
            return Err(PyValueError::new_err(format!(
                "descriptor arrays must have shape (N, {cols})"
            )));
        }
        if !self.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "descriptor arrays must be C-contiguous (use numpy.ascontiguousarray)",
            ));
        }
        Ok(())
    }

    /// Converts a checked `N x C` matrix row by row with `f`, with the GIL released for large
    /// arrays.
    pub fn map_rows<const C: usize, T: Send>(
        &self,
        py: Python<'_>,
        f: impl Fn(&[u64; C]) -> T + Send,
    ) -> PyResult<Vec<T>> {
        self.check_matrix(C)?;
        let n = self.shape[0];
        let ptr = self.ptr;
        let copy = move || {
            let mut out: Vec<T> = Vec::with_capacity(n);
            advise_huge(out.as_mut_ptr() as usize, n * std::mem::size_of::<T>());
            // SAFETY: `check_matrix` proved the array holds `n * C` contiguous native 8-byte
            // integers at `ptr` (as its `__array_interface__` declares); the array object is
            // kept alive by `self._owner` for the whole copy. Unaligned reads are used because
            // the interface does not promise alignment.
            unsafe {
                let base = ptr as *const [u64; C];
                for r in 0..n {
                    out.push(f(&std::ptr::read_unaligned(base.add(r))));
                }
            }
            out
        };
        Ok(if n >= 16384 { py.detach(copy) } else { copy() })
    }

    /// Reads a 1-D integer array as indices; negative values become `usize::MAX` (out of range).
    pub fn indices(&self) -> PyResult<Vec<usize>> {
        if self.shape.len() != 1 {
            return Err(PyValueError::new_err("index arrays must be 1-D"));
        }
        if !matches!(self.kind, b'u' | b'i' | b'b') || !self.native {
            return Err(PyValueError::new_err(
                "index arrays must have an integer dtype",
            ));
        }
        let (n, stride, size, signed) = (
            self.shape[0],
            self.strides[0],
            self.itemsize,
            self.kind == b'i',
        );
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(PyValueError::new_err("unsupported index dtype"));
        }
        let base = self.ptr as isize;
        macro_rules! read_all {
            ($t:ty) => {{
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let p = (base + stride * i as isize) as *const $t;
                    // SAFETY: `i < shape[0]` and `p = data + i * strides[0]` addresses element
                    // `i` of the 1-D array (item type checked above), whose object
                    // `self._owner` keeps alive.
                    let v = unsafe { p.read_unaligned() };
                    out.push(usize::try_from(v).unwrap_or(usize::MAX));
                }
                out
            }};
        }
        let out = match (size, signed) {
            (1, true) => read_all!(i8),
            (1, false) => read_all!(u8),
            (2, true) => read_all!(i16),
            (2, false) => read_all!(u16),
            (4, true) => read_all!(i32),
            (4, false) => read_all!(u32),
            (8, true) => read_all!(i64),
            _ => read_all!(u64),
        };
        Ok(out)
    }
}

/// Asks for transparent huge pages on a large fresh allocation: page faults dominate filling
/// tens of megabytes of new memory here (numpy does the same for its large arrays).
fn advise_huge(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < 4 * HUGE {
        return;
    }
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) & !(HUGE - 1);
    if end > start {
        // SAFETY: madvise is advisory; the range lies inside an allocation this process owns
        // and MADV_HUGEPAGE does not change its contents or validity.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}
