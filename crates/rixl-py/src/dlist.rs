//! `nixlXferDList`, `nixlRegDList`, `nixlRemoteDList` and their safe byte codec.

use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use rixl::core::codec::{Reader, Writer};
use rixl::{Desc, ErrorKind, MemType, RegDesc, RegDescList, StridedDesc, XferDescList};

use crate::array;
use crate::errors::{err, IntoPy};

static MEM_ENUM: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The `nixl_mem_t` member for `mem`.
pub fn mem_obj(py: Python<'_>, mem: MemType) -> PyResult<Bound<'_, PyAny>> {
    let e = MEM_ENUM.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("rixl._bindings")?.getattr("nixl_mem_t")?.unbind())
    });
    match e {
        Ok(e) => e.bind(py).call1((mem.as_u8(),)),
        Err(_) => Ok(mem.as_u8().into_pyobject(py)?.into_any()),
    }
}

/// A memory type from a `nixl_mem_t` member, an int, or a name (`"DRAM"`, `"DRAM_SEG"`, ...).
pub fn mem_from(obj: &Bound<'_, PyAny>) -> PyResult<MemType> {
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s.to_cow()?;
        return s
            .parse::<MemType>()
            .map_err(|_| pyo3::exceptions::PyKeyError::new_err(s.to_string()));
    }
    let v: i64 = obj
        .extract()
        .map_err(|_| PyTypeError::new_err("memory type must be a nixl_mem_t value"))?;
    u8::try_from(v)
        .ok()
        .and_then(MemType::from_u8)
        .ok_or_else(|| PyValueError::new_err(format!("unknown memory type {v}")))
}

fn tuple_n<'py>(t: &Bound<'py, PyAny>, n: usize, what: &str) -> PyResult<Bound<'py, PyTuple>> {
    let t = t
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err(format!("{what} descriptors must be tuples")))?;
    if t.len() != n {
        return Err(PyValueError::new_err(format!(
            "{what} descriptors must be {n}-tuples, got {} elements",
            t.len()
        )));
    }
    Ok(t.clone())
}

fn int_u64(o: &Bound<'_, PyAny>) -> PyResult<u64> {
    match o.extract::<u64>() {
        Ok(v) => Ok(v),
        // NIXL takes int64 arrays and negative values wrap, as a C++ cast does.
        Err(_) => o.extract::<i64>().map(|v| v as u64),
    }
}

fn desc_of(t: &Bound<'_, PyAny>) -> PyResult<Desc> {
    let t = tuple_n(t, 3, "transfer")?;
    Ok(Desc::new(
        int_u64(&t.get_item(0)?)?,
        int_u64(&t.get_item(1)?)?,
        int_u64(&t.get_item(2)?)?,
    ))
}

fn meta_of(o: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = o.cast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    if let Ok(b) = o.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    Err(PyTypeError::new_err(
        "registration meta must be str or bytes",
    ))
}

fn reg_of(t: &Bound<'_, PyAny>) -> PyResult<RegDesc> {
    let t = tuple_n(t, 4, "registration")?;
    Ok(RegDesc::with_meta(
        int_u64(&t.get_item(0)?)?,
        int_u64(&t.get_item(1)?)?,
        int_u64(&t.get_item(2)?)?,
        meta_of(&t.get_item(3)?)?,
    ))
}

fn remote_of(t: &Bound<'_, PyAny>) -> PyResult<(Desc, String)> {
    let t = tuple_n(t, 4, "remote")?;
    Ok((
        Desc::new(
            int_u64(&t.get_item(0)?)?,
            int_u64(&t.get_item(1)?)?,
            int_u64(&t.get_item(2)?)?,
        ),
        t.get_item(3)?.extract()?,
    ))
}

fn idx(i: isize, len: usize) -> PyResult<usize> {
    let j = if i < 0 { i + len as isize } else { i };
    if j < 0 || j as usize >= len {
        return Err(PyIndexError::new_err("descriptor index out of range"));
    }
    Ok(j as usize)
}

fn items<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(l) = obj.cast::<PyList>() {
        return Ok(l.iter().collect());
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Ok(t.iter().collect());
    }
    Err(PyTypeError::new_err(
        "descriptors must be given as a list of tuples, an Nx3 array or an int size",
    ))
}

/// What `__reduce__` returns: the class and `(mem, serialized bytes)`.
type Reduced<'py> = (Bound<'py, PyAny>, (u8, Bound<'py, PyBytes>));

// ------------------------------------------------------------------ codec

const MAGIC: &[u8; 6] = b"RIXLDL";
const VERSION: u8 = 1;
const KIND_XFER: u8 = 0;
const KIND_REG: u8 = 1;
const KIND_REMOTE: u8 = 2;
const MAX_META: usize = 1 << 20;

fn header(kind: u8, mem: MemType, n: usize) -> Writer {
    let mut w = Writer::with_capacity(16 + n * 12);
    w.raw(MAGIC);
    w.u8(VERSION);
    w.u8(kind);
    w.u8(mem.as_u8());
    w.varint(n as u64);
    w
}

fn put_desc(w: &mut Writer, d: &Desc) {
    w.varint(d.addr);
    w.varint(d.len);
    w.varint(d.dev);
}

fn get_desc(r: &mut Reader<'_>) -> rixl::Result<Desc> {
    Ok(Desc::new(r.varint()?, r.varint()?, r.varint()?))
}

/// A decoded list of any of the three kinds.
pub enum AnyList {
    Xfer(XferDescList),
    Reg(RegDescList),
    Remote(MemType, Vec<(Desc, String)>),
}

/// Decodes RIXL's serialized descriptor lists; anything else is `Mismatch`.
pub fn decode(buf: &[u8]) -> rixl::Result<AnyList> {
    let mut r = Reader::new(buf, "serialized descriptor list");
    if r.raw(MAGIC.len())? != MAGIC {
        return Err(rixl::Error::mismatch(
            "not a RIXL serialized descriptor list (bad magic; pickled NIXL lists are refused)",
        ));
    }
    let v = r.u8()?;
    if v != VERSION {
        return Err(rixl::Error::mismatch(format!(
            "serialized descriptor list version {v} not supported"
        )));
    }
    let kind = r.u8()?;
    let m = r.u8()?;
    let mem = MemType::from_u8(m)
        .ok_or_else(|| rixl::Error::mismatch(format!("unknown memory type {m}")))?;
    let n = r.count(3)?;
    let out = match kind {
        KIND_XFER => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(get_desc(&mut r)?);
            }
            AnyList::Xfer(XferDescList::from_descs(mem, v))
        }
        KIND_REG => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let d = get_desc(&mut r)?;
                v.push(RegDesc {
                    desc: d,
                    meta: r.bytes(MAX_META)?.to_vec(),
                });
            }
            AnyList::Reg(RegDescList::from_descs(mem, v))
        }
        KIND_REMOTE => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let d = get_desc(&mut r)?;
                v.push((d, r.str(1024)?.to_owned()));
            }
            AnyList::Remote(mem, v)
        }
        k => {
            return Err(rixl::Error::mismatch(format!(
                "unknown serialized descriptor list kind {k}"
            )))
        }
    };
    r.finish()?;
    Ok(out)
}

fn encode_xfer(l: &XferDescList) -> Vec<u8> {
    let mut w = header(KIND_XFER, l.mem(), l.len());
    for d in l.descs() {
        put_desc(&mut w, d);
    }
    w.finish()
}

fn encode_reg(l: &RegDescList) -> Vec<u8> {
    let mut w = header(KIND_REG, l.mem(), l.len());
    for d in l.descs() {
        put_desc(&mut w, &d.desc);
        w.bytes(&d.meta);
    }
    w.finish()
}

fn encode_remote(mem: MemType, l: &[(Desc, String)]) -> Vec<u8> {
    let mut w = header(KIND_REMOTE, mem, l.len());
    for (d, a) in l {
        put_desc(&mut w, d);
        w.str(a);
    }
    w.finish()
}

/// `deserialize_descs(bytes)`: a dlist from RIXL's codec (never pickle).
#[pyfunction]
pub fn deserialize_descs(py: Python<'_>, data: &[u8]) -> PyResult<Py<PyAny>> {
    let l = py.detach(|| decode(data)).py()?;
    Ok(match l {
        AnyList::Xfer(list) => Py::new(py, XferDList { list })?.into_any(),
        AnyList::Reg(list) => Py::new(py, RegDList { list })?.into_any(),
        AnyList::Remote(mem, descs) => Py::new(py, RemoteDList { mem, descs })?.into_any(),
    })
}

fn wrong_kind(found: &str, want: &str) -> PyErr {
    err(
        ErrorKind::Mismatch,
        format!("serialized list is a {found}, not a {want}"),
    )
}

/// Builds a transfer list from an `N x 5` strided array `(addr, len, dev, stride, count)`.
#[pyfunction]
pub fn strided_xfer_dlist(
    py: Python<'_>,
    mem: &Bound<'_, PyAny>,
    arr: &Bound<'_, PyAny>,
) -> PyResult<XferDList> {
    let mem = mem_from(mem)?;
    let v = array::view(arr)?.ok_or_else(|| PyTypeError::new_err("expected an Nx5 array"))?;
    let rows = v.map_rows::<5, _>(py, |r| StridedDesc {
        addr: r[0],
        len: r[1],
        dev: r[2],
        stride: r[3],
        count: r[4],
    })?;
    if rows.is_empty() {
        return Err(err(
            ErrorKind::NotFound,
            "strided descriptor array has no rows",
        ));
    }
    let list = py.detach(|| XferDescList::from_strided(mem, &rows)).py()?;
    Ok(XferDList { list })
}

// ------------------------------------------------------------------ nixlXferDList

/// A list of transfer descriptors `(addr, len, devId)` of one memory type.
#[pyclass(module = "rixl._bindings", name = "nixlXferDList")]
#[derive(Clone, Debug)]
pub struct XferDList {
    pub list: XferDescList,
}

#[pymethods]
impl XferDList {
    /// `nixlXferDList(mem, init_size=0)`, `(mem, [(addr, len, dev), ...])`, `(mem, Nx3 array)`.
    #[new]
    #[pyo3(signature = (mem, descs = None, sorted = false))]
    fn new(
        py: Python<'_>,
        mem: &Bound<'_, PyAny>,
        descs: Option<&Bound<'_, PyAny>>,
        sorted: bool,
    ) -> PyResult<Self> {
        let _ = sorted;
        let mem = mem_from(mem)?;
        let Some(d) = descs.filter(|d| !d.is_none()) else {
            return Ok(XferDList {
                list: XferDescList::new(mem),
            });
        };
        if let Ok(b) = d.cast::<PyBytes>() {
            let bytes = b.as_bytes();
            return match py.detach(|| decode(bytes)).py()? {
                AnyList::Xfer(list) if list.mem() == mem => Ok(XferDList { list }),
                AnyList::Xfer(_) => Err(err(ErrorKind::Mismatch, "memory type differs")),
                _ => Err(wrong_kind("different list", "nixlXferDList")),
            };
        }
        if let Ok(n) = d.extract::<usize>() {
            return Ok(XferDList {
                list: XferDescList::from_descs(mem, vec![Desc::default(); n]),
            });
        }
        if let Some(v) = array::view(d)? {
            let descs = v.map_rows::<3, _>(py, |r| Desc::new(r[0], r[1], r[2]))?;
            return Ok(XferDList {
                list: XferDescList::from_descs(mem, descs),
            });
        }
        let mut v = Vec::new();
        for t in items(d)? {
            v.push(desc_of(&t)?);
        }
        Ok(XferDList {
            list: XferDescList::from_descs(mem, v),
        })
    }

    /// The memory type (`nixl_mem_t`).
    #[allow(non_snake_case)]
    fn getType<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        mem_obj(py, self.list.mem())
    }

    /// Number of descriptors.
    #[allow(non_snake_case)]
    fn descCount(&self) -> usize {
        self.list.len()
    }

    /// True if there is no descriptor.
    #[allow(non_snake_case)]
    fn isEmpty(&self) -> bool {
        self.list.is_empty()
    }

    fn __len__(&self) -> usize {
        self.list.len()
    }

    fn __getitem__(&self, i: isize) -> PyResult<(u64, u64, u64)> {
        let d = self.list.descs()[idx(i, self.list.len())?];
        Ok((d.addr, d.len, d.dev))
    }

    fn __setitem__(&mut self, i: isize, t: &Bound<'_, PyAny>) -> PyResult<()> {
        let j = idx(i, self.list.len())?;
        self.list.descs_mut()[j] = desc_of(t)?;
        Ok(())
    }

    /// Appends a descriptor tuple.
    #[allow(non_snake_case)]
    fn addDesc(&mut self, t: &Bound<'_, PyAny>) -> PyResult<()> {
        self.list.push(desc_of(t)?);
        Ok(())
    }

    /// Appends a descriptor tuple.
    fn append(&mut self, t: &Bound<'_, PyAny>) -> PyResult<()> {
        self.addDesc(t)
    }

    /// Position of an exactly equal descriptor; `nixlNotFoundError` if absent.
    fn index(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        let d = desc_of(t)?;
        self.list
            .descs()
            .iter()
            .position(|x| *x == d)
            .ok_or_else(|| err(ErrorKind::NotFound, "descriptor not in the list"))
    }

    /// Removes the descriptor at `i`.
    #[allow(non_snake_case)]
    fn remDesc(&mut self, i: isize) -> PyResult<()> {
        let j = idx(i, self.list.len())?;
        self.list.descs_mut().remove(j);
        Ok(())
    }

    /// Removes every descriptor.
    fn clear(&mut self) {
        self.list.descs_mut().clear();
    }

    /// Prints the list.
    fn print(&self) {
        println!("{}", self.__repr__());
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<XferDList>() {
            Ok(o) => o.borrow().list == self.list,
            Err(_) => false,
        }
    }

    fn __repr__(&self) -> String {
        let mut s = format!(
            "nixlXferDList({}, {} descriptors",
            self.list.mem().seg_name(),
            self.list.len()
        );
        for d in self.list.descs().iter().take(8) {
            s.push_str(&format!(", ({:#x}, {}, {})", d.addr, d.len, d.dev));
        }
        if self.list.len() > 8 {
            s.push_str(", ...");
        }
        s.push(')');
        s
    }

    /// RIXL's versioned, bounds-checked serialization (what `get_serialized_descs` returns).
    fn _serialize<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let b = py.detach(|| encode_xfer(&self.list));
        PyBytes::new(py, &b)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        let me = slf.borrow();
        Ok((
            slf.get_type().into_any(),
            (me.list.mem().as_u8(), me._serialize(slf.py())),
        ))
    }
}

// ------------------------------------------------------------------ nixlRegDList

/// A list of registration descriptors `(addr, len, devId, metaInfo)` of one memory type.
#[pyclass(module = "rixl._bindings", name = "nixlRegDList")]
#[derive(Clone, Debug)]
pub struct RegDList {
    pub list: RegDescList,
}

#[pymethods]
impl RegDList {
    /// `nixlRegDList(mem, init_size=0)`, `(mem, [(addr, len, dev, meta), ...])`,
    /// `(mem, Nx3 array)` (meta empty).
    #[new]
    #[pyo3(signature = (mem, descs = None, sorted = false))]
    fn new(
        py: Python<'_>,
        mem: &Bound<'_, PyAny>,
        descs: Option<&Bound<'_, PyAny>>,
        sorted: bool,
    ) -> PyResult<Self> {
        let _ = sorted;
        let mem = mem_from(mem)?;
        let Some(d) = descs.filter(|d| !d.is_none()) else {
            return Ok(RegDList {
                list: RegDescList::new(mem),
            });
        };
        if let Ok(b) = d.cast::<PyBytes>() {
            let bytes = b.as_bytes();
            return match py.detach(|| decode(bytes)).py()? {
                AnyList::Reg(list) if list.mem() == mem => Ok(RegDList { list }),
                AnyList::Reg(_) => Err(err(ErrorKind::Mismatch, "memory type differs")),
                _ => Err(wrong_kind("different list", "nixlRegDList")),
            };
        }
        if let Ok(n) = d.extract::<usize>() {
            return Ok(RegDList {
                list: RegDescList::from_descs(mem, vec![RegDesc::default(); n]),
            });
        }
        if let Some(v) = array::view(d)? {
            let descs = v.map_rows::<3, _>(py, |r| RegDesc::new(r[0], r[1], r[2]))?;
            return Ok(RegDList {
                list: RegDescList::from_descs(mem, descs),
            });
        }
        let mut v = Vec::new();
        for t in items(d)? {
            v.push(reg_of(&t)?);
        }
        Ok(RegDList {
            list: RegDescList::from_descs(mem, v),
        })
    }

    /// The memory type (`nixl_mem_t`).
    #[allow(non_snake_case)]
    fn getType<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        mem_obj(py, self.list.mem())
    }

    /// Number of descriptors.
    #[allow(non_snake_case)]
    fn descCount(&self) -> usize {
        self.list.len()
    }

    /// True if there is no descriptor.
    #[allow(non_snake_case)]
    fn isEmpty(&self) -> bool {
        self.list.is_empty()
    }

    fn __len__(&self) -> usize {
        self.list.len()
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        i: isize,
    ) -> PyResult<(u64, u64, u64, Bound<'py, PyBytes>)> {
        let d = &self.list.descs()[idx(i, self.list.len())?];
        Ok((
            d.desc.addr,
            d.desc.len,
            d.desc.dev,
            PyBytes::new(py, &d.meta),
        ))
    }

    fn __setitem__(&mut self, i: isize, t: &Bound<'_, PyAny>) -> PyResult<()> {
        let j = idx(i, self.list.len())?;
        self.list.descs_mut()[j] = reg_of(t)?;
        Ok(())
    }

    /// Appends a descriptor tuple.
    #[allow(non_snake_case)]
    fn addDesc(&mut self, t: &Bound<'_, PyAny>) -> PyResult<()> {
        self.list.push(reg_of(t)?);
        Ok(())
    }

    /// Appends a descriptor tuple.
    fn append(&mut self, t: &Bound<'_, PyAny>) -> PyResult<()> {
        self.addDesc(t)
    }

    /// Position of an exactly equal descriptor (meta included); `nixlNotFoundError` if absent.
    fn index(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        let d = reg_of(t)?;
        self.list
            .descs()
            .iter()
            .position(|x| *x == d)
            .ok_or_else(|| err(ErrorKind::NotFound, "descriptor not in the list"))
    }

    /// Removes the descriptor at `i`.
    #[allow(non_snake_case)]
    fn remDesc(&mut self, i: isize) -> PyResult<()> {
        let j = idx(i, self.list.len())?;
        self.list.descs_mut().remove(j);
        Ok(())
    }

    /// Removes every descriptor.
    fn clear(&mut self) {
        self.list.descs_mut().clear();
    }

    /// The transfer list with the same ranges (meta dropped).
    fn trim(&self) -> XferDList {
        XferDList {
            list: self.list.trim(),
        }
    }

    /// Prints the list.
    fn print(&self) {
        println!("{}", self.__repr__());
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<RegDList>() {
            Ok(o) => o.borrow().list == self.list,
            Err(_) => false,
        }
    }

    fn __repr__(&self) -> String {
        let mut s = format!(
            "nixlRegDList({}, {} descriptors",
            self.list.mem().seg_name(),
            self.list.len()
        );
        for d in self.list.descs().iter().take(8) {
            s.push_str(&format!(
                ", ({:#x}, {}, {}, {:?})",
                d.desc.addr,
                d.desc.len,
                d.desc.dev,
                String::from_utf8_lossy(&d.meta)
            ));
        }
        if self.list.len() > 8 {
            s.push_str(", ...");
        }
        s.push(')');
        s
    }

    /// RIXL's versioned, bounds-checked serialization.
    fn _serialize<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let b = py.detach(|| encode_reg(&self.list));
        PyBytes::new(py, &b)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        let me = slf.borrow();
        Ok((
            slf.get_type().into_any(),
            (me.list.mem().as_u8(), me._serialize(slf.py())),
        ))
    }
}

// ------------------------------------------------------------------ nixlRemoteDList

/// A list of remote descriptors `(addr, len, devId, agent_name)` (GPU memory-view API).
#[pyclass(module = "rixl._bindings", name = "nixlRemoteDList")]
#[derive(Clone, Debug)]
pub struct RemoteDList {
    pub mem: MemType,
    pub descs: Vec<(Desc, String)>,
}

#[pymethods]
impl RemoteDList {
    /// `nixlRemoteDList(mem, init_size=0)` or `(mem, [(addr, len, dev, agent), ...])`.
    #[new]
    #[pyo3(signature = (mem, descs = None, sorted = false))]
    fn new(
        py: Python<'_>,
        mem: &Bound<'_, PyAny>,
        descs: Option<&Bound<'_, PyAny>>,
        sorted: bool,
    ) -> PyResult<Self> {
        let _ = sorted;
        let mem = mem_from(mem)?;
        let Some(d) = descs.filter(|d| !d.is_none()) else {
            return Ok(RemoteDList {
                mem,
                descs: Vec::new(),
            });
        };
        if let Ok(b) = d.cast::<PyBytes>() {
            let bytes = b.as_bytes();
            return match py.detach(|| decode(bytes)).py()? {
                AnyList::Remote(m, descs) if m == mem => Ok(RemoteDList { mem, descs }),
                AnyList::Remote(..) => Err(err(ErrorKind::Mismatch, "memory type differs")),
                _ => Err(wrong_kind("different list", "nixlRemoteDList")),
            };
        }
        if let Ok(n) = d.extract::<usize>() {
            return Ok(RemoteDList {
                mem,
                descs: vec![(Desc::default(), String::new()); n],
            });
        }
        let mut v = Vec::new();
        for t in items(d)? {
            v.push(remote_of(&t)?);
        }
        Ok(RemoteDList { mem, descs: v })
    }

    /// The memory type (`nixl_mem_t`).
    #[allow(non_snake_case)]
    fn getType<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        mem_obj(py, self.mem)
    }

    /// Number of descriptors.
    #[allow(non_snake_case)]
    fn descCount(&self) -> usize {
        self.descs.len()
    }

    /// True if there is no descriptor.
    #[allow(non_snake_case)]
    fn isEmpty(&self) -> bool {
        self.descs.is_empty()
    }

    fn __len__(&self) -> usize {
        self.descs.len()
    }

    fn __getitem__(&self, i: isize) -> PyResult<(u64, u64, u64, String)> {
        let (d, a) = &self.descs[idx(i, self.descs.len())?];
        Ok((d.addr, d.len, d.dev, a.clone()))
    }

    fn __setitem__(&mut self, i: isize, t: &Bound<'_, PyAny>) -> PyResult<()> {
        let j = idx(i, self.descs.len())?;
        self.descs[j] = remote_of(t)?;
        Ok(())
    }

    /// Appends a descriptor tuple.
    #[allow(non_snake_case)]
    fn addDesc(&mut self, t: &Bound<'_, PyAny>) -> PyResult<()> {
        self.descs.push(remote_of(t)?);
        Ok(())
    }

    /// Appends a descriptor tuple.
    fn append(&mut self, t: &Bound<'_, PyAny>) -> PyResult<()> {
        self.addDesc(t)
    }

    /// Position of an exactly equal descriptor; `nixlNotFoundError` if absent.
    fn index(&self, t: &Bound<'_, PyAny>) -> PyResult<usize> {
        let d = remote_of(t)?;
        self.descs
            .iter()
            .position(|x| *x == d)
            .ok_or_else(|| err(ErrorKind::NotFound, "descriptor not in the list"))
    }

    /// Removes the descriptor at `i`.
    #[allow(non_snake_case)]
    fn remDesc(&mut self, i: isize) -> PyResult<()> {
        let j = idx(i, self.descs.len())?;
        self.descs.remove(j);
        Ok(())
    }

    /// Removes every descriptor.
    fn clear(&mut self) {
        self.descs.clear();
    }

    /// Prints the list.
    fn print(&self) {
        println!("{}", self.__repr__());
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<RemoteDList>() {
            Ok(o) => {
                let o = o.borrow();
                o.mem == self.mem && o.descs == self.descs
            }
            Err(_) => false,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "nixlRemoteDList({}, {} descriptors)",
            self.mem.seg_name(),
            self.descs.len()
        )
    }

    /// RIXL's versioned, bounds-checked serialization.
    fn _serialize<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &encode_remote(self.mem, &self.descs))
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        let me = slf.borrow();
        Ok((
            slf.get_type().into_any(),
            (me.mem.as_u8(), me._serialize(slf.py())),
        ))
    }
}
