"""The NIXL Python API (``nixl._api``) on RIXL.

``nixl_agent`` keeps NIXL's signatures, defaults, return values and exceptions; see
NIXL-API.md §2. RIXL-only extensions are keyword-only or have names NIXL does not use
(``transfer(..., notif=..., clear_notif=...)``, ``wait_xfer``, ``get_listen_port``).
"""

import enum
import sys

import rixl._bindings as _bindings  # looked up at call time (tests monkeypatch nixlAgent)
from rixl import _rixl
from rixl.logging import get_logger

logger = get_logger(__name__)

DEFAULT_COMM_PORT = 8888

nixl_backend_handle = int

_STATE = ("DONE", "PROC")


def _b(msg):
    """Notification bytes from bytes or str."""
    if isinstance(msg, str):
        return msg.encode()
    return bytes(msg)


def _default_backends():
    """RIXL's DRAM backends: LOOPBACK (in-process), SHM (same host), POSIX if built."""
    plugins = _rixl.available_plugins()
    return [b for b in ("LOOPBACK", "SHM", "POSIX") if b in plugins]


class nixl_thread_sync_t(enum.Enum):
    """Thread-sync mode; ``.value`` is the low-level enum member. ``DEFAULT`` is an alias
    of ``NONE``. RIXL is thread-safe in every mode; the value is recorded."""

    NIXL_THREAD_SYNC_NONE = _bindings.NIXL_THREAD_SYNC_NONE
    NIXL_THREAD_SYNC_STRICT = _bindings.NIXL_THREAD_SYNC_STRICT
    NIXL_THREAD_SYNC_RW = _bindings.NIXL_THREAD_SYNC_RW
    NIXL_THREAD_SYNC_DEFAULT = _bindings.NIXL_THREAD_SYNC_NONE


class nixl_agent_config:
    """Agent configuration (NIXL's ``nixl_agent_config``).

    ``backends=None`` (RIXL) creates RIXL's DRAM backends (``LOOPBACK``, ``SHM`` and ``POSIX``
    when built). Naming a backend this build lacks (e.g. ``"UCX"``) logs a warning and skips it
    in the agent constructor, as NIXL does for a missing plugin.
    """

    def __init__(
        self,
        enable_prog_thread=True,
        enable_listen_thread=False,
        listen_port=DEFAULT_COMM_PORT,
        capture_telemetry=False,
        num_threads=0,
        backends=None,
        sync_mode=None,
    ):
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        self.backends = list(backends) if backends is not None else _default_backends()
        # `None` stays `None`, as in NIXL 1.5.1: the agent picks STRICT with the listener and
        # NONE without it when it is created (programs read `.sync_mode` back as given).
        if sync_mode is None:
            pass
        elif isinstance(sync_mode, _bindings.nixl_thread_sync_t):
            # NIXL rejects the low-level enum (a quirk of its re-exports); RIXL accepts both.
            sync_mode = nixl_thread_sync_t(sync_mode)
        elif not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(
                "sync_mode must be a nixl_thread_sync_t member, got " f"{type(sync_mode).__name__}"
            )
        self.sync_mode = sync_mode


class _Handle:
    # Each handle class names its own slots, as NIXL's do (`cls.__slots__` is read by some
    # programs); the base declares none so that the layout is the subclasses'.
    __slots__ = ()

    def __init__(self, agent, value):
        self._agent = agent
        self._handle = int(value)
        self._released = False

    def __int__(self):
        return self._handle

    def __index__(self):
        return self._handle

    def __repr__(self):
        return f"{type(self).__name__}({self._handle:#x}, released={self._released})"

    def __del__(self):
        try:
            self.release()
        except BaseException:  # never raise from a finaliser (interpreter exit included)
            pass


class nixl_xfer_handle(_Handle):
    """A transfer request handle. ``release()`` is idempotent; a released handle is refused
    with ``nixlNotFoundError``."""

    __slots__ = ("_handle", "_agent", "_released")

    def release(self):
        if self._released:
            return
        agent = self._agent.agent if isinstance(self._agent, nixl_agent) else self._agent
        try:
            agent.releaseXferReq(self._handle)
        except _bindings.nixlNotFoundError:
            pass  # already gone (e.g. released through the raw id)
        self._released = True


class nixl_prepped_dlist_handle(_Handle):
    """A prepared descriptor list handle. ``release()`` is idempotent."""

    __slots__ = ("_handle", "_agent", "_released")

    def release(self):
        if self._released:
            return
        agent = self._agent.agent if isinstance(self._agent, nixl_agent) else self._agent
        try:
            agent.releasedDlistH(self._handle)
        except _bindings.nixlNotFoundError:
            pass
        self._released = True


def _hid(h):
    """The id of a handle object (or an int)."""
    try:
        return h._handle
    except AttributeError:
        if isinstance(h, int):
            return h
        raise TypeError(f"expected a RIXL handle, got {type(h).__name__}") from None


def _torch():
    return sys.modules.get("torch")


def _numpy():
    return sys.modules.get("numpy")


class nixl_agent:
    """A NIXL agent on RIXL: ``nixl_agent(agent_name, nixl_conf=None, instantiate_all=False)``."""

    def __init__(self, agent_name, nixl_conf=None, instantiate_all=False):
        if nixl_conf is not None and instantiate_all:
            logger.warning("both nixl_conf and instantiate_all given; ignoring instantiate_all")
            instantiate_all = False
        if nixl_conf is None:
            nixl_conf = nixl_agent_config()
        if not agent_name:
            raise ValueError("the agent name must not be empty")

        self.name = agent_name
        self.notifs = {}
        self.backends = {}
        self.backend_mems = {}
        self.backend_options = {}
        self.plugin_list = []
        self.plugin_b_options = {}
        self.plugin_mem_types = {}
        self.nixl_mems = {
            "DRAM": _bindings.DRAM_SEG,
            "VRAM": _bindings.VRAM_SEG,
            "FILE": _bindings.FILE_SEG,
            "BLOCK": _bindings.BLK_SEG,
            "OBJ": _bindings.OBJ_SEG,
            "cpu": _bindings.DRAM_SEG,
            "cuda": _bindings.VRAM_SEG,
        }
        self.nixl_ops = {"WRITE": _bindings.NIXL_WRITE, "READ": _bindings.NIXL_READ}

        sync = nixl_conf.sync_mode
        if sync is None:
            sync = (
                nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
                if nixl_conf.enable_listen
                else nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE
            )
        cfg = _bindings.nixlAgentConfig(
            nixl_conf.enable_pthread,
            nixl_conf.enable_listen,
            nixl_conf.port,
            sync.value if isinstance(sync, enum.Enum) else sync,
            1,
            0,
            100000,
            nixl_conf.capture_telemetry,
        )
        self.agent = _bindings.nixlAgent(agent_name, cfg)

        self.plugin_list = list(self.agent.getAvailPlugins())
        if len(self.plugin_list) == 0:
            raise RuntimeError("No plugins available for NIXL, cannot start transfers!")
        for plugin in self.plugin_list:
            params, mems = self.agent.getPluginParams(plugin)
            self.plugin_b_options[plugin] = params
            self.plugin_mem_types[plugin] = list(mems)

        to_create = self.plugin_list if instantiate_all else nixl_conf.backends
        for bknd in to_create:
            if bknd not in self.plugin_list:
                logger.warning("Skipping backend registration %s due to the missing plugin.", bknd)
                continue
            init = {}
            if nixl_conf.num_threads > 0 and bknd in ("UCX", "OBJ", "LIBFABRIC"):
                init["num_threads"] = str(nixl_conf.num_threads)
            self.create_backend(bknd, init)

        logger.info("Initialized NIXL agent: %s", agent_name)

    # ------------------------------------------------------------------ helpers

    def _names(self, backends):
        """Backend names checked against the created ones (``KeyError`` otherwise)."""
        if not backends:
            return []
        for b in backends:
            self.backends[b]
        return list(backends)

    def _mem(self, mem_type):
        return self.nixl_mems[mem_type]  # KeyError for an unknown string

    # ------------------------------------------------------------------ plugins and backends

    def get_plugin_list(self):
        """Backends available to this build."""
        return self.plugin_list

    def get_plugin_mem_types(self, backend):
        """Memory types (``"DRAM_SEG"``, ...) of a plugin; unknown → ``[]`` and a warning."""
        if backend in self.plugin_mem_types:
            return self.plugin_mem_types[backend]
        logger.warning("Plugin %s is not available", backend)
        return []

    def get_plugin_params(self, backend):
        """Advertised init params of a plugin; unknown → ``{}`` and a warning."""
        if backend in self.plugin_b_options:
            return self.plugin_b_options[backend]
        logger.warning("Plugin %s is not available", backend)
        return {}

    def get_backend_mem_types(self, backend):
        """Memory types of a created backend; otherwise ``[]`` and a warning."""
        if backend in self.backend_mems:
            return self.backend_mems[backend]
        logger.warning("Backend %s not instantiated", backend)
        return []

    def get_backend_params(self, backend):
        """Effective params of a created backend (RIXL: defaults merged with overrides)."""
        if backend in self.backend_options:
            return self.backend_options[backend]
        logger.warning("Backend %s not instantiated", backend)
        return {}

    def create_backend(self, backend, initParams={}):  # noqa: B006 (NIXL's signature)
        """Creates a backend. Already created → ``nixlInvalidParamError``; unknown →
        ``nixlNotFoundError``; init failure → ``nixlBackendError``."""
        handle = self.agent.createBackend(backend, dict(initParams))
        params, mems = self.agent.getBackendParams(backend)
        self.backends[backend] = handle
        self.backend_mems[backend] = list(mems)
        self.backend_options[backend] = params

    # ------------------------------------------------------------------ memory

    def register_memory(self, reg_list, mem_type=None, backends=[]):  # noqa: B006
        """Registers memory; returns the ``nixlRegDList`` used."""
        reg_descs = self.get_reg_descs(reg_list, mem_type)
        if reg_descs is None:
            raise TypeError("register_memory: the descriptors could not be converted")
        self.agent.registerMem(reg_descs, self._names(backends))
        return reg_descs

    def deregister_memory(self, dereg_list, backends=[]):  # noqa: B006
        """Deregisters exactly matching registrations (a ``nixlRegDList``)."""
        if not isinstance(dereg_list, _bindings.nixlRegDList):
            raise TypeError("deregister_memory takes a nixlRegDList")
        self.agent.deregisterMem(dereg_list, self._names(backends))

    def query_memory(self, reg_list, backend, mem_type=None):
        """Asks a backend about registrations (files, objects): list of dict or None."""
        if backend not in self.backends:
            raise ValueError(f"backend {backend} not instantiated")
        descs = self.get_reg_descs(reg_list, mem_type)
        if descs is None:
            raise TypeError("query_memory: the descriptors could not be converted")
        return self.agent.queryMem(descs, backend)

    # ------------------------------------------------------------------ descriptor helpers

    def _tensor_descs(self, tensors, reg):
        """One descriptor per contiguous tensor on one device, else None."""
        dev = None
        out = []
        for t in tensors:
            if not t.is_contiguous():
                logger.error("non-contiguous tensors are not supported")
                return None
            d = t.device
            if d.type == "cpu":
                key = (_bindings.DRAM_SEG, 0)
            else:
                key = (_bindings.VRAM_SEG, d.index if d.index is not None else 0)
            if dev is None:
                dev = key
            elif dev != key:
                logger.error("tensors on different devices")
                return None
            base = (t.data_ptr(), t.numel() * t.element_size(), key[1])
            out.append(base + ("",) if reg else base)
        cls = _bindings.nixlRegDList if reg else _bindings.nixlXferDList
        return cls(dev[0], out)

    def _convert(self, descs, mem_type, reg):
        own = _bindings.nixlRegDList if reg else _bindings.nixlXferDList
        other = _bindings.nixlXferDList if reg else _bindings.nixlRegDList
        arity = 4 if reg else 3
        if isinstance(descs, own):
            return descs
        if isinstance(descs, other):
            logger.error("wrong descriptor list type %s", type(descs).__name__)
            return None
        np = _numpy()
        torch = _torch()
        if isinstance(descs, (list, tuple)):
            if len(descs) == 0:
                raise IndexError("empty descriptor list")
            first = descs[0]
            if isinstance(first, tuple):
                if mem_type is None:
                    logger.error("a memory type is needed to convert tuples")
                    return None
                mem = self._mem(mem_type)
                if len(first) != arity:
                    logger.error("descriptors must be %d-tuples", arity)
                    return None
                return own(mem, descs)
            if torch is not None and isinstance(first, torch.Tensor):
                if not all(isinstance(t, torch.Tensor) for t in descs):
                    return None
                return self._tensor_descs(descs, reg)
            logger.error("unsupported descriptor input: list of %s", type(first).__name__)
            return None
        if np is not None and isinstance(descs, np.ndarray):
            if descs.ndim >= 1 and descs.shape[0] == 0:
                raise IndexError("empty descriptor array")
            if descs.ndim == 2 and descs.shape[1] == 3:
                if mem_type is None:
                    logger.error("a memory type is needed to convert an array")
                    return None
                mem = self._mem(mem_type)
                if descs.dtype not in (np.uint64, np.int64):
                    raise ValueError("descriptor arrays must have dtype uint64 or int64")
                if not descs.flags["C_CONTIGUOUS"]:
                    raise ValueError("descriptor arrays must be C-contiguous")
                return own(mem, descs)
            logger.error("descriptor arrays must have shape (N, 3)")
            return None
        if torch is not None and isinstance(descs, torch.Tensor):
            return self._tensor_descs([descs], reg)
        logger.error("unsupported descriptor input %s", type(descs).__name__)
        return None

    def get_xfer_descs(self, descs, mem_type=None):
        """A ``nixlXferDList`` from a dlist, 3-tuples, an Nx3 uint64/int64 array, a CPU tensor
        or a list of tensors; ``None`` when the input cannot be converted."""
        return self._convert(descs, mem_type, False)

    def get_reg_descs(self, descs, mem_type=None):
        """A ``nixlRegDList`` from a dlist, 4-tuples, an Nx3 array (meta empty), a tensor or a
        list of tensors; ``None`` when the input cannot be converted."""
        return self._convert(descs, mem_type, True)

    def get_remote_descs(self, descs, mem_type=None):
        """A ``nixlRemoteDList`` from one or from 4-tuples ``(addr, len, dev, agent)``."""
        if isinstance(descs, _bindings.nixlRemoteDList):
            return descs
        if isinstance(descs, (list, tuple)) and descs and isinstance(descs[0], tuple):
            if mem_type is None:
                logger.error("a memory type is needed to convert tuples")
                return None
            return _bindings.nixlRemoteDList(self._mem(mem_type), descs)
        logger.error("unsupported remote descriptor input %s", type(descs).__name__)
        return None

    def get_serialized_descs(self, descs):
        """Bytes in RIXL's versioned, bounds-checked codec (never pickle)."""
        if isinstance(
            descs, (_bindings.nixlXferDList, _bindings.nixlRegDList, _bindings.nixlRemoteDList)
        ):
            return descs._serialize()
        raise TypeError("get_serialized_descs takes a descriptor list")

    def deserialize_descs(self, serialized):
        """The list encoded by ``get_serialized_descs``; anything else → ``nixlMismatchError``."""
        if not isinstance(serialized, (bytes, bytearray, memoryview)):
            raise TypeError("deserialize_descs takes bytes")
        return _rixl.deserialize_descs(bytes(serialized))

    # ------------------------------------------------------------------ transfers

    def prep_xfer_dlist(self, agent_name, xfer_list, mem_type=None, backends=[]):  # noqa: B006
        """Prepares descriptors for requests by index. ``""``/``"NIXL_INIT_AGENT"``: local side;
        own name: loopback target; another name: that remote agent. Accepts the Nx5 strided
        form ``(addr, len, dev, stride, count)``."""
        np = _numpy()
        if (
            np is not None
            and isinstance(xfer_list, np.ndarray)
            and xfer_list.ndim == 2
            and xfer_list.shape[1] == 5
        ):
            if mem_type is None:
                raise ValueError("the Nx5 strided form needs a mem_type")
            if xfer_list.dtype not in (np.uint64, np.int64):
                raise ValueError("strided arrays must have dtype uint64 or int64")
            descs = _rixl.strided_xfer_dlist(self._mem(mem_type), np.ascontiguousarray(xfer_list))
        else:
            descs = self.get_xfer_descs(xfer_list, mem_type)
            if descs is None:
                raise TypeError("prep_xfer_dlist: the descriptors could not be converted")
        if agent_name == "NIXL_INIT_AGENT":
            agent_name = ""
        h = self.agent.prepXferDlist(agent_name, descs, self._names(backends))
        return nixl_prepped_dlist_handle(self.agent, h)

    def make_prepped_xfer(
        self,
        operation,
        local_xfer_side,
        local_indices,
        remote_xfer_side,
        remote_indices,
        notif_msg=b"",
        backends=[],  # noqa: B006
        skip_desc_merge=False,
        *,
        notif=None,
    ):
        """A request from two prepared lists and index arrays (lists or 1-D numpy arrays).
        ``notif=b""`` (RIXL, keyword-only) attaches an empty notification."""
        op = self.nixl_ops[operation]
        h = self.agent.makeXferReq(
            op,
            _hid(local_xfer_side),
            local_indices,
            _hid(remote_xfer_side),
            remote_indices,
            _b(notif_msg),
            self._names(backends),
            bool(skip_desc_merge),
            notif=None if notif is None else _b(notif),
        )
        return nixl_xfer_handle(self.agent, h)

    def initialize_xfer(
        self,
        operation,
        local_descs,
        remote_descs,
        remote_agent,
        notif_msg=b"",
        backends=[],  # noqa: B006
        *,
        notif=None,
    ):
        """A request from two ``nixlXferDList``s."""
        op = self.nixl_ops[operation]
        if not isinstance(local_descs, _bindings.nixlXferDList) or not isinstance(
            remote_descs, _bindings.nixlXferDList
        ):
            raise TypeError("initialize_xfer takes nixlXferDList descriptor lists")
        h = self.agent.createXferReq(
            op,
            local_descs,
            remote_descs,
            remote_agent,
            _b(notif_msg),
            self._names(backends),
            notif=None if notif is None else _b(notif),
        )
        return nixl_xfer_handle(self.agent, h)

    def transfer(self, handle, notif_msg=b"", *, notif=None, clear_notif=False):
        """Posts; returns ``"DONE"`` or ``"PROC"``. ``notif_msg=b""`` keeps the current
        notification; a non-empty one replaces it for this and later posts. RIXL extensions:
        ``notif=b""`` sends an empty notification, ``clear_notif=True`` posts without one."""
        try:
            h = handle._handle
        except AttributeError:
            h = _hid(handle)
        if notif is not None:
            return _STATE[self.agent.postXferReq(h, notif=_b(notif))]
        if clear_notif:
            self.agent.setXferNotif(h, None)
            return _STATE[self.agent.postXferReq(h)]
        if notif_msg:
            return _STATE[self.agent.postXferReq(h, _b(notif_msg))]
        return _STATE[self.agent.postXferReq(h)]

    def check_xfer_state(self, handle):
        """``"DONE"`` or ``"PROC"``; errors of the transfer raise their class."""
        try:
            h = handle._handle
        except AttributeError:
            h = _hid(handle)
        return self.agent.xferState(h)

    def wait_xfer(self, handle, timeout=None):
        """RIXL: blocks (GIL released) until the post completes; ``"DONE"``/``"PROC"``
        (``"PROC"`` if ``timeout`` seconds passed)."""
        try:
            return _STATE[self.agent.waitXferReq(_hid(handle), timeout)]
        except _bindings.rixlTimeoutError:
            if timeout is None:
                raise
            return "PROC"

    def get_xfer_telemetry(self, handle):
        """``nixlXferTelemetry`` of the last post."""
        return self.agent.getXferTelemetry(_hid(handle))

    def query_xfer_backend(self, handle):
        """Name of the backend the request uses."""
        return self.agent.queryXferBackend(_hid(handle))

    def estimate_xfer_cost(self, req_handle):
        """``(duration µs, margin µs, method)``; method ``'ANALYTICAL_BACKEND'`` when the
        backend produced an estimate."""
        return self.agent.estimateXferCost(_hid(req_handle))

    def release_xfer_handle(self, handle):
        """Releases a request (aborting a post in flight)."""
        if isinstance(handle, nixl_xfer_handle):
            handle.release()
        else:
            self.agent.releaseXferReq(_hid(handle))

    def release_dlist_handle(self, handle):
        """Releases a prepared list."""
        if isinstance(handle, nixl_prepped_dlist_handle):
            handle.release()
        else:
            self.agent.releasedDlistH(_hid(handle))

    def make_connection(self, remote_agent, backends=[]):  # noqa: B006
        """Connects the common backends ahead of the first transfer."""
        self.agent.makeConnection(remote_agent, self._names(backends))

    def prep_mem_view(self, dlist, *, backends=None):
        """GPU device API: not available in RIXL (``nixlNotSupportedError``)."""
        raise _bindings.nixlNotSupportedError(
            "NIXL_ERR_NOT_SUPPORTED: the UCX GPU device API is not available"
        )

    def release_mem_view(self, mvh):
        """GPU device API: not available in RIXL (``nixlNotSupportedError``)."""
        raise _bindings.nixlNotSupportedError(
            "NIXL_ERR_NOT_SUPPORTED: the UCX GPU device API is not available"
        )

    # ------------------------------------------------------------------ notifications

    def get_new_notifs(self, backends=[]):  # noqa: B006
        """Drains new notifications: ``dict[sender, list[bytes]]`` (not added to
        ``self.notifs``)."""
        # A polling loop's call: no helper, no backend list to build (``getNotifs`` makes
        # the fresh dict, as NIXL's ``getNotifs({}, [])`` does).
        if backends:
            return self.agent.getNotifs({}, self._names(backends))
        return self.agent.getNotifs()

    def wait_new_notifs(self, timeout=None, backends=[]):  # noqa: B006
        """RIXL extension: sleeps until a notification arrives or ``timeout`` seconds pass
        (``None``: no limit), then drains like :meth:`get_new_notifs` (``{}`` on timeout).

        Unlike a ``get_new_notifs()`` loop it burns no CPU while nothing arrives, and it
        wakes within microseconds when something does. It wakes for any backend's
        notification, so with ``backends`` set it may return ``{}`` before the timeout."""
        self.agent.waitNotif(timeout)
        return self.agent.getNotifs({}, self._names(backends))

    def update_notifs(self, backends=[]):  # noqa: B006
        """Appends new notifications to ``self.notifs`` and returns it."""
        self.notifs = self.agent.getNotifs(self.notifs, self._names(backends))
        return self.notifs

    def check_remote_xfer_done(
        self, remote_agent_name, lookup_tag, backends=[], tag_is_prefix=True  # noqa: B006
    ):
        """Removes and reports the first message from ``remote_agent_name`` that starts with
        (or, with ``tag_is_prefix=False``, contains) ``lookup_tag``."""
        # ``update_notifs`` inlined: a polling loop calls this millions of times (and each
        # argument passed costs the call about 10 ns).
        if backends:
            self.notifs = notifs = self.agent.getNotifs(self.notifs, self._names(backends))
        else:
            self.notifs = notifs = self.agent.getNotifs(self.notifs)
        if remote_agent_name not in notifs:  # an operator, cheaper than a `get` call
            return False
        msgs = notifs[remote_agent_name]
        if not msgs:
            return False
        tag = _b(lookup_tag)
        for i, m in enumerate(msgs):
            if (m.startswith(tag) if tag_is_prefix else tag in m):
                del msgs[i]  # empty messages too (NIXL never removes them)
                return True
        return False

    def send_notif(self, remote_agent_name, notif_msg, backend=None):
        """Sends a standalone notification (bytes or str)."""
        if backend is not None:
            self.backends[backend]
        self.agent.genNotif(remote_agent_name, _b(notif_msg), backend)

    # ------------------------------------------------------------------ metadata

    def get_agent_metadata(self):
        """The full metadata blob."""
        return self.agent.getLocalMD()

    def get_partial_agent_metadata(self, descs, inc_conn_info=False, backends=[]):  # noqa: B006
        """A partial blob: the listed registrations (+ connection info if asked); an empty
        list gives connection info only."""
        if not isinstance(descs, _bindings.nixlRegDList):
            raise TypeError("get_partial_agent_metadata takes a nixlRegDList")
        return self.agent.getLocalPartialMD(descs, inc_conn_info, self._names(backends))

    def add_remote_agent(self, metadata):
        """Loads a peer's blob; returns its name as **bytes**."""
        return self.agent.loadRemoteMD(metadata)

    def remove_remote_agent(self, agent):
        """Invalidates a peer's metadata. Never raises."""
        try:
            self.agent.invalidateRemoteMD(agent)
        except Exception:  # noqa: BLE001 (NIXL: never raises)
            pass

    def send_local_metadata(self, ip_addr="", port=DEFAULT_COMM_PORT):
        """Pushes the full blob to the listener at ``ip_addr:port`` (asynchronous). Without
        ``ip_addr`` (and RIXL's Python layer has no etcd) → ``nixlInvalidParamError``."""
        self.agent.sendLocalMD(ip_addr, port)

    def send_partial_agent_metadata(
        self,
        descs,
        inc_conn_info=False,
        backends=[],  # noqa: B006
        ip_addr="",
        port=DEFAULT_COMM_PORT,
        label="",
    ):
        """Pushes a partial blob to the listener at ``ip_addr:port`` (asynchronous)."""
        if not isinstance(descs, _bindings.nixlRegDList):
            raise TypeError("send_partial_agent_metadata takes a nixlRegDList")
        self.agent.sendLocalPartialMD(
            descs, inc_conn_info, self._names(backends), ip_addr, port, label
        )

    def fetch_remote_metadata(self, remote_agent, ip_addr="", port=DEFAULT_COMM_PORT, label=""):
        """Asks the listener at ``ip_addr:port`` for ``remote_agent``'s blob (asynchronous;
        poll ``check_remote_metadata``). No local listener is needed."""
        self.agent.fetchRemoteMD(remote_agent, ip_addr, port, label)

    def invalidate_local_metadata(self, ip_addr="", port=DEFAULT_COMM_PORT):
        """Tells the listener at ``ip_addr:port`` to drop this agent (asynchronous)."""
        self.agent.invalidateLocalMD(ip_addr, port)

    def check_remote_metadata(self, agent, descs=None):
        """True if ``agent``'s metadata is loaded and covers ``descs`` (a ``nixlXferDList``)."""
        if descs is not None and not isinstance(descs, _bindings.nixlXferDList):
            raise TypeError("check_remote_metadata takes a nixlXferDList")
        return self.agent.checkRemoteMD(agent, descs) == _bindings.NIXL_SUCCESS

    def get_listen_port(self):
        """RIXL: the port the metadata listener is bound to (useful with ``listen_port=0``)."""
        return self.agent.getListenPort()


__all__ = [
    "nixl_agent",
    "nixl_agent_config",
    "nixl_xfer_handle",
    "nixl_prepped_dlist_handle",
    "nixl_backend_handle",
    "nixl_thread_sync_t",
    "DEFAULT_COMM_PORT",
]
