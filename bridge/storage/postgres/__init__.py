"""PostgreSQL as the bridge's storage, for two or more bridges sharing one worklist.

- `schema`: the tables, created and migrated by the bridge (`wlbridge db upgrade`).
- `worklist`: the worklist items (Part 10 bytes plus look-up columns) and the change stream
  (LISTEN/NOTIFY, with a catch-up read after a reconnect).
- `outbox`, `memory`, `mpps`: the outbox with leased claims, the retry memory of recent control
  IDs and the kept rejected messages, the MPPS instances.
- `transfer`: `wlbridge export` (to a folder of .wl files) and `wlbridge import` (from one).

Every call that cannot reach the database raises `StoreUnavailable` (a `StoreError`, so the
pipeline answers AR, never AA); the next call connects again by itself.
"""

from bridge.storage.postgres.connection import Database, StoreUnavailable, is_postgres_url

__all__ = ["Database", "StoreUnavailable", "is_postgres_url"]
