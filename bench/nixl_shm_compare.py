#!/usr/bin/env python3
"""The shm_bench grid through the real NIXL 1.5.1 (UCX, DRAM, two processes on one host).

Runs NIXL in its best configuration on this machine (progress thread off, UCX error handling
mode "none", UCX's intra-node transports) so that RIXL's `shm_bench` example can be compared
case by case:

    /work/nixl-venv/bin/python bench/nixl_shm_compare.py [--quick]
    cargo run --release -p rixl --example shm_bench [-- --quick]

The target process registers a 1 GiB buffer, prints its metadata (hex) on stdout and keeps
calling into NIXL (without a progress thread NIXL needs the target to poll). The initiator runs
READ and WRITE for blocks of 4 KiB..16 MiB, 1/16/128 descriptors, contiguous and scattered,
each case repeated for 0.3 s, and the KV-cache case (8192 random 16 KiB pages of 16384).
Processes end with os._exit(0): NIXL's UCX processes may segfault at interpreter exit.
"""
import os
import random
import subprocess
import sys
import time

import numpy as np
from nixl_cu12._api import nixl_agent, nixl_agent_config

BUF = 1 << 30
QUICK = "--quick" in sys.argv
SECS = 0.1 if QUICK else 0.3


def make_agent(name):
    cfg = nixl_agent_config(enable_prog_thread=False, backends=[])
    agent = nixl_agent(name, cfg)
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def target():
    buf = np.ones(BUF, dtype=np.uint8)
    agent = make_agent("nixl-target")
    agent.register_memory([(buf.ctypes.data, BUF, 0, "")], "DRAM")
    sys.stdout.write("MD %s %d\n" % (agent.get_agent_metadata().hex(), buf.ctypes.data))
    sys.stdout.flush()
    peer_md = sys.stdin.readline().split()[1]
    agent.add_remote_agent(bytes.fromhex(peer_md))
    import select
    while True:
        agent.get_new_notifs()
        r, _, _ = select.select([sys.stdin], [], [], 0)
        if r and sys.stdin.readline().strip() == "EXIT":
            os._exit(0)


def measure(agent, handle, total_bytes):
    def once():
        state = agent.transfer(handle)
        while state != "DONE":
            state = agent.check_xfer_state(handle)
            if state == "ERR":
                raise RuntimeError("transfer failed")
    for _ in range(3):
        once()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < SECS or n < 5:
        once()
        n += 1
    return n * total_bytes / (time.perf_counter() - start)


def initiator():
    child = subprocess.Popen([sys.executable, __file__, "--target"] + (["--quick"] if QUICK else []),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    while not line or line[0] != "MD":  # NIXL logs to stdout too
        line = child.stdout.readline().split()
    peer_md, rbase = bytes.fromhex(line[1]), int(line[2])
    buf = np.full(BUF, 2, dtype=np.uint8)
    lbase = buf.ctypes.data
    agent = make_agent("nixl-initiator")
    agent.register_memory([(lbase, BUF, 0, "")], "DRAM")
    peer = agent.add_remote_agent(peer_md).decode()
    child.stdin.write("MD %s\n" % agent.get_agent_metadata().hex())
    child.stdin.flush()
    rng = random.Random(7)
    print("%-6s %9s %6s %11s %10s" % ("op", "block", "batch", "layout", "GB/s"))
    for op in ("WRITE", "READ"):
        for block in (4 << 10, 64 << 10, 1 << 20, 16 << 20):
            for batch in (1, 16, 128):
                for scattered in (False, True):
                    span = block * batch * (2 if scattered else 1)
                    layout = "scattered" if scattered else "contiguous"
                    if span > BUF:
                        print("%-6s %9d %6d %11s %10s" % (op, block, batch, layout, "skip (>1 GiB)"))
                        continue
                    slots = [2 * i if scattered else i for i in range(batch)]
                    if scattered:
                        rng.shuffle(slots)
                    local = agent.get_xfer_descs([(lbase + s * block, block, 0) for s in slots], "DRAM")
                    remote = agent.get_xfer_descs([(rbase + s * block, block, 0) for s in slots], "DRAM")
                    h = agent.initialize_xfer(op, local, remote, peer)
                    bw = measure(agent, h, block * batch)
                    agent.release_xfer_handle(h)
                    print("%-6s %9d %6d %11s %10.2f" % (op, block, batch, layout, bw / 1e9))
                    sys.stdout.flush()
    page = 16 << 10
    src = list(range(16384))
    dst = list(range(16384))
    rng.shuffle(src)
    rng.shuffle(dst)
    lp = agent.prep_xfer_dlist("", [(lbase + i * page, page, 0) for i in range(16384)], "DRAM")
    rp = agent.prep_xfer_dlist(peer, [(rbase + i * page, page, 0) for i in range(16384)], "DRAM")
    for op in ("WRITE", "READ"):
        h = agent.make_prepped_xfer(op, lp, src[:8192], rp, dst[:8192])
        print("KV 8192 x 16 KiB random of 16384, %s: %.2f GB/s" % (op, measure(agent, h, 8192 * page) / 1e9))
        agent.release_xfer_handle(h)
    sys.stdout.flush()
    child.stdin.write("EXIT\n")
    child.stdin.flush()
    child.wait()
    os._exit(0)


if __name__ == "__main__":
    if "--target" in sys.argv:
        target()
    else:
        initiator()
