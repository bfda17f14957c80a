"""A small synchronous client for the emulator's admin API (stdlib only).

Used by the tests, the demo and the benchmark. Every method raises `AdminError` on a non-2xx
answer, except `get_service`, which raises `KeyError` when the service does not exist.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any


class AdminError(RuntimeError):
    """The admin API answered with an error status."""

    def __init__(self, status: int, message: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {message}")
        self.status = status
        self.message = message


class AdminClient:
    """Synchronous admin API client; `base_url` like ``http://127.0.0.1:8086``."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"admin base_url must be http://HOST:PORT, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"AdminClient({self.base_url!r})"

    # -------------------------------------------------------------- transport

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON or text). Never raises on status."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            payload = None
            headers = {}
            if body is not None:
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
            data: Any = raw.decode(errors="replace")
            if "json" in ctype and raw:
                data = json.loads(raw)
            return resp.status, data
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.request(method, path, body)
        if status >= 300:
            message = data
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                message = data["error"].get("message", data)
            raise AdminError(status, str(message), method, path)
        return data

    @staticmethod
    def _svc_path(project: str, region: str, name: str) -> str:
        q = urllib.parse.quote
        return f"/admin/services/{q(project, safe='')}/{q(region, safe='')}/{q(name, safe='')}"

    # -------------------------------------------------------------- API

    def healthz(self) -> bool:
        """True when the emulator answers /healthz with 200."""
        try:
            status, _ = self.request("GET", "/healthz")
        except OSError:
            return False
        return status == 200

    def put_service(
        self,
        project: str,
        region: str,
        name: str,
        env: dict[str, str] | None = None,
        invokers: dict[str, list[str]] | None = None,
        settings: dict[str, Any] | None = None,
        principal: str | None = None,
        *,
        secret_env: dict[str, dict[str, str]] | None = None,
        image: str | None = None,
        traffic: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Create or replace a service, as someone else's deploy would.

        Only the aspects passed are written: `env` replaces the plain env vars (secret ones stay),
        `secret_env` the secret ones, `settings` sets the keys given (None value = default),
        `invokers` sets the member list of each role given (an empty list removes the role;
        roles not given stay), `traffic` replaces Service.traffic ([{"revision": NAME or absent
        for the latest ready one, "percent": N, "tag": T}], e.g. pinned as by `--no-traffic`).
        Returns the service as `get_service` shows it.
        """
        body: dict[str, Any] = {}
        if env is not None:
            body["env"] = env
        if secret_env is not None:
            body["secretEnv"] = secret_env
        if invokers is not None:
            body["invokers"] = invokers
        if settings is not None:
            body["settings"] = settings
        if principal is not None:
            body["principal"] = principal
        if traffic is not None:
            body["traffic"] = traffic
        if image is not None:
            body["image"] = image
        return self._call("PUT", self._svc_path(project, region, name), body)  # type: ignore[no-any-return]

    def get_service(self, project: str, region: str, name: str) -> dict[str, Any]:
        """The service as JSON (env, secretEnv, iam, settings, generation, latestReadyRevision,
        etag = IAM policy etag, serviceEtag, ...). Raises KeyError when it does not exist."""
        path = self._svc_path(project, region, name)
        status, data = self.request("GET", path)
        if status == 404:
            raise KeyError(f"projects/{project}/locations/{region}/services/{name}")
        if status >= 300:
            raise AdminError(status, str(data), "GET", path)
        return data  # type: ignore[no-any-return]

    def delete_service(
        self, project: str, region: str, name: str, principal: str | None = None
    ) -> None:
        body = {"principal": principal} if principal else None
        self._call("DELETE", self._svc_path(project, region, name), body)

    def list_services(self) -> list[str]:
        return self._call("GET", "/admin/services")["services"]  # type: ignore[no-any-return]

    def put_service_account(self, email: str) -> None:
        self._call("PUT", f"/admin/serviceaccounts/{urllib.parse.quote(email, safe='@')}")

    def delete_service_account(self, email: str) -> None:
        self._call("DELETE", f"/admin/serviceaccounts/{urllib.parse.quote(email, safe='@')}")

    def set_faults(
        self,
        rate: float = 0.0,
        codes: list[str] | None = None,
        methods: list[str] | None = None,
        latency_ms: int = 0,
        fail_next_revision: bool = False,
    ) -> dict[str, Any]:
        """Replace the fault settings. `methods` are full gRPC names
        (``google.cloud.run.v2.Services/GetService``), short names (``GetService``) or
        fnmatch patterns; default all. Faults never apply to the admin API."""
        body = {
            "rate": rate,
            "codes": list(codes if codes is not None else (["UNAVAILABLE"] if rate else [])),
            "methods": list(methods or ["*"]),
            "latencyMs": latency_ms,
            "failNextRevision": fail_next_revision,
        }
        return self._call("PUT", "/admin/faults", body)  # type: ignore[no-any-return]

    def clear_faults(self) -> None:
        self._call("DELETE", "/admin/faults")

    def calls(self) -> dict[str, int]:
        """gRPC calls received per full method name, since start or the last reset."""
        return self._call("GET", "/admin/calls")  # type: ignore[no-any-return]

    def calls_by_principal(self) -> dict[str, dict[str, int]]:
        """gRPC calls per caller (x-emulator-principal, else runwarden@example.com), then per
        full method name, since start or the last reset."""
        return self._call("GET", "/admin/calls?by=principal")  # type: ignore[no-any-return]

    def reset_calls(self) -> None:
        self._call("DELETE", "/admin/calls")

    def set_quota(
        self, reads_per_minute: int | None = None, writes_per_minute: int | None = None
    ) -> dict[str, Any]:
        """Per-minute (sliding window) budgets; None = unlimited."""
        body = {"readsPerMinute": reads_per_minute, "writesPerMinute": writes_per_minute}
        return self._call("PUT", "/admin/quota", body)  # type: ignore[no-any-return]

    def clear_quota(self) -> None:
        self._call("DELETE", "/admin/quota")

    def set_grants(self, principal: str, projects: list[str]) -> dict[str, Any]:
        """Hold ``principal`` to these projects (any other: PERMISSION_DENIED)."""
        body = {"principal": principal, "projects": projects}
        return self._call("PUT", "/admin/grants", body)  # type: ignore[no-any-return]

    def grants(self) -> dict[str, Any]:
        """``grants``, ``tokenLifetimeSeconds`` and ``tokensIssued`` (per account)."""
        return self._call("GET", "/admin/grants")  # type: ignore[no-any-return]

    def clear_grants(self) -> None:
        """No grants (every principal may touch every project); full token lifetimes."""
        self._call("DELETE", "/admin/grants")

    def set_token_lifetime(self, seconds: int) -> dict[str, Any]:
        """Issue impersonation tokens living at most this long."""
        body = {"lifetimeSeconds": seconds}
        return self._call("PUT", "/admin/tokens", body)  # type: ignore[no-any-return]
