"""Crash-safe files of a run directory (``pama-ext train`` and ``pama-ext dpo``).

- :func:`atomic_write_text`: a temporary file next to the target, written, fsynced and renamed into
  place, so a reader sees the old or the new content, never a part.
- :func:`fsync_tree`: every file and directory below a path reaches the disk (used on a finished
  checkpoint before it is renamed into place).
- :func:`remove_stale_temporaries`: the temporaries a killed process leaves behind
  (``.<name>.tmp-<random>`` files and ``.checkpoint.tmp-<random>`` directories) are removed when the
  next run starts in the directory.
- :func:`new_dirs` / :func:`discard_run`: a run that fails before it saved anything removes what it
  wrote, including the output directory (and its parents) when it created them, so a corrected rerun
  is not blocked.
- :func:`prepare_output_dir`: an output directory made ready for a fresh run (a run already there is
  an error unless ``--overwrite``, which removes that run's files).
- :func:`jsonl_text` / :func:`read_jsonl`: the JSON-lines files of a run (metrics, evaluations, samples).

Imports nothing heavy.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from .config import ConfigError

__all__ = ["atomic_write_text", "fsync_file", "fsync_dir", "fsync_tree", "tmp_prefix", "is_temporary",
           "remove_stale_temporaries", "new_dirs", "discard_run", "umask", "prepare_output_dir", "jsonl_text",
           "read_jsonl"]

#: names of the temporaries this package creates: ``.<name>.tmp-<mkstemp/mkdtemp suffix>``
_TMP_NAME = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tmp_prefix(name: str) -> str:
    """The prefix of the temporaries of ``name`` (``.<name>.tmp-``); :func:`is_temporary` knows them."""
    return f".{name}.tmp-"


def is_temporary(name: str) -> bool:
    return bool(_TMP_NAME.match(name))


def fsync_file(path: Union[str, Path]) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Union[str, Path]) -> None:
    """fsync every regular file below ``root``, then every directory (deepest first)."""
    for dirpath, _dirs, files in os.walk(str(root), topdown=False):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


def _tmp_in(path: Path) -> str:
    """A temporary file next to ``path`` with ordinary permissions (mkstemp makes them 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), dir=str(path.parent))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    return tmp


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(out: Union[str, Path], subdirs: Iterable[str] = ("samples",)) -> List[str]:
    """Remove the temporaries (:func:`is_temporary`) in ``out`` and its ``subdirs``; returns their names.
    Only for a directory no other process is writing to (one run per output directory)."""
    out = Path(out)
    removed = []
    for d in [out] + [out / s for s in subdirs]:
        if not d.is_dir():
            continue
        for entry in d.iterdir():
            if not is_temporary(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry.relative_to(out)))
    return removed


def new_dirs(path: Union[str, Path]) -> Optional[Path]:
    """The topmost ancestor of ``path`` (or ``path`` itself) that does not exist yet: what
    ``mkdir(parents=True)`` will create. None when ``path`` exists."""
    p = Path(path).absolute()
    top = None
    while not p.exists():
        top = p
        if p.parent == p:
            break
        p = p.parent
    return top


def discard_run(out: Union[str, Path], files: Iterable[str], dirs: Iterable[str], created: Optional[Path]) -> None:
    """Remove a failed run's ``files`` and ``dirs`` (names inside ``out``) and its temporaries; then the
    directories this run created (``created``, from :func:`new_dirs`, down to ``out``) when they are
    empty. Anything else in ``out`` stays."""
    out = Path(out)
    if not out.is_dir():
        return
    for f in files:
        (out / f).unlink(missing_ok=True)
    for d in dirs:
        if (out / d).is_dir():
            shutil.rmtree(out / d, ignore_errors=True)
    remove_stale_temporaries(out)
    if created is None:
        return
    p, stop = out.absolute(), created.absolute()
    while True:
        try:
            p.rmdir()  # only when empty
        except OSError:
            return
        if p == stop or p.parent == p:
            return
        p = p.parent


def prepare_output_dir(out: Union[str, Path], run_files: Sequence[str], run_dirs: Sequence[str], overwrite: bool,
                       markers: Optional[Sequence[str]] = None, advice: str = "pass --overwrite to replace it",
                       stale_subdirs: Iterable[str] = ("samples",)) -> Path:
    """``out``, created if needed and ready for a fresh run. It holds a run when one of ``run_files`` or
    of ``markers`` (default: ``run_dirs``) exists in it: that is a :class:`ConfigError` naming
    ``--output-dir`` (with ``advice``) unless ``overwrite``, which removes the run's files and
    directories. Stale temporaries in ``out`` and ``stale_subdirs`` are removed."""
    out = Path(out)
    found = list(run_files) + list(run_dirs if markers is None else markers)
    has_run = out.is_dir() and any((out / f).exists() for f in found)
    if has_run and not overwrite:
        raise ConfigError(f"--output-dir: {str(out)!r} already holds a run; {advice}")
    if has_run:
        for f in run_files:
            if (out / f).exists():
                (out / f).unlink()
        for d in run_dirs:
            if (out / d).exists():
                shutil.rmtree(out / d)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, subdirs=stale_subdirs)
    return out


def jsonl_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """One JSON object per line."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path: Path) -> List[Dict]:
    """The rows of a JSON-lines file up to its first unreadable line (a run killed mid-write); [] when
    there is no file."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out
