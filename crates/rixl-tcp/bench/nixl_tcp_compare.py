#!/usr/bin/env python3
"""NIXL 1.5.1 (UCX, UCX_TLS=tcp) on the grid of RIXL's `tcp_bench` example, for side-by-side runs:

    UCX_TLS=tcp /work/nixl-venv/bin/python crates/rixl-tcp/bench/nixl_tcp_compare.py [--quick]
        [--prog-thread] [--target-sleep]
    cargo run --release -p rixl-tcp --example tcp_bench [-- --quick]

Across network namespaces, `RIXL_TCP_BENCH_NETNS=<ns>` starts the target process in that
namespace, with `UCX_NET_DEVICES` set to `RIXL_TCP_BENCH_TARGET_DEV` there (`netns_compare.sh`
sets these up).

Requests of one descriptor and of 16 descriptors (the target side in reverse order, as in
`tcp_bench`) of 64 KiB..16 MiB, WRITE and READ, posted and polled with `check_xfer_state` back
to back for 0.5 s (0.2 s with --quick); then 4 KiB WRITE post-to-complete latency (p50/p99).

NIXL's configuration: by default its best here, no progress thread and a target process that
calls `get_new_notifs` in a loop (which progresses its UCX worker: UCX over TCP emulates
one-sided operations with active messages, so the target must progress; with no progress thread
and a sleeping target, `--target-sleep`, transfers made no progress at all on this machine).
`--prog-thread` turns NIXL's progress thread on in both agents and lets the target sleep (2-3x
slower on 2 cores). The load average is printed before
and after. Processes end with os._exit(0) (NIXL's UCX processes may segfault at exit)."""
import os, select, subprocess, sys, time
import numpy as np
from nixl_cu12._api import nixl_agent, nixl_agent_config

BUF = 256 << 20
BLOCKS = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)
BATCH = 16
PROG = "--prog-thread" in sys.argv
QUICK = "--quick" in sys.argv
SECS = 0.2 if QUICK else 0.5


def make_agent(name):
    a = nixl_agent(name, nixl_agent_config(enable_prog_thread=PROG, backends=[]))
    a.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return a


def target():
    buf = np.ones(BUF, dtype=np.uint8)
    a = make_agent("nixl-target")
    a.register_memory([(buf.ctypes.data, BUF, 0, "")], "DRAM")
    print("MD %s %d" % (a.get_agent_metadata().hex(), buf.ctypes.data), flush=True)
    a.add_remote_agent(bytes.fromhex(sys.stdin.readline().split()[1]))
    if "--target-sleep" not in sys.argv and not PROG:
        n = 0
        while True:
            a.get_new_notifs()
            n += 1
            if n % 256 == 0 and select.select([sys.stdin], [], [], 0)[0]:
                break
    else:
        sys.stdin.readline()
    os._exit(0)


def once(a, h):
    s = a.transfer(h)
    while s != "DONE":
        s = a.check_xfer_state(h)
        if s == "ERR":
            raise RuntimeError("ERR")


def descs(a, base, block, count, reverse):
    order = range(count - 1, -1, -1) if reverse else range(count)
    return a.get_xfer_descs([(base + k * block, block, 0) for k in order], "DRAM")


def steal_ticks():
    """Hypervisor steal time of all CPUs (USER_HZ ticks), as tcp_bench reports it."""
    return int(open("/proc/stat").readline().split()[8])


def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main():
    args = [a for a in sys.argv[1:] if a.startswith("--")]
    cmd = [sys.executable, __file__, "--target"] + args
    env = dict(os.environ)
    ns = os.environ.get("RIXL_TCP_BENCH_NETNS")
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
        if os.environ.get("RIXL_TCP_BENCH_TARGET_DEV"):
            env["UCX_NET_DEVICES"] = os.environ["RIXL_TCP_BENCH_TARGET_DEV"]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline().split()
    while not line or line[0] != "MD":
        line = child.stdout.readline().split()
    md, rbase = bytes.fromhex(line[1]), int(line[2])
    buf = np.full(BUF, 2, dtype=np.uint8)
    lbase = buf.ctypes.data
    a = make_agent("nixl-init")
    a.register_memory([(lbase, BUF, 0, "")], "DRAM")
    peer = a.add_remote_agent(md).decode()
    child.stdin.write("MD %s\n" % a.get_agent_metadata().hex())
    child.stdin.flush()
    print("NIXL 1.5.1 UCX_TLS=%s progress thread %s, target %s%s; load %s" % (
        os.environ.get("UCX_TLS", "(unset)"), "on" if PROG else "off",
        "sleeps" if "--target-sleep" in sys.argv or PROG else "polls",
        " in netns %s" % ns if ns else "", load()), flush=True)
    print("%-6s %5s %9s %10s" % ("op", "descs", "block", "NIXL GB/s"), flush=True)
    for count in (1, BATCH):
        for op in ("WRITE", "READ"):
            for block in BLOCKS:
                if block * count > BUF:
                    continue
                h = a.initialize_xfer(op, descs(a, lbase, block, count, False),
                                      descs(a, rbase, block, count, count > 1), peer)
                for _ in range(3):
                    once(a, h)
                n = 0
                s0 = steal_ticks()
                t = time.perf_counter()
                while time.perf_counter() - t < SECS or n < 5:
                    once(a, h)
                    n += 1
                el = time.perf_counter() - t
                gbs = n * block * count / el / 1e9
                print("%-6s %5d %9d %10.2f   stolen %.2f" % (
                    op, count, block, gbs, (steal_ticks() - s0) / 100.0 / el), flush=True)
                a.release_xfer_handle(h)
    h = a.initialize_xfer("WRITE", descs(a, lbase, 4096, 1, False), descs(a, rbase, 4096, 1, False), peer)
    lat = []
    n = 1000 if QUICK else 5000
    for i in range(n + 50):
        t = time.perf_counter()
        once(a, h)
        if i >= 50:
            lat.append(time.perf_counter() - t)
    lat.sort()
    print("4 KiB WRITE post-to-complete p50 %.1f us p99 %.1f us (load %s)" % (
        lat[len(lat) // 2] * 1e6, lat[len(lat) * 99 // 100] * 1e6, load()), flush=True)
    child.stdin.write("EXIT\n")
    child.stdin.flush()
    child.wait()
    os._exit(0)


if "--target" in sys.argv:
    target()
else:
    main()
