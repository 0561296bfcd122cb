#!/usr/bin/env python3
"""Container health check: exit 0 when the server is ready to serve, 1 when not.

Asks ``/ready`` first; a server without that route (404) is asked ``/health`` instead. Either must
answer 200: both say 503 while the model loads or after it failed. Standard library only, so it runs
with the image's Python and nothing else. ``HEALTHCHECK_URL`` overrides the base URL
(default ``http://127.0.0.1:$CSM_PORT``).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def status_of(url: str) -> int | None:
    """The HTTP status of GET ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def main() -> int:
    base = os.environ.get("HEALTHCHECK_URL") or f"http://127.0.0.1:{os.environ.get('CSM_PORT') or 8000}"
    base = base.rstrip("/")
    status = status_of(base + "/ready")
    where = "/ready"
    if status in (404, 405):
        status = status_of(base + "/health")
        where = "/health"
    if status == 200:
        return 0
    print(f"unhealthy: {base}{where} answered {status or 'nothing'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
