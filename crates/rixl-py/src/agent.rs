//! The low-level agent (`_bindings.nixlAgent`): C++ method names, int handles, GIL released
//! around every call that may block or walk descriptors.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use rixl::{
    Agent, AgentConfig, CostMethod, ErrorKind, Params, PreparedList, XferOp, XferOptions,
    XferRequest, XferStatus,
};

use crate::array;
use crate::dlist::{RegDList, XferDList};
use crate::errors::{err, to_py, IntoPy};
use crate::slab::Slab;

/// Low-level agent configuration (NIXL's `nixlAgentConfig`).
#[pyclass(module = "rixl._bindings", name = "nixlAgentConfig", get_all, set_all)]
#[derive(Clone, Debug)]
#[allow(non_snake_case)]
pub struct Config {
    /// Let backends run a progress thread (accepted; RIXL backends own their progress).
    pub useProgThread: bool,
    /// Run the metadata listener.
    pub useListenThread: bool,
    /// Listener port (0: the OS chooses).
    pub listenPort: u16,
    /// Thread-sync mode value (recorded; RIXL is always thread-safe).
    pub syncMode: i64,
    /// Progress-thread delay in µs (recorded).
    pub pthrDelay: u64,
    /// Listener-thread delay in µs (recorded).
    pub lthrDelay: u64,
    /// Record per-request telemetry.
    pub captureTelemetry: bool,
}

#[pymethods]
impl Config {
    #[new]
    #[pyo3(signature = (use_prog_thread = false, use_listen_thread = false, port = rixl::DEFAULT_PORT,
        sync_mode = 0, num_workers = 1, pthr_delay_us = 0, lthr_delay_us = 100000,
        capture_telemetry = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        use_prog_thread: bool,
        use_listen_thread: bool,
        port: u16,
        sync_mode: i64,
        num_workers: u64,
        pthr_delay_us: u64,
        lthr_delay_us: u64,
        capture_telemetry: bool,
    ) -> Self {
        let _ = num_workers;
        Config {
            useProgThread: use_prog_thread,
            useListenThread: use_listen_thread,
            listenPort: port,
            syncMode: sync_mode,
            pthrDelay: pthr_delay_us,
            lthrDelay: lthr_delay_us,
            captureTelemetry: capture_telemetry,
        }
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Per-request telemetry of the last post (NIXL's `nixlXferTelemetry`), integers in µs.
#[pyclass(module = "rixl._bindings", name = "nixlXferTelemetry", frozen, get_all)]
#[derive(Clone, Debug)]
#[allow(non_snake_case)]
pub struct Telemetry {
    /// Monotonic µs at the start of the last post.
    pub startTime: u64,
    /// µs spent inside the post call (rounded up).
    pub postDuration: u64,
    /// µs from the post until the data had moved (rounded up).
    pub xferDuration: u64,
    /// Bytes per post.
    pub totalBytes: u64,
    /// Descriptors per post, as NIXL counts them.
    pub descCount: u64,
}

#[pymethods]
impl Telemetry {
    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// The low-level agent.
#[pyclass(module = "rixl._bindings", name = "nixlAgent", frozen)]
#[derive(Debug)]
pub struct LowAgent {
    agent: Arc<Agent>,
    xfers: Mutex<Slab<XferRequest>>,
    dlists: Mutex<Slab<PreparedList>>,
}

/// Notification bytes from `str` (UTF-8), `bytes`, `bytearray` or a sequence of ints.
fn msg_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    obj.extract::<Vec<u8>>()
        .map_err(|_| PyTypeError::new_err("a notification must be bytes or str"))
}

/// NIXL's `notif_msg` argument: `None` or empty means "no notification" (or "keep the current
/// one" when posting). RIXL's keyword-only `notif` overrides it and is taken as given, empty
/// included.
fn notif_arg(
    notif_msg: Option<&Bound<'_, PyAny>>,
    notif: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Vec<u8>>> {
    if let Some(n) = notif {
        return msg_of(n).map(Some);
    }
    match notif_msg {
        None => Ok(None),
        Some(m) if m.is_none() => Ok(None),
        Some(m) => msg_of(m).map(|v| if v.is_empty() { None } else { Some(v) }),
    }
}

/// NIXL's success status as returned by the low-level calls (`NIXL_SUCCESS`).
const SUCCESS: i32 = 0;
/// `NIXL_ERR_NOT_FOUND`, returned (not raised) where NIXL returns it.
const NOT_FOUND: i32 = -4;

/// The `nixl_mem_t` member names (`"DRAM_SEG"`, ...) of `mems`, as NIXL's low-level calls give
/// them.
fn mem_names(mems: &[rixl::MemType]) -> Vec<&'static str> {
    const NAMES: [&str; 5] = ["DRAM_SEG", "VRAM_SEG", "BLK_SEG", "OBJ_SEG", "FILE_SEG"];
    mems.iter()
        .map(|m| {
            NAMES
                .get(usize::from(m.as_u8()))
                .copied()
                .unwrap_or("UNKNOWN_SEG")
        })
        .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn op_from(obj: &Bound<'_, PyAny>) -> PyResult<XferOp> {
    if let Ok(s) = obj.cast::<PyString>() {
        return match &*s.to_cow()? {
            "READ" => Ok(XferOp::Read),
            "WRITE" => Ok(XferOp::Write),
            other => Err(pyo3::exceptions::PyKeyError::new_err(other.to_owned())),
        };
    }
    match obj.extract::<i64>() {
        Ok(0) => Ok(XferOp::Read),
        Ok(1) => Ok(XferOp::Write),
        _ => Err(PyTypeError::new_err(
            "operation must be \"READ\" or \"WRITE\"",
        )),
    }
}

fn indices(obj: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    if let Some(v) = array::view(obj)? {
        return v.indices();
    }
    let to = |o: Bound<'_, PyAny>| -> PyResult<usize> {
        let v: i64 = o.extract()?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    };
    if let Ok(l) = obj.cast::<PyList>() {
        return list_indices(l, to);
    }
    let mut out = Vec::new();
    for o in obj.try_iter()? {
        out.push(to(o?)?);
    }
    Ok(out)
}

/// The indices of a Python list, read without taking a reference per item: with 8192
/// indices (one KV request) pyo3's per-item `Bound` (an incref/decref pair through the
/// limited API's function calls) was half of `make_prepped_xfer`. Exact `int`s are read
/// directly; anything else (numpy scalars, `__index__` objects, which may run Python code)
/// goes through `to` with a proper reference.
fn list_indices(
    l: &Bound<'_, PyList>,
    to: impl Fn(Bound<'_, PyAny>) -> PyResult<usize>,
) -> PyResult<Vec<usize>> {
    let py = l.py();
    let mut out = Vec::with_capacity(l.len());
    let mut i = 0;
    while i < l.len() {
        // SAFETY: the GIL is held and `l` is a live list; PyList_GetItem returns a borrowed
        // reference to item `i` (in range: checked just above, and no Python code ran since).
        let item = unsafe { pyo3::ffi::PyList_GetItem(l.as_ptr(), i as pyo3::ffi::Py_ssize_t) };
        if item.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: `item` is a valid borrowed object pointer (above). For an exact `int`,
        // PyLong_AsLongLong runs no Python code, so the list (and the borrowed item) cannot
        // change under us; its error is checked right after.
        let fast = unsafe {
            if pyo3::ffi::PyLong_CheckExact(item) != 0 {
                let v = pyo3::ffi::PyLong_AsLongLong(item);
                if v == -1 && !pyo3::ffi::PyErr_Occurred().is_null() {
                    return Err(PyErr::fetch(py));
                }
                Some(usize::try_from(v).unwrap_or(usize::MAX))
            } else {
                None
            }
        };
        let v = match fast {
            Some(v) => v,
            None => to(l.get_item(i)?)?,
        };
        out.push(v);
        i += 1;
    }
    Ok(out)
}

fn status_code(s: XferStatus) -> i32 {
    match s {
        XferStatus::Done => 0,
        XferStatus::InProgress => 1,
    }
}

fn socket_addr(ip: &str, port: u16) -> PyResult<SocketAddr> {
    if ip.is_empty() {
        return Err(err(
            ErrorKind::InvalidParam,
            "no ip_addr given and no etcd/TCPStore metadata service is supported by RIXL's Python layer",
        ));
    }
    (ip, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            err(
                ErrorKind::InvalidParam,
                format!("cannot resolve {ip}:{port}"),
            )
        })
}

fn params_dict<'py>(py: Python<'py>, p: &Params) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in p {
        d.set_item(k, v)?;
    }
    Ok(d)
}

impl LowAgent {
    /// A backend name from a name or from a handle (the int `createBackend` returned, as NIXL's
    /// low-level calls take them). An unknown handle → `nixlNotFoundError`.
    fn backend_of(&self, obj: &Bound<'_, PyAny>) -> PyResult<String> {
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(s.to_cow()?.into_owned());
        }
        let h: i64 = obj.extract().map_err(|_| {
            PyTypeError::new_err("a backend must be a name (str) or a handle from createBackend")
        })?;
        usize::try_from(h)
            .ok()
            .and_then(|i| self.agent.backends().into_iter().nth(i))
            .ok_or_else(|| err(ErrorKind::NotFound, format!("unknown backend handle {h}")))
    }

    /// Backend names from `None`, one name or handle, or a sequence of names and/or handles.
    fn backends_of(&self, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
        let Some(obj) = obj else {
            return Ok(Vec::new());
        };
        if obj.is_none() {
            return Ok(Vec::new());
        }
        // Lists and tuples first: a failed `extract::<i64>` builds a Python exception (about
        // 0.3 us), which every `get_new_notifs()` polling loop used to pay for its `[]`.
        if let Ok(list) = obj.cast::<PyList>() {
            return list.iter().map(|o| self.backend_of(&o)).collect();
        }
        if let Ok(tuple) = obj.cast::<PyTuple>() {
            return tuple.iter().map(|o| self.backend_of(&o)).collect();
        }
        if obj.is_instance_of::<PyString>() || obj.extract::<i64>().is_ok() {
            return Ok(vec![self.backend_of(obj)?]);
        }
        let mut out = Vec::new();
        for o in obj.try_iter()? {
            out.push(self.backend_of(&o?)?);
        }
        Ok(out)
    }

    fn xfer(&self, h: u64) -> PyResult<Arc<XferRequest>> {
        self.xfers.lock().get(h).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("transfer handle {h:#x} is released or unknown"),
            )
        })
    }

    fn dlist(&self, h: u64) -> PyResult<Arc<PreparedList>> {
        self.dlists.lock().get(h).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("prepared list handle {h:#x} is released or unknown"),
            )
        })
    }

    fn opts(notif: Option<Vec<u8>>, backends: Vec<String>, skip: bool) -> XferOptions {
        XferOptions {
            notif,
            backends,
            skip_desc_merge: skip,
            ..XferOptions::default()
        }
    }
}

#[pymethods]
#[allow(non_snake_case)]
impl LowAgent {
    /// `nixlAgent(name, cfg)`. An empty name → `ValueError`; a listener that cannot bind →
    /// `RuntimeError`.
    #[new]
    #[pyo3(signature = (name, cfg = None))]
    fn new(py: Python<'_>, name: &str, cfg: Option<PyRef<'_, Config>>) -> PyResult<Self> {
        if name.is_empty() {
            return Err(PyValueError::new_err("the agent name must not be empty"));
        }
        let c = cfg.map(|c| c.clone()).unwrap_or(Config {
            useProgThread: true,
            useListenThread: false,
            listenPort: 0,
            syncMode: 0,
            pthrDelay: 0,
            lthrDelay: 100_000,
            captureTelemetry: false,
        });
        let conf = AgentConfig {
            capture_telemetry: c.captureTelemetry,
            progress_thread: c.useProgThread,
            listen: c.useListenThread,
            listen_port: c.listenPort,
            ..AgentConfig::default()
        };
        let name = name.to_owned();
        let agent = py.detach(move || Agent::new(&name, conf)).map_err(|e| {
            if c.useListenThread && e.kind() == ErrorKind::Backend {
                PyRuntimeError::new_err(e.to_string())
            } else {
                to_py(e)
            }
        })?;
        Ok(LowAgent {
            agent: Arc::new(agent),
            xfers: Mutex::new(Slab::default()),
            dlists: Mutex::new(Slab::default()),
        })
    }

    /// The agent's name.
    fn getName(&self) -> String {
        self.agent.name().to_owned()
    }

    /// Port the metadata listener is bound to, or None.
    fn getListenPort(&self) -> Option<u16> {
        self.agent.listen_addr().map(|a| a.port())
    }

    /// Whether per-request telemetry is on (after environment overrides).
    fn telemetryEnabled(&self) -> bool {
        self.agent.telemetry_enabled()
    }

    /// Names of the backends this build can create.
    fn getAvailPlugins(&self) -> Vec<String> {
        Agent::available_backends()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// `(params, [mem type names])` of a plugin (names such as `"DRAM_SEG"`, as NIXL gives
    /// them); unknown → `nixlNotFoundError`.
    fn getPluginParams<'py>(
        &self,
        py: Python<'py>,
        backend: &str,
    ) -> PyResult<(Bound<'py, PyDict>, Vec<&'static str>)> {
        let p = Agent::plugin_params(backend).py()?;
        let m = Agent::plugin_mem_types(backend).py()?;
        Ok((params_dict(py, &p)?, mem_names(&m)))
    }

    /// `(effective params, [mem type names])` of a created backend, given by name or handle.
    fn getBackendParams<'py>(
        &self,
        py: Python<'py>,
        backend: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyDict>, Vec<&'static str>)> {
        let backend = self.backend_of(backend)?;
        let p = self.agent.backend_params(&backend).py()?;
        let c = self.agent.backend_capabilities(&backend).py()?;
        Ok((params_dict(py, &p)?, mem_names(&c.mems)))
    }

    /// `(remote, local, notif)` capabilities of a created backend, given by name or handle.
    fn getBackendCaps(&self, backend: &Bound<'_, PyAny>) -> PyResult<(bool, bool, bool)> {
        let backend = self.backend_of(backend)?;
        let c = self.agent.backend_capabilities(&backend).py()?;
        Ok((c.remote, c.local, c.notif))
    }

    /// Names of the created backends, in preference order.
    fn getBackends(&self) -> Vec<String> {
        self.agent.backends()
    }

    /// Creates a backend; returns its handle (its index in creation order).
    #[pyo3(signature = (backend, params = None))]
    fn createBackend(
        &self,
        py: Python<'_>,
        backend: &str,
        params: Option<std::collections::BTreeMap<String, String>>,
    ) -> PyResult<usize> {
        let p: Params = params.unwrap_or_default();
        let a = &self.agent;
        py.detach(|| a.create_backend(backend, &p)).py()
    }

    /// Registers a `nixlRegDList` with the given backends (names or handles; none: every
    /// capable one). Returns `NIXL_SUCCESS`; errors raise.
    #[pyo3(signature = (descs, backends = None))]
    fn registerMem(
        &self,
        py: Python<'_>,
        descs: PyRef<'_, RegDList>,
        backends: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let b = self.backends_of(backends)?;
        let list = &descs.list;
        let a = &self.agent;
        // SAFETY: the Python API has NIXL's contract: the caller registers memory of this
        // process that stays allocated and is not used concurrently with transfers until it is
        // deregistered or the agent is gone. Python cannot express this in types.
        py.detach(|| unsafe { a.register_mem(list, &refs(&b)) })
            .py()?;
        Ok(SUCCESS)
    }

    /// Deregisters registrations that match exactly. Returns `NIXL_SUCCESS`; errors raise.
    #[pyo3(signature = (descs, backends = None))]
    fn deregisterMem(
        &self,
        py: Python<'_>,
        descs: PyRef<'_, RegDList>,
        backends: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let b = self.backends_of(backends)?;
        let list = &descs.list;
        let a = &self.agent;
        py.detach(|| a.deregister_mem(list, &refs(&b))).py()?;
        Ok(SUCCESS)
    }

    /// `query_mem` of one backend (name or handle): a list of dicts or None.
    fn queryMem<'py>(
        &self,
        py: Python<'py>,
        descs: PyRef<'_, RegDList>,
        backend: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Option<Bound<'py, PyDict>>>> {
        let backend = self.backend_of(backend)?;
        let list = &descs.list;
        let a = &self.agent;
        let res = py.detach(|| a.query_mem(list, &backend)).py()?;
        res.iter()
            .map(|r| r.as_ref().map(|p| params_dict(py, p)).transpose())
            .collect()
    }

    /// Prepares a transfer list; returns a prepared-list handle id. Forms (NIXL's):
    /// `(agent_name, descs, backends=[])`, and `(descs, backends=[])` for the local side.
    #[pyo3(signature = (agent, descs = None, backends = None))]
    fn prepXferDlist(
        &self,
        py: Python<'_>,
        agent: &Bound<'_, PyAny>,
        descs: Option<&Bound<'_, PyAny>>,
        backends: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let (agent, descs, backends) = if let Ok(d) = agent.cast::<XferDList>() {
            if backends.is_some() {
                return Err(PyTypeError::new_err(
                    "prepXferDlist(descs, backends) takes no third argument",
                ));
            }
            (String::new(), d.clone(), descs)
        } else {
            let name: String = agent.extract()?;
            let d = descs
                .ok_or_else(|| PyTypeError::new_err("prepXferDlist needs a nixlXferDList"))?
                .cast::<XferDList>()?
                .clone();
            (name, d, backends)
        };
        let b = self.backends_of(backends)?;
        let descs = descs.borrow();
        let agent = agent.as_str();
        let list = &descs.list;
        let a = &self.agent;
        let p = py
            .detach(|| a.prep_xfer_dlist(agent, list, &refs(&b)))
            .py()?;
        Ok(self.dlists.lock().insert(p))
    }

    /// Makes a request from two prepared lists and index arrays; returns a request handle id.
    /// `notif_msg` (bytes or str) empty means no notification; RIXL's keyword-only `notif`
    /// attaches exactly what it is given (an empty notification included).
    #[pyo3(signature = (op, local, local_indices, remote, remote_indices, notif_msg = None,
        backends = None, skip_desc_merge = false, *, notif = None))]
    #[allow(clippy::too_many_arguments)]
    fn makeXferReq(
        &self,
        py: Python<'_>,
        op: &Bound<'_, PyAny>,
        local: u64,
        local_indices: &Bound<'_, PyAny>,
        remote: u64,
        remote_indices: &Bound<'_, PyAny>,
        notif_msg: Option<&Bound<'_, PyAny>>,
        backends: Option<&Bound<'_, PyAny>>,
        skip_desc_merge: bool,
        notif: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let op = op_from(op)?;
        let li = indices(local_indices)?;
        let ri = indices(remote_indices)?;
        let (l, r) = (self.dlist(local)?, self.dlist(remote)?);
        let msg = notif_arg(notif_msg, notif)?;
        let opts = Self::opts(msg, self.backends_of(backends)?, skip_desc_merge);
        let a = &self.agent;
        let req = py
            .detach(|| a.make_xfer_req(op, &l, &li, &r, &ri, &opts))
            .py()?;
        Ok(self.xfers.lock().insert(req))
    }

    /// Creates a request from two transfer lists; returns a request handle id. `notif_msg`
    /// and `notif` as in `makeXferReq`.
    #[pyo3(signature = (op, local, remote, remote_agent, notif_msg = None, backends = None, *,
        notif = None))]
    #[allow(clippy::too_many_arguments)]
    fn createXferReq(
        &self,
        py: Python<'_>,
        op: &Bound<'_, PyAny>,
        local: PyRef<'_, XferDList>,
        remote: PyRef<'_, XferDList>,
        remote_agent: &str,
        notif_msg: Option<&Bound<'_, PyAny>>,
        backends: Option<&Bound<'_, PyAny>>,
        notif: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let op = op_from(op)?;
        let msg = notif_arg(notif_msg, notif)?;
        let opts = Self::opts(msg, self.backends_of(backends)?, false);
        let (l, r) = (&local.list, &remote.list);
        let a = &self.agent;
        let req = py
            .detach(|| a.create_xfer_req(op, l, r, remote_agent, &opts))
            .py()?;
        Ok(self.xfers.lock().insert(req))
    }

    /// Posts a request; returns 0 (done) or 1 (in progress). A non-empty `notif_msg` (bytes or
    /// str) replaces the request's notification for this post and later ones; empty keeps it
    /// (NIXL). RIXL's keyword-only `notif` replaces it with exactly what is given, empty
    /// included.
    #[pyo3(signature = (handle, notif_msg = None, *, notif = None))]
    fn postXferReq(
        &self,
        py: Python<'_>,
        handle: u64,
        notif_msg: Option<&Bound<'_, PyAny>>,
        notif: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let notif = notif_arg(notif_msg, notif)?;
        let req = self.xfer(handle)?;
        let s = py
            .detach(|| match &notif {
                Some(n) => req.post_with_notif(n),
                None => req.post(),
            })
            .py()?;
        Ok(status_code(s))
    }

    /// Replaces (or clears, with None) the notification of later posts.
    #[pyo3(signature = (handle, notif = None))]
    fn setXferNotif(&self, handle: u64, notif: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let notif = notif.filter(|n| !n.is_none()).map(msg_of).transpose()?;
        self.xfer(handle)?.set_notif(notif);
        Ok(())
    }

    /// Status of the last post: 0 (done) or 1 (in progress); errors raise.
    fn getXferStatus(&self, handle: u64) -> PyResult<i32> {
        let req = self.xfer(handle)?;
        req.status().py().map(status_code)
    }

    /// RIXL: the status of the last post as `check_xfer_state` reports it, the interned
    /// string `"DONE"` or `"PROC"` (no Python-side conversion in a polling loop); errors
    /// raise.
    fn xferState<'py>(&self, py: Python<'py>, handle: u64) -> PyResult<Bound<'py, PyString>> {
        let req = self.xfer(handle)?;
        Ok(match req.status().py()? {
            XferStatus::Done => pyo3::intern!(py, "DONE"),
            XferStatus::InProgress => pyo3::intern!(py, "PROC"),
        }
        .clone())
    }

    /// Blocks (GIL released) until the current post completes or `timeout` seconds pass.
    #[pyo3(signature = (handle, timeout = None))]
    fn waitXferReq(&self, py: Python<'_>, handle: u64, timeout: Option<f64>) -> PyResult<i32> {
        let req = self.xfer(handle)?;
        let t = timeout.map(|s| std::time::Duration::from_secs_f64(s.max(0.0)));
        py.detach(|| req.wait(t)).py().map(status_code)
    }

    /// Telemetry of the last post.
    fn getXferTelemetry(&self, handle: u64) -> PyResult<Telemetry> {
        let t = self.xfer(handle)?.telemetry().py()?;
        Ok(Telemetry {
            startTime: t.start_time_us,
            postDuration: t.post_duration_us,
            xferDuration: t.xfer_duration_us,
            totalBytes: t.total_bytes,
            descCount: t.desc_count,
        })
    }

    /// Name of the backend the request uses.
    fn queryXferBackend(&self, handle: u64) -> PyResult<String> {
        Ok(self.xfer(handle)?.backend_name().to_owned())
    }

    /// `(duration µs, margin µs, method)`; method `'ANALYTICAL_BACKEND'` or `'UNKNOWN'`.
    fn estimateXferCost(&self, handle: u64) -> PyResult<(u64, u64, &'static str)> {
        let c = self.xfer(handle)?.estimate_cost().py()?;
        let m = match c.method {
            CostMethod::AnalyticalBackend => "ANALYTICAL_BACKEND",
            _ => "UNKNOWN",
        };
        Ok((c.duration_us, c.margin_us, m))
    }

    /// Releases a request, cancelling a post in flight. If the cancel fails the handle stays
    /// valid (`nixlRepostActiveError`) so that the release can be retried.
    fn releaseXferReq(&self, py: Python<'_>, handle: u64) -> PyResult<i32> {
        let req = self.xfer(handle)?;
        if let Err(e) = py.detach(|| req.cancel()) {
            return Err(err(
                ErrorKind::RepostActive,
                format!("the request could not be aborted: {e}"),
            ));
        }
        let removed = self.xfers.lock().remove(handle);
        drop(req);
        py.detach(move || drop(removed));
        Ok(SUCCESS)
    }

    /// Releases a prepared list; returns `NIXL_SUCCESS`.
    fn releasedDlistH(&self, handle: u64) -> PyResult<i32> {
        self.dlists
            .lock()
            .remove(handle)
            .map(|_| SUCCESS)
            .ok_or_else(|| {
                err(
                    ErrorKind::NotFound,
                    format!("prepared list handle {handle:#x} is released or unknown"),
                )
            })
    }

    /// Whether a request handle is live.
    fn isXferHandleValid(&self, handle: u64) -> bool {
        self.xfers.lock().get(handle).is_some()
    }

    /// Connects the common backends to `agent` ahead of the first transfer.
    #[pyo3(signature = (agent, backends = None))]
    fn makeConnection(
        &self,
        py: Python<'_>,
        agent: &str,
        backends: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let b = self.backends_of(backends)?;
        let a = &self.agent;
        py.detach(|| a.make_connection(agent, &refs(&b))).py()?;
        Ok(SUCCESS)
    }

    /// Blocks until a notification is available (from any backend) or `timeout` seconds pass
    /// (None: no limit), without polling: returns whether one is. The GIL is released, and
    /// the wait is sliced so that Ctrl-C and other signals are seen within 50 ms.
    #[pyo3(signature = (timeout = None))]
    fn waitNotif(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        const SLICE: std::time::Duration = std::time::Duration::from_millis(50);
        let deadline = timeout
            .map(|s| std::time::Instant::now() + std::time::Duration::from_secs_f64(s.max(0.0)));
        let a = &self.agent;
        loop {
            let left = deadline.map_or(SLICE, |d| {
                d.saturating_duration_since(std::time::Instant::now())
                    .min(SLICE)
            });
            if py.detach(|| a.wait_notif(left)) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    /// Drains new notifications into `notifs` (a dict name → list of bytes, created if None)
    /// and returns it.
    #[pyo3(signature = (notifs = None, backends = None))]
    fn getNotifs<'py>(
        &self,
        py: Python<'py>,
        notifs: Option<Bound<'py, PyDict>>,
        backends: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let b = self.backends_of(backends)?;
        // With the GIL held: `get_notifs` never blocks (one read lock and the backends'
        // non-blocking polls), and releasing and retaking the GIL would cost a polling
        // loop more than the call itself.
        let got = self.agent.get_notifs(&refs(&b)).py()?;
        let map = notifs.unwrap_or_else(|| PyDict::new(py));
        for n in got {
            let msg = PyBytes::new(py, &n.msg);
            match map.get_item(&n.from)? {
                Some(l) => match l.cast::<PyList>() {
                    Ok(l) => l.append(msg)?,
                    // Another sequence (e.g. a tuple): replaced by a list with the new message.
                    Err(_) => {
                        let list = PyList::empty(py);
                        for m in l.try_iter()? {
                            list.append(m?)?;
                        }
                        list.append(msg)?;
                        map.set_item(&n.from, list)?;
                    }
                },
                None => map.set_item(&n.from, PyList::new(py, [msg])?)?,
            }
        }
        Ok(map)
    }

    /// Sends a standalone notification (bytes or str). `backends`: None or empty (the agent
    /// chooses), one backend, or a list of backends (names or handles) tried in order.
    /// Returns `NIXL_SUCCESS`; errors raise.
    #[pyo3(signature = (agent, msg, backends = None))]
    fn genNotif(
        &self,
        py: Python<'_>,
        agent: &str,
        msg: &Bound<'_, PyAny>,
        backends: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let msg = msg_of(msg)?;
        let b = self.backends_of(backends)?;
        let a = &self.agent;
        py.detach(|| {
            if b.is_empty() {
                return a.send_notif(agent, &msg, None);
            }
            let mut last = None;
            for name in &b {
                match a.send_notif(agent, &msg, Some(name)) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one backend was tried"))
        })
        .py()?;
        Ok(SUCCESS)
    }

    /// The full metadata blob.
    fn getLocalMD<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let a = &self.agent;
        let b = py.detach(|| a.local_metadata()).py()?;
        Ok(PyBytes::new(py, &b))
    }

    /// A partial metadata blob.
    #[pyo3(signature = (descs, inc_conn_info = false, backends = None))]
    fn getLocalPartialMD<'py>(
        &self,
        py: Python<'py>,
        descs: PyRef<'_, RegDList>,
        inc_conn_info: bool,
        backends: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.backends_of(backends)?;
        let list = &descs.list;
        let a = &self.agent;
        let blob = py
            .detach(|| a.local_partial_metadata(list, inc_conn_info, &refs(&b)))
            .py()?;
        Ok(PyBytes::new(py, &blob))
    }

    /// Loads a peer's blob; returns its name as bytes.
    fn loadRemoteMD<'py>(&self, py: Python<'py>, blob: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let a = &self.agent;
        let n = py.detach(|| a.load_remote_metadata(blob)).py()?;
        Ok(PyBytes::new(py, n.as_bytes()))
    }

    /// Drops a peer's metadata. Never raises: returns `NIXL_SUCCESS`, or `NIXL_ERR_NOT_FOUND`
    /// when no metadata of `agent` was loaded (as NIXL does).
    fn invalidateRemoteMD(&self, py: Python<'_>, agent: &str) -> i32 {
        let a = &self.agent;
        let known = a.remote_generation(agent).is_some();
        py.detach(|| a.invalidate_remote_metadata(agent));
        if known {
            SUCCESS
        } else {
            NOT_FOUND
        }
    }

    /// `NIXL_SUCCESS` if `agent`'s metadata is loaded (and covers `descs`, if given), else
    /// `NIXL_ERR_NOT_FOUND` (returned, not raised, as NIXL does).
    #[pyo3(signature = (agent, descs = None))]
    fn checkRemoteMD(
        &self,
        py: Python<'_>,
        agent: &str,
        descs: Option<PyRef<'_, XferDList>>,
    ) -> i32 {
        let list = descs.as_ref().map(|d| &d.list);
        let a = &self.agent;
        if py.detach(|| a.check_remote_metadata(agent, list)) {
            SUCCESS
        } else {
            NOT_FOUND
        }
    }

    /// The generation of `agent`'s loaded metadata, or None.
    fn getRemoteGeneration(&self, agent: &str) -> Option<u64> {
        self.agent.remote_generation(agent)
    }

    /// Pushes the full blob to the listener at `ip:port` (asynchronous).
    #[pyo3(signature = (ip_addr = "", port = 8888))]
    fn sendLocalMD(&self, py: Python<'_>, ip_addr: &str, port: u16) -> PyResult<()> {
        let addr = socket_addr(ip_addr, port)?;
        let a = &self.agent;
        py.detach(|| a.send_local_metadata(addr)).py()
    }

    /// Pushes a partial blob to the listener at `ip:port` (asynchronous).
    #[pyo3(signature = (descs, inc_conn_info = false, backends = None, ip_addr = "", port = 8888, label = ""))]
    #[allow(clippy::too_many_arguments)]
    fn sendLocalPartialMD(
        &self,
        py: Python<'_>,
        descs: PyRef<'_, RegDList>,
        inc_conn_info: bool,
        backends: Option<&Bound<'_, PyAny>>,
        ip_addr: &str,
        port: u16,
        label: &str,
    ) -> PyResult<()> {
        let _ = label;
        let addr = socket_addr(ip_addr, port)?;
        let b = self.backends_of(backends)?;
        let list = &descs.list;
        let a = &self.agent;
        py.detach(|| a.send_partial_metadata(list, inc_conn_info, &refs(&b), addr))
            .py()
    }

    /// Asks the listener at `ip:port` for `agent`'s metadata (asynchronous; poll
    /// `checkRemoteMD`).
    #[pyo3(signature = (agent, ip_addr = "", port = 8888, label = ""))]
    fn fetchRemoteMD(
        &self,
        py: Python<'_>,
        agent: &str,
        ip_addr: &str,
        port: u16,
        label: &str,
    ) -> PyResult<()> {
        let _ = label;
        let addr = socket_addr(ip_addr, port)?;
        let a = &self.agent;
        py.detach(|| a.fetch_remote_metadata(agent, addr));
        Ok(())
    }

    /// Tells the listener at `ip:port` to drop this agent (asynchronous).
    #[pyo3(signature = (ip_addr = "", port = 8888))]
    fn invalidateLocalMD(&self, py: Python<'_>, ip_addr: &str, port: u16) -> PyResult<()> {
        let addr = socket_addr(ip_addr, port)?;
        let a = &self.agent;
        py.detach(|| a.invalidate_local_metadata(addr));
        Ok(())
    }

    /// Benchmark helper: posts `handle` `iters` times entirely in Rust (post, then poll the
    /// status until done), with the GIL released; returns the mean nanoseconds per iteration.
    /// It measures the Rust API's own cost for the same request, to compare with Python.
    fn _benchPostLoop(&self, py: Python<'_>, handle: u64, iters: u64) -> PyResult<f64> {
        let req = self.xfer(handle)?;
        py.detach(|| {
            let t0 = std::time::Instant::now();
            for _ in 0..iters {
                if req.post()? == XferStatus::InProgress {
                    while req.status()? == XferStatus::InProgress {}
                }
            }
            Ok(t0.elapsed().as_nanos() as f64 / iters.max(1) as f64)
        })
        .py()
    }

    /// Releases every request and prepared list (used at agent teardown).
    fn releaseAll(&self, py: Python<'_>) {
        let x = self.xfers.lock().drain();
        let d = self.dlists.lock().drain();
        py.detach(move || {
            drop(x);
            drop(d);
        });
    }
}

impl Drop for LowAgent {
    fn drop(&mut self) {
        // Requests hold Arcs into the agent; drop them first so teardown is orderly.
        drop(self.xfers.get_mut().drain());
        drop(self.dlists.get_mut().drain());
    }
}
