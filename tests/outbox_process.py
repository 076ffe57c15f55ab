"""A `wlbridge serve` whose worklist changes come from standard input, for the kill -9 tests.

`python -m tests.outbox_process CONFIG` starts a BridgeServer with the config and prints `ready`.
Each input line `ACCESSION STATUS` publishes a StatusChange (cause mpps) for a stored-like item of
that accession on the reactor thread, as the worklist writer does, and prints `queued ACCESSION
STATUS` once the publication returned (the outbox has then written its messages durably).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

from bridge.app.server import BridgeServer
from bridge.app.settings_checks import load_settings
from bridge.core.events import StatusChange
from tests.hl7.test_status_message import stored_item


def main() -> None:
    settings = load_settings(Path(sys.argv[1]))
    server = BridgeServer(settings)
    server.start()

    def read_commands() -> None:
        for line in sys.stdin:
            accession, status = line.split()
            item = stored_item(
                accession=accession, placer=f"P-{accession}", filler=f"F-{accession}"
            )
            event = StatusChange(item=item, old_status="SCHEDULED", new_status=status,
                                 cause="mpps", performed_start="20261201103000")  # fmt: skip
            blockingCallFromThread(reactor, server.events.publish, event)
            print(f"queued {accession} {status}", flush=True)

    threading.Thread(target=read_commands, daemon=True).start()
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()
