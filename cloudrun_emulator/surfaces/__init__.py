"""Surfaces: the wire protocols the emulator speaks, each a thin adapter over the store.

An adapter parses a request, calls one part of `Store` (or a view in `cloudrun_emulator.views`),
renders the answer and turns `ApiError` into its protocol's error. Cloud Run semantics live in
the store, never here. Each module has a `start_*(store, controls, host, port)` that
`server.serve` awaits; a new surface (e.g. REST) is one more module of that shape.

- `grpc`: Cloud Run Admin v2, IAM admin v1 and long-running operations over gRPC; applies
  the faults, quota and call counters of `Controls`.
- `admin_http`: the JSON admin API for tests, the demo and the bench; no faults apply.
"""
