"""`metrics.jsonl`: one JSON object per record, appended and flushed as it comes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlSink:
    def __init__(self, path: Path):
        self.file = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
