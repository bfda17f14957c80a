"""Root conftest: the shared fixtures live in tests/fixtures/, one module per component."""

pytest_plugins = [
    "tests.fixtures.k8s",
    "tests.fixtures.emulator",
    "tests.fixtures.controller",
]
