"""Logging with NIXL's conventions (``nixl.logging``): stdout, INFO by default,
``NIXL_LOG_LEVEL`` (or ``RIXL_LOG_LEVEL``) overrides: TRACE DEBUG INFO WARN ERROR FATAL."""

import logging as _logging
import os as _os
import sys as _sys

_LEVELS = {
    "TRACE": _logging.DEBUG,
    "DEBUG": _logging.DEBUG,
    "INFO": _logging.INFO,
    "WARN": _logging.WARNING,
    "WARNING": _logging.WARNING,
    "ERROR": _logging.ERROR,
    "FATAL": _logging.CRITICAL,
    "CRITICAL": _logging.CRITICAL,
}


def _level():
    v = _os.environ.get("RIXL_LOG_LEVEL") or _os.environ.get("NIXL_LOG_LEVEL") or "INFO"
    return _LEVELS.get(v.strip().upper(), _logging.INFO)


class _StdoutHandler(_logging.StreamHandler):
    """Writes to the *current* ``sys.stdout`` (so redirection and capture work)."""

    def __init__(self):
        super().__init__(_sys.stdout)

    @property
    def stream(self):
        return _sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name):
    """A logger that writes to stdout at INFO (or the level of ``NIXL_LOG_LEVEL``)."""
    logger = _logging.getLogger(name)
    if not getattr(logger, "_rixl_configured", False):
        handler = _StdoutHandler()
        handler.setFormatter(
            _logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(_level())
        logger.propagate = False
        logger._rixl_configured = True
    return logger


__all__ = ["get_logger"]
