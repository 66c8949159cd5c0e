#!/usr/bin/env python3
"""RIXL's POSIX backend next to NIXL 1.5.1's and fio, on the same files, in interleaved rounds.

Each round runs every implementation once, in an order rotated from round to round, over the
same two files (`<dir>/posix_cmp_buffered.bin`, `<dir>/posix_cmp_direct.bin`):

- RIXL: `crates/rixl-posix/benches/posix_bw.rs` (one process per `engine` value, so that one
  engine's threads never run during another's measurement);
- NIXL: this script, in this process (one agent for the whole run);
- fio (`--fio`): single-threaded `psync` for buffered rows, `io_uring` for O_DIRECT and random
  rows (fio 3.33 from Debian: `apt-get install fio`).

The measurement is the same for all of them:

- Sequential WRITE then READ of TOTAL bytes (1 GiB) in 1 MiB and 16 MiB blocks, buffered and
  O_DIRECT. One request holds every block; block i of the buffer goes to file slot n-1-i (fio
  writes in file order). Per row: one untimed warm-up WRITE pass (allocates the blocks, puts the
  whole file in the page cache), an untimed `fdatasync` (so no implementation pays for the
  writeback of another one's dirty pages, and all start from a clean, fully cached file), then
  ITERS timed WRITE passes (buffered: into the page cache, no fsync) and right after them ITERS
  timed READ passes (buffered: from the page cache; this VM evicts idle page cache within a
  minute, so reads must follow writes at once).
- 4 KiB random READs, 128 per post (16 prepared requests of 128 random offsets, posted
  round-robin, one in flight), O_DIRECT and buffered (after a full read of the file, "hot"),
  reported as IOPS. fio's equivalent is io_uring at queue depth 128 submitting and reaping 128
  at a time (`--iodepth_batch_submit=128 --iodepth_batch_complete_min=128`); plain queue depth
  128 and single-threaded psync are printed as well.
- O_DIRECT fio rows use the queue depth RIXL runs at: min(kernel_queue_size=256, blocks per
  pass, file_inflight_bytes=256 MiB / block), i.e. 256 for 1 MiB and 16 for 16 MiB blocks
  (`--fio-depth` changes the budget assumed). With `--fio-deep` fio also runs at
  min(256, blocks per pass) (256 and 64), the depth NIXL runs at.

NIXL has no blocking wait: completion is polled with check_xfer_state, as NIXL programs do.
RIXL's bench waits with `XferRequest::wait`. Every buffer is page-aligned (`--iomem_align=4096`
for fio): on this project's AMD machines the kernel's copy into a buffer a few bytes past a
page boundary runs about 4x slower.

The machine is shared: before every case the script prints the 1-minute load average and,
after it, the CPU time other processes used during the case (in cores). The summary gives, per
row and implementation, the median over the rounds with the minimum and maximum.

Usage (with the NIXL virtualenv):
    /work/nixl-venv/bin/python bench/nixl_posix_compare.py [--dir /tmp] [--total-mib 1024]
        [--iters 3] [--rand-posts 2000] [--rounds 5] [--engines auto,io_uring,threads]
        [--param use_uring=true ...] [--no-nixl] [--fio]

The script ends with os._exit(0): NIXL 1.5.1 can crash at interpreter exit.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def busy_jiffies():
    """Busy CPU time of the whole machine, in clock ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle


def own_cpu_seconds():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def wait_quiet(limit, max_wait):
    """Waits (up to max_wait seconds) until the machine's busy CPU, sampled over 0.5 s, is
    below `limit` cores: another session's compiler would otherwise run during the case."""
    t0 = time.monotonic()
    tck = os.sysconf("SC_CLK_TCK")
    while True:
        b = busy_jiffies()
        time.sleep(0.5)
        busy = (busy_jiffies() - b) / tck / 0.5
        if busy < limit:
            return True
        if time.monotonic() - t0 > max_wait:
            print(f"    [machine still busy ({busy:.2f} cores) after {max_wait} s: going on]")
            return False


class Case:
    """Measures the foreign CPU load during one case."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.load = os.getloadavg()[0]
        self.t = time.monotonic()
        self.busy = busy_jiffies()
        self.own = own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        el = time.monotonic() - self.t
        busy = (busy_jiffies() - self.busy) / os.sysconf("SC_CLK_TCK")
        own = own_cpu_seconds() - self.own
        self.foreign = max(0.0, busy - own) / el if el > 0 else 0.0
        print(f"    [{self.name}: load1 {self.load:.2f} before, foreign CPU {self.foreign:.2f} "
              f"cores during {el:.1f} s]")
        sys.stdout.flush()
        return False


def row_line(impl, mode, op, block, gbps, iops=None):
    iops_s = f"{iops:>12.0f}" if iops is not None else f"{'-':>12}"
    print(f"{impl:<24} {mode:<9} {op:<6} {block:>8} {gbps:>10.3f} {iops_s}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rand-posts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="auto,io_uring,threads",
                    help="RIXL engines to run (empty: none); an entry may add backend "
                         "parameters: auto/inline_max_bytes=0")
    ap.add_argument("--before-root", default=None,
                    help="also run the bench of another checkout of the workspace (e.g. the "
                         "last commit, for before/after figures), labelled rixl@before")
    ap.add_argument("--before-engines", default="auto,threads")
    ap.add_argument("--modes", default="buffered,direct")
    ap.add_argument("--blocks", default="1,16", help="block sizes in MiB")
    ap.add_argument("--quiet", type=float, default=0.3,
                    help="before each case, wait until other processes use less than this "
                         "many cores; a case during which they used more is repeated once "
                         "and flagged (0: no check)")
    ap.add_argument("--param", action="append", default=[],
                    help="NIXL POSIX init param KEY=VALUE (e.g. use_uring=true)")
    ap.add_argument("--no-nixl", action="store_true")
    ap.add_argument("--fio", action="store_true", help="add fio to every round")
    ap.add_argument("--fio-depth", type=int, default=256 << 20,
                    help="O_DIRECT fio rows run at the queue depth RIXL uses: min(256, blocks, "
                         "this many bytes / block); RIXL's file_inflight_bytes default")
    ap.add_argument("--fio-deep", action="store_true",
                    help="O_DIRECT fio rows also at depth min(256, blocks), as NIXL runs")
    args = ap.parse_args()

    args.modes = [m for m in args.modes.split(",") if m]
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    results = {}  # (impl, mode, op, block) -> [values]
    pending = []

    def record(impl, mode, op, block, gbps, iops=None):
        row_line(impl, mode, op, block, gbps, iops)
        pending.append(((impl, mode, op, block), iops if iops is not None else gbps))

    impls = []
    rixl_exe = None
    engines = [e for e in args.engines.split(",") if e]
    if engines:
        rixl_exe = build_rixl(ROOT)
        impls += [("rixl", e) for e in engines]
    before_exe = None
    if args.before_root:
        before_exe = build_rixl(args.before_root)
        impls += [("rixl@before", e) for e in args.before_engines.split(",") if e]
    nixl = None
    if not args.no_nixl:
        nixl = NixlBench(args)
        impls.append(("nixl", None))
    if args.fio:
        impls.append(("fio", None))
    print(f"POSIX compare: dir {args.dir}, {args.total_mib} MiB per pass, {args.iters} timed "
          f"passes per row, {args.rand_posts} random posts, {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs")
    print(f"{'impl':<24} {'mode':<9} {'op':<6} {'block':>8} {'GB/s':>10} {'IOPS':>12}")
    sys.stdout.flush()
    loads = []
    for rnd in range(args.rounds):
        order = impls[rnd % len(impls):] + impls[:rnd % len(impls)]
        print(f"--- round {rnd + 1}/{args.rounds}: " +
              ", ".join(k if e is None else f"{k}:{e}" for k, e in order))
        for kind, eng in order:
            for attempt in (1, 2):
                if args.quiet > 0:
                    wait_quiet(args.quiet, 120)
                pending.clear()
                with Case(kind if eng is None else f"{kind}:{eng}") as c:
                    if kind == "rixl":
                        run_rixl(args, rixl_exe, eng, record)
                    elif kind == "rixl@before":
                        run_rixl(args, before_exe, eng, record, tag="@before")
                    elif kind == "nixl":
                        nixl.run(record)
                    else:
                        run_fio(args, record)
                dirty = args.quiet > 0 and c.foreign > args.quiet
                if dirty and attempt == 1:
                    print("    [other processes ran during the case: repeating it]")
                    continue
                for key, v in pending:
                    k = key if not dirty else (key[0] + " (busy machine)",) + key[1:]
                    results.setdefault(k, []).append(v)
                loads.append((c.load, c.foreign))
                break
    summary(results, loads)
    for mode in ("buffered", "direct"):
        try:
            os.unlink(shared_path(args, mode))
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(0)


def shared_path(args, mode):
    return os.path.join(args.dir, f"posix_cmp_{mode}.bin")


def summary(results, loads):
    print()
    print("Summary: median [min-max] over rounds (GB/s, or IOPS for RANDRD)")
    ls = [l for l, _ in loads]
    fs = [f for _, f in loads]
    print(f"load1 before each case: median {statistics.median(ls):.2f} "
          f"[{min(ls):.2f}-{max(ls):.2f}]; foreign CPU during cases: median "
          f"{statistics.median(fs):.2f} [{min(fs):.2f}-{max(fs):.2f}] cores")
    keys = sorted({(m, o, b) for (_, m, o, b) in results},
                  key=lambda k: (k[1] == "RANDRD", k[0] != "buffered", k[1], k[2]))
    impls = []
    for (i, _, _, _) in results:
        if i not in impls:
            impls.append(i)
    for (mode, op, block) in keys:
        print(f"{mode:<9} {op:<6} {block:>8}")
        for i in impls:
            v = results.get((i, mode, op, block))
            if not v:
                continue
            fmt = (lambda x: f"{x:,.0f}") if op == "RANDRD" else (lambda x: f"{x:.2f}")
            print(f"    {i:<40} {fmt(statistics.median(v)):>10} "
                  f"[{fmt(min(v))}-{fmt(max(v))}] n={len(v)}")
    sys.stdout.flush()


def build_rixl(root):
    cmd = ["cargo", "bench", "-q", "-p", "rixl-posix", "--bench", "posix_bw", "--no-run",
           "--message-format=json"]
    print(f"$ (cd {root}; " + " ".join(cmd) + ")")
    env = dict(os.environ)
    if os.path.realpath(root) != os.path.realpath(ROOT):
        # Its own target directory: cargo identifies a workspace member by its path relative to
        # the workspace, so in a shared one it would take the other checkout's build as fresh.
        env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target", "posix-compare-before"))
    out = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True,
                         text=True).stdout
    exe = None
    for line in out.splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == \
                "posix_bw" and m.get("executable"):
            exe = m["executable"]
    if not exe:
        sys.exit("could not find the posix_bw bench executable")
    # Cargo names the binary by a hash of the package, not of the checkout: a build of another
    # checkout into the same target directory would replace it. Keep a copy per checkout.
    keep = os.path.join(ROOT, "target", "posix-compare",
                        "posix_bw-" + os.path.realpath(root).strip("/").replace("/", "_"))
    os.makedirs(os.path.dirname(keep), exist_ok=True)
    shutil.copy2(exe, keep)
    print(f"RIXL bench of {root}: {keep}")
    return keep


def run_rixl(args, exe, spec, record, tag=""):
    """RIXL's side: one process of the Rust bench for one engine, on the shared files."""
    engine, *params = spec.split("/")
    env = dict(os.environ,
               RIXL_BENCH_PARAMS=",".join(params),
               RIXL_BENCH_MODES=",".join(args.modes),
               RIXL_BENCH_BLOCKS_MIB=",".join(str(b) for b in args.blocks),
               RIXL_BENCH_DIR=args.dir,
               RIXL_BENCH_FILE="posix_cmp",
               RIXL_BENCH_KEEP="1",
               RIXL_BENCH_TOTAL_MIB=str(args.total_mib),
               RIXL_BENCH_ITERS=str(args.iters),
               RIXL_BENCH_ENGINES=engine,
               RIXL_BENCH_RAND_POSTS=str(args.rand_posts))
    out = subprocess.run([exe, "--bench"], env=env, check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) == 6 and f[1] in ("buffered", "direct"):
            iops = float(f[5]) if f[5] != "-" else None
            label = f"rixl{tag}-{f[0]}" + "".join(f"/{p}" for p in params)
            record(label, f[1], f[2], f[3], float(f[4]), iops)


class NixlBench:
    def __init__(self, args):
        from nixl_cu12._api import nixl_agent, nixl_agent_config
        import nixl_cu12._utils as nu

        self.args = args
        params = dict(p.split("=", 1) for p in args.param)
        self.label = "nixl-" + (",".join(f"{k}={v}" for k, v in params.items()) or "default")
        self.name = "nixl-bench"
        self.agent = nixl_agent(self.name, nixl_agent_config(backends=[]))
        self.agent.create_backend("POSIX", params)
        self.total = args.total_mib * MIB
        self.buf = nu.malloc_passthru(self.total)  # 4096-aligned
        nu.ba_buf(self.buf, self.total)            # touch every page
        self.agent.register_memory([(self.buf, self.total, 0, "")], "DRAM")

    def _run(self, h):
        st = self.agent.transfer(h)
        while st != "DONE":
            if st == "ERR":
                raise RuntimeError("NIXL transfer failed")
            st = self.agent.check_xfer_state(h)

    def _request(self, op, fd, segs):
        a = self.agent
        local = a.get_xfer_descs([(p, l, 0) for (p, _, l) in segs], "DRAM")
        remote = a.get_xfer_descs([(o, l, fd) for (_, o, l) in segs], "FILE")
        return a.initialize_xfer(op, local, remote, self.name)

    def run(self, record):
        a, args, total, buf = self.agent, self.args, self.total, self.buf
        iters = max(1, args.iters)
        for mode in args.modes:
            direct = mode == "direct"
            path = shared_path(args, mode)
            flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
            for block in (b * MIB for b in args.blocks):
                fd = os.open(path, flags, 0o644)
                freg = a.register_memory([(0, 0, fd, "")], "FILE")
                n = total // block
                segs = [(buf + i * block, (n - 1 - i) * block, block) for i in range(n)]
                w = self._request("WRITE", fd, segs)
                r = self._request("READ", fd, segs)
                self._run(w)  # warm-up: allocates the file's blocks, fills the page cache
                os.fdatasync(fd)
                t = time.perf_counter()
                for _ in range(iters):
                    self._run(w)
                tw = time.perf_counter() - t
                t = time.perf_counter()
                for _ in range(iters):
                    self._run(r)
                tr = time.perf_counter() - t
                for op, el in (("WRITE", tw), ("READ", tr)):
                    record(self.label, mode, op, f"{block // MIB}Mi", total * iters / el / 1e9)
                a.release_xfer_handle(w)
                a.release_xfer_handle(r)
                a.deregister_memory(freg)
                os.close(fd)
        if args.rand_posts <= 0 or not os.path.exists(shared_path(args, "direct")):
            return
        rng = random.Random(0x5EED)
        blocks = total // 4096
        for direct in (True, False):
            mode = "direct" if direct else "buffered"
            fd = os.open(shared_path(args, "direct"), os.O_RDONLY | (os.O_DIRECT if direct else 0))
            freg = a.register_memory([(0, 0, fd, "")], "FILE")
            reqs = []
            for k in range(16):
                segs = [(buf + (k * 128 + i) * 4096, rng.randrange(blocks) * 4096, 4096)
                        for i in range(128)]
                reqs.append(self._request("READ", fd, segs))
            if not direct:
                hot = self._request("READ", fd, [(buf + i * 16 * MIB, i * 16 * MIB, 16 * MIB)
                                                 for i in range(total // (16 * MIB))])
                self._run(hot)
                a.release_xfer_handle(hot)
            for h in reqs:
                self._run(h)
            t = time.perf_counter()
            for i in range(args.rand_posts):
                self._run(reqs[i % len(reqs)])
            el = time.perf_counter() - t
            ios = args.rand_posts * 128
            record(self.label, mode, "RANDRD", "4Ki×128", ios * 4096 / el / 1e9, ios / el)
            for h in reqs:
                a.release_xfer_handle(h)
            a.deregister_memory(freg)
            os.close(fd)


def run_fio(args, record):
    """fio over the same files, in the same protocol (warm-up, fdatasync, timed passes)."""
    size = f"{args.total_mib}M"
    loops = f"--loops={max(1, args.iters)}"
    printed = getattr(run_fio, "printed", set())
    run_fio.printed = printed

    def fio(label, mode, op, block, path, extra, show=True):
        cmd = ["fio", "--name=posix", f"--filename={path}", f"--size={size}",
               "--invalidate=0", "--iomem_align=4096", "--output-format=json"] + extra
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        d = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
        if show:
            record(label, mode, op, block, d["bw_bytes"] / 1e9,
                   d["iops"] if op == "RANDRD" else None)
            if label not in printed:
                printed.add(label)
                print("    $ " + " ".join(cmd))

    def fdatasync(path):
        fd = os.open(path, os.O_WRONLY)
        os.fdatasync(fd)
        os.close(fd)

    for mode in args.modes:
        path = shared_path(args, mode)
        for bs_mib in args.blocks:
            bs = f"{bs_mib}M"
            if mode == "buffered":
                runs = [("fio-psync", ["--ioengine=psync", "--direct=0"])]
            else:
                blocks = args.total_mib // bs_mib
                same = max(1, min(256, blocks, args.fio_depth // (bs_mib * MIB)))
                depths = [same]
                if args.fio_deep and min(256, blocks) != same:
                    depths.append(min(256, blocks))
                runs = [(f"fio-io_uring-qd{qd}",
                         ["--ioengine=io_uring", f"--iodepth={qd}", "--direct=1"])
                        for qd in depths]
            fio(runs[0][0], mode, "WRITE", f"{bs_mib}Mi", path,
                ["--rw=write", f"--bs={bs}"] + runs[0][1], show=False)  # warm-up
            fdatasync(path)
            for label, eng in runs:
                for rw, op in (("write", "WRITE"), ("read", "READ")):
                    fio(label, mode, op, f"{bs_mib}Mi", path,
                        [f"--rw={rw}", f"--bs={bs}", loops] + eng)
    path = shared_path(args, "direct")
    if args.rand_posts <= 0 or not os.path.exists(path):
        return
    rt = ["--runtime=5", "--time_based"]
    batch = ["--iodepth=128", "--iodepth_batch_submit=128", "--iodepth_batch_complete_min=128"]
    fio("fio-io_uring-batch128", "direct", "RANDRD", "4Ki×128", path,
        ["--rw=randread", "--bs=4k", "--ioengine=io_uring", "--direct=1"] + batch + rt)
    fio("fio-io_uring-qd128", "direct", "RANDRD", "4Ki×128", path,
        ["--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=128", "--direct=1"] + rt)
    fio("fio", "hot", "READ", "16Mi", path, ["--rw=read", "--bs=16M", "--ioengine=psync"],
        show=False)
    fio("fio-io_uring-batch128", "buffered", "RANDRD", "4Ki×128", path,
        ["--rw=randread", "--bs=4k", "--ioengine=io_uring", "--direct=0"] + batch + rt)
    fio("fio-psync", "buffered", "RANDRD", "4Ki×128", path,
        ["--rw=randread", "--bs=4k", "--ioengine=psync", "--direct=0"] + rt)


if __name__ == "__main__":
    main()
