#!/usr/bin/env python3
"""Python API micro-benchmarks, runnable against RIXL and against the real NIXL.

    target/py-venv/bin/python bench/python_api_bench.py            # RIXL (import rixl)
    /work/nixl-venv/bin/python bench/python_api_bench.py --nixl    # NIXL 1.5.1 (UCX, DRAM)

Prints one line per measurement (median of several runs):
  get_xfer_descs_1M      Nx3 uint64 numpy array of 1,000,000 rows -> nixlXferDList
  make_prepped_16k_np    make_prepped_xfer with 16,384 indices (numpy int64 arrays)
  make_prepped_16k_list  same with Python lists
  xfer_4k_roundtrip      transfer() + check_xfer_state() until DONE, one 4 KiB descriptor
  xfer_4kx128_python     same for a 4 KiB x 128-descriptor request
  xfer_4kx128_rust       (RIXL only) the same request posted/polled by the Rust API alone
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--nixl", action="store_true", help="benchmark NIXL (nixl_cu12) instead of RIXL")
p.add_argument("--repeat", type=int, default=7)
args = p.parse_args()

if args.nixl:
    from nixl_cu12._api import nixl_agent, nixl_agent_config  # type: ignore
    import nixl_cu12._utils as utils  # type: ignore

    BACKENDS = ["UCX"]
    IMPL = "NIXL 1.5.1 (UCX)"
else:
    from rixl._api import nixl_agent, nixl_agent_config
    import rixl._utils as utils

    BACKENDS = ["LOOPBACK"]
    IMPL = "RIXL (LOOPBACK)"

import logging

logging.disable(logging.INFO)


def median_time(fn, repeat=args.repeat, number=1):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return statistics.median(ts)


def report(name, seconds, unit="ms"):
    v = seconds * (1e3 if unit == "ms" else 1e6)
    print(f"{IMPL:20s} {name:24s} {v:10.3f} {unit}", flush=True)


def main():
    cfg = nixl_agent_config(backends=BACKENDS)
    a = nixl_agent("bench-a", cfg)
    b = nixl_agent("bench-b", cfg)

    # 1. descriptor conversion
    n = 1_000_000
    arr = np.empty((n, 3), dtype=np.uint64)
    arr[:, 0] = np.arange(n, dtype=np.uint64) * 4096 + 0x10000000
    arr[:, 1] = 4096
    arr[:, 2] = 0
    a.get_xfer_descs(arr[:10], "DRAM")
    report("get_xfer_descs_1M", median_time(lambda: a.get_xfer_descs(arr, "DRAM")))

    # memory: 16,384 pages of 4 KiB on each side
    pages = 16384
    size = pages * 4096
    src = utils.malloc_passthru(size)
    dst = utils.malloc_passthru(size)
    utils.ba_buf(src, size)
    a.register_memory([(src, size, 0, "")], "DRAM")
    b.register_memory([(dst, size, 0, "")], "DRAM")
    a.add_remote_agent(b.get_agent_metadata())
    lp = a.prep_xfer_dlist("", [(src + i * 4096, 4096, 0) for i in range(pages)], "DRAM")
    rp = a.prep_xfer_dlist("bench-b", [(dst + i * 4096, 4096, 0) for i in range(pages)], "DRAM")

    # 2. make_prepped_xfer with 16k indices (a permutation, so nothing merges)
    perm = np.random.default_rng(1).permutation(pages).astype(np.int64)
    ident = np.arange(pages, dtype=np.int64)

    def make_np():
        h = a.make_prepped_xfer("WRITE", lp, perm, rp, ident)
        a.release_xfer_handle(h)

    lperm, lident = perm.tolist(), ident.tolist()

    def make_list():
        h = a.make_prepped_xfer("WRITE", lp, lperm, rp, lident)
        a.release_xfer_handle(h)

    make_np()
    report("make_prepped_16k_np", median_time(make_np, number=20))
    report("make_prepped_16k_list", median_time(make_list, number=20))

    # 3. 4 KiB transfer + check_xfer_state until DONE
    def roundtrip_loop(h, iters):
        def run():
            for _ in range(iters):
                if a.transfer(h) != "DONE":
                    while a.check_xfer_state(h) != "DONE":
                        pass

        return median_time(run) / iters

    h1 = a.make_prepped_xfer("WRITE", lp, [0], rp, [0])
    roundtrip_loop(h1, 1000)
    report("xfer_4k_roundtrip", roundtrip_loop(h1, 20000), unit="us")

    # 4. 4 KiB x 128 descriptors (every other page: no merging), Python vs Rust alone
    idx = list(range(0, 256, 2))
    h128 = a.make_prepped_xfer("WRITE", lp, idx, rp, idx)
    roundtrip_loop(h128, 200)
    py_t = roundtrip_loop(h128, 5000)
    report("xfer_4kx128_python", py_t, unit="us")
    if not args.nixl:
        low = a.agent
        low._benchPostLoop(h128._handle, 200)
        rs = statistics.median(low._benchPostLoop(h128._handle, 5000) for _ in range(args.repeat)) / 1e9
        report("xfer_4kx128_rust", rs, unit="us")
        print(f"{IMPL:20s} {'python_overhead_4kx128':24s} {100 * (py_t - rs) / rs:10.1f} %")
        rs1 = statistics.median(low._benchPostLoop(h1._handle, 20000) for _ in range(args.repeat)) / 1e9
        report("xfer_4k_rust", rs1, unit="us")
    utils.verify_transfer(src, dst, 4096)

    for h in (h1, h128):
        a.release_xfer_handle(h)
    a.release_dlist_handle(lp)
    a.release_dlist_handle(rp)
    sys.stdout.flush()
    if args.nixl:
        os._exit(0)  # NIXL's UCX may segfault at interpreter exit


if __name__ == "__main__":
    main()
