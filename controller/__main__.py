"""`python -m controller` / `runwarden`: CLI -> settings -> kopf; `runwarden export ...` exports."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from controller.obs import logs
from controller.settings import Settings


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["export"]:
        from controller import export  # the controller process never loads it

        sys.exit(export.main(args[1:]))
    settings = Settings.from_cli(args)
    logs.configure(settings.log_format)
    from controller.operator import handlers  # registers the kopf handlers; after logging is set up

    handlers.run(settings)


if __name__ == "__main__":
    main()
