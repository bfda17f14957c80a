"""The audit flags and their environment variables (CONTRACT §2)."""

from __future__ import annotations

import pytest

from controller.settings import Settings

SUB = "projects/host-project/subscriptions/runwarden-audit"


def test_defaults_are_polling_only() -> None:
    s = Settings.from_cli([], {})
    assert s.audit_subscription is None
    assert s.own_principal is None
    assert (s.audit_debounce, s.fight_threshold, s.fight_window) == (1.0, 5, 600.0)


def test_flags() -> None:
    s = Settings.from_cli(
        [
            "--audit-subscription", SUB,
            "--own-principal", "rw@p.iam.gserviceaccount.com",
            "--audit-debounce", "0.5",
            "--fight-threshold", "0",
            "--fight-window", "60",
        ],
        {},
    )  # fmt: skip
    assert s.audit_subscription == SUB
    assert s.own_principal == "rw@p.iam.gserviceaccount.com"
    assert (s.audit_debounce, s.fight_threshold, s.fight_window) == (0.5, 0, 60.0)


def test_environment_and_flags_win() -> None:
    env = {
        "RUNWARDEN_AUDIT_SUBSCRIPTION": SUB,
        "RUNWARDEN_OWN_PRINCIPAL": "rw@example.com",
        "RUNWARDEN_FIGHT_THRESHOLD": "7",
        "RUNWARDEN_FIGHT_WINDOW_SECONDS": "120",
    }
    s = Settings.from_cli([], env)
    assert (s.audit_subscription, s.own_principal) == (SUB, "rw@example.com")
    assert (s.fight_threshold, s.fight_window) == (7, 120.0)
    s = Settings.from_cli(["--fight-threshold", "2"], env)
    assert s.fight_threshold == 2


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--audit-subscription", "runwarden-audit"], {}),
        (["--audit-subscription", "projects/p/topics/t"], {}),
        ([], {"RUNWARDEN_AUDIT_SUBSCRIPTION": "projects/p/subscriptions/"}),
        (["--fight-threshold", "-1"], {}),
        ([], {"RUNWARDEN_FIGHT_THRESHOLD": "many"}),
        (["--fight-window", "0"], {}),
        (["--audit-debounce", "-1"], {}),
    ],
)
def test_bad_values_exit_with_usage(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as exc:
        Settings.from_cli(argv, env)
    assert exc.value.code == 2
