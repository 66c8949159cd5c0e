"""A peer process for the two-process tests: an SHM agent driven by line commands on stdin.

Commands (one per line), replies on stdout (one line each):
  md                  -> hex of the full metadata blob
  addr                -> address of the registered buffer
  port                -> listener port (0 if none)
  fill <byte>         -> fills the buffer
  dump <n>            -> hex of the first n bytes of the buffer
  load <hex>          -> loads a metadata blob, replies with the name
  wait <agent> <tag>  -> waits for a notification starting with tag, replies "ok"
  has <agent>         -> "1" if metadata of agent is loaded, else "0"
  notif <agent> <msg> -> sends a notification
  exit
"""

import sys
import time

import rixl as nixl

name, size, listen = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
cfg = nixl.nixl_agent_config(backends=["SHM"], enable_listen_thread=listen, listen_port=0)
agent = nixl.nixl_agent(name, cfg)
buf = nixl.malloc_passthru(size)
nixl.ba_buf(buf, size)
agent.register_memory([(buf, size, 0, "")], "DRAM")


def reply(s):
    sys.stdout.write(f"R {s}\n")
    sys.stdout.flush()


for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "md":
        reply(agent.get_agent_metadata().hex())
    elif cmd == "addr":
        reply(buf)
    elif cmd == "port":
        reply(agent.get_listen_port() or 0)
    elif cmd == "fill":
        nixl._rixl.write_bytes(buf, bytes([int(args[0])]) * size)
        reply("ok")
    elif cmd == "dump":
        reply(nixl._rixl.read_bytes(buf, int(args[0])).hex())
    elif cmd == "load":
        reply(agent.add_remote_agent(bytes.fromhex(args[0])).decode())
    elif cmd == "wait":
        deadline = time.time() + 20
        while not agent.check_remote_xfer_done(args[0], args[1].encode()):
            if time.time() > deadline:
                reply("timeout")
                break
            time.sleep(0.001)
        else:
            reply("ok")
    elif cmd == "has":
        reply("1" if agent.check_remote_metadata(args[0]) else "0")
    elif cmd == "notif":
        agent.send_notif(args[0], args[1].encode())
        reply("ok")
    elif cmd == "exit":
        reply("bye")
        break
