"""A PostgreSQL bridge's rejected folder kept in step with the shared table of kept messages.

Every refused message is kept twice: in the refusing bridge's folder and in the shared table
(`rejected_messages`). A replay is done on one of them; this makes the other follow, so the
folder does not show as pending what the table replayed (a second `wlbridge replay
rejected/*.hl7` would send it again), nor the table what a file replay sent:

- a row replayed and accepted (the HTTP API, the web view, `wlbridge replay --store`, on any
  bridge) is recorded in `replayed_messages` by its copy key (control ID and digest prefix, the
  end of the folder names): each bridge moves its own copies with that key, kept before the
  replay, to `replayed/` (never a copy whose message was not accepted: only replays recorded
  as accepted are followed, and a later refusal of the same message is a newer copy);
- a copy replayed from the folder (`wlbridge replay FILE`, moved to `replayed/` once accepted,
  its modified time the replay's) finishes the row of the same key kept before then.

Each bridge does this for its own folder every RECONCILE_INTERVAL seconds (bridge.app.server):
the database work in a worker thread, the moves on the reactor thread (the pipeline's).
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from bridge.hl7.pipeline import move_replayed
from bridge.storage.postgres.memory import RejectedMessages, copy_of

log = logging.getLogger("bridge.ops.rejected_copies")

RECONCILE_INTERVAL = 5.0  # seconds between two passes over the folder


class RejectedCopies:
    """The folder copies of one bridge against the shared table."""

    def __init__(self, folder: Path, shared: RejectedMessages) -> None:
        self.folder = folder
        self.shared = shared
        self._finished: set[str] = set()  # replayed/ names already matched against the table

    def find(self) -> list[Path]:
        """Finish the rows of copies replayed from the folder, and return the copies whose
        rows were replayed from the table (to move). Reads files and the database: run it in
        a worker thread. StoreError when the database cannot say."""
        self._finish_file_replays()
        pending: dict[str, list[tuple[datetime, Path]]] = {}
        for path in _copies(self.folder):
            kept, key = copy_of(path.name) or (None, "")
            if kept is not None:
                pending.setdefault(key, []).append((kept, path))
        if not pending:
            return []
        replayed = self.shared.replayed(sorted(pending))
        return [
            path
            for key, at in replayed.items()
            for kept, path in pending[key]
            if kept < at  # kept before the replay: a refusal since is a message of its own
        ]

    def move(self, paths: list[Path]) -> list[str]:
        """Move the copies `find` returned (on the reactor thread); the names moved."""
        moved = []
        for path in paths:
            try:
                move_replayed(path)
            except FileNotFoundError:
                continue  # replayed from the folder meanwhile
            except OSError as exc:
                log.error("cannot move the replayed copy %s: %s", path.name, exc)
                continue
            self._finished.add(path.name)  # replayed already: nothing to finish
            log.info("%s: replayed from the shared table, moved to replayed/", path.name)
            moved.append(path.name)
        return moved

    def _finish_file_replays(self) -> None:
        done = self.folder / "replayed"
        new = [p for p in _copies(done) if p.name not in self._finished]
        copies = []
        for path in new:
            named = copy_of(path.name)
            if named is None:
                continue
            try:
                replayed_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            except OSError:
                continue
            copies.append((named[1], replayed_at))
        for key in self.shared.finish_copies(copies):
            log.info("%s: replayed from the folder, finished in the shared table", key)
        self._finished.update(p.name for p in new)


def _copies(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.name.endswith(".hl7") and e.is_file()]
    except OSError:  # not made yet (nothing refused), or unreadable: nothing to do now
        return []
