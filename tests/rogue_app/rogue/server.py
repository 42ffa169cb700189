"""The rogue app's ServerApp: sends every node one message and writes what the rogue ClientApps report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["num-nodes"])
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1)
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({"go": 1})}), message_type="train", dst_node_id=node)
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages, timeout=float(context.run_config["timeout"]))
    reports = []
    for reply in replies:
        if reply.has_error():
            reports.append({"error": reply.error.reason})
        else:
            reports.append(json.loads(str(reply.content["report"]["json"])))
    Path(str(context.run_config["report"])).write_text(json.dumps(reports, indent=1))
