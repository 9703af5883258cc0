"""Print how long each container of a pod ran, from `kubectl get pod -o json` on stdin."""

import datetime as dt
import json
import sys


def main() -> None:
    pod = json.load(sys.stdin)
    status = pod["status"]
    for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        term = c["state"].get("terminated")
        if term:
            start, end = (dt.datetime.fromisoformat(term[k].replace("Z", "+00:00")) for k in ("startedAt", "finishedAt"))
            print(f"  {pod['metadata']['name']}, container {c['name']}: {int((end - start).total_seconds())} s"
                  f" (exit {term.get('exitCode')})")


if __name__ == "__main__":
    main()
