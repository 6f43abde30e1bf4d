"""What a new user types wrong on gpfm-train's command line is one line and exit status 2 (no traceback): an unknown
--config field with the nearest names, a value of the wrong type, a missing config file, a field below a value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers_train import REPO


@pytest.mark.parametrize("args, line", [
    (["--config.schedule.base_lrr=1"], "config.schedule.base_lrr: no such field; nearest: config.schedule.base_lr"),
    (["--config.optim.lrr=1"], "config.optim.lrr: no such field; fields here: b1, b2, backbone_key"),
    (["--config", "configs/no_such_config.py"], "config file configs/no_such_config.py: no such file"),
    (["--config.steps=abc"], "flag --config.steps=abc: invalid literal for int()"),
    (["--config.steps.x=1"], "config.steps.x: no such field (config.steps is a value, not a section)"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(tmp_path, args, line):
    proc = subprocess.run([sys.executable, "-m", "gpfm_jax.train.main", "--workdir", str(tmp_path / "w"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"JAX_PLATFORMS": "cpu",
                                                                                       "PATH": "/usr/bin:/bin"})
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert out.splitlines() == [f"gpfm-train: config error: {line}" + out.split(line, 1)[-1]], out
    assert not (tmp_path / "w").exists()  # nothing was created


def test_help_still_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "gpfm_jax.train.main", "--helpfull"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    out = proc.stdout + proc.stderr
    assert "--workdir" in out and "--scratch" in out and "config error" not in out, out[-2000:]
