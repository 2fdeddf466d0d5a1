"""docs/dpo.md shows one example row per published schema, each followed by the command that reads it: every
example row is read by its schema's reader (the row, or for the per-response schemas the row and a second
response to pair it with), with the objectives the command names. Keeps the docs' schemas true to the code."""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

from pama_ext.dpo.readers import SCHEMAS, load_schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "dpo.md"


def _examples():
    """(schema, example row, objectives of the command) for each ```json block followed by a ```bash block."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"```json\n([^`]*?)\n```\n```bash\n([^`]*?)\n```", text, flags=re.S):
        cmd = m.group(2).replace("\\\n", " ")
        line = next((x for x in cmd.splitlines() if x.strip().startswith("pama-ext dpo")), None)
        if line is None:
            continue
        args = shlex.split(line.split("#")[0])
        data = args[args.index("--data") + 1]
        objectives = []
        if "--objectives" in args:
            for a in args[args.index("--objectives") + 1:]:
                if a.startswith("--"):
                    break
                objectives.append(a)
        out.append((data.partition(":")[0], json.loads(m.group(1)), objectives or None))
    return out


def test_every_schema_has_an_example():
    assert sorted({s for s, _, _ in _examples()}) == sorted(SCHEMAS)


@pytest.mark.parametrize("schema, row, objectives", _examples(), ids=lambda x: x if isinstance(x, str) else "")
def test_the_example_row_reads(tmp_path, schema, row, objectives):
    rows = [row]
    if schema == "scores":  # one response per row: a second response of the same prompt makes the pair
        other = copy.deepcopy(row)
        other["response"] = row["response"] + " More."
        for o in objectives:
            other[o] = row[o] + 1
        rows.append(other)
    path = tmp_path / "example.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"hh:helpful={path}" if schema == "hh" else f"{schema}:{path}"
    data = load_schema(spec, objectives)
    assert len(data) >= 1
    if objectives:
        assert list(data.objectives) == objectives
