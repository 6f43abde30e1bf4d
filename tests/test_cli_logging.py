"""gpfm_jax.cli_logging: the stderr handler the commands (gpfm-extract, gpfm-eval, gpfm-bench) put on their loggers."""

from __future__ import annotations

import contextlib
import io
import logging

from gpfm_jax.cli_logging import log_to_stderr


def test_lines_go_once_to_the_current_stderr_in_each_commands_format():
    names = ("gpfm_jax.test_cli_logging.a", "gpfm_jax.test_cli_logging.b")
    root = io.StringIO()
    root_handler = logging.StreamHandler(root)  # someone else's handler on the root logger (absl's, say)
    logging.getLogger().addHandler(root_handler)
    try:
        log_to_stderr("tool: %(message)s", *names)
        log_to_stderr("tool: %(message)s", *names)  # again: no second handler
        log_to_stderr("bench: %(message)s", names[1], level=logging.WARNING)  # a second command on a shared logger
        first, second = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(first):  # redirections made after the set-up are followed
            logging.getLogger(names[0]).info("one")
        with contextlib.redirect_stderr(second):
            logging.getLogger(names[1]).info("two")
            logging.getLogger(names[1]).warning("three")
            logging.getLogger(names[1]).debug("hidden")
        assert first.getvalue() == "tool: one\n"
        assert second.getvalue() == "tool: two\ntool: three\nbench: three\n"
        assert root.getvalue() == ""  # not propagated
    finally:
        logging.getLogger().removeHandler(root_handler)
        for name in names:
            logging.getLogger(name).handlers.clear()
