#!/usr/bin/env python3
"""NIXL 1.5.1's POSIX backend, measured the way `crates/rixl-posix/benches/posix_bw.rs`
measures RIXL's, so that the two can be run side by side in one session.

- Sequential WRITE then READ of TOTAL bytes (1 GiB) in 1 MiB and 16 MiB blocks, buffered and
  O_DIRECT. One request holds every block; block i of the buffer goes to file slot n-1-i.
  Buffered READs run right after the WRITEs (this VM evicts idle page cache within a minute).
- 4 KiB random READs, 128 per post (16 prepared requests of 128 random offsets, posted
  round-robin, one in flight), O_DIRECT and buffered (hot), reported as IOPS.

NIXL has no blocking wait: completion is polled with check_xfer_state, as NIXL programs do.

Usage (with the NIXL virtualenv):
    /work/nixl-venv/bin/python bench/nixl_posix_compare.py [--dir /tmp] [--total-mib 1024]
        [--iters 3] [--rand-posts 4000] [--param use_uring=true ...] [--rixl] [--fio]

--rixl first runs RIXL's side (`cargo bench -p rixl-posix --bench posix_bw`, same sizes) and
--fio runs fio baselines (fio 3.33 from Debian: `apt-get install fio`) after NIXL, so that one
command measures all three in the same session. The fio jobs print their command lines.
Buffered sequential baselines use `psync` (one thread copying, as NIXL's AIO queue does for
buffered files), O_DIRECT ones `io_uring` at queue depth 64, random reads `io_uring` at queue
depth 128. Every fio job uses `--iomem_align=4096`: on this project's AMD machines the
kernel's `rep movsb` copy runs about 4x slower when the user buffer sits a few bytes past a
page boundary (fio's default), which would make fio look 4x slower than it is.

The script ends with os._exit(0): NIXL 1.5.1 can crash at interpreter exit.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rand-posts", type=int, default=4000)
    ap.add_argument("--param", action="append", default=[],
                    help="POSIX init param KEY=VALUE (e.g. use_uring=true)")
    ap.add_argument("--rixl", action="store_true", help="run RIXL's posix_bw bench first")
    ap.add_argument("--fio", action="store_true", help="run fio baselines after NIXL")
    args = ap.parse_args()
    if args.rixl:
        run_rixl(args)

    from nixl_cu12._api import nixl_agent, nixl_agent_config
    import nixl_cu12._utils as nu

    params = dict(p.split("=", 1) for p in args.param)
    label = "nixl-" + (",".join(f"{k}={v}" for k, v in params.items()) or "default")
    name = "nixl-bench"
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    agent.create_backend("POSIX", params)

    total = args.total_mib * MIB
    iters = max(1, args.iters)
    buf = nu.malloc_passthru(total)  # 4096-aligned
    nu.ba_buf(buf, total)            # touch every page
    agent.register_memory([(buf, total, 0, "")], "DRAM")

    print(f"NIXL POSIX bench ({label}): dir {args.dir}, {args.total_mib} MiB per pass, "
          f"{iters} timed passes per row")
    print(f"{'engine':<22} {'mode':<9} {'op':<6} {'block':>8} {'GB/s':>12} {'IOPS':>12}")
    sys.stdout.flush()

    def run(h):
        st = agent.transfer(h)
        while st != "DONE":
            st = agent.check_xfer_state(h)

    def request(op, fd, segs):
        local = agent.get_xfer_descs([(p, l, 0) for (p, _, l) in segs], "DRAM")
        remote = agent.get_xfer_descs([(o, l, fd) for (_, o, l) in segs], "FILE")
        return agent.initialize_xfer(op, local, remote, name)

    paths = {}
    for direct in (False, True):
        mode = "direct" if direct else "buffered"
        path = os.path.join(args.dir, f"nixl_posix_bw_{mode}.bin")
        paths[mode] = path
        flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
        for block in (MIB, 16 * MIB):
            fd = os.open(path, flags, 0o644)
            freg = agent.register_memory([(0, 0, fd, "")], "FILE")
            n = total // block
            segs = [(buf + i * block, (n - 1 - i) * block, block) for i in range(n)]
            w = request("WRITE", fd, segs)
            r = request("READ", fd, segs)
            run(w)  # warm-up: allocates the file's blocks
            t = time.perf_counter()
            for _ in range(iters):
                run(w)
            tw = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(iters):
                run(r)
            tr = time.perf_counter() - t
            for op, el in (("WRITE", tw), ("READ", tr)):
                print(f"{label:<22} {mode:<9} {op:<6} {block // MIB:>6}Mi "
                      f"{total * iters / el / 1e9:>12.3f} {'-':>12}")
            sys.stdout.flush()
            agent.release_xfer_handle(w)
            agent.release_xfer_handle(r)
            agent.deregister_memory(freg)
            os.close(fd)

    rng = random.Random(0x5EED)
    blocks = total // 4096
    for direct in (True, False):
        mode = "direct" if direct else "buffered"
        fd = os.open(paths["direct"], os.O_RDONLY | (os.O_DIRECT if direct else 0))
        freg = agent.register_memory([(0, 0, fd, "")], "FILE")
        reqs = []
        for k in range(16):
            segs = [(buf + (k * 128 + i) * 4096, rng.randrange(blocks) * 4096, 4096)
                    for i in range(128)]
            reqs.append(request("READ", fd, segs))
        if not direct:
            hot = request("READ", fd, [(buf + i * 16 * MIB, i * 16 * MIB, 16 * MIB)
                                       for i in range(total // (16 * MIB))])
            run(hot)
            agent.release_xfer_handle(hot)
        for h in reqs:
            run(h)
        t = time.perf_counter()
        for i in range(args.rand_posts):
            run(reqs[i % len(reqs)])
        el = time.perf_counter() - t
        ios = args.rand_posts * 128
        print(f"{label:<22} {mode:<9} {'RANDRD':<6} {'4Ki×128':>8} "
              f"{ios * 4096 / el / 1e9:>12.3f} {ios / el:>12.0f}")
        sys.stdout.flush()
        for h in reqs:
            agent.release_xfer_handle(h)
        agent.deregister_memory(freg)
        os.close(fd)

    for p in paths.values():
        try:
            os.unlink(p)
        except OSError:
            pass
    sys.stdout.flush()
    if args.fio:
        run_fio(args)
    sys.stdout.flush()
    os._exit(0)


def run_rixl(args):
    """RIXL's side: the Rust bench with the same sizes, in this session."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ,
               RIXL_BENCH_DIR=args.dir,
               RIXL_BENCH_TOTAL_MIB=str(args.total_mib),
               RIXL_BENCH_ITERS=str(args.iters),
               RIXL_BENCH_RAND_POSTS=str(args.rand_posts))
    cmd = ["cargo", "bench", "-q", "-p", "rixl-posix", "--bench", "posix_bw"]
    print("$ " + " ".join(cmd))
    sys.stdout.flush()
    subprocess.run(cmd, cwd=root, env=env, check=True)
    sys.stdout.flush()


def run_fio(args):
    """fio baselines over a file of the same size, printed in the same table shape."""
    path = os.path.join(args.dir, "fio_posix_bw.bin")
    size = f"{args.total_mib}M"
    common = ["fio", "--name=posix", f"--filename={path}", f"--size={size}",
              "--invalidate=0", "--iomem_align=4096", "--output-format=json"]

    def fio(label, mode, op, block, extra, show=True):
        cmd = common + extra
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        d = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
        if show:
            iops = f"{d['iops']:>12.0f}" if op == "RANDRD" else f"{'-':>12}"
            print(f"{label:<22} {mode:<9} {op:<6} {block:>8} {d['bw_bytes'] / 1e9:>12.3f} "
                  f"{iops}")
            print("    $ " + " ".join(cmd))
        sys.stdout.flush()

    loops = f"--loops={max(1, args.iters)}"
    fio("fio", "prep", "WRITE", "16Mi", ["--rw=write", "--bs=16M", "--ioengine=psync"],
        show=False)
    for bs in ("1M", "16M"):
        for rw, op in (("write", "WRITE"), ("read", "READ")):
            fio("fio psync", "buffered", op, bs + "i",
                [f"--rw={rw}", f"--bs={bs}", "--ioengine=psync", "--direct=0", loops])
    for bs in ("1M", "16M"):
        for rw, op in (("write", "WRITE"), ("read", "READ")):
            fio("fio io_uring qd64", "direct", op, bs + "i",
                [f"--rw={rw}", f"--bs={bs}", "--ioengine=io_uring", "--iodepth=64",
                 "--direct=1", loops])
    fio("fio io_uring qd128", "direct", "RANDRD", "4Ki",
        ["--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=128", "--direct=1",
         "--runtime=10", "--time_based"])
    fio("fio", "hot", "READ", "16Mi", ["--rw=read", "--bs=16M", "--ioengine=psync"],
        show=False)
    fio("fio io_uring qd128", "buffered", "RANDRD", "4Ki",
        ["--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=128", "--direct=0",
         "--runtime=10", "--time_based"])
    fio("fio psync", "buffered", "RANDRD", "4Ki",
        ["--rw=randread", "--bs=4k", "--ioengine=psync", "--direct=0",
         "--runtime=10", "--time_based"])
    try:
        os.unlink(path)
    except OSError:
        pass


if __name__ == "__main__":
    main()
