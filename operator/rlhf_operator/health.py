"""The operator's probe endpoints, served by the replica whether it leads or stands by.

- `/healthz` (liveness): 200 while the process's event loop answers and the replica has not
  lost its leadership (a leader that lost the Lease is on its way out: the process exits and
  Kubernetes restarts it as a standby). A standby is live: restarting it would not help.
- `/readyz` (readiness): 200 once the replica reached the API server (it read the Lease, or it
  runs without leader election), leader or standby alike. Readiness is not leadership: a
  Deployment rolls (helm upgrade) only onto ready pods, and a new pod can only ever become
  the standby first; nothing sends traffic to the operator's pods. Who leads is in the body
  (`{"leader": true}`), in the Lease's holderIdentity and in the `rlhf_operator_leader` gauge.

kopf's own liveness endpoint only exists while kopf runs, i.e. on the leader; this one covers
both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp.web


@dataclass
class Health:
    """What the probes report; the runner in __main__ keeps it current."""

    ready: Callable[[], bool] = lambda: True
    leader: Callable[[], bool] = lambda: True
    lost: bool = False
    identity: str = ""

    def body(self) -> str:
        return json.dumps({"leader": self.leader(), "identity": self.identity, "lost": self.lost})


async def serve(health: Health, url: str) -> aiohttp.web.AppRunner:
    """Start serving /healthz and /readyz on the host and port of `url`."""
    parsed = urlparse(url)

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        status = 500 if health.lost else 200
        return aiohttp.web.Response(
            status=status, text=health.body(), content_type="application/json"
        )

    async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        status = 200 if health.ready() and not health.lost else 503
        return aiohttp.web.Response(
            status=status, text=health.body(), content_type="application/json"
        )

    app = aiohttp.web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, parsed.hostname or "0.0.0.0", parsed.port or 8080).start()
    return runner
