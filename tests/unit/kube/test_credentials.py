"""controller.kube.credentials: kubeconfig loading through the ``kubernetes`` package (an exec
credential plugin, its expiry), and what the CRD gate and the status writer do when the
apiserver refuses the credentials (a local HTTP server answering like kube-apiserver would; the
e2e test in tests/e2e/test_kube_credentials.py uses the real one)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from kubernetes.config import incluster_config

from controller.kube import crd_gate, credentials
from controller.kube.status_writer import StatusWriteError, StatusWriter
from tests.fixtures.wait import wait_for

EXPIRES = "2031-01-02T03:04:05Z"


def exec_kubeconfig(tmp: Path, server: str, token: str, expires: str | None) -> Path:
    """A kubeconfig whose user is an exec credential plugin printing ``token``."""
    status: dict[str, str] = {"token": token}
    if expires:
        status["expirationTimestamp"] = expires
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": status,
    }
    plugin = tmp / "plugin.py"
    plugin.write_text(f"import json\nprint(json.dumps({credential!r}))\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [
            {
                "name": "u",
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1beta1",
                        "command": sys.executable,
                        "args": [str(plugin)],
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def refusals(monkeypatch: pytest.MonkeyPatch) -> credentials.Refusals:
    fresh = credentials.Refusals()
    monkeypatch.setattr(credentials, "REFUSALS", fresh)
    return fresh


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(path))
    # Not in a pod, whatever the machine running the tests says.
    monkeypatch.setattr(incluster_config, "SERVICE_HOST_ENV_NAME", "RUNWARDEN_TEST_NO_SUCH_ENV")


def test_an_exec_plugin_gives_the_token_and_its_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_kubeconfig(
        monkeypatch, exec_kubeconfig(tmp_path, "https://k8s.example:6443", "t0k", EXPIRES)
    )
    found = credentials.load_blocking()
    assert (found.source, found.server) == ("kubeconfig", "https://k8s.example:6443")
    assert (found.scheme, found.token) == ("Bearer", "t0k")
    assert found.expiration == datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert not found.expired(datetime.datetime(2031, 1, 2, 3, 0, 0, tzinfo=datetime.UTC))
    assert found.expired(datetime.datetime(2031, 1, 2, 3, 3, 30, tzinfo=datetime.UTC))
    assert credentials.headers(found) == {"Authorization": "Bearer t0k"}


def test_an_exec_plugin_that_fails_is_an_error_not_anonymous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = exec_kubeconfig(tmp_path, "https://k8s.example:6443", "t0k", None)
    (tmp_path / "plugin.py").write_text("import sys\nsys.exit('not logged in')\n")
    use_kubeconfig(monkeypatch, path)
    with pytest.raises(credentials.NoCredentials, match="exec credential plugin"):
        credentials.load_blocking()


def test_no_kubeconfig_says_to_set_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_kubeconfig(monkeypatch, tmp_path / "missing")
    with pytest.raises(credentials.NoCredentials, match="KUBECONFIG"):
        credentials.load_blocking()


async def test_expired_credentials_are_loaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    past = "2020-01-01T00:00:00Z"
    use_kubeconfig(monkeypatch, exec_kubeconfig(tmp_path, "https://k8s.example", "old", past))
    source = credentials.Source()
    assert (await source.get()).token == "old"
    exec_kubeconfig(tmp_path, "https://k8s.example", "new", EXPIRES)  # the plugin's next answer
    assert (await source.get()).token == "new"  # the old one had expired: loaded again
    exec_kubeconfig(tmp_path, "https://k8s.example", "newer", EXPIRES)
    assert (await source.get()).token == "new"  # still valid: no plugin run
    assert (await source.get(fresh=True)).token == "newer"


# ---------------------------------------------------------------------- refusals


@pytest.fixture
async def apiserver() -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering every request with the next status in the list (default 200 {})."""
    answers: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        code = answers.pop(0) if answers else 200
        body = {"kind": "Status", "message": "Unauthorized"} if code >= 300 else {}
        return web.json_response(body, status=code)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", answers
    await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("code", [401, 403])
async def test_refused_credentials_end_the_crd_wait_and_fail_liveness(
    apiserver: tuple[str, list[int]],
    refusals: credentials.Refusals,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
) -> None:
    base, answers = apiserver
    answers += [code, code]  # refused, and refused again with credentials loaded again
    connects: list[bool] = []

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        connects.append(fresh)
        return base, aiohttp.ClientSession()

    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    monkeypatch.setattr(crd_gate, "REFUSED_GRACE", 30.0)
    seen: list[int] = []

    async def probe() -> None:
        def get() -> int:
            try:
                with urllib.request.urlopen(liveness, timeout=2) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return 0

        status = await asyncio.to_thread(wait_for, get, 10.0, 0.05, "liveness answered")
        seen.append(status)
        os.kill(os.getpid(), signal.SIGTERM)  # the gate's handler: end the grace

    resource = crd_gate.ApiResource("runwarden.dev", "v1alpha1", "orchestrators")
    prober = asyncio.create_task(probe())
    served = await crd_gate.wait_until_served(resource, connect, liveness=liveness, poll=0.05)
    await prober
    assert served is False
    assert connects == [False, True]
    assert refusals.code == code and f"HTTP {code}" in refusals.message
    assert seen == [503]


async def test_a_401_with_fresh_credentials_is_a_refusal_for_the_status_writer(
    apiserver: tuple[str, list[int]], refusals: credentials.Refusals
) -> None:
    base, answers = apiserver
    answers += [401, 401]

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        return base, aiohttp.ClientSession()

    writer = StatusWriter(connect, "runwarden.dev", "v1alpha1", "orchestrators")
    try:
        with pytest.raises(StatusWriteError) as refused:
            await writer.patch("ns", "a", {"drift": {"count": 1}})
    finally:
        await writer.close()
    assert refused.value.code == 401
    assert refusals.code == 401 and "orchestrators/status ns/a" in refusals.message


async def test_a_401_then_fresh_credentials_that_work_is_no_refusal(
    apiserver: tuple[str, list[int]], refusals: credentials.Refusals
) -> None:
    base, answers = apiserver
    answers += [401]

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        return base, aiohttp.ClientSession()

    writer = StatusWriter(connect, "runwarden.dev", "v1alpha1", "orchestrators")
    try:
        assert await writer.patch("ns", "a", {"drift": {"count": 1}})
    finally:
        await writer.close()
    assert not refusals.failed


def test_the_proxy_is_the_kubeconfigs_else_the_environments_as_kubectl_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Looked up once per session (not per request, as aiohttp's trust_env would): the
    kubeconfig's proxy-url first, else HTTPS_PROXY unless NO_PROXY names the apiserver."""
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    creds = credentials.Credentials(server="https://api.example:6443", source="kubeconfig")
    assert credentials.proxy_for(creds) == (None, None)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.example:3128")
    proxy, auth = credentials.proxy_for(creds)
    assert proxy == "http://proxy.example:3128"
    assert auth is not None and (auth.login, auth.password) == ("user", "pw")
    monkeypatch.setenv("NO_PROXY", "api.example")
    assert credentials.proxy_for(creds) == (None, None)
    own = credentials.Credentials(
        server=creds.server, source="kubeconfig", proxy_url="http://kube-proxy.example:8080"
    )
    assert credentials.proxy_for(own) == ("http://kube-proxy.example:8080", None)
