"""Checkpoints of ``pama-ext train`` and ``pama-ext dpo``: written crash-safely, verified before use, loaded without
unpickling code.

A checkpoint directory holds ``save_pretrained`` of the policy LM and the tokenizer,
``value_heads.pt``, ``trainer_state.pt`` and ``checkpoint.json``. ``checkpoint.json`` is written last
and lists every other file with its size and SHA-256 (the *manifest*).

Safety:

- ``trainer_state.pt`` and ``value_heads.pt`` hold tensors and plain Python values only (the numpy
  and Python RNG states are stored as tensors and numbers) and are read with
  ``torch.load(..., weights_only=True)``: a file holding any other object is refused
  (:class:`CheckpointRefused`) and nothing in it runs.
- A save writes the checkpoint under ``.checkpoint.tmp-<random>``, fsyncs its files and directory,
  then moves ``checkpoint/`` to ``checkpoint.prev/`` and the new one to ``checkpoint/``: the last two
  checkpoints are kept. A kill at any point leaves at least one complete checkpoint.
- ``--resume`` verifies ``checkpoint/`` against its manifest (:func:`verify_checkpoint`); when a file
  is missing, truncated or corrupt it says which and resumes from ``checkpoint.prev/`` (moving the bad
  one to ``checkpoint.corrupt/``), or fails with that one message when there is no good earlier one.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .files import fsync_dir, fsync_tree, tmp_prefix, umask

__all__ = ["save_policy_checkpoint", "CHECKPOINT", "PREVIOUS", "CORRUPT", "MANIFEST", "STATE_FORMAT", "CheckpointError", "CheckpointRefused",
           "rng_states", "set_rng_states", "write_checkpoint", "verify_checkpoint", "select_checkpoint",
           "read_tensor_file"]

CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint.prev"
CORRUPT = "checkpoint.corrupt"
MANIFEST = "checkpoint.json"
#: 2: plain-type RNG states and a manifest (format 1 pickled numpy arrays and needed unsafe unpickling)
STATE_FORMAT = 2
REQUIRED = ("trainer_state.pt", "value_heads.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointRefused(CheckpointError):
    """A checkpoint file holding objects other than tensors and plain values (never loaded)."""


# -------------------------------------------------------------------------------------------------
# RNG states as tensors and plain values
# -------------------------------------------------------------------------------------------------
def rng_states() -> Dict[str, Any]:
    """The torch, numpy, Python (and CUDA) global RNG states as tensors and plain values."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    s = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s: Dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -------------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_files(root: Path) -> Dict[str, Dict[str, Any]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    return out


def write_checkpoint(out: Path, write: Callable[[Path], Dict[str, Any]]) -> Path:
    """Write a checkpoint into ``out/checkpoint`` crash-safely: ``write(tmp_dir)`` fills a temporary
    directory and returns the facts for ``checkpoint.json``; the manifest is added, every file fsynced,
    then ``checkpoint/`` becomes ``checkpoint.prev/`` and the new one ``checkpoint/``."""
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(CHECKPOINT), dir=str(out)))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        info = dict(write(tmp))
        info["format"] = STATE_FORMAT
        info["files"] = _manifest_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        fsync_tree(tmp)
        ck, prev = out / CHECKPOINT, out / PREVIOUS
        if ck.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.rename(ck, prev)
        os.rename(tmp, ck)
        fsync_dir(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ck


def save_policy_checkpoint(out: Path, policy, tokenizer, trainer_state: Dict[str, Any], manifest: Dict[str, Any],
                           lm: Any = None) -> bool:
    """The checkpoint of both trainers (:func:`write_checkpoint`): the language model (``lm``, default
    ``policy.lm``) and tokenizer as Hugging Face files, ``value_heads.pt``, and ``trainer_state.pt`` =
    ``trainer_state`` with the format and the RNG states (tensors and plain values only, so it loads with
    ``weights_only=True``); ``manifest`` goes into ``checkpoint.json``. Refuses (returns False, with a
    warning) when a parameter of the policy is not finite."""
    import warnings

    import torch

    from .hf import hf_quiet

    for name, p in policy.named_parameters():
        if not bool(torch.isfinite(p).all()):
            warnings.warn(f"checkpoint NOT saved: parameter {name} is not finite", RuntimeWarning)
            return False

    def write(tmp: Path) -> Dict[str, Any]:
        with hf_quiet():
            (policy.lm if lm is None else lm).save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        torch.save(policy.value_heads.state_dict(), tmp / "value_heads.pt")
        torch.save({"format": STATE_FORMAT, "rng": rng_states(), **trainer_state}, tmp / "trainer_state.pt")
        return {"value_heads": policy.n_heads, "value_heads_file": "value_heads.pt", **manifest}

    write_checkpoint(out, write)
    return True


# -------------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------------
def verify_checkpoint(ck: Union[str, Path]) -> Dict[str, Any]:
    """``checkpoint.json`` of ``ck`` after checking every file it lists (present, same size, same
    SHA-256); a :class:`CheckpointError` naming the first bad file otherwise."""
    ck = Path(ck)
    man = ck / MANIFEST
    if not man.is_file():
        raise CheckpointError(f"{man}: missing (an incomplete checkpoint)")
    try:
        info = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{man}: cannot be read ({type(e).__name__}: {e}); truncated or corrupt") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{man}: expected a JSON object; truncated or corrupt")
    files = info.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{man}: written by an older pama_ext (checkpoint format {info.get('format', 1)}, "
                              f"this version reads format {STATE_FORMAT}); it cannot be resumed safely: start "
                              f"afresh with --overwrite")
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(f"{man}: does not list {name}; not a pama_ext checkpoint or a corrupt one")
    for rel, meta in files.items():
        p = ck / rel
        if os.path.isabs(rel) or ".." in Path(rel).parts or not isinstance(meta, dict):
            raise CheckpointError(f"{man}: bad file entry {rel!r}; corrupt or tampered with")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (an incomplete checkpoint)")
        size = p.stat().st_size
        if size != meta.get("bytes"):
            raise CheckpointError(f"{p}: truncated or corrupt ({size} bytes; the checkpoint recorded "
                                  f"{meta.get('bytes')})")
        if _sha256(p) != meta.get("sha256"):
            raise CheckpointError(f"{p}: corrupt (its SHA-256 differs from the one recorded in {MANIFEST})")
    return info


def read_tensor_file(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error naming the file: refused when it
    holds any object other than tensors and plain values (nothing in it runs), else truncated/corrupt."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+?)(?: was|$|\s)", str(e))
        if m:
            raise CheckpointRefused(f"{path}: refused to load: it holds a reference to {m.group(1)}; pama_ext "
                                    f"checkpoints hold only tensors and plain values (a file from elsewhere or "
                                    f"tampered with)") from None
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)}); truncated or corrupt") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)}); truncated or corrupt") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def select_checkpoint(out: Union[str, Path], log: Callable[[str], None]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint ``--resume`` continues from: ``out/checkpoint`` when it verifies, else
    ``out/checkpoint.prev`` (renamed to ``checkpoint``; the bad one is kept as ``checkpoint.corrupt``),
    reported through ``log``. None when there is no checkpoint at all; a :class:`CheckpointError`
    naming the bad file when none is usable."""
    out = Path(out)
    ck, prev = out / CHECKPOINT, out / PREVIOUS
    problems: List[str] = []
    for cand in (ck, prev):
        if not cand.is_dir():
            continue
        try:
            info = verify_checkpoint(cand)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if cand == prev:
            if ck.exists():
                bad = out / CORRUPT
                if bad.exists():
                    shutil.rmtree(bad)
                os.rename(ck, bad)
            os.rename(prev, ck)
            fsync_dir(out)
            why = problems[0] if problems else f"{ck}: missing (a save was interrupted)"
            log(f"{why}; resuming from the previous checkpoint (step {info.get('step')})"
                + (f"; the unusable one is kept in {out / CORRUPT}" if problems else ""))
        return ck, info
    if problems:
        raise CheckpointError(problems[0] + ("; the previous checkpoint is unusable too: " + problems[1]
                                             if len(problems) > 1 else "; there is no earlier checkpoint"))
    return None
