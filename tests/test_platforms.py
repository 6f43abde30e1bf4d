"""libtpu's start-up noise on machines without a TPU (gpfm_jax/_platforms.py): with the `tpu` extra installed and
JAX_PLATFORMS unset, plain JAX prints libtpu's TPU_WORKER_HOSTNAMES / InitGoogle warnings at its first use; after
`import gpfm_jax` it prints nothing, and the CPU backend is what runs."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import require

NOISE = ("TPU_WORKER_HOSTNAMES", "InitGoogle")
PROBE = "import jax{extra}; print(jax.default_backend(), len(jax.devices()))"


def _run(extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)], env=env, capture_output=True, text=True,
                          timeout=180)


def test_no_libtpu_noise_without_a_tpu():
    require("libtpu", "tpu")
    from jax._src import hardware_utils

    assert hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0, "this test is for machines without a TPU"
    plain = _run("")  # the control: what every command printed before
    assert any(word in plain.stderr for word in NOISE), plain.stderr[-2000:]
    quiet = _run(", gpfm_jax")
    assert quiet.returncode == 0 and quiet.stdout.split() == ["cpu", "1"], quiet.stdout + quiet.stderr
    assert not any(word in quiet.stderr for word in NOISE), quiet.stderr[-2000:]


def test_a_tpu_host_or_an_explicit_choice_is_left_alone(monkeypatch):
    """With TPU chips present (as jax's own check reports them) or JAX_PLATFORMS set, nothing is changed."""
    import jax
    from jax._src import hardware_utils

    from gpfm_jax import _platforms

    before = jax.config.jax_platforms
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
    _platforms.quiet_libtpu_without_tpu()
    assert jax.config.jax_platforms == before
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    _platforms.quiet_libtpu_without_tpu()
    assert jax.config.jax_platforms == before
