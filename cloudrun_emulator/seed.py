"""`--seed FILE.yaml`: services and service accounts that exist when the emulator starts.

```yaml
serviceAccounts:
  - orchestrator@nba-props-platform.iam.gserviceaccount.com
services:
  - project: nba-props-platform
    region: us-west2
    name: phase3-to-phase4
    env: {GCP_PROJECT_ID: nba-props-platform}          # same body as PUT /admin/services/...
    secretEnv: {SLACK_WEBHOOK_URL: {secret: slack-webhook, version: latest}}
    invokers: {roles/run.invoker: ["serviceAccount:ci@nba-props-platform.iam.gserviceaccount.com"]}
    settings: {maxInstances: 10, timeoutSeconds: 540}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import names
from .errors import ApiError
from .store import Store
from .views import admin as view


class SeedError(ValueError):
    """The seed file cannot be loaded; the message names the file and the entry."""


def load_seed(store: Store, path: str | Path) -> tuple[int, int]:
    """Apply a seed file; returns (services, service accounts) loaded."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SeedError(f"{p}: cannot read seed file: {exc}") from exc
    if not isinstance(data, dict):
        raise SeedError(f"{p}: top level must be a mapping with 'services' and 'serviceAccounts'")
    unknown = sorted(set(data) - {"services", "serviceAccounts"})
    if unknown:
        raise SeedError(f"{p}: unknown top-level key(s) {unknown}")
    accounts = data.get("serviceAccounts") or []
    services = data.get("services") or []
    if not isinstance(accounts, list) or not isinstance(services, list):
        raise SeedError(f"{p}: 'services' and 'serviceAccounts' must be lists")
    for i, email in enumerate(accounts):
        try:
            store.accounts.put(str(email))
        except ApiError as exc:
            raise SeedError(f"{p}: serviceAccounts[{i}]: {exc.message}") from exc
    for i, entry in enumerate(services):
        if not isinstance(entry, dict):
            raise SeedError(f"{p}: services[{i}] must be a mapping")
        body: dict[str, Any] = dict(entry)
        try:
            key = names.service_key(
                str(body.pop("project", "")), str(body.pop("region", "")), str(body.pop("name", ""))
            )
            body.setdefault("principal", "seed@example.com")
            view.put_service(store, key, body)
        except ApiError as exc:
            raise SeedError(f"{p}: services[{i}]: {exc.message}") from exc
    return len(services), len(accounts)
