import os
import sys

import pytest

import rixl
import rixl._utils as utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class Buffers:
    """malloc_passthru buffers freed at teardown."""

    def __init__(self):
        self.addrs = []

    def __call__(self, size, fill=None):
        a = utils.malloc_passthru(size)
        self.addrs.append(a)
        if fill is not None:
            rixl._rixl.write_bytes(a, bytes([fill]) * size)
        return a

    def free(self):
        for a in self.addrs:
            utils.free_passthru(a)


@pytest.fixture
def bufs():
    b = Buffers()
    yield b
    b.free()


_counter = [0]


def uniq(prefix):
    _counter[0] += 1
    return f"{prefix}-{os.getpid()}-{_counter[0]}"


@pytest.fixture
def agent():
    a = rixl.nixl_agent(uniq("a"), rixl.nixl_agent_config(backends=["LOOPBACK"]))
    yield a


@pytest.fixture
def pair():
    """Two agents in one process that know each other (LOOPBACK is remote-capable in-process)."""
    cfg = rixl.nixl_agent_config(backends=["LOOPBACK"])
    a = rixl.nixl_agent(uniq("init"), cfg)
    b = rixl.nixl_agent(uniq("target"), cfg)
    return a, b


def read(addr, size):
    return rixl._rixl.read_bytes(addr, size)


def write(addr, data):
    rixl._rixl.write_bytes(addr, data)
