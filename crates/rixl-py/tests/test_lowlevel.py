"""The low-level agent (``_bindings.nixlAgent``) with NIXL's calling conventions
(NIXL-API.md §2.7): backends passed as the int handles ``createBackend`` returns, status codes
as return values, notifications given as ``str`` or ``bytes``."""

import pytest

from rixl import _bindings as B
from conftest import read, uniq

KiB = 1024


def low_agent(backend="LOOPBACK", **cfg_attrs):
    cfg = B.nixlAgentConfig()
    for k, v in cfg_attrs.items():
        setattr(cfg, k, v)
    a = B.nixlAgent(uniq("low"), cfg)
    return a, a.createBackend(backend, {})


def low_pair(bufs, size=4 * KiB):
    """Two low-level agents that know each other, with one registered buffer each."""
    a, ha = low_agent()
    b, hb = low_agent()
    src, dst = bufs(size, fill=0x5A), bufs(size, fill=0)
    ra = B.nixlRegDList(B.DRAM_SEG, [(src, size, 0, "")])
    rb = B.nixlRegDList(B.DRAM_SEG, [(dst, size, 0, "")])
    assert a.registerMem(ra, [ha]) == B.NIXL_SUCCESS
    assert b.registerMem(rb, [hb]) == B.NIXL_SUCCESS
    assert a.loadRemoteMD(b.getLocalMD()) == b.getName().encode()
    return a, ha, b, hb, src, dst


def xfer_lists(src, dst, size):
    return (
        B.nixlXferDList(B.DRAM_SEG, [(src, size, 0)]),
        B.nixlXferDList(B.DRAM_SEG, [(dst, size, 0)]),
    )


def wait_done(agent, h):
    while agent.getXferStatus(h) != B.NIXL_SUCCESS:
        pass


def drain(agent, want):
    """Notifications until `want` messages have arrived (bounded)."""
    got = {}
    for _ in range(100000):
        got = agent.getNotifs(got)
        if sum(len(v) for v in got.values()) >= want:
            return got
    return got


def test_config_defaults_match_nixl():
    c = B.nixlAgentConfig()
    assert c.useProgThread is False and c.useListenThread is False
    assert c.listenPort == 8888 and c.syncMode == 0 and c.captureTelemetry is False
    assert c.pthrDelay == 0 and c.lthrDelay == 100000
    c = B.nixlAgentConfig(True, False, 5, B.NIXL_THREAD_SYNC_RW)
    assert c.useProgThread is True and c.listenPort == 5 and c.syncMode == B.NIXL_THREAD_SYNC_RW
    # attributes are writable, as NIXL's tests set them one by one
    c.useProgThread = False
    c.captureTelemetry = True
    assert c.useProgThread is False and c.captureTelemetry is True


def test_backend_handles_select_backends(bufs):
    a, h = low_agent("LOOPBACK")
    hs = a.createBackend("SHM", {})
    assert (h, hs) == (0, 1)
    params, mems = a.getBackendParams(hs)
    assert mems == ["DRAM_SEG"] and isinstance(params, dict)
    assert a.getBackendParams("SHM") == (params, mems)
    assert a.getBackendCaps(h) == a.getBackendCaps("LOOPBACK")
    buf = bufs(4 * KiB)
    reg = B.nixlRegDList(B.DRAM_SEG, [(buf, 4 * KiB, 0, "")])
    # names and handles can be mixed; a single handle is accepted too
    assert a.registerMem(reg, [h, "SHM"]) == B.NIXL_SUCCESS
    assert a.deregisterMem(reg, hs) == B.NIXL_SUCCESS
    assert a.deregisterMem(reg, [h]) == B.NIXL_SUCCESS
    with pytest.raises(B.nixlNotFoundError, match="backend handle 7"):
        a.registerMem(reg, [7])
    with pytest.raises(B.nixlNotFoundError):
        a.getBackendParams(-1)
    with pytest.raises(TypeError):
        a.registerMem(reg, [1.5])


def test_plugin_params_give_mem_type_names():
    a, _ = low_agent()
    params, mems = a.getPluginParams("POSIX")
    assert isinstance(params, dict) and {"DRAM_SEG", "FILE_SEG"} <= set(mems)
    assert all(isinstance(m, str) and m.endswith("_SEG") for m in mems)
    with pytest.raises(B.nixlNotFoundError):
        a.getPluginParams("NOPE")


def test_query_mem_by_handle(tmp_path):
    a = B.nixlAgent(uniq("q"), B.nixlAgentConfig(False, False))
    params, _ = a.getPluginParams("POSIX")
    h = a.createBackend("POSIX", params)
    descs = B.nixlRegDList(B.FILE_SEG)
    assert a.queryMem(descs, h) == []
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 33)
    descs.addDesc((0, 0, 0, str(f)))
    descs.addDesc((0, 0, 0, str(tmp_path / "missing")))
    got = a.queryMem(descs, h)
    assert got[0]["size"] == "33" and "mode" in got[0] and got[1] is None
    assert a.queryMem(descs, "POSIX") == got


def test_str_notification_with_nul_and_statuses(bufs, monkeypatch):
    monkeypatch.setenv("NIXL_TELEMETRY_ENABLE", "y")
    a, ha, b, hb, src, dst = low_pair(bufs)
    local, remote = xfer_lists(src + 8, dst + 8, 8)
    h = a.createXferReq(B.NIXL_WRITE, local, remote, b.getName(), "n\0tif")
    assert h != 0
    assert a.postXferReq(h) in (B.NIXL_SUCCESS, B.NIXL_IN_PROG)
    wait_done(a, h)
    got = drain(b, 1)
    assert got == {a.getName(): [b"n\0tif"]}
    assert read(dst + 8, 8) == b"\x5a" * 8
    t = a.getXferTelemetry(h)
    assert t.descCount == 1 and t.totalBytes == 8 and t.xferDuration >= t.postDuration > 0
    assert a.releaseXferReq(h) == B.NIXL_SUCCESS
    assert a.invalidateRemoteMD(b.getName()) == B.NIXL_SUCCESS
    # unknown (or already dropped) peers: NIXL_ERR_NOT_FOUND is returned, not raised
    assert a.invalidateRemoteMD(b.getName()) == B.NIXL_ERR_NOT_FOUND
    assert a.checkRemoteMD(b.getName()) == B.NIXL_ERR_NOT_FOUND


def test_empty_notif_msg_means_none_or_keep(bufs):
    a, ha, b, hb, src, dst = low_pair(bufs)
    local, remote = xfer_lists(src, dst, 64)
    # "" at creation: no notification
    h = a.createXferReq(B.NIXL_WRITE, local, remote, b.getName(), "", [ha])
    a.postXferReq(h)
    wait_done(a, h)
    # a non-empty one replaces; "" or nothing keeps it
    a.postXferReq(h, b"one")
    wait_done(a, h)
    a.postXferReq(h, "")
    wait_done(a, h)
    # RIXL keyword: exactly what is given, an empty notification included
    a.postXferReq(h, notif=b"")
    wait_done(a, h)
    got = drain(b, 3)
    assert got == {a.getName(): [b"one", b"one", b""]}
    h2 = a.createXferReq(B.NIXL_WRITE, local, remote, b.getName(), notif=b"")
    a.postXferReq(h2)
    wait_done(a, h2)
    assert drain(b, 1) == {a.getName(): [b""]}


def test_prepped_requests_with_handles(bufs):
    a, ha, b, hb, src, dst = low_pair(bufs)
    local, remote = xfer_lists(src, dst, 4 * KiB)
    lp = a.prepXferDlist(local, [ha])  # NIXL's local-side form (descs, backends)
    rp = a.prepXferDlist(b.getName(), remote, [ha])
    with pytest.raises(TypeError):
        a.prepXferDlist(local, [ha], [ha])
    h = a.makeXferReq(B.NIXL_WRITE, lp, [0], rp, [0], "tag", [ha])
    a.postXferReq(h)
    wait_done(a, h)
    assert drain(b, 1) == {a.getName(): [b"tag"]}
    assert read(dst, 4 * KiB) == read(src, 4 * KiB)
    assert a.makeConnection(b.getName(), [ha]) == B.NIXL_SUCCESS
    assert a.checkRemoteMD(b.getName(), remote) == B.NIXL_SUCCESS
    assert a.releaseXferReq(h) == B.NIXL_SUCCESS
    assert a.releasedDlistH(lp) == B.NIXL_SUCCESS
    assert a.releasedDlistH(rp) == B.NIXL_SUCCESS


def test_gen_notif_backends_and_get_notifs_map(bufs):
    a, ha, b, hb, src, dst = low_pair(bufs)
    assert a.genNotif(b.getName(), "plain") == B.NIXL_SUCCESS
    assert a.genNotif(b.getName(), b"by-handle", [ha]) == B.NIXL_SUCCESS
    assert a.genNotif(b.getName(), b"by-name", "LOOPBACK") == B.NIXL_SUCCESS
    with pytest.raises(B.nixlNotFoundError):
        a.genNotif(b.getName(), b"x", [5])
    # the map passed in may hold tuples; new messages are appended after them
    got = {a.getName(): (b"old",)}
    for _ in range(100000):
        got = b.getNotifs(got, [hb])
        if len(got[a.getName()]) >= 4:
            break
    assert sorted(got[a.getName()]) == sorted([b"old", b"plain", b"by-handle", b"by-name"])
    assert got[a.getName()][0] == b"old"


def test_high_level_api_still_uses_names():
    """The Python API passes names; the low-level statuses are turned back into its results."""
    import rixl

    cfg = rixl.nixl_agent_config(backends=["LOOPBACK"])
    a = rixl.nixl_agent(uniq("hi"), cfg)
    b = rixl.nixl_agent(uniq("hi"), cfg)
    assert {"DRAM_SEG", "FILE_SEG"} <= set(a.plugin_mem_types["POSIX"])
    assert a.backend_mems["LOOPBACK"] == ["DRAM_SEG"]
    assert a.check_remote_metadata(b.name) is False
    a.add_remote_agent(b.get_agent_metadata())
    assert a.check_remote_metadata(b.name) is True
    a.remove_remote_agent(b.name)
    a.remove_remote_agent(b.name)  # never raises
    assert a.check_remote_metadata(b.name) is False
