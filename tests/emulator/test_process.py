"""The emulator as a process: seed file, command line, signals, garbage on the wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from cloudrun_emulator.testing import EmulatorProcess, EmulatorStartError
from controller.gcp.clients import make_clients
from tests.fixtures.wait import wait_for

SEED = textwrap.dedent(
    """
    serviceAccounts:
      - orchestrator@seed-project.iam.gserviceaccount.com
    services:
      - project: seed-project
        region: us-west2
        name: phase3-to-phase4
        env: {GCP_PROJECT_ID: seed-project, MODE: prod}
        secretEnv: {SLACK_WEBHOOK_URL: {secret: slack-webhook, version: latest}}
        invokers:
          roles/run.invoker: ["serviceAccount:756957797294-compute@developer.gserviceaccount.com"]
        settings:
          serviceAccount: orchestrator@seed-project.iam.gserviceaccount.com
          maxInstances: 10
          timeoutSeconds: 540
      - project: seed-project
        region: europe-west1
        name: other
    """
)


@pytest.fixture
def seed_file(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED)
    return path


async def test_seed_file_is_served(seed_file, tmp_path):
    with EmulatorProcess(seed=seed_file, log_dir=tmp_path / "emu") as emu:
        svc = emu.admin.get_service("seed-project", "us-west2", "phase3-to-phase4")
        assert svc["env"] == {"GCP_PROJECT_ID": "seed-project", "MODE": "prod"}
        assert svc["settings"]["maxInstances"] == 10
        assert (
            svc["settings"]["serviceAccount"] == "orchestrator@seed-project.iam.gserviceaccount.com"
        )
        clients = make_clients(emu.grpc_endpoint)
        try:
            got = await clients.run.get_service(
                name="projects/seed-project/locations/us-west2/services/phase3-to-phase4"
            )
            assert got.template.timeout.total_seconds() == 540
            policy = await clients.run.get_iam_policy(request={"resource": got.name})
            assert [list(b.members) for b in policy.bindings] == [
                ["serviceAccount:756957797294-compute@developer.gserviceaccount.com"]
            ]
            sa = await clients.iam.get_service_account(
                name="projects/-/serviceAccounts/orchestrator@seed-project.iam.gserviceaccount.com"
            )
            assert sa.project_id == "seed-project"
            pager = await clients.run.list_services(parent="projects/seed-project/locations/-")
            assert len([s async for s in pager]) == 2
        finally:
            await clients.close()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("services: [{project: seed-project, region: us-west2, name: Bad_Name}]", "services[0]"),
        (
            "services: [{project: seed-project, region: us-west2, name: x, settings: {cpus: 1}}]",
            "cpus",
        ),
        ("nonsense: true", "unknown top-level key"),
        ("services: {a: 1}", "must be lists"),
        ("services: [\n  - {project: [", "cannot read seed file"),
    ],
)
def test_bad_seed_file_stops_with_a_message(tmp_path, content, fragment):
    path = tmp_path / "seed.yaml"
    path.write_text(content)
    emu = EmulatorProcess(seed=path, log_dir=tmp_path / "emu")
    with pytest.raises(EmulatorStartError, match="exited with 2") as info:
        emu.start()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "args",
    [["--rollout-ms", "-1"], ["--audit-topic", "my-topic"], ["--seed", "/nonexistent/seed.yaml"]],
)
def test_bad_command_line_is_refused(args):
    proc = subprocess.run(
        [sys.executable, "-m", "cloudrun_emulator", "--port", "0", "--admin-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cloudrun-emulator: error:" in proc.stderr


def test_sigterm_stops_promptly_and_cleanly(tmp_path):
    emu = EmulatorProcess(log_dir=tmp_path).start()
    port = emu.admin_port
    t0 = time.monotonic()
    code = emu.stop(timeout=10)
    assert code == 0
    assert time.monotonic() - t0 < 5
    assert "stopped" in emu.log_tail()
    # Its ports are free again: a new emulator can bind the same admin port.
    with EmulatorProcess(log_dir=tmp_path / "again", admin_port=port) as again:
        assert again.admin_port == port


def test_sigint_stops_too(tmp_path):
    emu = EmulatorProcess(log_dir=tmp_path).start()
    os.kill(emu.pid, signal.SIGINT)
    assert emu.wait(timeout=10) == 0
    emu.stop()


async def test_garbage_on_the_wire_is_invalid_argument(emulator):
    """Bytes that are not a GetServiceRequest get INVALID_ARGUMENT, and the server lives on."""
    async with grpc.aio.insecure_channel(emulator.grpc_endpoint) as channel:
        call = channel.unary_unary(
            "/google.cloud.run.v2.Services/GetService",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        unknown = channel.unary_unary(
            "/google.cloud.run.v2.Services/NoSuchMethod",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unknown(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert emulator.admin.healthz()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_emulator_exits_when_its_parent_is_killed(tmp_path):
    """A test run killed with SIGKILL does not leak an emulator (--parent-pid watchdog)."""
    script = (
        "import signal, sys\n"
        "from cloudrun_emulator.testing import EmulatorProcess\n"
        "emu = EmulatorProcess(log_dir=sys.argv[1]).start()\n"
        "print(emu.pid, flush=True)\n"
        "signal.pause()  # until the test kills it\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(parent.stdout.readline())
        assert _running(pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    wait_for(lambda: not _running(pid), timeout=15, message="emulator outlived its parent")
