"""The admin API (JSON over HTTP): round trips, its write semantics, bad input."""

from __future__ import annotations

import pytest

from cloudrun_emulator.admin import AdminError

from .conftest import PROJECT, REGION

SETTINGS = {
    "serviceAccount": f"orchestrator@{PROJECT}.iam.gserviceaccount.com",
    "timeoutSeconds": 540,
    "minInstances": 0,
    "maxInstances": 10,
    "concurrency": 1,
    "cpu": "1",
    "memory": "512Mi",
    "ingress": "internal",
    "labels": {"team": "data"},
}


def test_healthz(emulator):
    assert emulator.admin.healthz()
    assert emulator.admin.request("GET", "/healthz")[0] == 200


def test_put_get_round_trip(emulator, unique_name):
    name = unique_name("roundtrip")
    admin = emulator.admin
    put = admin.put_service(
        PROJECT,
        REGION,
        name,
        env={"GCP_PROJECT_ID": PROJECT, "EMPTY": ""},
        invokers={
            "roles/run.invoker": [
                "serviceAccount:756957797294-compute@developer.gserviceaccount.com"
            ]
        },
        settings=SETTINGS,
        secret_env={"SLACK_WEBHOOK_URL": {"secret": "slack-webhook", "version": "latest"}},
    )
    got = admin.get_service(PROJECT, REGION, name)
    assert put == got
    assert got["env"] == {"GCP_PROJECT_ID": PROJECT, "EMPTY": ""}
    assert got["secretEnv"] == {
        "SLACK_WEBHOOK_URL": {"secret": "slack-webhook", "version": "latest"}
    }
    assert got["iam"] == {
        "roles/run.invoker": ["serviceAccount:756957797294-compute@developer.gserviceaccount.com"]
    }
    assert got["settings"] == SETTINGS
    assert got["generation"] == 1
    assert got["latestReadyRevision"].startswith(f"{name}-00001-")
    assert isinstance(got["etag"], str) and got["etag"]
    assert got["serviceEtag"]
    assert got["uri"].startswith(f"https://{name}-")


def test_put_writes_only_the_aspects_given(emulator, unique_name):
    name = unique_name("aspects")
    admin = emulator.admin
    admin.put_service(
        PROJECT,
        REGION,
        name,
        env={"A": "1", "B": "2"},
        secret_env={"S": {"secret": "s", "version": "1"}},
        invokers={"roles/run.invoker": ["user:a@x.com"], "roles/run.developer": ["user:d@x.com"]},
        settings={"maxInstances": 4},
    )
    before = admin.get_service(PROJECT, REGION, name)

    # A deploy with --set-env-vars: plain env replaced, secrets/IAM/settings untouched.
    after = admin.put_service(PROJECT, REGION, name, env={"A": "9"})
    assert after["env"] == {"A": "9"}
    assert after["secretEnv"] == before["secretEnv"]
    assert after["iam"] == before["iam"]
    assert after["etag"] == before["etag"]  # no IAM write happened
    assert after["settings"]["maxInstances"] == 4
    assert after["generation"] == 2
    assert after["latestReadyRevision"] != before["latestReadyRevision"]

    # invokers: each role given is set; an empty list removes it; other roles stay.
    after = admin.put_service(PROJECT, REGION, name, invokers={"roles/run.invoker": []})
    assert after["iam"] == {"roles/run.developer": ["user:d@x.com"]}
    assert after["generation"] == 2  # an IAM-only write does not touch the service
    assert after["etag"] != before["etag"]

    # settings: only the keys given; null resets to Cloud Run's default.
    after = admin.put_service(PROJECT, REGION, name, settings={"maxInstances": None, "cpu": "2"})
    assert after["settings"]["maxInstances"] == 0  # unset, as Cloud Run v2 reports it
    assert after["settings"]["cpu"] == "2"
    assert after["env"] == {"A": "9"}


def test_get_unknown_service_raises_key_error(emulator):
    with pytest.raises(KeyError):
        emulator.admin.get_service(PROJECT, REGION, "never-created")


def test_delete_service(emulator, unique_name):
    name = unique_name("gone")
    emulator.admin.put_service(PROJECT, REGION, name, env={})
    emulator.admin.delete_service(PROJECT, REGION, name)
    with pytest.raises(KeyError):
        emulator.admin.get_service(PROJECT, REGION, name)
    with pytest.raises(AdminError) as info:
        emulator.admin.delete_service(PROJECT, REGION, name)
    assert info.value.status == 404


def test_service_accounts(emulator, unique_name):
    email = f"{unique_name('robot')}@{PROJECT}.iam.gserviceaccount.com"
    emulator.admin.put_service_account(email)
    emulator.admin.put_service_account(email)  # idempotent
    assert email in emulator.admin.request("GET", "/admin/serviceaccounts")[1]["serviceAccounts"]
    emulator.admin.delete_service_account(email)
    with pytest.raises(AdminError) as info:
        emulator.admin.delete_service_account(email)
    assert info.value.status == 404
    with pytest.raises(AdminError) as info:
        emulator.admin.put_service_account("not-an-email")
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("PUT", "/admin/services/{p}/{r}/{n}", b"{not json", 400, "malformed JSON"),
        ("PUT", "/admin/services/{p}/{r}/{n}", b"[1, 2]", 400, "JSON object"),
        ("PUT", "/admin/services/{p}/{r}/{n}", {"envs": {}}, 400, "unknown field"),
        ("PUT", "/admin/services/{p}/{r}/{n}", {"env": {"A": 1}}, 400, "env.A"),
        ("PUT", "/admin/services/{p}/{r}/{n}", {"env": {"PORT": "1"}}, 400, "reserved"),
        (
            "PUT",
            "/admin/services/{p}/{r}/{n}",
            {"settings": {"maxInstance": 3}},
            400,
            "maxInstance",
        ),
        ("PUT", "/admin/services/{p}/{r}/{n}", {"settings": {"ingress": "public"}}, 400, "ingress"),
        (
            "PUT",
            "/admin/services/{p}/{r}/{n}",
            {"settings": {"timeoutSeconds": "9"}},
            400,
            "timeoutSeconds",
        ),
        (
            "PUT",
            "/admin/services/{p}/{r}/{n}",
            {"settings": {"minInstances": 5, "maxInstances": 2}},
            400,
            "min_instance_count",
        ),
        (
            "PUT",
            "/admin/services/{p}/{r}/{n}",
            {"invokers": {"roles/run.invoker": "x"}},
            400,
            "invokers",
        ),
        (
            "PUT",
            "/admin/services/{p}/{r}/{n}",
            {"invokers": {"roles/run.invoker": ["bob"]}},
            400,
            "bob",
        ),
        ("PUT", "/admin/services/{p}/{r}/Bad_Name", {}, 400, "invalid service name"),
        ("PUT", "/admin/services/{p}/nowhere/{n}", {}, 400, "invalid region"),
        ("PUT", "/admin/faults", {"rate": 2}, 400, "rate"),
        ("PUT", "/admin/faults", {"codes": ["NOPE"]}, 400, "NOPE"),
        ("PUT", "/admin/faults", b"", 400, "empty"),
        ("PUT", "/admin/quota", {"readsPerMinute": -1}, 400, "readsPerMinute"),
        ("PUT", "/admin/quota", {"reads": 1}, 400, "unknown field"),
        ("GET", "/admin/nothing-here", None, 404, "no such admin path"),
        ("GET", "/admin/services/{p}/{r}", None, 404, "no such admin path"),
        ("POST", "/admin/faults", {}, 405, "not allowed"),
    ],
)
def test_bad_admin_input(emulator, unique_name, method, path, body, status, fragment):
    name = unique_name("bad")
    path = path.format(p=PROJECT, r=REGION, n=name)
    got_status, data = emulator.admin.request(method, path, body)
    assert got_status == status, data
    assert fragment in data["error"]["message"]
    # Nothing was created by a refused write, and the emulator still answers.
    with pytest.raises(KeyError):
        emulator.admin.get_service(PROJECT, REGION, name)
    assert emulator.admin.healthz()
