"""An append-only JSONL cache: one line per computed text, never rewritten.

Each record is written with a single `write` of one complete line in append mode and
flushed to disk, so a crash can at worst leave one truncated last line, which reading
skips (and the next append starts on a fresh line). Keys are strings chosen by the
caller (e.g. dataset image id + prompt + model hash).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from sasi_online.errors import UserInputError


class JsonlCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._values: dict[str, str] = {}
        self._needs_newline = False
        if self.path.exists():
            if not self.path.is_file():
                raise UserInputError(f"cache path '{self.path}' is not a file: give a file path")
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                self._values[str(rec["key"])] = str(rec["value"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: computed again on demand

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._values)

    def get(self, key: str) -> Optional[str]:
        return self._values.get(key)

    def put(self, key: str, value: str, **extra) -> None:
        line = json.dumps({"key": key, "value": value, **extra}, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._needs_newline = False
        self._values[key] = value
