"""structlog setup: JSON in a cluster, console on a terminal; kopf's stdlib logs through the same
formatter, carrying their ``k8s_ref`` (the object) and nothing else of kopf's extras — in
particular not the operator settings kopf attaches to every record.

Only names are ever logged (variables, members, fields), never env values: the reconcile's
vocabulary carries values only inside EnvValue, which no log call receives.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

# kopf's per-object INFO messages ("Timer ... succeeded", "Handler ... succeeded") repeat on every
# check; Runwarden logs its own story, so only their warnings and errors come through.
_QUIET_LOGGERS = {"kopf.objects": logging.WARNING, "kopf.activities.probe": logging.WARNING}


def _k8s_ref(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Lift kopf's ``record.k8s_ref`` (the object a message is about) into the event."""
    record = event.get("_record")
    ref = getattr(record, "k8s_ref", None) if record is not None else None
    if isinstance(ref, dict) and "k8s_ref" not in event:
        event["k8s_ref"] = {k: ref[k] for k in ("namespace", "name", "uid") if ref.get(k)}
    return event


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route structlog and stdlib logging (kopf's included) through one formatter."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from stdlib loggers (kopf, asyncio, grpc): only the message and k8s_ref, not
        # kopf's ``settings`` extra or any other attribute.
        foreign_pre_chain=[*shared, _k8s_ref],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, quiet_level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(level, quiet_level))


def get(name: str = "runwarden", **context: Any) -> structlog.stdlib.BoundLogger:
    """A structured logger, optionally bound to context (e.g. k8s_ref=...)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger.bind(**context) if context else logger
