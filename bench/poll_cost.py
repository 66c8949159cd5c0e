#!/usr/bin/env python3
"""Cost of the polling calls of a NIXL-style loop when there is nothing new (issue 16).

Prints nanoseconds per call (median of ``--repeat`` timeit runs of ``--number`` calls)
for ``get_new_notifs()`` with nothing queued, ``check_remote_xfer_done()`` with nothing
queued, and ``check_xfer_state()`` on a finished LOOPBACK self-transfer. Runs against the
installed ``rixl`` wheel::

    python bench/poll_cost.py [--number 1000000] [--repeat 5] [--json]
"""

import argparse
import json
import logging
import os
import statistics
import timeit

import numpy as np

import rixl._api as nixl


def per_call_ns(stmt, names, number, repeat):
    # A statement, not a lambda: the timed loop makes the call itself, as a polling loop does.
    t = timeit.Timer(stmt, globals=names)
    t.timeit(number=1000)  # warm up
    runs = t.repeat(number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=1_000_000, help="calls per run")
    p.add_argument("--repeat", type=int, default=5, help="runs (the median is reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()

    logging.getLogger(nixl.__name__).setLevel(logging.WARNING)  # no "Initialized" line
    agent = nixl.nixl_agent(f"poll-cost-{os.getpid()}")  # default backends
    name = agent.name

    # A LOOPBACK self-transfer, waited to DONE.
    src = np.full(4096, 0x11, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    regs = [(src.ctypes.data, src.nbytes, 0, ""), (dst.ctypes.data, dst.nbytes, 0, "")]
    reg = agent.register_memory(regs, "DRAM", backends=["LOOPBACK"])
    local = agent.get_xfer_descs([(src.ctypes.data, src.nbytes, 0)], "DRAM")
    remote = agent.get_xfer_descs([(dst.ctypes.data, dst.nbytes, 0)], "DRAM")
    h = agent.initialize_xfer("WRITE", local, remote, name, backends=["LOOPBACK"])
    agent.transfer(h)
    agent.wait_xfer(h)
    assert agent.check_xfer_state(h) == "DONE"
    assert bytes(dst) == bytes(src)
    assert agent.get_new_notifs() == {}

    names = {
        "get_new_notifs": agent.get_new_notifs,
        "check_remote_xfer_done": agent.check_remote_xfer_done,
        "check_xfer_state": agent.check_xfer_state,
        "h": h,
    }
    cases = {
        "get_new_notifs": "get_new_notifs()",
        "check_remote_xfer_done": "check_remote_xfer_done('peer', b'tag')",
        "check_xfer_state_done": "check_xfer_state(h)",
        "loop_overhead": "pass",  # the timed loop itself
    }
    out = {k: per_call_ns(s, names, args.number, args.repeat) for k, s in cases.items()}

    agent.release_xfer_handle(h)
    agent.deregister_memory(reg)

    if args.json:
        print(json.dumps({k: round(v, 1) for k, v in out.items()}))
    else:
        for k, v in out.items():
            print(f"{k:26s} {v:8.1f} ns/call")


if __name__ == "__main__":
    main()
