"""`cloudrun-emulator gcloud-env`: a gcloud configuration that sends `gcloud run ...` to the
emulator's REST surface (CONTRACT §6.3), printed as `export NAME=VALUE` lines for sh.

What the unmodified Cloud SDK (528) needs, found by running it:
- gcloud prefixes the `run` endpoint override's host with `{region}-` for regional calls
  (`http://run.googleapis.com/` becomes `http://us-central1-run.googleapis.com/`), so a local
  address cannot be the override itself. The override stays a googleapis.com host over plain
  http and the emulator is gcloud's HTTP proxy (`proxy/*`): gcloud then sends every request to
  the emulator in proxy form (absolute URI), which carries the region in the host.
- `proxy/username` becomes a `Proxy-Authorization: Basic` header on every request: that is the
  principal the emulator records (audit `principalEmail`, the Service's `last_modifier`).
- `auth/disable_credentials` (no Google login or token refresh), and
  `core/should_prompt_to_enable_api false` (otherwise an error offers to enable the API).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CONFIG_NAME = "emulator"
DEFAULT_PRINCIPAL = "deployer@example.com"
DEFAULT_PROJECT = "runwarden-demo"


def write_config(
    config_dir: Path,
    rest_port: int,
    *,
    principal: str = DEFAULT_PRINCIPAL,
    project: str = DEFAULT_PROJECT,
    region: str | None = None,
    host: str = "127.0.0.1",
) -> dict[str, str]:
    """Write the named configuration `emulator` into `config_dir` and make it active; return the
    environment variables to export."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configurations").mkdir(exist_ok=True)
    cp = configparser.ConfigParser(interpolation=None)
    cp["core"] = {
        "project": project,
        "should_prompt_to_enable_api": "false",
        "disable_usage_reporting": "true",
        "check_gce_metadata": "false",
    }
    cp["auth"] = {"disable_credentials": "true"}
    cp["component_manager"] = {"disable_update_check": "true"}
    cp["api_endpoint_overrides"] = {"run": "http://run.googleapis.com/"}
    cp["proxy"] = {
        "type": "http",
        "address": host,
        "port": str(rest_port),
        "username": principal,
        "password": "emulator",
    }
    if region:
        cp["run"] = {"region": region}
    with open(config_dir / "configurations" / f"config_{CONFIG_NAME}", "w") as fh:
        cp.write(fh)
    (config_dir / "active_config").write_text(CONFIG_NAME)
    return {
        "CLOUDSDK_CONFIG": str(config_dir.resolve()),
        "CLOUDSDK_ACTIVE_CONFIG_NAME": CONFIG_NAME,
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }


class GcloudError(RuntimeError):
    """gcloud exited non-zero; the message carries the command and its stderr."""


class Gcloud:
    """The installed `gcloud`, configured by `write_config` in a directory of its own (for the
    tests and the demo). `json(...)` runs a command with `--format json` and parses it."""

    def __init__(
        self,
        config_dir: Path,
        rest_port: int,
        *,
        principal: str = DEFAULT_PRINCIPAL,
        project: str = DEFAULT_PROJECT,
        region: str | None = None,
    ) -> None:
        self.principal = principal
        self.project = project
        exports = write_config(
            config_dir, rest_port, principal=principal, project=project, region=region
        )
        # Output is captured, never a terminal: no ANSI bold even where gcloud would add it.
        self.env = {**os.environ, **exports, "CLOUDSDK_CORE_DISABLE_COLOR": "1", "TERM": "dumb"}

    @staticmethod
    def available() -> bool:
        return shutil.which("gcloud") is not None

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["gcloud", *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise GcloudError(f"gcloud {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--format", "json").stdout)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="cloudrun-emulator gcloud-env",
        description="Prepare a gcloud configuration in DIR that sends `gcloud run services ...` "
        "to the emulator's REST surface; print `export NAME=VALUE` lines (eval them in sh).",
    )
    p.add_argument("--rest-port", type=int, required=True, help="the emulator's --rest-port")
    p.add_argument("--config-dir", required=True, metavar="DIR", help="becomes CLOUDSDK_CONFIG")
    p.add_argument(
        "--principal",
        default=DEFAULT_PRINCIPAL,
        metavar="EMAIL",
        help=f"who the writes are attributed to (default {DEFAULT_PRINCIPAL})",
    )
    p.add_argument("--project", default=DEFAULT_PROJECT, help="core/project")
    p.add_argument("--region", default=None, help="run/region (else pass --region to gcloud)")
    p.add_argument("--host", default="127.0.0.1", help="the emulator's address")
    a = p.parse_args(argv)
    if not 0 < a.rest_port < 65536:
        p.error("--rest-port must be the emulator's REST port (1-65535)")
    if "@" not in a.principal or ":" in a.principal:
        p.error("--principal must be an email address such as ci@example.iam.gserviceaccount.com")
    env = write_config(
        Path(a.config_dir),
        a.rest_port,
        principal=a.principal,
        project=a.project,
        region=a.region,
        host=a.host,
    )
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
