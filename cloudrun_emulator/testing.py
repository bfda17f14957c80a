"""Run the emulators as subprocesses: for the tests, the demo and the benchmark.

`EmulatorProcess` starts `cloudrun-emulator` on free ports (no port races: the emulator binds
port 0 and reports what it got through a ready file). `PubSubEmulatorProcess` starts the Google
Cloud SDK's Pub/Sub emulator with its own config and data directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .admin import AdminClient

_START_TIMEOUT = 30.0


class EmulatorStartError(RuntimeError):
    """An emulator did not come up; the message carries the tail of its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class EmulatorProcess:
    """`cloudrun-emulator` in a subprocess on free loopback ports.

    >>> with EmulatorProcess(rollout_ms=500) as emu:
    ...     clients = make_clients(emu.grpc_endpoint); emu.admin.put_service(...)
    """

    def __init__(
        self,
        seed: str | os.PathLike[str] | None = None,
        rollout_ms: int = 0,
        audit_topic: str | None = None,
        env: dict[str, str] | None = None,
        *,
        random_seed: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        extra_args: list[str] | None = None,
        port: int = 0,
        admin_port: int = 0,
        rest_port: int | None = None,
    ) -> None:
        self.seed = seed
        self.rollout_ms = rollout_ms
        self.audit_topic = audit_topic
        self.env = dict(env or {})
        self.random_seed = random_seed
        self.extra_args = list(extra_args or [])
        self._own_dir = log_dir is None
        self.dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="cloudrun-emu-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "emulator.log"
        self._ready_file = self.dir / "ready.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.requested_ports = (port, admin_port)  # 0 = any free port
        self.grpc_port = 0
        self.admin_port = 0
        self.requested_rest_port = rest_port  # None = no REST surface, 0 = any free port
        self.rest_port = 0

    @property
    def grpc_endpoint(self) -> str:
        """``127.0.0.1:PORT`` for `make_clients` / `--gcp-endpoint`."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the REST surface (started with ``rest_port=0``)."""
        if not self.rest_port:
            raise RuntimeError("the emulator was started without a REST surface (rest_port=None)")
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.admin_url)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "cloudrun_emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.requested_ports[0]),
            "--admin-port",
            str(self.requested_ports[1]),
            "--ready-file",
            str(self._ready_file),
            "--rollout-ms",
            str(self.rollout_ms),
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.audit_topic:
            cmd += ["--audit-topic", self.audit_topic]
        if self.random_seed is not None:
            cmd += ["--random-seed", str(self.random_seed)]
        if self.requested_rest_port is not None:
            cmd += ["--rest-port", str(self.requested_rest_port)]
        return cmd + self.extra_args

    def start(self, timeout: float = _START_TIMEOUT) -> EmulatorProcess:
        if self._proc is not None:
            raise RuntimeError("emulator already started")
        self._ready_file.unlink(missing_ok=True)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise EmulatorStartError(
                    f"cloudrun-emulator exited with {code} before it was ready; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self._ready_file.exists():
                info = json.loads(self._ready_file.read_text())
                self.grpc_port, self.admin_port = info["grpcPort"], info["adminPort"]
                self.rest_port = int(info.get("restPort", 0))
                if self.admin.healthz():
                    return self
            time.sleep(0.05)
        self.stop()
        raise EmulatorStartError(
            f"cloudrun-emulator not ready after {timeout:g}s; log {self.log_path}:\n"
            f"{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait (SIGKILL after `timeout`); returns the exit code."""
        code = None
        if self._proc is not None:
            _terminate(self._proc, timeout)
            code = self._proc.returncode
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit by itself; its exit code, or None if still running."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; tests, the benchmark
    and the demo use this one helper)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PubSubEmulatorProcess:
    """The Cloud SDK Pub/Sub emulator (`gcloud beta emulators pubsub start`) on a free port.

    It gets its own CLOUDSDK_CONFIG and data directory, and JAVA_TOOL_OPTIONS=-XX:-UsePerfData,
    so it writes nothing outside `self.dir`. Point clients at it with
    ``PUBSUB_EMULATOR_HOST=<.host>``. Known emulator bug: after a streaming-pull subscriber is
    cancelled the emulator keeps a dead consumer, so use a fresh subscription per test.
    """

    def __init__(self, project: str = "runwarden-test", data_dir: str | None = None) -> None:
        self.project = project
        self.dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="pubsub-emu-"))
        self.log_path = self.dir / "pubsub-emulator.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` — the value for PUBSUB_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """PUBSUB_EMULATOR_HOST pointing at this emulator for a block, restored after (the
        google-cloud-pubsub clients read it when they are built)."""
        saved = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = self.host
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = saved

    @staticmethod
    def unavailable_reason() -> str | None:
        """None when the emulator can run here, else why not."""
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            return "gcloud (Google Cloud SDK) is not on PATH"
        if shutil.which("java") is None:
            return "java is not on PATH (the Pub/Sub emulator needs a JRE)"
        sdk_root = Path(os.path.realpath(gcloud)).parent.parent
        candidates = [
            sdk_root / "platform" / "pubsub-emulator",
            Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator"),
        ]
        if not any(c.is_dir() for c in candidates):
            return "the gcloud pubsub-emulator component is not installed"
        return None

    def start(self, timeout: float = 60.0) -> PubSubEmulatorProcess:
        reason = self.unavailable_reason()
        if reason is not None:
            raise EmulatorStartError(f"Pub/Sub emulator unavailable: {reason}")
        config = self.dir / "cloudsdk-config"
        data = self.dir / "data"
        config.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "CLOUDSDK_CONFIG": str(config),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_PROJECT": self.project,
            "JAVA_TOOL_OPTIONS": "-XX:-UsePerfData",
        }
        last_error = ""
        for _attempt in range(3):  # the port can be taken between choosing and binding it
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [
                    "gcloud",
                    "beta",
                    "emulators",
                    "pubsub",
                    "start",
                    f"--host-port=127.0.0.1:{self.port}",
                    f"--data-dir={data}",
                    f"--project={self.project}",
                    "--quiet",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._ready():
                    return self
                time.sleep(0.1)
            last_error = _tail(self.log_path)
            self.stop()
        raise EmulatorStartError(
            f"Pub/Sub emulator did not start; log {self.log_path}:\n{last_error}"
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        if self._proc is not None:
            _terminate(self._proc, timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PubSubEmulatorProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
