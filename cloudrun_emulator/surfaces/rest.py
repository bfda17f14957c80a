"""The REST face (`--rest-port`): HTTP/1.1 JSON the way gcloud and the REST clients use the
Cloud Run Admin API, over the same store as the gRPC face (CONTRACT §6.3).

- v1, Knative serving (what every `gcloud run services ...` command speaks):
  `/apis/serving.knative.dev/v1/namespaces/{project}/services[/{name}]` (GET, list with
  `labelSelector`, POST create, PUT replace, DELETE), `.../revisions[/{name}]` (GET, list with
  `labelSelector`), `/v1/projects/{p}/locations/{r|-}/services[/{s}]` and the IAM methods
  `/v1/projects/{p}/locations/{r}/services/{s}:getIamPolicy|:setIamPolicy|:testIamPermissions`.
- v2 (the google-cloud-run REST transport): `/v2/projects/{p}/locations/{r}/services...` and
  `/v2/projects/{p}/locations/{r}/operations/{id}[:wait]`, JSON as protobuf's JSON mapping (enums
  as numbers when the client asks with `$alt=json;enum-encoding=int`).
- IAM admin v1 (what Runwarden's `--gcp-transport rest` uses to check that a service account
  exists): `GET /v1/projects/{p|-}/serviceAccounts/{email}`, as
  https://cloud.google.com/iam/docs/reference/rest/v1/projects.serviceAccounts/get documents it
  on `https://iam.googleapis.com`.

gcloud reaches a regional endpoint `https://{region}-run.googleapis.com`; locally it is pointed
at `http://run.googleapis.com/` through this port as its HTTP proxy (see `gcloud_env.py`), so a
request may arrive in proxy form (absolute URI) and the region is the `{region}-` host prefix.
The caller's principal is, as on the gRPC surface, the account of a bearer token this emulator
issued (an impersonated identity; its calls are counted under it and held to its project grants),
else the proxy user (`Proxy-Authorization: Basic`, which gcloud sends from its `proxy/username`
property), else the `x-emulator-principal` header, else the gRPC default.
Errors use Google's JSON error shape `{"error": {"code", "message", "status", "details"}}`
(https://cloud.google.com/apis/design/errors#http_mapping).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2

from .. import knative, names
from ..control import Controls
from ..errors import ApiError, invalid, not_found
from ..store import Store
from ..store.directory import missing
from ..store.records import ServiceEntry
from .grpc import DEFAULT_PRINCIPAL, PRINCIPAL_HEADER
from .http_site import serve

log = logging.getLogger("cloudrun_emulator")

REGION_HOST_RE = re.compile(r"^(?P<region>[a-z]+(?:-[a-z]+)+\d+)-run\.googleapis\.com$")
V1 = "google.cloud.run.v1.Services"
V2 = "google.cloud.run.v2.Services"
OPS = "google.longrunning.Operations"
IAM = "google.iam.admin.v1.IAM"

_KN = r"^/apis/serving\.knative\.dev/v1/namespaces/(?P<ns>[^/]+)"
_V1P = r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)"
_V2P = r"^/v2/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)"


@dataclass(slots=True)
class Call:
    """One parsed request: path parameters, query, body, caller and region from the host."""

    params: dict[str, str]
    query: Any
    body: dict[str, Any]
    principal: str
    host_region: str | None
    ints: bool  # enums as numbers


Impl = Callable[[Call], Any]


def _principal(request: web.Request, store: Store) -> str:
    """Who makes the call: the account of a token this emulator issued (GenerateAccessToken; an
    expired one is UNAUTHENTICATED), as on the gRPC surface; else the proxy user; else the
    x-emulator-principal header; else the default."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        account = store.credentials.principal_of(token.strip())
        if account is not None:
            return account
    auth = request.headers.get("Proxy-Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "basic" and token:
        try:
            user = base64.b64decode(token.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if user:
            return user
    return request.headers.get(PRINCIPAL_HEADER) or DEFAULT_PRINCIPAL


def _host_region(request: web.Request) -> str | None:
    host = (request.host or "").rsplit(":", 1)[0] if request.host else ""
    m = REGION_HOST_RE.match(host)
    return m["region"] if m else None


def _bool(query: Any, name: str) -> bool:
    return str(query.get(name, "")).lower() in ("1", "true")


def error_body(e: ApiError) -> dict[str, Any]:
    """Google's JSON error shape, with the details a gRPC status would carry (e.g. RetryInfo)."""
    err: dict[str, Any] = {"code": e.http_status, "message": e.message, "status": e.code.name}
    for key, value in e.trailing_metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            st = status_pb2.Status.FromString(value)
            err["details"] = [
                json_format.MessageToDict(d) for d in st.details if _known_any(d.type_url)
            ]
    return {"error": err}


def _known_any(type_url: str) -> bool:
    from google.protobuf import symbol_database

    try:
        symbol_database.Default().GetSymbol(type_url.rsplit("/", 1)[-1])
        return True
    except KeyError:
        return False


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _to_json(message: Message, ints: bool) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(message, use_integers_for_enums=ints)
    return out


def _parse(data: Any, message: Message, where: str) -> Any:
    if not isinstance(data, dict):
        raise invalid(f"{where} must be a JSON object.")
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise invalid(f"Invalid JSON payload received. {where}: {exc}") from exc
    return message


class RestApi:
    """The method implementations, each `(Call) -> JSON-able`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------------ lookups

    def _project(self, ns: str) -> str:
        return self.store.directory.numbers.get(ns, ns)

    def _find(self, project: str, service: str, region: str | None) -> ServiceEntry:
        """A service by project and name; the region when the host names one, else the only
        service of that name in the project."""
        services = self.store.directory.services
        if region:
            key = self.store.directory.resolve(names.ServiceKey(project, region, service))
            entry = services.get(key.name)
            if entry is None:
                raise missing(key)
            return entry
        found = [
            e for e in services.values() if e.key.project == project and e.key.service == service
        ]
        if len(found) == 1:
            return found[0]
        if not found:
            raise not_found(f"Resource '{service}' of kind 'SERVICE' does not exist.")
        raise invalid(
            f"Service '{service}' exists in several regions of project '{project}'; use the "
            "regional endpoint https://{region}-run.googleapis.com to choose one."
        )

    def _entries(self, project: str, region: str | None) -> list[ServiceEntry]:
        return sorted(
            (
                e
                for e in self.store.directory.services.values()
                if e.key.project == project
                and (not region or region == "-" or e.key.region == region)
            ),
            key=lambda e: e.key.name,
        )

    # ------------------------------------------------------------------ v1 Knative services

    def v1_list_services(self, c: Call) -> Any:
        project = self._project(c.params.get("ns") or c.params["project"])
        region = c.params.get("region") or c.host_region
        selector = str(c.query.get("labelSelector", ""))
        items = [
            knative.service_v1(e)
            for e in self._entries(project, region)
            if knative.selector_matches(
                selector, {**dict(e.service.labels), knative.LOCATION_LABEL: e.key.region}
            )
        ]
        return knative.list_v1("Service", items)

    def v1_get_service(self, c: Call) -> Any:
        project = self._project(c.params.get("ns") or c.params["project"])
        region = c.params.get("region") or c.host_region
        return knative.service_v1(self._find(project, c.params["name"], region))

    def v1_create_service(self, c: Call) -> Any:
        project = self._project(c.params["ns"])
        meta: dict[str, Any] = _dict(c.body.get("metadata"))
        name = str(meta.get("name") or "")
        if not name:
            raise invalid("metadata.name: Required field is missing (the service's name).")
        labels = _dict(meta.get("labels"))
        region = c.host_region or labels.get(knative.LOCATION_LABEL)
        if not region:
            raise invalid(
                "No region: call the regional endpoint https://{region}-run.googleapis.com or "
                f"set metadata.labels['{knative.LOCATION_LABEL}']."
            )
        key = self.store.directory.resolve(names.service_key(project, str(region), name))
        return self._v1_deploy(key, c, "CreateService", must_exist=False)

    def v1_replace_service(self, c: Call) -> Any:
        project = self._project(c.params["ns"])
        entry = self._find(project, c.params["name"], c.host_region)
        meta: dict[str, Any] = _dict(c.body.get("metadata"))
        if meta.get("name") not in (None, c.params["name"]):
            raise invalid(
                f"metadata.name '{meta.get('name')}' does not match the service in the URL "
                f"'{c.params['name']}'."
            )
        rv = str(meta.get("resourceVersion") or "")
        etag = f'"{rv}"' if rv else ""
        return self._v1_deploy(entry.key, c, "ReplaceService", etag=etag, must_exist=True)

    def _v1_deploy(self, key: names.ServiceKey, c: Call, method: str, **options: Any) -> Any:
        """The Knative Service in ``c.body`` deployed as ``key`` by ``method`` (``options``:
        the store's ``deploy`` keywords); the Knative view of the result."""
        entry, _, _ = self.store.services.deploy(
            key,
            knative.service_from_v1(c.body),
            principal=c.principal,
            method=f"{V1}.{method}",
            request=_v1_request(key, c.body),
            **options,
        )
        assert entry is not None
        return knative.service_v1(entry)

    def v1_delete_service(self, c: Call) -> Any:
        project = self._project(c.params["ns"])
        entry = self._find(project, c.params["name"], c.host_region)
        key = entry.key
        uid = entry.service.uid
        self.store.services.delete(
            key.name,
            "",
            False,
            c.principal,
            {"name": f"namespaces/{key.project}/services/{key.service}"},
            method=f"{V1}.DeleteService",
        )
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Success",
            "details": {"name": key.service, "kind": "services", "uid": uid},
        }

    # ------------------------------------------------------------------ v1 Knative revisions

    def v1_list_revisions(self, c: Call) -> Any:
        project = self._project(c.params["ns"])
        selector = str(c.query.get("labelSelector", ""))
        items = []
        for e in self._entries(project, c.host_region):
            for rev in sorted(e.revisions.values(), key=lambda r: -r.generation):
                item = knative.revision_v1(e, rev)
                if knative.selector_matches(selector, item["metadata"]["labels"]):
                    items.append(item)
        return knative.list_v1("Revision", items)

    def v1_get_revision(self, c: Call) -> Any:
        project = self._project(c.params["ns"])
        name = c.params["name"]
        for e in self._entries(project, c.host_region):
            rev = e.revisions.get(name)
            if rev is not None:
                return knative.revision_v1(e, rev)
        raise not_found(f"Revision '{name}' of kind 'REVISION' does not exist.")

    # ------------------------------------------------------------------ IAM (v1 and v2)

    def _resource(self, c: Call) -> str:
        p = c.params
        return f"projects/{p['project']}/locations/{p['region']}/services/{p['name']}"

    def get_iam_policy(self, c: Call) -> Any:
        return _to_json(self.store.policies.get(self._resource(c)), c.ints)

    def _set_iam_policy(self, c: Call, method: str) -> Any:
        resource = self._resource(c)
        if "policy" not in c.body:
            raise invalid("The request is missing the required field 'policy'.")
        req = iam_policy_pb2.SetIamPolicyRequest(resource=resource)
        _parse(c.body["policy"], req.policy, "policy")
        mask = c.body.get("updateMask")
        if mask:
            req.update_mask.paths.extend(p.strip() for p in str(mask).split(",") if p.strip())
        new = self.store.policies.set(
            resource, req.policy, list(req.update_mask.paths), c.principal, req, method=method
        )
        return _to_json(new, c.ints)

    def v1_set_iam_policy(self, c: Call) -> Any:
        return self._set_iam_policy(c, f"{V1}.SetIamPolicy")

    def v2_set_iam_policy(self, c: Call) -> Any:
        return self._set_iam_policy(c, f"{V2}.SetIamPolicy")

    def test_iam_permissions(self, c: Call) -> Any:
        perms = c.body.get("permissions") or []
        if not isinstance(perms, list):
            raise invalid("permissions must be a list of strings.")
        granted = self.store.policies.test_permissions(self._resource(c), [str(p) for p in perms])
        return {"permissions": granted} if granted else {}

    # ------------------------------------------------------------------ v2 services

    def v2_list_services(self, c: Call) -> Any:
        parent = f"projects/{c.params['project']}/locations/{c.params['region']}"
        page_size = int(c.query.get("pageSize", 0) or 0)
        resp = self.store.services.list_page(parent, page_size, str(c.query.get("pageToken", "")))
        return _to_json(resp, c.ints)

    def v2_get_service(self, c: Call) -> Any:
        return _to_json(self.store.services.get(self._resource(c)), c.ints)

    def v2_create_service(self, c: Call) -> Any:
        parent = f"projects/{c.params['project']}/locations/{c.params['region']}"
        req = run_v2.CreateServiceRequest.pb()(
            parent=parent,
            service_id=str(c.query.get("serviceId", "")),
            validate_only=_bool(c.query, "validateOnly"),
        )
        _parse(c.body, req.service, "service")
        op = self.store.services.create(
            req.parent, req.service_id, req.service, req.validate_only, c.principal, req
        )
        return _to_json(op, c.ints)

    def v2_update_service(self, c: Call) -> Any:
        req = run_v2.UpdateServiceRequest.pb()(
            allow_missing=_bool(c.query, "allowMissing"),
            validate_only=_bool(c.query, "validateOnly"),
        )
        _parse(c.body, req.service, "service")
        req.service.name = self._resource(c)
        op = self.store.services.update(
            req.service, req.allow_missing, req.validate_only, c.principal, req
        )
        return _to_json(op, c.ints)

    def v2_delete_service(self, c: Call) -> Any:
        req = run_v2.DeleteServiceRequest.pb()(
            name=self._resource(c),
            etag=str(c.query.get("etag", "")),
            validate_only=_bool(c.query, "validateOnly"),
        )
        op = self.store.services.delete(req.name, req.etag, req.validate_only, c.principal, req)
        return _to_json(op, c.ints)

    # ------------------------------------------------------------------ IAM admin v1

    def get_service_account(self, c: Call) -> Any:
        name = f"projects/{c.params['project']}/serviceAccounts/{c.params['email']}"
        return _to_json(self.store.accounts.get(name), c.ints)

    # ------------------------------------------------------------------ v2 operations

    def _op_name(self, c: Call) -> str:
        p = c.params
        return f"projects/{p['project']}/locations/{p['region']}/operations/{p['op']}"

    def get_operation(self, c: Call) -> Any:
        return _to_json(self.store.operations.get(self._op_name(c)), c.ints)

    async def wait_operation(self, c: Call) -> Any:
        timeout = None
        raw = c.body.get("timeout")
        if raw:
            try:
                timeout = float(str(raw).removesuffix("s"))
            except ValueError as exc:
                raise invalid(f"timeout must be a duration such as '10s', got {raw!r}") from exc
        return _to_json(await self.store.operations.wait(self._op_name(c), timeout), c.ints)

    def delete_operation(self, c: Call) -> Any:
        self.store.operations.delete(self._op_name(c))
        return {}


def _v1_request(key: names.ServiceKey, body: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"namespaces/{key.project}/services/{key.service}", "service": body}


_SVC = r"/services/(?P<name>[a-z][-a-z0-9]*)"


def _iam_routes(
    api: RestApi, prefix: str, rpc: str, set_policy: Impl
) -> list[tuple[str, str, Impl, str]]:
    """A service's IAM methods under ``prefix`` (v1 and v2 differ only in the policy write)."""
    on, test = prefix + _SVC, api.test_iam_permissions
    return [
        ("GET", on + ":getIamPolicy$", api.get_iam_policy, f"{rpc}/GetIamPolicy"),
        ("POST", on + ":setIamPolicy$", set_policy, f"{rpc}/SetIamPolicy"),
        ("POST", on + ":testIamPermissions$", test, f"{rpc}/TestIamPermissions"),
    ]


def _routes(api: RestApi) -> list[tuple[str, re.Pattern[str], Impl, str]]:
    """(HTTP method, path pattern, implementation, the call's name for counters and faults)."""
    table: list[tuple[str, str, Impl, str]] = [
        ("GET", _KN + r"/services$", api.v1_list_services, f"{V1}/ListServices"),
        ("POST", _KN + r"/services$", api.v1_create_service, f"{V1}/CreateService"),
        ("GET", _KN + _SVC + "$", api.v1_get_service, f"{V1}/GetService"),
        ("PUT", _KN + _SVC + "$", api.v1_replace_service, f"{V1}/ReplaceService"),
        ("DELETE", _KN + _SVC + "$", api.v1_delete_service, f"{V1}/DeleteService"),
        ("GET", _KN + r"/revisions$", api.v1_list_revisions, f"{V1}/ListRevisions"),
        ("GET", _KN + r"/revisions/(?P<name>[^/:]+)$", api.v1_get_revision, f"{V1}/GetRevision"),
        ("GET", _V1P + r"/services$", api.v1_list_services, f"{V1}/ListServices"),
        ("GET", _V1P + _SVC + "$", api.v1_get_service, f"{V1}/GetService"),
        *_iam_routes(api, _V1P, V1, api.v1_set_iam_policy),
        ("GET", _V2P + r"/services$", api.v2_list_services, f"{V2}/ListServices"),
        ("POST", _V2P + r"/services$", api.v2_create_service, f"{V2}/CreateService"),
        ("GET", _V2P + _SVC + "$", api.v2_get_service, f"{V2}/GetService"),
        ("PATCH", _V2P + _SVC + "$", api.v2_update_service, f"{V2}/UpdateService"),
        ("DELETE", _V2P + _SVC + "$", api.v2_delete_service, f"{V2}/DeleteService"),
        *_iam_routes(api, _V2P, V2, api.v2_set_iam_policy),
        ("GET", _V2P + r"/operations/(?P<op>[^/:]+)$", api.get_operation, f"{OPS}/GetOperation"),
        (
            "POST",
            _V2P + r"/operations/(?P<op>[^/:]+):wait$",
            api.wait_operation,
            f"{OPS}/WaitOperation",
        ),
        (
            "DELETE",
            _V2P + r"/operations/(?P<op>[^/:]+)$",
            api.delete_operation,
            f"{OPS}/DeleteOperation",
        ),
        (
            "GET",
            r"^/v1/projects/(?P<project>[^/]+)/serviceAccounts/(?P<email>[^/:]+)$",
            api.get_service_account,
            f"{IAM}/GetServiceAccount",
        ),
    ]
    return [(m, re.compile(p), impl, rpc) for m, p, impl, rpc in table]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, indent=1).encode(), status=status, content_type="application/json"
    )


def make_app(store: Store, controls: Controls) -> web.Application:
    api = RestApi(store)
    routes = _routes(api)
    calls = controls.calls

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.path
        matched = [(m, rx.match(path), impl, rpc) for m, rx, impl, rpc in routes]
        matched = [r for r in matched if r[1] is not None]
        if not matched:
            return _json(
                error_body(not_found(f"The requested URL {path} was not found on this server.")),
                404,
            )
        chosen = next((r for r in matched if r[0] == request.method), None)
        if chosen is None:
            allowed = sorted({r[0] for r in matched})
            e = ApiError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"Method {request.method} is not allowed on {path}; allowed: {allowed}.",
            )
            return _json(error_body(e), 405)
        _, m, impl, rpc = chosen
        assert m is not None
        calls[rpc] = calls.get(rpc, 0) + 1
        try:
            body: dict[str, Any] = {}
            raw = await request.read()
            if raw.strip():
                try:
                    parsed = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise invalid(f"Invalid JSON payload received. {exc}") from exc
                if not isinstance(parsed, dict):
                    raise invalid("Invalid JSON payload received: the body must be an object.")
                body = parsed
            alt = ",".join(request.query.getall("$alt", []))
            principal = _principal(request, store)
            mine = controls.calls_by_principal.setdefault(principal, {})
            mine[rpc] = mine.get(rpc, 0) + 1
            params = m.groupdict()
            if not rpc.startswith(IAM) and store.credentials.grants:
                # As on the gRPC surface: grants are about projects' Cloud Run resources.
                project = params.get("project") or params.get("ns")
                store.credentials.check(principal, project, path)
            call = Call(
                params=params,
                query=request.query,
                body=body,
                principal=principal,
                host_region=_host_region(request),
                ints="enum-encoding=int" in alt,
            )
            if controls.faults.active:
                delay, error = controls.fault_for(rpc)
                if delay:
                    await asyncio.sleep(delay)
                if error is not None:
                    raise error
            if controls.quota.active:
                controls.quota.check(rpc)
            result = impl(call)
            if isinstance(result, Awaitable):
                result = await result
            return _json(result)
        except ApiError as e:
            return _json(error_body(e), e.http_status)
        except Exception:
            log.exception("rest_handler_failed method=%s path=%s", rpc, path)
            internal = ApiError(grpc.StatusCode.INTERNAL, "Internal error encountered.")
            return _json(error_body(internal), 500)

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def start_rest(
    store: Store, controls: Controls, host: str, port: int
) -> tuple[web.AppRunner, int]:
    return await serve(make_app(store, controls), host, port)
