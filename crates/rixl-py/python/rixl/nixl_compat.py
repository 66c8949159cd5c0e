"""Importing this module registers ``nixl``, ``nixl._api``, ``nixl._bindings``,
``nixl._utils`` and ``nixl.logging`` as aliases of RIXL's modules in ``sys.modules``, so
that programs written for NIXL run unchanged::

    import rixl.nixl_compat  # noqa: F401
    from nixl._api import nixl_agent
"""

import rixl

rixl.install_nixl_alias()
