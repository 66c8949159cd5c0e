#!/usr/bin/env python3
"""NIXL 1.5.1 (UCX, UCX_TLS=tcp) on the grid of RIXL's `tcp_bench` example, for side-by-side runs:

    UCX_TLS=tcp /work/nixl-venv/bin/python crates/rixl-tcp/bench/nixl_tcp_compare.py
    cargo run --release -p rixl-tcp --example tcp_bench

One descriptor per request, 64 KiB..16 MiB, WRITE and READ, posted and polled back to back for
0.5 s; then 4 KiB WRITE post-to-complete latency (p50/p99 of 1000). Progress threads on both
sides so that the target does not have to spin. Processes end with os._exit(0) (NIXL's UCX
processes may segfault at interpreter exit)."""
import os, subprocess, sys, time
import numpy as np
from nixl_cu12._api import nixl_agent, nixl_agent_config
BUF = 256 << 20
def make_agent(name):
    a = nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=[]))
    a.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return a
def target():
    buf = np.ones(BUF, dtype=np.uint8)
    a = make_agent("nixl-target")
    a.register_memory([(buf.ctypes.data, BUF, 0, "")], "DRAM")
    print("MD %s %d" % (a.get_agent_metadata().hex(), buf.ctypes.data), flush=True)
    a.add_remote_agent(bytes.fromhex(sys.stdin.readline().split()[1]))
    sys.stdin.readline()
    os._exit(0)
def once(a, h):
    s = a.transfer(h)
    while s != "DONE":
        s = a.check_xfer_state(h)
        if s == "ERR": raise RuntimeError("ERR")
def main():
    child = subprocess.Popen([sys.executable, __file__, "--target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    while not line or line[0] != "MD": line = child.stdout.readline().split()
    md, rbase = bytes.fromhex(line[1]), int(line[2])
    buf = np.full(BUF, 2, dtype=np.uint8); lbase = buf.ctypes.data
    a = make_agent("nixl-init"); a.register_memory([(lbase, BUF, 0, "")], "DRAM")
    peer = a.add_remote_agent(md).decode()
    child.stdin.write("MD %s\n" % a.get_agent_metadata().hex()); child.stdin.flush()
    for op in ("WRITE", "READ"):
        for block in (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20):
            h = a.initialize_xfer(op, a.get_xfer_descs([(lbase, block, 0)], "DRAM"), a.get_xfer_descs([(rbase, block, 0)], "DRAM"), peer)
            for _ in range(3): once(a, h)
            n = 0; t = time.perf_counter()
            while time.perf_counter() - t < 0.5 or n < 5:
                once(a, h); n += 1
            print("%-6s %9d %8.2f GB/s" % (op, block, n * block / (time.perf_counter() - t) / 1e9), flush=True)
            a.release_xfer_handle(h)
    h = a.initialize_xfer("WRITE", a.get_xfer_descs([(lbase, 4096, 0)], "DRAM"), a.get_xfer_descs([(rbase, 4096, 0)], "DRAM"), peer)
    lat = []
    for i in range(1050):
        t = time.perf_counter(); once(a, h)
        if i >= 50: lat.append(time.perf_counter() - t)
    lat.sort()
    print("4 KiB WRITE post-to-complete p50 %.1f us p99 %.1f us" % (lat[500] * 1e6, lat[990] * 1e6), flush=True)
    child.stdin.write("EXIT\n"); child.stdin.flush(); child.wait(); os._exit(0)
if "--target" in sys.argv: target()
else: main()
