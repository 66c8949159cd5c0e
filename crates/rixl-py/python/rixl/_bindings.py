"""Low-level bindings, with the names of NIXL's ``nixl._bindings``.

Exception classes, enums and constants are defined here; the descriptor lists and the low-level
agent come from the native extension ``rixl._rixl``.
"""

import enum as _enum

from rixl._rixl import (  # noqa: F401
    DEFAULT_COMM_PORT,
    nixlAgent,
    nixlAgentConfig,
    nixlRegDList,
    nixlRemoteDList,
    nixlXferDList,
    nixlXferTelemetry,
)


# --------------------------------------------------------------------------- exceptions
# They derive from Exception (not RuntimeError), as NIXL's do. The message starts with the
# NIXL status name, e.g. "NIXL_ERR_NOT_FOUND: descriptor 3 ... (backend SHM, peer "b")".


class nixlNotPostedError(Exception):
    """NIXL_ERR_NOT_POSTED: status or telemetry asked for before the first post."""


class nixlInvalidParamError(Exception):
    """NIXL_ERR_INVALID_PARAM: bad arguments."""


class nixlBackendError(Exception):
    """NIXL_ERR_BACKEND: a backend failed."""


class nixlNotFoundError(Exception):
    """NIXL_ERR_NOT_FOUND: unknown agent/backend/handle, uncovered descriptors, stale handle."""


class nixlMismatchError(Exception):
    """NIXL_ERR_MISMATCH: malformed metadata or serialized data."""


class nixlNotAllowedError(Exception):
    """NIXL_ERR_NOT_ALLOWED: forbidden in this state (e.g. conflicting reload)."""


class nixlRepostActiveError(Exception):
    """NIXL_ERR_REPOST_ACTIVE: a post is still in progress."""


class nixlUnknownError(Exception):
    """NIXL_ERR_UNKNOWN: internal error."""


class nixlNotSupportedError(Exception):
    """NIXL_ERR_NOT_SUPPORTED: optional operation not supported by the backend."""


class nixlRemoteDisconnectError(Exception):
    """NIXL_ERR_REMOTE_DISCONNECT: the peer failed; its metadata was invalidated."""


class nixlCancelledError(Exception):
    """NIXL_ERR_CANCELED: the request was cancelled."""


class nixlNoTelemetryError(Exception):
    """NIXL_ERR_NO_TELEMETRY: telemetry is disabled."""


class rixlTimeoutError(nixlCancelledError, TimeoutError):
    """RIXL only: a request's deadline passed and its post was cancelled.

    Subclasses ``nixlCancelledError`` (what happened to the post) and the built-in
    ``TimeoutError``, so existing ``except`` clauses catch it."""


# --------------------------------------------------------------------------- enums


class nixl_mem_t(_enum.IntEnum):
    """Memory types (same values as NIXL)."""

    DRAM_SEG = 0
    VRAM_SEG = 1
    BLK_SEG = 2
    OBJ_SEG = 3
    FILE_SEG = 4


class nixl_xfer_op_t(_enum.IntEnum):
    """Transfer operations."""

    NIXL_READ = 0
    NIXL_WRITE = 1


class nixl_status_t(_enum.IntEnum):
    """Status codes."""

    NIXL_IN_PROG = 1
    NIXL_SUCCESS = 0
    NIXL_ERR_NOT_POSTED = -1
    NIXL_ERR_INVALID_PARAM = -2
    NIXL_ERR_BACKEND = -3
    NIXL_ERR_NOT_FOUND = -4
    NIXL_ERR_MISMATCH = -5
    NIXL_ERR_NOT_ALLOWED = -6
    NIXL_ERR_REPOST_ACTIVE = -7
    NIXL_ERR_UNKNOWN = -8
    NIXL_ERR_NOT_SUPPORTED = -9
    NIXL_ERR_REMOTE_DISCONNECT = -10
    NIXL_ERR_CANCELED = -11
    NIXL_ERR_NO_TELEMETRY = -12


class nixl_cost_t(_enum.IntEnum):
    """How a cost estimate was produced."""

    NIXL_COST_ANALYTICAL_BACKEND = 0
    NIXL_COST_UNKNOWN = 1


class nixl_thread_sync_t(_enum.IntEnum):
    """Thread-sync modes (recorded; RIXL is thread-safe in every mode)."""

    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_STRICT = 1
    NIXL_THREAD_SYNC_RW = 2
    NIXL_THREAD_SYNC_DEFAULT = 0  # alias of NONE


DRAM_SEG = nixl_mem_t.DRAM_SEG
VRAM_SEG = nixl_mem_t.VRAM_SEG
BLK_SEG = nixl_mem_t.BLK_SEG
OBJ_SEG = nixl_mem_t.OBJ_SEG
FILE_SEG = nixl_mem_t.FILE_SEG

NIXL_READ = nixl_xfer_op_t.NIXL_READ
NIXL_WRITE = nixl_xfer_op_t.NIXL_WRITE

NIXL_IN_PROG = nixl_status_t.NIXL_IN_PROG
NIXL_SUCCESS = nixl_status_t.NIXL_SUCCESS
NIXL_ERR_NOT_POSTED = nixl_status_t.NIXL_ERR_NOT_POSTED
NIXL_ERR_INVALID_PARAM = nixl_status_t.NIXL_ERR_INVALID_PARAM
NIXL_ERR_BACKEND = nixl_status_t.NIXL_ERR_BACKEND
NIXL_ERR_NOT_FOUND = nixl_status_t.NIXL_ERR_NOT_FOUND
NIXL_ERR_MISMATCH = nixl_status_t.NIXL_ERR_MISMATCH
NIXL_ERR_NOT_ALLOWED = nixl_status_t.NIXL_ERR_NOT_ALLOWED
NIXL_ERR_REPOST_ACTIVE = nixl_status_t.NIXL_ERR_REPOST_ACTIVE
NIXL_ERR_UNKNOWN = nixl_status_t.NIXL_ERR_UNKNOWN
NIXL_ERR_NOT_SUPPORTED = nixl_status_t.NIXL_ERR_NOT_SUPPORTED
NIXL_ERR_REMOTE_DISCONNECT = nixl_status_t.NIXL_ERR_REMOTE_DISCONNECT
NIXL_ERR_CANCELED = nixl_status_t.NIXL_ERR_CANCELED
NIXL_ERR_NO_TELEMETRY = nixl_status_t.NIXL_ERR_NO_TELEMETRY

NIXL_COST_ANALYTICAL_BACKEND = nixl_cost_t.NIXL_COST_ANALYTICAL_BACKEND
NIXL_COST_UNKNOWN = nixl_cost_t.NIXL_COST_UNKNOWN

NIXL_THREAD_SYNC_NONE = nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE
NIXL_THREAD_SYNC_STRICT = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
NIXL_THREAD_SYNC_RW = nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
NIXL_THREAD_SYNC_DEFAULT = nixl_thread_sync_t.NIXL_THREAD_SYNC_DEFAULT

NIXL_INIT_AGENT = ""
HAVE_UCX_GPU_DEVICE_API = False

__all__ = [
    "nixlNotPostedError",
    "nixlInvalidParamError",
    "nixlBackendError",
    "nixlNotFoundError",
    "nixlMismatchError",
    "nixlNotAllowedError",
    "nixlRepostActiveError",
    "nixlUnknownError",
    "nixlNotSupportedError",
    "nixlRemoteDisconnectError",
    "nixlCancelledError",
    "nixlNoTelemetryError",
    "rixlTimeoutError",
    "nixlXferDList",
    "nixlRegDList",
    "nixlRemoteDList",
    "nixlXferTelemetry",
    "nixlAgent",
    "nixlAgentConfig",
    "nixl_mem_t",
    "nixl_xfer_op_t",
    "nixl_status_t",
    "nixl_cost_t",
    "nixl_thread_sync_t",
    "DRAM_SEG",
    "VRAM_SEG",
    "BLK_SEG",
    "OBJ_SEG",
    "FILE_SEG",
    "NIXL_READ",
    "NIXL_WRITE",
    "NIXL_IN_PROG",
    "NIXL_SUCCESS",
    "NIXL_ERR_NOT_POSTED",
    "NIXL_ERR_INVALID_PARAM",
    "NIXL_ERR_BACKEND",
    "NIXL_ERR_NOT_FOUND",
    "NIXL_ERR_MISMATCH",
    "NIXL_ERR_NOT_ALLOWED",
    "NIXL_ERR_REPOST_ACTIVE",
    "NIXL_ERR_UNKNOWN",
    "NIXL_ERR_NOT_SUPPORTED",
    "NIXL_ERR_REMOTE_DISCONNECT",
    "NIXL_ERR_CANCELED",
    "NIXL_ERR_NO_TELEMETRY",
    "NIXL_COST_ANALYTICAL_BACKEND",
    "NIXL_COST_UNKNOWN",
    "NIXL_THREAD_SYNC_NONE",
    "NIXL_THREAD_SYNC_STRICT",
    "NIXL_THREAD_SYNC_RW",
    "NIXL_THREAD_SYNC_DEFAULT",
    "NIXL_INIT_AGENT",
    "DEFAULT_COMM_PORT",
    "HAVE_UCX_GPU_DEVICE_API",
]
