#!/usr/bin/env python3
"""RIXL vs NIXL, side by side: the same workloads through the Python API of both libraries.

    python bench/compare_nixl.py            # full run (a few minutes on 2 cores)
    python bench/compare_nixl.py --quick    # fewer cases, one round (well under a minute)
    python bench/compare_nixl.py --json     # one JSON object per case instead of the table

Needs one Python environment with both packages: `rixl` (this repository's wheel, see
README "Benchmarking") and NIXL's wheel `nixl-cu12==1.5.1` (import `nixl_cu12._api`).

Process model. This script only coordinates: it imports neither library. For each library it
starts two workers (this file again, `--worker LIB ROLE`): a target, which registers a buffer
and publishes its metadata, and an initiator, which registers its own buffer and runs the cases.
Metadata goes from worker to worker through this script (hex lines on the workers' pipes; lines
of library logging on stdout are skipped). Every case runs on both libraries one after the other,
in an order that alternates from case to case and from round to round, and the figure reported
per library is the median over the rounds.

How each library runs (its best local configuration):
- RIXL: `nixl_agent(name)` with no configuration, i.e. RIXL's DRAM backends; SHM carries the
  transfers between the two processes (process_vm_readv/writev). Its backends make progress on
  their own threads, so its target sleeps on its pipe, except in the notification cases, where it
  polls `get_new_notifs` to answer, as NIXL's does. With `--rixl_blocking` RIXL's target and
  initiator wait with `wait_new_notifs` (RIXL's blocking wait, no CPU burnt while nothing
  arrives) instead, which is how a RIXL program would wait.
- NIXL 1.5.1: UCX backend with `ucx_error_handling_mode=none` and no progress thread
  (`enable_prog_thread=False`), the fastest of its local settings on this machine. Without a
  progress thread NIXL needs its target to call in for notifications: its target polls
  `get_new_notifs` in a loop (answering each notification) in the notification cases and while
  the connection is set up. UCX's shared-memory transports move RMA data without the target,
  so in the bandwidth and KV cases NIXL's target sleeps like RIXL's: on 2 cores a polling target
  only slowed NIXL down (`--nixl_target_poll` makes it poll there too).
- Both initiators run the same code: `transfer()` then `check_xfer_state()` in a loop until
  "DONE" (the NIXL way; no blocking waits), `get_new_notifs()` in a loop for answers.
- NIXL processes may crash at interpreter exit: every worker ends with `os._exit(0)`.

Cases (one request at a time, no notification unless said):
- bw OP BLOCKxBATCH: one request of BATCH descriptors of BLOCK bytes, reposted for --secs;
  GB/s = bytes moved / time. Descriptors lie back to back (--layout contiguous, which RIXL merges
  into one range) or at every other block position in shuffled order (scattered). Requests
  larger than the buffer wrap around it (marked "*": some descriptors repeat).
- kv OP: a KV-cache pool of 16,384 pages of 16 KiB on each side, prepared once
  (`prep_xfer_dlist`); one request of 8,192 random pages to 8,192 random pages
  (`make_prepped_xfer`), reposted for --secs: GB/s; also the time of `make_prepped_xfer` and of
  preparing both pools.
- lat notif rtt: 64-byte WRITE carrying a notification; the target answers with a notification;
  time from `transfer()` until the answer is seen, p50 over --lat_iters.
- lat 4KiB post->done: 4 KiB single-descriptor WRITE, `transfer()` until "DONE", p50.
- lat ping-pong: standalone notification and the target's answer, p50.

The ratio column is RIXL / NIXL: above 1 RIXL is faster for GB/s, below 1 it is faster for
times (the "RIXL" column says which). The load average is printed before and after: on a small
shared machine the figures move with it.
"""

import argparse
import json
import os
import random
import select
import statistics
import subprocess
import sys
import time

LIBS = ("rixl", "nixl")
LABEL = {"rixl": "RIXL", "nixl": "NIXL"}
KIB, MIB = 1 << 10, 1 << 20
KV_PAGES, KV_PAGE, KV_MOVE = 16384, 16 * KIB, 8192


# --------------------------------------------------------------------------- workers

def say(tag, *words):
    """A protocol line for the coordinator (library logging may share stdout)."""
    sys.stdout.write("@@ %s %s\n" % (tag, " ".join(str(w) for w in words)))
    sys.stdout.flush()


class Lines:
    """Command lines on fd 0, readable with or without blocking (select + os.read, so that no
    line hides in a Python buffer while select says there is nothing)."""

    def __init__(self):
        self.buf = b""

    def get(self, block=True):
        while b"\n" not in self.buf:
            if not block and not select.select([0], [], [], 0)[0]:
                return None
            chunk = os.read(0, 65536)
            if not chunk:
                return "EXIT"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def make_agent(lib, name):
    import logging

    logging.disable(logging.WARNING)  # NIXL and RIXL log their set-up at INFO
    if lib == "rixl":
        from rixl._api import nixl_agent

        # No configuration: RIXL's DRAM backends (SHM reaches a peer on the same host).
        return nixl_agent(name)
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def alloc(np, nbytes, byte):
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(byte)  # touch every page before registering and timing
    return buf


def huge_page_share(addr, nbytes):
    """Share of [addr, addr + nbytes) on transparent huge pages, from /proc/self/smaps (None
    where that file is missing). CMA copies into 4 KiB pages at half the speed of 2 MiB pages,
    so a row that differs from run to run is first checked against this."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    huge, inside = 0, False
    for line in lines:
        first = line.split(None, 1)[0] if line else ""
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo < addr + nbytes and hi > addr
        elif inside and first == "AnonHugePages:":
            huge += int(line.split()[1]) * 1024
    return min(1.0, huge / nbytes)


def target(lib, buf_bytes):
    import numpy as np

    agent = make_agent(lib, lib + "-target")
    buf = alloc(np, buf_bytes, 0xAA)
    agent.register_memory([(buf.ctypes.data, buf_bytes, 0, "")], "DRAM")
    say("MD", agent.get_agent_metadata().hex(), buf.ctypes.data)
    lines = Lines()
    # POLL: call into the library (NIXL's progress); ANSWER: also echo every notification to
    # its sender; IDLE: sleep on the pipe.
    mode = "POLL"
    polls = 0
    while True:
        if mode == "IDLE":
            cmd = lines.get()
        else:
            notifs = new_notifs(agent, 0.01)
            if mode == "ANSWER":
                for peer, msgs in notifs.items():
                    for m in msgs:
                        agent.send_notif(peer, m)
            polls += 1
            # Looking at the pipe costs a system call: every 64 polls is often enough (and
            # after every idle wait of a blocking target).
            look = polls % 64 == 0 or (BLOCKING[0] and not notifs)
            cmd = lines.get(block=False) if look else None
            if cmd is None:
                continue
        word, _, rest = cmd.partition(" ")
        if word == "PEER":
            agent.add_remote_agent(bytes.fromhex(rest))
            say("OK")
        elif word == "THP":
            say("OK", json.dumps(huge_page_share(buf.ctypes.data, buf_bytes)))
        elif word in ("IDLE", "POLL", "ANSWER"):
            mode = word
            say("OK")
        else:
            os._exit(0)


class Timeout(RuntimeError):
    pass


# When the current case must have finished (a bound, so that a stuck transfer fails the run).
DEADLINE = [0.0]


def complete(agent, h):
    """Posts `h` and polls until it is done (the NIXL way)."""
    state = agent.transfer(h)
    n = 0
    while state != "DONE":
        if state == "ERR":
            raise RuntimeError("transfer failed")
        state = agent.check_xfer_state(h)
        n += 1
        if n % 100000 == 0 and time.monotonic() > DEADLINE[0]:
            raise Timeout("transfer did not complete")


# `--rixl_blocking`: RIXL workers wait for notifications with `wait_new_notifs`.
BLOCKING = [False]


def new_notifs(agent, timeout):
    """What arrived: polled (NIXL's way), or waited for up to `timeout` s with --rixl_blocking."""
    if BLOCKING[0]:
        return agent.wait_new_notifs(timeout)
    return agent.get_new_notifs()


def wait_answer(agent, peer):
    n = 0
    while True:
        got = new_notifs(agent, 0.1)
        if got.get(peer):
            return
        n += 1
        if (BLOCKING[0] or n % 10000 == 0) and time.monotonic() > DEADLINE[0]:
            raise Timeout("no answer from the target")


def rate(agent, h, nbytes, secs):
    """GB/s of `h` reposted for at least `secs` and 3 times, after warm-up."""
    for _ in range(2 if nbytes <= 64 * MIB else 1):
        complete(agent, h)
    n = 0
    t0 = time.perf_counter()
    while True:
        complete(agent, h)
        n += 1
        dt = time.perf_counter() - t0
        if n >= 3 and dt >= secs:
            return n * nbytes / dt / 1e9


def layout(np, base, buf_bytes, block, batch, scattered, seed):
    """Nx3 descriptors: back to back, or every other block position in shuffled order; they
    wrap around the buffer when it is too small (the second value says so)."""
    unit = 2 * block if scattered else block
    slots = list(range(batch))
    if scattered:
        random.Random(seed).shuffle(slots)
    cap = buf_bytes // unit
    arr = np.empty((batch, 3), dtype=np.uint64)
    arr[:, 0] = [base + (s % cap) * unit for s in slots]
    arr[:, 1] = block
    arr[:, 2] = 0
    return arr, batch > cap


def percentile50(samples_ns):
    return statistics.median(samples_ns) / 1e3


def initiator(lib, buf_bytes):
    import numpy as np

    agent = make_agent(lib, lib + "-initiator")
    buf = alloc(np, buf_bytes, 0xBB)
    lbase = buf.ctypes.data
    agent.register_memory([(lbase, buf_bytes, 0, "")], "DRAM")
    lines = Lines()
    # "PEER <target metadata hex> <target buffer address>"
    md_hex, rbase = lines.get().split()[1:3]
    rbase = int(rbase)
    peer = agent.add_remote_agent(bytes.fromhex(md_hex))
    peer = peer.decode() if isinstance(peer, bytes) else peer
    say("MD", agent.get_agent_metadata().hex())
    while True:
        cmd = lines.get()
        if cmd == "EXIT" or not cmd:
            sys.stdout.flush()
            os._exit(0)
        c = json.loads(cmd)
        DEADLINE[0] = time.monotonic() + 120
        res = {}
        if c["kind"] == "thp":
            res["value"] = huge_page_share(lbase, buf_bytes)
        elif c["kind"] == "bw":
            scattered = c["layout"] == "scattered"
            loc, wrapped = layout(np, lbase, buf_bytes, c["block"], c["batch"], scattered, 1)
            rem, _ = layout(np, rbase, buf_bytes, c["block"], c["batch"], scattered, 2)
            h = agent.initialize_xfer(
                c["op"], agent.get_xfer_descs(loc, "DRAM"), agent.get_xfer_descs(rem, "DRAM"), peer
            )
            res["value"] = rate(agent, h, c["block"] * c["batch"], c["secs"])
            res["wrapped"] = wrapped
            if c.get("backend"):
                res["backend"] = agent.query_xfer_backend(h)
            agent.release_xfer_handle(h)
        elif c["kind"] == "kv":
            pools = []
            for base in (lbase, rbase):
                pages = np.zeros((KV_PAGES, 3), dtype=np.uint64)
                pages[:, 0] = base + np.arange(KV_PAGES, dtype=np.uint64) * KV_PAGE
                pages[:, 1] = KV_PAGE
                pools.append(pages)
            t0 = time.perf_counter()
            lp = agent.prep_xfer_dlist("", pools[0], "DRAM")
            rp = agent.prep_xfer_dlist(peer, pools[1], "DRAM")
            res["prep_ms"] = (time.perf_counter() - t0) * 1e3
            rng = random.Random(c["seed"])
            makes = []
            for _ in range(5):
                src = rng.sample(range(KV_PAGES), KV_MOVE)
                dst = rng.sample(range(KV_PAGES), KV_MOVE)
                t0 = time.perf_counter()
                h = agent.make_prepped_xfer(c["op"], lp, src, rp, dst)
                makes.append(time.perf_counter() - t0)
                agent.release_xfer_handle(h)
            res["make_ms"] = statistics.median(makes) * 1e3
            h = agent.make_prepped_xfer(c["op"], lp, src, rp, dst)
            res["value"] = rate(agent, h, KV_MOVE * KV_PAGE, c["secs"])
            agent.release_xfer_handle(h)
            agent.release_dlist_handle(lp)
            agent.release_dlist_handle(rp)
        elif c["kind"] in ("notif_rtt", "post_done", "pingpong"):
            size = 64 if c["kind"] == "notif_rtt" else 4 * KIB
            loc = np.array([[lbase, size, 0]], dtype=np.uint64)
            rem = np.array([[rbase, size, 0]], dtype=np.uint64)
            h = None
            if c["kind"] != "pingpong":
                notif = b"lat" if c["kind"] == "notif_rtt" else b""
                h = agent.initialize_xfer(
                    "WRITE",
                    agent.get_xfer_descs(loc, "DRAM"),
                    agent.get_xfer_descs(rem, "DRAM"),
                    peer,
                    notif,
                )
            samples = []
            clock = time.perf_counter_ns
            for i in range(c["warm"] + c["iters"]):
                t0 = clock()
                if c["kind"] == "pingpong":
                    agent.send_notif(peer, b"ping")
                    wait_answer(agent, peer)
                elif c["kind"] == "notif_rtt":
                    complete(agent, h)
                    wait_answer(agent, peer)
                else:
                    complete(agent, h)
                if i >= c["warm"]:
                    samples.append(clock() - t0)
            if h is not None:
                agent.release_xfer_handle(h)
            res["value"] = percentile50(samples)
        say("RES", json.dumps(res))


# --------------------------------------------------------------------------- coordinator

class Worker:
    def __init__(self, lib, role, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, role,
               "--buffer_mib", str(args.buffer_mib)] + (["--rixl_blocking"] if args.rixl_blocking else [])
        self.name = "%s %s" % (lib, role)
        self.verbose = args.verbose
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def read(self, tag):
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("the %s worker died (exit status %s)" % (self.name, self.p.poll()))
            if line.startswith("@@ "):
                words = line[3:].rstrip("\n").split(" ", 1)
                if words[0] != tag:
                    raise RuntimeError("%s said %r, expected %s" % (self.name, line, tag))
                return words[1] if len(words) > 1 else ""
            if self.verbose:
                sys.stderr.write("[%s] %s" % (self.name, line))

    def ask(self, line, tag="OK"):
        self.send(line)
        return self.read(tag)

    def close(self):
        try:
            self.send("EXIT")
        except OSError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def fmt_size(n):
    if n >= MIB and n % MIB == 0:
        return "%dMiB" % (n // MIB)
    if n >= KIB and n % KIB == 0:
        return "%dKiB" % (n // KIB)
    return "%dB" % n


def parse_sizes(s):
    out = []
    for w in s.split(","):
        w = w.strip().upper()
        mult = 1
        for suffix, m in (("KIB", KIB), ("K", KIB), ("MIB", MIB), ("M", MIB)):
            if w.endswith(suffix):
                w, mult = w[: -len(suffix)], m
                break
        out.append(int(w) * mult)
    return out


def cases(args):
    """(key, label, unit, higher_is_better, command) for every case, in run order."""
    out = []
    if "bw" in args.only:
        for op in args.ops:
            for lay in args.layout:
                for block in args.blocks:
                    for batch in args.batches:
                        label = "bw %-5s %s x%d" % (op, fmt_size(block), batch)
                        if len(args.layout) > 1 or lay != "contiguous":
                            label += " " + lay
                        cmd = {"kind": "bw", "op": op, "block": block, "batch": batch,
                               "layout": lay, "secs": args.secs}
                        out.append((label, label, "GB/s", True, cmd))
    if "kv" in args.only:
        for op in args.ops:
            label = "kv %-5s 8192 of 16384 x 16KiB" % op
            out.append((label, label, "GB/s", True,
                        {"kind": "kv", "op": op, "secs": args.secs, "seed": 11}))
    if "lat" in args.only:
        for kind, label in (("notif_rtt", "lat 64B WRITE+notif rtt p50"),
                            ("post_done", "lat 4KiB WRITE post->done p50"),
                            ("pingpong", "lat notif ping-pong p50")):
            out.append((label, label, "us", False,
                        {"kind": kind, "iters": args.lat_iters, "warm": max(10, args.lat_iters // 10)}))
    return out


def target_mode(lib, cmd, nixl_poll):
    """What the library's target must do while `cmd` runs (see the module docstring)."""
    if cmd["kind"] in ("notif_rtt", "pingpong"):
        return "ANSWER"
    return "POLL" if lib == "nixl" and nixl_poll else "IDLE"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("LIB", "ROLE"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="fewer blocks, one round, shorter cases")
    p.add_argument("--json", action="store_true", help="one JSON object per case")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--secs", type=float, help="seconds per bandwidth measurement (0.25, quick 0.08)")
    p.add_argument("--blocks", help="block sizes, e.g. 4K,64K,1M (default 4K..16M by 4)")
    p.add_argument("--batches", default="1,16,128", help="descriptors per request")
    p.add_argument("--ops", default="WRITE,READ")
    p.add_argument("--layout", default="contiguous", help="contiguous, scattered or both")
    p.add_argument("--only", default="bw,kv,lat", help="case groups: bw, kv, lat")
    p.add_argument("--lat_iters", type=int, help="iterations per latency case (2000, quick 300)")
    p.add_argument("--buffer_mib", type=int, default=512, help="buffer per worker (>= 256 for kv)")
    p.add_argument("--nixl_target_poll", action="store_true",
                   help="NIXL's target polls during bandwidth and KV cases too")
    p.add_argument("--libs", default="rixl,nixl", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="show the workers' other output")
    p.add_argument("--rixl_blocking", action="store_true",
                   help="RIXL waits for notifications with wait_new_notifs instead of polling")
    args = p.parse_args()
    buf_bytes = args.buffer_mib * MIB
    if args.worker:
        lib, role = args.worker
        BLOCKING[0] = args.rixl_blocking and lib == "rixl"
        (target if role == "target" else initiator)(lib, buf_bytes)
        return

    args.rounds = args.rounds or (1 if args.quick else 3)
    args.secs = args.secs or (0.08 if args.quick else 0.25)
    args.lat_iters = args.lat_iters or (300 if args.quick else 2000)
    args.blocks = parse_sizes(args.blocks or ("4K,64K,1M,16M" if args.quick else "4K,16K,64K,256K,1M,4M,16M"))
    args.batches = [int(b) for b in args.batches.split(",")]
    args.ops = [o.strip().upper() for o in args.ops.split(",")]
    args.layout = ["contiguous", "scattered"] if args.layout == "both" else [args.layout]
    args.only = [o.strip() for o in args.only.split(",")]
    libs = [l for l in args.libs.split(",") if l in LIBS]
    bad = [o for o in args.ops if o not in ("READ", "WRITE")] + \
          [l for l in args.layout if l not in ("contiguous", "scattered")]
    if bad or not libs or args.rounds < 1 or (("kv" in args.only) and args.buffer_mib < 256):
        p.error("bad --ops/--layout/--libs/--rounds, or --buffer_mib < 256 with kv cases")

    import importlib.util

    needed = ["numpy"] + [{"rixl": "rixl", "nixl": "nixl_cu12"}[lib] for lib in libs]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit("compare_nixl.py: error: %s not importable from %s (see the module docstring)"
                 % (", ".join(missing), sys.executable))

    load_before = os.getloadavg()
    workers = {}
    try:
        for lib in libs:
            t = Worker(lib, "target", args)
            i = Worker(lib, "initiator", args)
            workers[lib] = (i, t)
        for lib, (i, t) in workers.items():
            md, rbase = t.read("MD").split()
            i.send("PEER %s %s" % (md, rbase))
            t.ask("PEER " + i.read("MD"))
            # First transfer (connection set-up) while the target polls, then let it sleep.
            r = json.loads(i.ask(json.dumps({"kind": "bw", "op": "WRITE", "block": 4096, "batch": 1,
                                             "layout": "contiguous", "secs": 0.01,
                                             "backend": True}), "RES"))
            t.ask("IDLE")
            share = {"initiator": json.loads(i.ask(json.dumps({"kind": "thp"}), "RES"))["value"],
                     "target": json.loads(t.ask("THP"))}
            if not args.json:
                pages = ", ".join("%s %s" % (k, "?" if v is None else "%d%%" % round(v * 100))
                                  for k, v in share.items())
                print("%s: transfers through %s; buffers on huge pages: %s"
                      % (LABEL[lib], r.get("backend", "?"), pages), flush=True)

        todo = cases(args)
        results = {c[0]: {lib: [] for lib in libs} for c in todo}
        extra = {c[0]: {lib: [] for lib in libs} for c in todo}
        wrapped = set()
        t_start = time.time()
        for rnd in range(args.rounds):
            for n, (key, _, _, _, cmd) in enumerate(todo):
                order = libs if (rnd + n) % 2 == 0 else libs[::-1]
                for lib in order:
                    i, t = workers[lib]
                    mode = target_mode(lib, cmd, args.nixl_target_poll)
                    if mode != "IDLE":
                        t.ask(mode)
                    r = json.loads(i.ask(json.dumps(cmd), "RES"))
                    if mode != "IDLE":
                        t.ask("IDLE")
                    results[key][lib].append(r["value"])
                    extra[key][lib].append(r)
                    if r.get("wrapped"):
                        wrapped.add(key)
                if not args.json:
                    sys.stderr.write("\rround %d/%d case %d/%d   " % (rnd + 1, args.rounds, n + 1, len(todo)))
                    sys.stderr.flush()
        if not args.json:
            sys.stderr.write("\r%s\r" % (" " * 40))
        elapsed = time.time() - t_start
    finally:
        for i, t in workers.values():
            i.close()
            t.close()
    load_after = os.getloadavg()

    rows = []
    for key, label, unit, higher, _ in todo:
        med = {lib: statistics.median(results[key][lib]) for lib in libs}
        ratio = med["rixl"] / med["nixl"] if len(libs) == 2 and med["nixl"] > 0 else None
        rows.append((key, label, unit, higher, med, ratio))
        # The KV case's side figures: make_prepped_xfer and pool preparation times.
        if key.startswith("kv"):
            for field, what in (("make_ms", "make_prepped_xfer 8192"), ("prep_ms", "prep_xfer_dlist 2x16384")):
                if field == "prep_ms" and not key.startswith("kv WRITE"):
                    continue
                m = {lib: statistics.median(r[field] for r in extra[key][lib]) for lib in libs}
                rt = m["rixl"] / m["nixl"] if len(libs) == 2 and m["nixl"] > 0 else None
                rows.append((key + " " + field, "kv %-5s %s" % (key.split()[1], what), "ms", False, m, rt))

    if args.json:
        for key, label, unit, higher, med, ratio in rows:
            print(json.dumps({"case": " ".join(label.split()), "unit": unit, "higher_is_better": higher,
                              "rixl": med.get("rixl"), "nixl": med.get("nixl"),
                              "ratio_rixl_over_nixl": ratio, "wrapped": key in wrapped,
                              "rounds": args.rounds,
                              "load_before": load_before, "load_after": load_after}))
        return

    print("RIXL vs NIXL 1.5.1 (UCX, no progress thread, ucx_error_handling_mode=none), Python API, "
          "2 processes per library,\nmedian of %d interleaved round(s); load average before %.2f %.2f %.2f, "
          "after %.2f %.2f %.2f; %.0f s%s"
          % (args.rounds, *load_before, *load_after, elapsed,
             "\nRIXL waits for notifications with wait_new_notifs (--rixl_blocking); NIXL polls"
             if args.rixl_blocking else ""))
    head = "%-40s %-5s %12s %12s %10s  %s" % ("case", "unit", "RIXL", "NIXL", "RIXL/NIXL", "RIXL")
    print(head)
    print("-" * len(head))
    for key, label, unit, higher, med, ratio in rows:
        def cell(lib):
            v = med.get(lib)
            return "-" if v is None else ("%.3f" % v if v < 10 else "%.1f" % v)
        verdict = ""
        if ratio is not None:
            better = ratio > 1 if higher else ratio < 1
            factor = ratio if ratio >= 1 else 1 / ratio
            verdict = "%.2fx %s" % (factor, "faster" if better else "slower")
        print("%-40s %-5s %12s %12s %10s  %s" % (
            label + (" *" if key in wrapped else ""), unit, cell("rixl"), cell("nixl"),
            "-" if ratio is None else "%.2f" % ratio, verdict))
    if wrapped:
        print("* the request is larger than the %d MiB buffer: its descriptors wrap around it"
              % args.buffer_mib)
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError) as e:
        sys.exit("compare_nixl.py: error: %s" % e)
