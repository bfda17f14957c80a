"""Cloud Run Admin API v2 + IAM emulator that the unmodified Google client libraries talk to.

Run it with `cloudrun-emulator --port P --admin-port A`; drive it from tests with
`cloudrun_emulator.testing.EmulatorProcess` and `cloudrun_emulator.admin.AdminClient`.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
