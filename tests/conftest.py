"""Root conftest: the shared fixtures live in tests/fixtures/, one module per component."""

from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.k8s",
    "tests.fixtures.emulator",
    "tests.fixtures.controller",
    "tests.fixtures.orch",
    "tests.fixtures.gcloud",
]

# No per-example deadline: it is a timing assertion, and this machine's load (2 cores, the
# control plane and emulators of other tests) made it fail on examples that were correct.
settings.register_profile("runwarden", deadline=None)
settings.load_profile("runwarden")
