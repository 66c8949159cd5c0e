"""The NIXL Python API on RIXL, in one process (NIXL-API.md §2)."""

import pickle
import sys
import threading
import time

import pytest

import rixl
import rixl as nixl
from rixl import _bindings as B
from conftest import read, uniq, write

np = pytest.importorskip("numpy")

KiB = 1024


# ---------------------------------------------------------------- modules, names, config


def test_module_layout_and_constants():
    assert nixl.DEFAULT_COMM_PORT == 8888 and B.DEFAULT_COMM_PORT == 8888
    assert nixl.NIXL_INIT_AGENT == ""
    assert nixl.HAVE_UCX_GPU_DEVICE_API is False
    assert int(nixl.DRAM_SEG) == 0 and int(nixl.FILE_SEG) == 4
    assert int(nixl.NIXL_READ) == 0 and int(nixl.NIXL_WRITE) == 1
    assert int(nixl.NIXL_ERR_NO_TELEMETRY) == -12
    assert nixl.nixl_backend_handle is int
    # _bindings is re-exported after _api: the top-level enum is the low-level one (NIXL quirk)
    assert nixl.nixl_thread_sync_t is B.nixl_thread_sync_t
    assert len(list(rixl._api.nixl_thread_sync_t)) == 3
    assert rixl._api.nixl_thread_sync_t.NIXL_THREAD_SYNC_DEFAULT is (
        rixl._api.nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE
    )
    for m in ("nixl_agent", "nixl_agent_config", "nixlXferDList", "malloc_passthru", "get_logger"):
        assert hasattr(nixl, m)


def test_exceptions_derive_from_exception():
    names = [
        "nixlNotPostedError", "nixlInvalidParamError", "nixlBackendError", "nixlNotFoundError",
        "nixlMismatchError", "nixlNotAllowedError", "nixlRepostActiveError", "nixlUnknownError",
        "nixlNotSupportedError", "nixlRemoteDisconnectError", "nixlCancelledError",
        "nixlNoTelemetryError",
    ]
    for n in names:
        cls = getattr(B, n)
        assert cls.__bases__ == (Exception,), n
        assert getattr(nixl, n) is cls
    assert issubclass(B.rixlTimeoutError, B.nixlCancelledError)
    assert issubclass(B.rixlTimeoutError, TimeoutError)


def test_nixl_alias_is_opt_in():
    assert "nixl" not in sys.modules or sys.modules["nixl"] is rixl
    import rixl.nixl_compat  # noqa: F401

    import nixl as aliased
    from nixl._api import nixl_agent
    import nixl._bindings
    import nixl._utils
    import nixl.logging

    assert aliased is rixl and nixl_agent is rixl._api.nixl_agent
    assert sys.modules["nixl._bindings"] is rixl._bindings
    for k in ("nixl", "nixl._api", "nixl._bindings", "nixl._utils", "nixl.logging"):
        del sys.modules[k]


def test_config_defaults_and_sync_mode():
    c = nixl.nixl_agent_config()
    assert c.enable_pthread is True and c.enable_listen is False and c.port == 8888
    assert c.backends[:2] == ["LOOPBACK", "SHM"]
    # NIXL 1.5.1 keeps `None`; the agent resolves it (NONE, or STRICT with the listener).
    assert c.sync_mode is None
    c = nixl.nixl_agent_config(enable_listen_thread=True)
    assert c.sync_mode is None
    # both enums accepted (RIXL fixes NIXL's top-level enum quirk)
    c = nixl.nixl_agent_config(sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW)
    assert c.sync_mode.value == B.NIXL_THREAD_SYNC_RW
    c = nixl.nixl_agent_config(sync_mode=rixl._api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    assert c.sync_mode.value == B.NIXL_THREAD_SYNC_STRICT
    for bad in (1, "NONE", 0.0):
        with pytest.raises(TypeError):
            nixl.nixl_agent_config(sync_mode=bad)


def test_constructor_uses_bindings_at_call_time(monkeypatch):
    seen = {}
    real = B.nixlAgent

    def spy(name, cfg):
        seen["sync"] = cfg.syncMode
        seen["listen"] = cfg.useListenThread
        return real(name, cfg)

    monkeypatch.setattr(B, "nixlAgent", spy)
    nixl.nixl_agent(uniq("spy"), nixl.nixl_agent_config(backends=[]))
    assert seen == {"sync": B.NIXL_THREAD_SYNC_NONE, "listen": False}
    # sync_mode=None with the listener resolves to STRICT at agent creation, as in NIXL.
    nixl.nixl_agent(
        uniq("spy-listen"),
        nixl.nixl_agent_config(backends=[], enable_listen_thread=True, listen_port=0),
    )
    assert seen == {"sync": B.NIXL_THREAD_SYNC_STRICT, "listen": True}


def test_constructor_errors_and_missing_plugin(capsys):
    with pytest.raises(ValueError):
        nixl.nixl_agent("")
    a = nixl.nixl_agent(uniq("ucx"), nixl.nixl_agent_config(backends=["UCX", "LOOPBACK"]))
    assert list(a.backends) == ["LOOPBACK"]
    assert "Skipping backend registration UCX" in capsys.readouterr().out
    # instantiate_all creates every plugin
    b = nixl.nixl_agent(uniq("all"), None, instantiate_all=True)
    assert list(b.backends) == b.plugin_list


def test_default_agent_has_dram_backends():
    a = nixl.nixl_agent(uniq("d"))
    assert "LOOPBACK" in a.backends and "SHM" in a.backends
    assert a.backends["LOOPBACK"] == 0 and isinstance(a.backends["SHM"], int)


def test_plugin_and_backend_queries(agent, capsys):
    assert "LOOPBACK" in agent.get_plugin_list() and "SHM" in agent.get_plugin_list()
    assert agent.get_plugin_mem_types("SHM") == ["DRAM_SEG"]
    assert isinstance(agent.get_plugin_params("SHM"), dict)
    assert agent.get_plugin_mem_types("NOPE") == [] and agent.get_plugin_params("NOPE") == {}
    assert agent.get_backend_mem_types("LOOPBACK") == ["DRAM_SEG"]
    assert agent.get_backend_mem_types("SHM") == [] and agent.get_backend_params("SHM") == {}
    assert "not instantiated" in capsys.readouterr().out
    with pytest.raises(nixl.nixlInvalidParamError):
        agent.create_backend("LOOPBACK")
    with pytest.raises(nixl.nixlNotFoundError):
        agent.create_backend("UCX")
    agent.create_backend("SHM", {"workers": "1"})
    assert agent.get_backend_params("SHM")["workers"] == "1"
    assert agent.backend_mems["SHM"] == ["DRAM_SEG"]


# ---------------------------------------------------------------- descriptors


def test_xfer_descs_conversions(agent, bufs):
    a = bufs(4 * KiB)
    d = agent.get_xfer_descs([(a, 4096, 0), (a, 16, 0)], "DRAM")
    assert isinstance(d, nixl.nixlXferDList) and d.descCount() == 2 and d[1] == (a, 16, 0)
    assert agent.get_xfer_descs(d) is d
    assert agent.get_xfer_descs([(a, 1, 0)]) is None  # no mem_type
    assert agent.get_xfer_descs([(a, 1, 0, "")], "DRAM") is None  # 4-tuples
    assert agent.get_xfer_descs([[a, 1, 0]], "DRAM") is None  # list of lists
    assert agent.get_xfer_descs(nixl.nixlRegDList(nixl.DRAM_SEG)) is None
    with pytest.raises(KeyError):
        agent.get_xfer_descs([(a, 1, 0)], "HBM")
    with pytest.raises(TypeError):
        agent.get_xfer_descs([(a, 1, 0), [a, 1, 0]], "DRAM")
    with pytest.raises(ValueError):
        agent.get_xfer_descs([(a, 1, 0), (a, 1)], "DRAM")
    with pytest.raises(IndexError):
        agent.get_xfer_descs([], "DRAM")


def test_reg_descs_conversions(agent, bufs):
    a = bufs(4 * KiB)
    r = agent.get_reg_descs([(a, 4096, 0, "x"), (a, 8, 1, b"y")], "DRAM")
    assert r[0] == (a, 4096, 0, b"x") and r[1] == (a, 8, 1, b"y")
    assert agent.get_reg_descs([(a, 1, 0)], "DRAM") is None
    assert agent.get_reg_descs(nixl.nixlXferDList(nixl.DRAM_SEG)) is None
    x = r.trim()
    assert isinstance(x, nixl.nixlXferDList) and x[0] == (a, 4096, 0)


def test_numpy_descs(agent):
    arr = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint64)
    d = agent.get_xfer_descs(arr, "DRAM")
    assert d.descCount() == 2 and d[1] == (4, 5, 6)
    r = agent.get_reg_descs(arr.astype(np.int64), "DRAM")
    assert r[0] == (1, 2, 3, b"")
    with pytest.raises(ValueError):
        agent.get_xfer_descs(arr.astype(np.int32), "DRAM")
    with pytest.raises(ValueError):
        agent.get_xfer_descs(np.asfortranarray(np.zeros((4, 3), dtype=np.uint64)), "DRAM")
    assert agent.get_xfer_descs(np.zeros((4, 2), dtype=np.uint64), "DRAM") is None
    with pytest.raises(IndexError):
        agent.get_xfer_descs(np.zeros((0, 3), dtype=np.uint64), "DRAM")
    big = np.arange(3 * 100000, dtype=np.uint64).reshape(-1, 3)
    d = agent.get_xfer_descs(big, "DRAM")
    assert d.descCount() == 100000 and d[99999] == tuple(int(x) for x in big[99999])
    # direct constructor with an array
    assert nixl.nixlXferDList(nixl.DRAM_SEG, arr) == d.__class__(nixl.DRAM_SEG, [(1, 2, 3), (4, 5, 6)])


def test_dlist_methods():
    d = nixl.nixlXferDList(nixl.DRAM_SEG)
    assert d.isEmpty() and d.getType() == nixl.DRAM_SEG and d.getType() is nixl.DRAM_SEG
    d.addDesc((1, 2, 3))
    d.append((4, 5, 6))
    assert d.descCount() == 2 and len(d) == 2
    d[0] = (7, 8, 9)
    assert d[0] == (7, 8, 9) and d.index((4, 5, 6)) == 1
    with pytest.raises(nixl.nixlNotFoundError):
        d.index((0, 0, 0))
    with pytest.raises(IndexError):
        d[5]
    d.remDesc(0)
    assert d[0] == (4, 5, 6)
    d.print()
    assert "nixlXferDList" in repr(d)
    d.clear()
    assert d.isEmpty()
    sized = nixl.nixlXferDList(nixl.VRAM_SEG, 3)
    assert sized.descCount() == 3 and sized[2] == (0, 0, 0)
    rem = nixl.nixlRemoteDList(nixl.VRAM_SEG, [(1, 2, 0, "peer")])
    assert rem[0] == (1, 2, 0, "peer") and rem.descCount() == 1
    r = nixl.nixlRegDList(nixl.FILE_SEG, [(0, 0, 3, "rw:/tmp/x")])
    assert r.getType() == nixl.FILE_SEG and r.index((0, 0, 3, "rw:/tmp/x")) == 0


def test_serialization_without_pickle(agent):
    x = nixl.nixlXferDList(nixl.DRAM_SEG, [(1, 2, 3), (2**64 - 1, 5, 6)])
    r = nixl.nixlRegDList(nixl.FILE_SEG, [(1, 2, 3, b"\x00meta")])
    rem = agent.get_remote_descs([(1, 2, 0, "p")], "VRAM")
    for d in (x, r, rem):
        s = agent.get_serialized_descs(d)
        assert isinstance(s, bytes) and s.startswith(b"RIXLDL")
        back = agent.deserialize_descs(s)
        assert type(back) is type(d) and back == d
        assert pickle.loads(pickle.dumps(d)) == d
    evil = pickle.dumps(x)
    with pytest.raises(nixl.nixlMismatchError):
        agent.deserialize_descs(evil)
    s = agent.get_serialized_descs(x)
    for bad in (s[:-1], s + b"\x00", s[:6] + b"\x09" + s[7:], b""):
        with pytest.raises(nixl.nixlMismatchError):
            agent.deserialize_descs(bad)


# ---------------------------------------------------------------- memory


def test_register_deregister(agent, bufs):
    a = bufs(8 * KiB)
    r = agent.register_memory([(a, 8192, 0, "")], "DRAM")
    assert isinstance(r, nixl.nixlRegDList)
    with pytest.raises(TypeError):
        agent.register_memory([(a, 1, 0)], "DRAM")
    with pytest.raises(KeyError):
        agent.register_memory(r, backends=["SHM"])
    with pytest.raises(nixl.nixlNotFoundError):
        agent.deregister_memory(agent.get_reg_descs([(a, 4096, 0, "")], "DRAM"))
    agent.deregister_memory(r)
    with pytest.raises(nixl.nixlNotFoundError):
        agent.deregister_memory(r)
    with pytest.raises(nixl.nixlNotFoundError):
        agent.register_memory([(0, 10, 0, "f")], "FILE")  # no FILE backend here


def test_query_memory(agent, bufs):
    with pytest.raises(ValueError):
        agent.query_memory([(0, 0, 0, "/tmp")], "POSIX", "FILE")
    with pytest.raises(nixl.nixlNotSupportedError):
        agent.query_memory([(bufs(4096), 4096, 0, "")], "LOOPBACK", "DRAM")


# ---------------------------------------------------------------- transfers


def setup_pair(pair, bufs, n=4, size=4 * KiB):
    a, b = pair
    src = bufs(n * size, fill=0x11)
    dst = bufs(n * size, fill=0x00)
    a.register_memory([(src, n * size, 0, "")], "DRAM")
    b.register_memory([(dst, n * size, 0, "")], "DRAM")
    assert a.add_remote_agent(b.get_agent_metadata()) == b.name.encode()
    return a, b, src, dst


def test_initialize_xfer_write_read_and_notifs(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs)
    write(src, bytes(range(256)) * 16)
    local = a.get_xfer_descs([(src, 4096, 0)], "DRAM")
    remote = a.get_xfer_descs([(dst, 4096, 0)], "DRAM")
    h = a.initialize_xfer("WRITE", local, remote, b.name, b"tag1")
    with pytest.raises(nixl.nixlNotPostedError):
        a.check_xfer_state(h)
    st = a.transfer(h)
    assert st in ("DONE", "PROC")
    while a.check_xfer_state(h) == "PROC":
        pass
    assert read(dst, 4096) == read(src, 4096)
    assert a.query_xfer_backend(h) == "LOOPBACK"
    # sticky notification: replace, then keep
    a.transfer(h, b"tag2")
    a.wait_xfer(h)
    a.transfer(h)
    a.wait_xfer(h)
    # RIXL extension: empty notification
    a.transfer(h, notif=b"")
    a.wait_xfer(h)
    got = b.get_new_notifs()
    assert got == {a.name: [b"tag1", b"tag2", b"tag2", b""]}
    # READ back into another part of src
    write(dst, b"\x42" * 4096)
    loc2 = a.get_xfer_descs([(src + 4096, 4096, 0)], "DRAM")
    r = a.initialize_xfer("READ", loc2, remote, b.name)
    a.transfer(r)
    a.wait_xfer(r)
    assert read(src + 4096, 4096) == b"\x42" * 4096
    assert b.get_new_notifs() == {}
    a.release_xfer_handle(h)
    r.release()
    r.release()  # idempotent


def test_initialize_xfer_errors(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs)
    l1 = a.get_xfer_descs([(src, 4096, 0)], "DRAM")
    l2 = a.get_xfer_descs([(src, 4096, 0), (src + 4096, 4096, 0)], "DRAM")
    rem = a.get_xfer_descs([(dst, 4096, 0)], "DRAM")
    with pytest.raises(KeyError):
        a.initialize_xfer("COPY", l1, rem, b.name)
    with pytest.raises(TypeError):
        a.initialize_xfer("WRITE", [(src, 4096, 0)], rem, b.name)
    with pytest.raises(nixl.nixlInvalidParamError):
        a.initialize_xfer("WRITE", l2, rem, b.name)
    with pytest.raises(nixl.nixlInvalidParamError):
        a.initialize_xfer("WRITE", l1, a.get_xfer_descs([(dst, 100, 0)], "DRAM"), b.name)
    with pytest.raises(nixl.nixlNotFoundError):
        a.initialize_xfer("WRITE", l1, rem, "nobody")
    with pytest.raises(nixl.nixlNotFoundError):
        a.initialize_xfer("WRITE", l1, a.get_xfer_descs([(dst, 4096, 7)], "DRAM"), b.name)
    with pytest.raises(nixl.nixlNotFoundError):
        a.initialize_xfer(
            "WRITE", nixl.nixlXferDList(nixl.DRAM_SEG), nixl.nixlXferDList(nixl.DRAM_SEG), b.name
        )


def test_prepped_xfer_merging_indices_and_errors(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs, n=64)
    write(src, bytes(i % 251 for i in range(64 * 4096)))
    lp = a.prep_xfer_dlist("", [(src + i * 4096, 4096, 0) for i in range(64)], "DRAM")
    rp = a.prep_xfer_dlist(b.name, [(dst + i * 4096, 4096, 0) for i in range(64)], "DRAM")
    assert "nixl_prepped_dlist_handle(0x" in repr(lp)
    h = a.make_prepped_xfer("WRITE", lp, list(range(64)), rp, np.arange(64), b"m")
    a.transfer(h)
    a.wait_xfer(h)
    assert read(dst, 64 * 4096) == read(src, 64 * 4096)
    assert b.check_remote_xfer_done(a.name, b"m")
    # numpy index arrays of other integer dtypes
    h2 = a.make_prepped_xfer("READ", lp, np.array([0, 1], dtype=np.int8), rp, np.array([5, 6], dtype=np.uint32))
    a.transfer(h2)
    a.wait_xfer(h2)
    with pytest.raises(KeyError):
        a.make_prepped_xfer("BAD", lp, [0], rp, [0])
    with pytest.raises(ValueError):
        a.make_prepped_xfer("WRITE", lp, np.zeros((2, 2), dtype=np.int64), rp, [0, 1])
    with pytest.raises(nixl.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lp, [], rp, [])
    with pytest.raises(nixl.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lp, [0, 1], rp, [0])
    with pytest.raises(nixl.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lp, [64], rp, [0])
    with pytest.raises(nixl.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lp, [-1], rp, [0])
    with pytest.raises(nixl.nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", rp, [0], lp, [0])  # sides swapped
    # Lists mixing exact ints with numpy scalars and bools (read through __index__), an int
    # beyond 64 bits, and a non-integer.
    h3 = a.make_prepped_xfer("WRITE", lp, [0, np.int64(1), True, np.uint16(3)], rp, [4, 5, 6, 7])
    a.transfer(h3)
    a.wait_xfer(h3)
    page = lambda base, i: read(base + i * 4096, 4096)  # noqa: E731
    assert [page(dst, 4 + k) for k in range(4)] == [page(src, i) for i in (0, 1, 1, 3)]  # True is 1
    with pytest.raises((OverflowError, nixl.nixlInvalidParamError)):
        a.make_prepped_xfer("WRITE", lp, [2**70], rp, [0])
    with pytest.raises(TypeError):
        a.make_prepped_xfer("WRITE", lp, [0, "1"], rp, [0, 1])
    with pytest.raises(nixl.nixlNotFoundError):
        a.prep_xfer_dlist("nobody", [(dst, 4096, 0)], "DRAM")
    with pytest.raises(nixl.nixlNotFoundError):
        a.prep_xfer_dlist("", [(src, 4096, 9)], "DRAM")
    lp.release()
    lp.release()
    with pytest.raises(nixl.nixlNotFoundError):
        a.make_prepped_xfer("WRITE", lp, [0], rp, [0])
    a.release_dlist_handle(rp)


def test_strided_prep(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs, n=8)
    write(src, bytes(i % 253 for i in range(8 * 4096)))
    rows = np.array([[src, 4096, 0, 4096, 4], [src + 4 * 4096, 4096, 0, 4096, 4]], dtype=np.uint64)
    lp = a.prep_xfer_dlist("", rows, "DRAM")
    rp = a.prep_xfer_dlist(b.name, np.array([[dst, 4096, 0, 4096, 8]], dtype=np.int64), "DRAM")
    h = a.make_prepped_xfer("WRITE", lp, list(range(8)), rp, list(range(8)))
    a.transfer(h)
    a.wait_xfer(h)
    assert read(dst, 8 * 4096) == read(src, 8 * 4096)
    with pytest.raises(ValueError):
        a.prep_xfer_dlist("", rows)
    with pytest.raises(ValueError):
        a.prep_xfer_dlist("", rows.astype(np.float64), "DRAM")
    for bad in ([[src, 4096, 0, 4096, 0]], [[src, 4096, 0, 100, 2]]):
        with pytest.raises(nixl.nixlNotFoundError):
            a.prep_xfer_dlist("", np.array(bad, dtype=np.uint64), "DRAM")
    with pytest.raises(nixl.nixlNotFoundError):
        a.prep_xfer_dlist("", np.zeros((0, 5), dtype=np.uint64), "DRAM")


def test_loopback_to_self_and_send_notif(agent, bufs):
    a = agent
    s, d = bufs(4096, fill=7), bufs(4096, fill=0)
    a.register_memory([(s, 4096, 0, ""), (d, 4096, 0, "")], "DRAM")
    h = a.initialize_xfer(
        "WRITE", a.get_xfer_descs([(s, 4096, 0)], "DRAM"), a.get_xfer_descs([(d, 4096, 0)], "DRAM"), a.name
    )
    a.transfer(h)
    a.wait_xfer(h)
    assert read(d, 4096) == b"\x07" * 4096
    a.send_notif(a.name, "hello")
    a.send_notif(a.name, b"")
    assert a.get_new_notifs() == {a.name: [b"hello", b""]}
    with pytest.raises(nixl.nixlNotFoundError):
        a.send_notif("nobody", b"x")
    with pytest.raises(KeyError):
        a.send_notif(a.name, b"x", backend="SHM")
    # Backend filters given as a list or a tuple (the list is the fast path of polling loops).
    a.send_notif(a.name, b"by-list")
    assert a.get_new_notifs(["LOOPBACK"]) == {a.name: [b"by-list"]}
    a.send_notif(a.name, b"by-tuple")
    assert a.get_new_notifs(("LOOPBACK",)) == {a.name: [b"by-tuple"]}
    assert a.get_new_notifs([]) == {}


@pytest.mark.parametrize("backend", ["SHM", "TCP"])
def test_single_backend_agent_is_its_own_target(backend, bufs):
    """An agent whose only backend is SHM or TCP is its own target, as with NIXL's UCX (local KV
    tiering relies on it): a transfer to its own name with a notification completes, the bytes
    arrive, and the notification, like a standalone one, lands in its own queue."""
    a = nixl.nixl_agent(uniq(backend.lower()), nixl.nixl_agent_config(backends=[backend]))
    n = 16
    src, dst = bufs(n * 4096), bufs(n * 4096 + 5, fill=0)
    data = bytes(i * 7 % 251 for i in range(n * 4096))
    write(src, data)
    a.register_memory([(src, n * 4096, 0, ""), (dst, n * 4096 + 5, 0, "")], "DRAM")
    # Scattered pages, reversed, to 5 bytes past each page (4K-aliased with the source).
    local = a.get_xfer_descs([(src + i * 4096, 4096, 0) for i in range(n)], "DRAM")
    remote = a.get_xfer_descs([(dst + 5 + (n - 1 - i) * 4096, 4096, 0) for i in range(n)], "DRAM")
    h = a.initialize_xfer("WRITE", local, remote, a.name, b"n")
    assert a.query_xfer_backend(h) == backend
    assert a.transfer(h) in ("DONE", "PROC")
    while a.check_xfer_state(h) == "PROC":
        pass
    assert a.check_xfer_state(h) == "DONE"
    got = read(dst + 5, n * 4096)
    for i in range(n):
        assert got[(n - 1 - i) * 4096 : (n - i) * 4096] == data[i * 4096 : (i + 1) * 4096]
    assert a.get_new_notifs() == {a.name: [b"n"]}
    # READ back into the source, without a notification.
    write(src, b"\0" * (n * 4096))
    r = a.initialize_xfer("READ", local, remote, a.name)
    a.transfer(r)
    a.wait_xfer(r)
    assert read(src, n * 4096) == data
    assert a.get_new_notifs() == {}
    a.send_notif(a.name, b"standalone")
    a.send_notif(a.name, b"named", backend=backend)
    assert a.get_new_notifs() == {a.name: [b"standalone", b"named"]}
    a.release_xfer_handle(h)
    a.release_xfer_handle(r)
    a.deregister_memory(a.get_reg_descs([(src, n * 4096, 0, ""), (dst, n * 4096 + 5, 0, "")], "DRAM"))


def test_check_remote_xfer_done_semantics(agent):
    a = agent
    for m in (b"abc-1", b"", b"xyz", b"abc-2"):
        a.send_notif(a.name, m)
    assert a.check_remote_xfer_done(a.name, b"abc") is True
    assert a.notifs[a.name] == [b"", b"xyz", b"abc-2"]
    assert a.check_remote_xfer_done(a.name, b"y", tag_is_prefix=False) is True
    assert a.check_remote_xfer_done(a.name, b"") is True  # empty tag matches the empty message
    assert a.notifs[a.name] == [b"abc-2"]  # ... which is removed (NIXL defect fixed)
    assert a.check_remote_xfer_done(a.name, b"abc") is True
    assert a.check_remote_xfer_done(a.name, b"") is False
    assert a.check_remote_xfer_done("nobody", b"") is False
    # separate queues: get_new_notifs drains without touching self.notifs
    a.send_notif(a.name, b"q")
    assert a.get_new_notifs() == {a.name: [b"q"]}
    assert a.update_notifs() is a.notifs and a.notifs[a.name] == []


def test_repost_active_and_release_in_flight(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs, n=256)
    loc = a.get_xfer_descs([(src, 256 * 4096, 0)], "DRAM")
    rem = a.get_xfer_descs([(dst, 256 * 4096, 0)], "DRAM")
    h = a.initialize_xfer("WRITE", loc, rem, b.name)
    for _ in range(3):
        st = a.transfer(h)
        if st == "PROC":
            try:
                a.transfer(h)
            except nixl.nixlRepostActiveError:
                pass
        a.wait_xfer(h)
        assert a.check_xfer_state(h) == "DONE"
    h.release()
    with pytest.raises(nixl.nixlNotFoundError):
        a.check_xfer_state(h)
    with pytest.raises(nixl.nixlNotFoundError):
        a.transfer(h)


def test_telemetry(bufs):
    cfg = nixl.nixl_agent_config(backends=["LOOPBACK"], capture_telemetry=True)
    a = nixl.nixl_agent(uniq("tel"), cfg)
    s, d = bufs(8192), bufs(8192)
    a.register_memory([(s, 8192, 0, ""), (d, 8192, 0, "")], "DRAM")
    h = a.initialize_xfer(
        "WRITE",
        a.get_xfer_descs([(s, 4096, 0), (s + 4096, 4096, 0)], "DRAM"),
        a.get_xfer_descs([(d, 4096, 0), (d + 4096, 4096, 0)], "DRAM"),
        a.name,
    )
    with pytest.raises(nixl.nixlNotPostedError):
        a.get_xfer_telemetry(h)
    a.transfer(h)
    a.wait_xfer(h)
    t = a.get_xfer_telemetry(h)
    assert t.startTime > 0 and t.postDuration > 0 and t.xferDuration >= t.postDuration
    assert t.totalBytes == 8192 and t.descCount == 2
    plain = nixl.nixl_agent(uniq("notel"), nixl.nixl_agent_config(backends=["LOOPBACK"]))
    plain.register_memory([(s, 8192, 0, "")], "DRAM")
    h2 = plain.initialize_xfer(
        "WRITE", plain.get_xfer_descs([(s, 10, 0)], "DRAM"), plain.get_xfer_descs([(s + 100, 10, 0)], "DRAM"), plain.name
    )
    plain.transfer(h2)
    with pytest.raises(nixl.nixlNoTelemetryError):
        plain.get_xfer_telemetry(h2)


def test_estimate_cost(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs)
    h = a.initialize_xfer(
        "WRITE", a.get_xfer_descs([(src, 4096, 0)], "DRAM"), a.get_xfer_descs([(dst, 4096, 0)], "DRAM"), b.name
    )
    try:
        dur, margin, method = a.estimate_xfer_cost(h)
    except nixl.nixlNotSupportedError:
        return
    assert isinstance(dur, int) and isinstance(margin, int) and method == "ANALYTICAL_BACKEND"


# ---------------------------------------------------------------- metadata


def test_metadata_rules(pair, bufs):
    a, b, src, dst = setup_pair(pair, bufs)
    md = b.get_agent_metadata()
    assert a.add_remote_agent(md) == b.name.encode()  # idempotent
    with pytest.raises(nixl.nixlInvalidParamError):
        a.add_remote_agent(a.get_agent_metadata())
    for bad in (b"", b"garbage", md[:-3]):
        with pytest.raises(nixl.nixlMismatchError):
            a.add_remote_agent(bad)
    assert a.check_remote_metadata(b.name)
    assert a.check_remote_metadata(b.name, a.get_xfer_descs([(dst, 4096, 0)], "DRAM"))
    assert not a.check_remote_metadata(b.name, a.get_xfer_descs([(dst + 10**6, 1, 0)], "DRAM"))
    assert not a.check_remote_metadata("nobody")
    a.make_connection(b.name)
    with pytest.raises(nixl.nixlNotFoundError):
        a.make_connection("nobody")
    with pytest.raises(nixl.nixlNotFoundError):
        a.make_connection(a.name)
    a.remove_remote_agent("nobody")  # never raises
    a.remove_remote_agent(a.name)
    storage_only = nixl.nixl_agent(uniq("st"), nixl.nixl_agent_config(backends=[]))
    with pytest.raises(nixl.nixlInvalidParamError):
        storage_only.get_agent_metadata()


def test_partial_metadata_and_invalidation(pair, bufs):
    a, b = pair
    n = 4
    dst = bufs(n * 4096)
    src = bufs(4096, fill=9)
    a.register_memory([(src, 4096, 0, "")], "DRAM")
    regs = b.register_memory([(dst + i * 4096, 4096, 0, "") for i in range(n)], "DRAM")
    conn = b.get_partial_agent_metadata(nixl.nixlRegDList(nixl.DRAM_SEG), False)
    assert a.add_remote_agent(conn) == b.name.encode()
    want = a.get_xfer_descs([(dst + 4096, 4096, 0)], "DRAM")
    assert a.check_remote_metadata(b.name) and not a.check_remote_metadata(b.name, want)
    with pytest.raises(nixl.nixlNotFoundError):
        a.prep_xfer_dlist(b.name, want)
    one = nixl.nixlRegDList(nixl.DRAM_SEG, [regs[1]])
    a.add_remote_agent(b.get_partial_agent_metadata(one, False))
    assert a.check_remote_metadata(b.name, want)
    rp = a.prep_xfer_dlist(b.name, want)
    lp = a.prep_xfer_dlist("", [(src, 4096, 0)], "DRAM")
    h = a.make_prepped_xfer("WRITE", lp, [0], rp, [0])
    a.transfer(h)
    a.wait_xfer(h)
    assert read(dst + 4096, 4096) == b"\x09" * 4096
    with pytest.raises(nixl.nixlNotFoundError):
        b.get_partial_agent_metadata(nixl.nixlRegDList(nixl.DRAM_SEG, [(dst, 100, 0, "")]))
    # invalidation makes handles stale; release still works
    a.remove_remote_agent(b.name)
    assert not a.check_remote_metadata(b.name)
    with pytest.raises(nixl.nixlNotFoundError):
        a.transfer(h)
    with pytest.raises(nixl.nixlNotFoundError):
        a.make_prepped_xfer("WRITE", lp, [0], rp, [0])
    with pytest.raises(nixl.nixlNotFoundError):
        a.estimate_xfer_cost(h)
    # reload gives a fresh entry; the stale handles stay stale
    a.add_remote_agent(b.get_agent_metadata())
    with pytest.raises(nixl.nixlNotFoundError):
        a.transfer(h)
    h.release()
    rp.release()


def test_listener_calls_without_ip(agent):
    with pytest.raises(nixl.nixlInvalidParamError):
        agent.send_local_metadata()
    with pytest.raises(nixl.nixlInvalidParamError):
        agent.fetch_remote_metadata("x")
    with pytest.raises(nixl.nixlInvalidParamError):
        agent.invalidate_local_metadata()
    with pytest.raises(nixl.nixlInvalidParamError):
        agent.send_partial_agent_metadata(nixl.nixlRegDList(nixl.DRAM_SEG))


def test_listener_in_process(bufs):
    cfg_l = nixl.nixl_agent_config(backends=["LOOPBACK"], enable_listen_thread=True, listen_port=0)
    srv = nixl.nixl_agent(uniq("srv"), cfg_l)
    port = srv.get_listen_port()
    assert isinstance(port, int) and port > 0
    with pytest.raises(RuntimeError):
        nixl.nixl_agent(uniq("dup"), nixl.nixl_agent_config(backends=[], enable_listen_thread=True, listen_port=port))
    cli = nixl.nixl_agent(uniq("cli"), nixl.nixl_agent_config(backends=["LOOPBACK"]))
    d = bufs(4096)
    srv.register_memory([(d, 4096, 0, "")], "DRAM")
    cli.fetch_remote_metadata(srv.name, "127.0.0.1", port)
    import time

    deadline = time.time() + 10
    want = cli.get_xfer_descs([(d, 4096, 0)], "DRAM")
    while not cli.check_remote_metadata(srv.name, want):
        assert time.time() < deadline, "fetch did not complete"
        time.sleep(0.01)
    cli.send_local_metadata("127.0.0.1", port)
    while not srv.check_remote_metadata(cli.name):
        assert time.time() < deadline, "send did not complete"
        time.sleep(0.01)
    cli.invalidate_local_metadata("127.0.0.1", port)
    while srv.check_remote_metadata(cli.name):
        assert time.time() < deadline, "invalidate did not complete"
        time.sleep(0.01)
    cli.send_partial_agent_metadata(nixl.nixlRegDList(nixl.DRAM_SEG), False, [], "127.0.0.1", port)
    while not srv.check_remote_metadata(cli.name):
        assert time.time() < deadline, "partial send did not complete"
        time.sleep(0.01)


# ---------------------------------------------------------------- handles, threads, misc


def test_handle_classes(agent):
    h = nixl.nixl_xfer_handle(agent.agent, 12345)
    # Each class names its slots, as NIXL 1.5.1's do.
    for cls in (nixl.nixl_xfer_handle, nixl.nixl_prepped_dlist_handle):
        assert cls.__slots__ == ("_handle", "_agent", "_released")
    with pytest.raises(AttributeError):
        h.other = 1
    assert repr(h) == "nixl_xfer_handle(0x3039, released=False)"
    h.release()  # unknown id: release is best-effort and idempotent
    assert repr(h).endswith("released=True)")
    with pytest.raises(nixl.nixlNotFoundError):
        agent.check_xfer_state(nixl.nixl_xfer_handle(agent.agent, 99))
    with pytest.raises(nixl.nixlNotSupportedError):
        agent.prep_mem_view(nixl.nixlXferDList(nixl.VRAM_SEG))


def test_many_threads_one_agent(pair, bufs):
    a, b = pair
    nthreads, per = 8, 50
    src = bufs(nthreads * 4096, fill=0x5A)
    dst = bufs(nthreads * 4096, fill=0)
    a.register_memory([(src, nthreads * 4096, 0, "")], "DRAM")
    b.register_memory([(dst, nthreads * 4096, 0, "")], "DRAM")
    a.add_remote_agent(b.get_agent_metadata())
    errors = []

    def work(t):
        try:
            for i in range(per):
                lp = a.prep_xfer_dlist("", [(src + t * 4096, 4096, 0)], "DRAM")
                rp = a.prep_xfer_dlist(b.name, [(dst + t * 4096, 4096, 0)], "DRAM")
                h = a.make_prepped_xfer("WRITE", lp, [0], rp, [0], f"t{t}-{i}")
                a.transfer(h)
                while a.check_xfer_state(h) != "DONE":
                    pass
                h.release()
                lp.release()
                rp.release()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert read(dst, nthreads * 4096) == b"\x5a" * (nthreads * 4096)
    got = b.get_new_notifs()[a.name]
    assert sorted(got) == sorted(f"t{t}-{i}".encode() for t in range(nthreads) for i in range(per))


def test_utils(bufs):
    a = nixl.malloc_passthru(10000)
    assert a % 4096 == 0
    nixl.ba_buf(a, 10000)
    assert read(a, 10000) == b"\xba" * 10000
    c = bufs(10000)
    nixl.ba_buf(c, 10000)
    nixl.verify_transfer(a, c, 10000)
    write(c, b"\x00")
    with pytest.raises(AssertionError):
        nixl.verify_transfer(a, c, 10000)
    nixl.free_passthru(a)


def test_logger_env(monkeypatch):
    import logging

    monkeypatch.setenv("NIXL_LOG_LEVEL", "WARN")
    lg = nixl.get_logger(uniq("lg"))
    assert lg.level == logging.WARNING


def test_wait_new_notifs_sleeps_until_a_notification(pair, bufs):
    a, b, _, _ = setup_pair(pair, bufs)
    t0 = time.monotonic()
    assert b.wait_new_notifs(0.05) == {}
    assert time.monotonic() - t0 >= 0.045, "returned before the timeout with nothing to deliver"
    sender = threading.Timer(0.1, lambda: a.send_notif(b.name, b"late"))
    sender.start()
    t0 = time.monotonic()
    got = b.wait_new_notifs(10)
    sender.join()
    assert got == {a.name: [b"late"]}
    assert time.monotonic() - t0 < 5, "the notification did not wake the waiter"
    a.send_notif(b.name, b"queued")
    assert b.wait_new_notifs() == {a.name: [b"queued"]}, "an already queued one returns at once"
    with pytest.raises(KeyError):
        b.wait_new_notifs(0, backends=["NOPE"])
