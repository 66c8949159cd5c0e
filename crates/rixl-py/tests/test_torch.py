"""CPU torch tensors as descriptor inputs (skipped when torch is not installed)."""

import sys

import pytest

import rixl as nixl
from conftest import uniq

try:
    import torch
except ImportError:  # torch is several GB: CI does not install it
    print("test_torch: torch is not installed; skipping (numpy tests cover the same paths)")
    pytest.skip("torch is not installed", allow_module_level=True)


def test_rixl_does_not_import_torch():
    import subprocess

    code = "import rixl, sys; a = rixl.nixl_agent('t'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_tensor_descs_and_transfer():
    a = nixl.nixl_agent(uniq("t"), nixl.nixl_agent_config(backends=["LOOPBACK"]))
    src = torch.arange(1024, dtype=torch.float32)
    dst = torch.zeros(1024, dtype=torch.float32)
    d = a.get_xfer_descs(src)
    assert d[0] == (src.data_ptr(), 4096, 0) and d.getType() == nixl.DRAM_SEG
    r = a.get_reg_descs([src, dst])
    assert r.descCount() == 2 and r[1][3] == b""
    assert a.get_xfer_descs(src.view(32, 32).t()) is None  # non-contiguous
    a.register_memory([src, dst])
    h = a.initialize_xfer("WRITE", a.get_xfer_descs(src), a.get_xfer_descs(dst), a.name)
    a.transfer(h)
    a.wait_xfer(h)
    assert torch.equal(src, dst)
