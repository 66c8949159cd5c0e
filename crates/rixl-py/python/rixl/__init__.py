"""RIXL: NIXL-compatible point-to-point transfers (``import rixl as nixl``).

Top level re-exports the public names of ``rixl._api``, ``rixl._bindings``, ``rixl._utils``
and ``rixl.logging``, in that order (as NIXL does). Programs that import NIXL's submodules
(``from nixl._api import ...``) can call :func:`install_nixl_alias` (or import
``rixl.nixl_compat``) first; RIXL never installs a ``nixl`` package by itself.
"""

import sys as _sys

from rixl._api import *  # noqa: F401,F403
from rixl._bindings import *  # noqa: F401,F403
from rixl._utils import *  # noqa: F401,F403
from rixl.logging import *  # noqa: F401,F403
from rixl import _api, _bindings, _utils, logging  # noqa: F401
from rixl._rixl import __version__  # noqa: F401


def install_nixl_alias(name="nixl"):
    """Registers ``name``, ``name._api``, ``name._bindings``, ``name._utils`` and
    ``name.logging`` in ``sys.modules`` as aliases of RIXL's modules. Refuses (``ImportError``)
    if a different module is already registered under ``name``."""
    me = _sys.modules[__name__]
    existing = _sys.modules.get(name)
    if existing is not None and existing is not me:
        raise ImportError(
            f"a module named {name!r} is already imported ({existing!r}); not aliasing RIXL over it"
        )
    _sys.modules[name] = me
    _sys.modules[name + "._api"] = _api
    _sys.modules[name + "._bindings"] = _bindings
    _sys.modules[name + "._utils"] = _utils
    _sys.modules[name + ".logging"] = logging
    return me
