"""The long-running operations table (google.longrunning.Operations): every write returns one;
finished ones are kept for GetOperation until the oldest are forgotten."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from typing import Any

from google.longrunning import operations_pb2
from google.rpc import status_pb2

from .. import names
from ..errors import invalid, not_found
from .records import OperationEntry, pack

MAX_OPERATIONS = 20_000  # finished operations kept for GetOperation; oldest are forgotten


class Operations:
    def __init__(self) -> None:
        self.table: OrderedDict[str, OperationEntry] = OrderedDict()

    def new(self, key: names.ServiceKey, metadata: Any) -> OperationEntry:
        name = f"projects/{key.project}/locations/{key.region}/operations/{uuid.uuid4()}"
        op = operations_pb2.Operation(name=name, done=False)
        op.metadata.CopyFrom(pack(metadata))
        entry = OperationEntry(op, asyncio.Event())
        self.table[name] = entry
        while len(self.table) > MAX_OPERATIONS:
            self.table.popitem(last=False)
        return entry

    @staticmethod
    def preview(key: names.ServiceKey, result: Any) -> operations_pb2.Operation:
        """What a validate_only write returns: a finished operation that is not stored."""
        preview = operations_pb2.Operation(
            name=f"projects/{key.project}/locations/{key.region}/operations/{uuid.uuid4()}",
            done=True,
        )
        preview.metadata.CopyFrom(pack(result))
        preview.response.CopyFrom(pack(result))
        return preview

    @staticmethod
    def finish(
        entry: OperationEntry, response: Any = None, error: tuple[int, str] | None = None
    ) -> None:
        if entry.op.done:
            return
        entry.op.done = True
        if error is not None:
            entry.op.error.CopyFrom(status_pb2.Status(code=error[0], message=error[1]))
        else:
            entry.op.response.CopyFrom(pack(response))
        entry.done.set()

    def find(self, name: str) -> OperationEntry | None:
        return self.table.get(name)

    def _lookup(self, name: str) -> OperationEntry:
        if not name:
            raise invalid("The request is missing the required field 'name'.")
        if not names.OPERATION_RE.match(name):
            raise invalid(
                f"Invalid value for field 'name': '{name}'. Expected the form "
                "'projects/{project}/locations/{location}/operations/{operation}'."
            )
        entry = self.table.get(name)
        if entry is None:
            raise not_found(f"Operation '{name}' not found.")
        return entry

    def get(self, name: str) -> operations_pb2.Operation:
        return self._lookup(name).op

    async def wait(self, name: str, wait_seconds: float | None) -> operations_pb2.Operation:
        entry = self._lookup(name)
        if not entry.op.done:
            try:
                await asyncio.wait_for(entry.done.wait(), wait_seconds or 60.0)
            except TimeoutError:
                pass
        return entry.op

    def delete(self, name: str) -> None:
        self._lookup(name)
        del self.table[name]
