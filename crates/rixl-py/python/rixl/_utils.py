"""Test helpers with NIXL's names (``nixl._utils``)."""

from rixl._rixl import ba_buf, free_passthru, malloc_passthru, verify_transfer  # noqa: F401

__all__ = ["malloc_passthru", "free_passthru", "ba_buf", "verify_transfer"]
