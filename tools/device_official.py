"""tools/device_check.py's vs_official section (issue 27): tools/bench_vs_official.py, the official DINOv2/GPFM
step and gpfm_jax's side by side on this machine's first device (equality of one fp32 step first, then both timed
in their own precisions). Its JSON (vs_official.json) goes beside the report and its figures into the section.

On a GPU it runs in a subprocess, so torch and JAX share a GPU that nothing else holds (JAX capped at half of it,
torch takes the rest) and a time-out kills only it; whatever the script wrote by then (its check) is kept. With
--tiny (the CPU test) it runs in this process at the script's tiny size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tools.device_common import REPO, Skip


def section(out_dir: Path, args: argparse.Namespace, timeout_s: float | None) -> dict[str, Any]:
    out = out_dir / "vs_official.json"
    out.unlink(missing_ok=True)
    if args.tiny:
        from tools import bench_vs_official

        code, tail = bench_vs_official.main(["--size", "tiny", "--warmup", "1", "--rounds", "1", "--iters", "2",
                                             "--json", str(out)]), ""
    else:
        if timeout_s is not None and timeout_s < 60:
            raise Skip(f"{timeout_s:.0f} s left: too little for the side by side")
        cmd = [sys.executable, str(REPO / "tools" / "bench_vs_official.py"), "--size", "vitl",
               "--batches", args.official_batches, "--json", str(out)]
        env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
            code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as err:
            code, tail = "timeout", f"ran past {timeout_s:.0f} s; " + str(err.stdout or "")[-2000:]
    data = json.loads(out.read_text()) if out.exists() else {}
    if code == 2:
        raise RuntimeError(data.get("refused") or tail)
    if code != 0:
        raise RuntimeError(f"bench_vs_official exit {code}; its check: {json.dumps(data.get('check'))}; {tail}")
    return {"json": out.name, **data, "log_tail": tail[-1500:]}
