"""A command's own log lines on stderr, whoever configured logging first.

Libraries imported before a command's `main` (absl, through orbax) may already own the root logger, so a command
puts its own handler on the loggers it means for the user and stops them propagating: each line appears once, in
the command's format. The handler looks sys.stderr up per record, so a redirection made later (a test's capture,
contextlib.redirect_stderr) is honoured.
"""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr; `fmt` tells one command's handler from another's on a shared logger."""

    def __init__(self, fmt: str, level: int):
        super().__init__(sys.stderr)
        self.fmt = fmt
        self.setFormatter(logging.Formatter(fmt))
        self.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_to_stderr(fmt: str, *names: str, level: int = logging.NOTSET) -> None:
    """Each logger of `names` logs INFO and up to stderr as `fmt` (the handler drops records below `level`) and no
    longer propagates. Calling it again with the same format adds no second handler."""
    for name in names:
        log = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) and h.fmt == fmt for h in log.handlers):
            log.addHandler(_StderrHandler(fmt, level))
        log.setLevel(logging.INFO)
        log.propagate = False
