"""`python -m controller` / `runwarden`: CLI -> settings -> kopf."""

from __future__ import annotations

from collections.abc import Sequence

from controller.obs import logs
from controller.settings import Settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_cli(argv)
    logs.configure(settings.log_format)
    from controller.operator import handlers  # registers the kopf handlers; after logging is set up

    handlers.run(settings)


if __name__ == "__main__":
    main()
