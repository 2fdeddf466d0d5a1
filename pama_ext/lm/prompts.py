"""Prompt files (``--train-prompts``, ``--eval-prompts``): .txt (one prompt per non-blank line), a .json
list (or ``{"prompts": [...]}``) or .jsonl with a ``prompt`` field per line. Imports nothing heavy."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from .config import ConfigError

__all__ = ["load_prompts"]


def load_prompts(path: str, what: str = "--train-prompts") -> List[str]:
    """Prompts from a .txt file (one per non-blank line), a .json list (or {"prompts": [...]}) or a .jsonl
    file with a "prompt" field per line. UTF-8; lines end at ``\n`` only (U+2028 / U+2029 / U+0085 are
    text). A file that cannot be read is a :class:`ConfigError` naming ``what``, the file and the line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path!r}: {e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for i, bline in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(bline.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what}: {path}:{i}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column "
                              f"{e.start + 1})") from None
    if p.suffix == ".json":
        try:
            data = json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what}: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            data = data.get("prompts", data.get("train", []))
        if not isinstance(data, list):
            raise ConfigError(f"{what}: {path}: expected a JSON list of prompts (or {{\"prompts\": [...]}})")
        return [str(x) for x in data]
    if p.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, start=1):
            if not line.strip(" \t"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what}: {path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise ConfigError(f"{what}: {path}:{i}: expected an object with a 'prompt' field")
            out.append(str(row["prompt"]))
        return out
    return [l for l in lines if l.strip()]
