"""Two processes on one host through the SHM backend, with data verification."""

import os
import subprocess
import sys
import time

import pytest

import rixl as nixl
from conftest import read, uniq, write

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 64 * 4096


class Peer:
    def __init__(self, name, listen=False):
        self.name = name
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "peer.py"), name, str(SIZE), "1" if listen else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        while True:
            line = self.p.stdout.readline()
            assert line, f"peer exited (rc={self.p.poll()})"
            if line.startswith("R "):
                return line[2:].strip()

    def close(self):
        try:
            self.ask("exit")
        finally:
            self.p.stdin.close()
            assert self.p.wait(timeout=30) == 0


@pytest.fixture
def peer():
    p = Peer(uniq("peer"))
    yield p
    p.close()


def shm_agent(**kw):
    return nixl.nixl_agent(uniq("init"), nixl.nixl_agent_config(backends=["SHM"], **kw))


def test_write_read_notify_by_hand(peer, bufs):
    a = shm_agent()
    src = bufs(SIZE)
    write(src, bytes(i % 249 for i in range(SIZE)))
    a.register_memory([(src, SIZE, 0, "")], "DRAM")
    assert a.add_remote_agent(bytes.fromhex(peer.ask("md"))) == peer.name.encode()
    assert peer.ask(f"load {a.get_agent_metadata().hex()}") == a.name
    raddr = int(peer.ask("addr"))
    n = SIZE // 4096
    lp = a.prep_xfer_dlist("", [(src + i * 4096, 4096, 0) for i in range(n)], "DRAM")
    rp = a.prep_xfer_dlist(peer.name, [(raddr + i * 4096, 4096, 0) for i in range(n)], "DRAM")
    h = a.make_prepped_xfer("WRITE", lp, list(range(n)), rp, list(range(n)), b"done-w")
    assert a.query_xfer_backend(h) == "SHM"
    a.transfer(h)
    while a.check_xfer_state(h) != "DONE":
        pass
    assert peer.ask(f"wait {a.name} done-w") == "ok"
    assert bytes.fromhex(peer.ask(f"dump {SIZE}")) == read(src, SIZE)
    # READ back after the peer changes its memory
    assert peer.ask("fill 99") == "ok"
    r = a.make_prepped_xfer("READ", lp, [0, 1, 2], rp, [5, 6, 7])
    a.transfer(r)
    a.wait_xfer(r)
    assert read(src, 3 * 4096) == bytes([99]) * 3 * 4096
    # standalone notifications both ways
    a.send_notif(peer.name, "ping")
    assert peer.ask(f"wait {a.name} ping") == "ok"
    assert peer.ask(f"notif {a.name} pong") == "ok"
    deadline = time.time() + 10
    while not a.check_remote_xfer_done(peer.name, b"pong"):
        assert time.time() < deadline
        time.sleep(0.001)
    h.release()
    r.release()


def test_peer_exit_invalidates(bufs):
    p = Peer(uniq("dying"))
    a = shm_agent()
    src = bufs(4096)
    a.register_memory([(src, 4096, 0, "")], "DRAM")
    a.add_remote_agent(bytes.fromhex(p.ask("md")))
    raddr = int(p.ask("addr"))
    h = a.initialize_xfer(
        "WRITE", a.get_xfer_descs([(src, 4096, 0)], "DRAM"), a.get_xfer_descs([(raddr, 4096, 0)], "DRAM"), p.name
    )
    a.transfer(h)
    a.wait_xfer(h)
    p.close()
    deadline = time.time() + 10
    err = None
    while time.time() < deadline:
        try:
            a.transfer(h)
            a.wait_xfer(h)
        except (nixl.nixlRemoteDisconnectError, nixl.nixlNotFoundError) as e:
            err = e
            break
        time.sleep(0.01)
    assert err is not None, "a transfer to a dead peer kept succeeding"
    assert not a.check_remote_metadata(p.name)


def test_listener_exchange_and_invalidate(bufs):
    p = Peer(uniq("lpeer"), listen=True)
    try:
        port = int(p.ask("port"))
        assert port > 0
        a = shm_agent()
        src = bufs(4096)
        write(src, b"\x33" * 4096)
        a.register_memory([(src, 4096, 0, "")], "DRAM")
        raddr = int(p.ask("addr"))
        a.fetch_remote_metadata(p.name, "127.0.0.1", port)
        want = a.get_xfer_descs([(raddr, 4096, 0)], "DRAM")
        deadline = time.time() + 10
        while not a.check_remote_metadata(p.name, want):
            assert time.time() < deadline
            time.sleep(0.01)
        a.send_local_metadata("127.0.0.1", port)
        while p.ask(f"has {a.name}") != "1":
            assert time.time() < deadline
            time.sleep(0.01)
        h = a.initialize_xfer("WRITE", a.get_xfer_descs([(src, 4096, 0)], "DRAM"), want, p.name, "via-listener")
        a.transfer(h)
        a.wait_xfer(h)
        assert p.ask(f"wait {a.name} via-listener") == "ok"
        assert bytes.fromhex(p.ask("dump 4096")) == b"\x33" * 4096
        a.invalidate_local_metadata("127.0.0.1", port)
        while p.ask(f"has {a.name}") != "0":
            assert time.time() < deadline
            time.sleep(0.01)
        # partial metadata through the listener: connection info first, then a registration
        a.send_partial_agent_metadata(nixl.nixlRegDList(nixl.DRAM_SEG), False, [], "127.0.0.1", port)
        while p.ask(f"has {a.name}") != "1":
            assert time.time() < deadline
            time.sleep(0.01)
        h.release()
    finally:
        p.close()


def test_clean_interpreter_exit():
    code = (
        "import rixl as nixl\n"
        "a = nixl.nixl_agent('x', nixl.nixl_agent_config(backends=['SHM','LOOPBACK'], enable_listen_thread=True, listen_port=0))\n"
        "b = nixl.malloc_passthru(4096)\n"
        "a.register_memory([(b, 4096, 0, '')], 'DRAM')\n"
        "l = a.prep_xfer_dlist('', [(b, 100, 0)], 'DRAM')\n"
        "r = a.prep_xfer_dlist('x', [(b + 200, 100, 0)], 'DRAM')\n"
        "h = a.make_prepped_xfer('WRITE', l, [0], r, [0], b'n')\n"
        "a.transfer(h)\n"
        "handles = [h, l, r]\n"
        "del a\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
