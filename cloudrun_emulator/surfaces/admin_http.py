"""The admin API: JSON over HTTP for tests, the demo and the benchmark (CONTRACT §3).

Faults, quota and counters never apply here; this is the back door, not the API under test.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import names
from ..control import Controls, Faults, Quota, parse_faults, parse_quota
from ..errors import ApiError, invalid
from ..store import Store
from ..views import admin as view
from .http_site import serve

log = logging.getLogger("cloudrun_emulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, sort_keys=True))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": {"code": status, "message": message}}, status=status)


async def _body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise invalid("request body is empty; expected a JSON object")
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"malformed JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise invalid(f"body must be a JSON object, got {type(data).__name__}")
    return data


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _error(e.http_status, e.message)
    except web.HTTPException as e:
        if e.status == 404:
            return _error(404, f"no such admin path: {request.method} {request.path}")
        if e.status == 405:
            return _error(405, f"method {request.method} not allowed on {request.path}")
        raise
    except Exception:
        log.exception("admin_handler_failed path=%s", request.path)
        return _error(500, "internal error in the emulator (see its log)")


class Admin:
    def __init__(self, store: Store, controls: Controls) -> None:
        self.store = store
        self.controls = controls

    def _key(self, request: web.Request) -> names.ServiceKey:
        m = request.match_info
        return names.service_key(m["project"], m["region"], m["name"])

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def put_service(self, request: web.Request) -> web.Response:
        key = self._key(request)
        body = await _body(request, required=False)
        created = view.put_service(self.store, key, body)
        log.info("admin_put_service name=%s created=%s fields=%s", key.name, created, sorted(body))
        return _json(view.get_service(self.store, key), status=201 if created else 200)

    async def get_service(self, request: web.Request) -> web.Response:
        return _json(view.get_service(self.store, self._key(request)))

    async def delete_service(self, request: web.Request) -> web.Response:
        key = self._key(request)
        body = await _body(request, required=False)
        principal = body.get("principal") or view.DEFAULT_PRINCIPAL
        if not isinstance(principal, str):
            raise invalid("'principal' must be a string")
        view.delete_service(self.store, key, principal)
        return _json({"deleted": key.name})

    async def list_services(self, request: web.Request) -> web.Response:
        return _json({"services": view.list_services(self.store)})

    async def put_sa(self, request: web.Request) -> web.Response:
        sa, created = view.put_service_account(self.store, request.match_info["email"])
        return _json(sa, status=201 if created else 200)

    async def delete_sa(self, request: web.Request) -> web.Response:
        email = request.match_info["email"]
        self.store.accounts.delete(email)
        return _json({"deleted": email})

    async def list_sa(self, request: web.Request) -> web.Response:
        return _json({"serviceAccounts": view.list_service_accounts(self.store)})

    async def put_faults(self, request: web.Request) -> web.Response:
        faults, fail_next = parse_faults(await _body(request))
        self.controls.faults = faults
        if fail_next:
            self.store.revisions.fail_next_revision = True
        log.info("faults_set %s failNextRevision=%s", faults.as_json(), fail_next)
        return await self.get_faults(request)

    async def get_faults(self, request: web.Request) -> web.Response:
        data = self.controls.faults.as_json()
        data["failNextRevision"] = self.store.revisions.fail_next_revision
        return _json(data)

    async def delete_faults(self, request: web.Request) -> web.Response:
        self.controls.faults = Faults()
        self.store.revisions.fail_next_revision = False
        return await self.get_faults(request)

    async def get_calls(self, request: web.Request) -> web.Response:
        if request.query.get("by") == "principal":
            return _json({p: dict(m) for p, m in self.controls.calls_by_principal.items()})
        return _json(dict(self.controls.calls))

    async def delete_calls(self, request: web.Request) -> web.Response:
        self.controls.calls.clear()
        self.controls.calls_by_principal.clear()
        return _json({})

    async def put_quota(self, request: web.Request) -> web.Response:
        self.controls.quota = parse_quota(await _body(request))
        return _json(self.controls.quota.as_json())

    async def get_quota(self, request: web.Request) -> web.Response:
        return _json(self.controls.quota.as_json())

    async def delete_quota(self, request: web.Request) -> web.Response:
        self.controls.quota = Quota()
        return _json(self.controls.quota.as_json())

    # IAM Credentials over REST, the way google-auth's impersonated_credentials calls it
    # (POST .../v1/projects/-/serviceAccounts/{email}:generateAccessToken, JSON body
    # {"scope": [...], "lifetime": "3600s"}; reply {"accessToken", "expireTime"} with the time as
    # RFC 3339 in UTC without fractions, which google-auth parses with "%Y-%m-%dT%H:%M:%SZ").
    async def generate_access_token(self, request: web.Request) -> web.Response:
        account, _, verb = request.match_info["account"].partition(":")
        if verb != "generateAccessToken":
            return _error(404, f"no such method: {request.path}")
        body = await _body(request, required=False)
        raw = str(body.get("lifetime") or "")
        try:
            lifetime = float(raw.removesuffix("s")) if raw else None
        except ValueError as exc:
            raise invalid(f"Invalid value for field 'lifetime': {raw!r}") from exc
        name = f"projects/{request.match_info['project']}/serviceAccounts/{account}"
        token, expires = self.store.credentials.generate(name, lifetime)
        log.info("access_token_generated name=%s (REST)", name)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
        return _json({"accessToken": token, "expireTime": stamp})

    async def put_grants(self, request: web.Request) -> web.Response:
        body = await _body(request)
        projects = body.get("projects")
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            raise invalid("'projects' must be a list of project ids")
        self.store.credentials.set_grants(body.get("principal"), projects)  # type: ignore[arg-type]
        return await self.get_grants(request)

    async def get_grants(self, request: web.Request) -> web.Response:
        creds = self.store.credentials
        return _json(
            {
                "grants": {p: sorted(v) for p, v in creds.grants.items()},
                "tokenLifetimeSeconds": creds.lifetime_cap,
                "tokensIssued": dict(creds.issued),
            }
        )

    async def delete_grants(self, request: web.Request) -> web.Response:
        self.store.credentials.clear()
        return await self.get_grants(request)

    async def put_token_lifetime(self, request: web.Request) -> web.Response:
        seconds = (await _body(request)).get("lifetimeSeconds")
        if not isinstance(seconds, int) or seconds <= 0:
            raise invalid("'lifetimeSeconds' must be a positive whole number")
        self.store.credentials.lifetime_cap = seconds
        return await self.get_grants(request)


def _on(path: str, **handlers: Handler) -> list[web.RouteDef]:
    """``path``'s routes, one per method keyword (``get=`` is ``web.get``: HEAD too)."""
    return [getattr(web, method)(path, handler) for method, handler in handlers.items()]


def make_app(store: Store, controls: Controls) -> web.Application:
    a = Admin(store, controls)
    app = web.Application(middlewares=[_errors], client_max_size=8 * 1024 * 1024)
    svc = "/admin/services/{project}/{region}/{name}"
    sa = "/admin/serviceaccounts/{email}"
    app.add_routes(
        [
            web.get("/healthz", a.healthz),
            web.get("/admin/services", a.list_services),
            *_on(svc, put=a.put_service, get=a.get_service, delete=a.delete_service),
            web.get("/admin/serviceaccounts", a.list_sa),
            *_on(sa, put=a.put_sa, delete=a.delete_sa),
            *_on("/admin/faults", get=a.get_faults, put=a.put_faults, delete=a.delete_faults),
            *_on("/admin/calls", get=a.get_calls, delete=a.delete_calls),
            *_on("/admin/quota", get=a.get_quota, put=a.put_quota, delete=a.delete_quota),
            *_on("/admin/grants", get=a.get_grants, put=a.put_grants, delete=a.delete_grants),
            web.put("/admin/tokens", a.put_token_lifetime),
            web.post("/v1/projects/{project}/serviceAccounts/{account}", a.generate_access_token),
        ]
    )
    return app


async def start_admin(
    store: Store, controls: Controls, host: str, port: int
) -> tuple[web.AppRunner, int]:
    return await serve(make_app(store, controls), host, port)
