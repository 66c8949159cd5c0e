"""The type stubs cover the API: every public method of nixl_agent is declared in _api.pyi."""
import ast
import pathlib

import rixl._api as api


def _stub_methods(cls_name):
    stub = pathlib.Path(api.__file__).with_suffix(".pyi")
    tree = ast.parse(stub.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            return {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    raise AssertionError(f"class {cls_name} missing from {stub}")


def test_nixl_agent_stub_is_complete():
    public = {m for m in dir(api.nixl_agent) if not m.startswith("_")}
    missing = public - _stub_methods("nixl_agent")
    assert not missing, f"methods without stubs: {sorted(missing)}"


def test_handle_and_config_stubs_exist():
    for cls in ("nixl_agent_config", "nixl_xfer_handle", "nixl_prepped_dlist_handle"):
        assert _stub_methods(cls), cls
