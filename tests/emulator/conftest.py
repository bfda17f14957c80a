"""Shared helpers for the emulator tests: real async clients and a quick way to deploy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from cloudrun_emulator.admin import AdminClient
from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import Clients, make_clients

PROJECT = "emu-test-project"
REGION = "us-west2"


@dataclass
class Svc:
    """A service deployed through the admin API for one test."""

    admin: AdminClient
    project: str
    region: str
    service: str

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/services/{self.service}"

    def get(self) -> dict:
        return self.admin.get_service(self.project, self.region, self.service)


@pytest.fixture
async def clients(emulator: EmulatorProcess) -> AsyncIterator[Clients]:
    c = make_clients(emulator.grpc_endpoint)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def deploy(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> Callable[..., Svc]:
    """deploy(env=..., invokers=..., settings=...) -> Svc on the shared emulator."""

    def make(prefix: str = "svc", **body: object) -> Svc:
        svc = Svc(emulator.admin, PROJECT, REGION, unique_name(prefix))
        emulator.admin.put_service(PROJECT, REGION, svc.service, **body)  # type: ignore[arg-type]
        return svc

    return make


def fresh_deploy(emu: EmulatorProcess, service: str, **body: object) -> Svc:
    emu.admin.put_service(PROJECT, REGION, service, **body)  # type: ignore[arg-type]
    return Svc(emu.admin, PROJECT, REGION, service)
