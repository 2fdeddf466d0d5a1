"""Hugging Face loading shared by the trainers: fail-fast checks of ``--model`` / ``--tokenizer``
(:func:`check_pretrained`), the causal LM and its tokenizer (:func:`load_lm`, :func:`load_tokenizer`)
and :func:`hf_quiet`, which silences transformers' progress bars for a block.

Importing this module imports no transformers (every import is inside the functions).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from .config import ConfigError

__all__ = ["HUB_CHECK_TIMEOUT", "check_pretrained", "hf_quiet", "load_lm", "load_tokenizer", "truthy_env"]


def truthy_env(name: str) -> bool:
    """An environment flag is set (1, on, yes, true; any case)."""
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


#: seconds the up-front hub lookup of a --model id may take (one request, no retries)
HUB_CHECK_TIMEOUT = 10.0


def check_pretrained(name: str, what: str = "--model", need: Optional[str] = "config.json") -> None:
    """Fail fast, before the output directory is touched, when ``name`` (a ``--model`` or ``--tokenizer``
    value) names nothing loadable; a :class:`ConfigError` naming ``what`` otherwise.

    - an existing directory must hold ``need`` (``config.json`` for a model; pass ``need=None`` to skip);
    - a name that is not a valid Hugging Face hub id (an absolute or relative path, ``a/b/c``) and does
      not exist is an error at once;
    - a hub id is looked up in the local Hugging Face cache; when it is not there and ``HF_HUB_OFFLINE``
      (or ``TRANSFORMERS_OFFLINE``) is set it is an error at once; otherwise the hub is asked about it
      once (:data:`HUB_CHECK_TIMEOUT` seconds, no retries) and a missing repository, a repository without
      ``need`` or no answer is an error naming ``what``.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        if need and not (p / need).is_file():
            raise ConfigError(f"{what}: {name!r} is a directory without {need} (not a Hugging Face model directory)")
        return
    if p.exists():
        raise ConfigError(f"{what}: {name!r} is a file; expected a model directory or a Hugging Face hub id")
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ConfigError(f"{what}: no such directory: {name!r}") from None
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{what}: no such directory: {name!r}") from None
    probe = need or "config.json"
    if isinstance(try_to_load_from_cache(name, probe), str):
        return
    if need is None:
        return  # a tokenizer id: which files it has varies; transformers reports a bad one
    if truthy_env("HF_HUB_OFFLINE") or truthy_env("TRANSFORMERS_OFFLINE"):
        raise ConfigError(f"{what}: {name!r} is not a local directory and not in the Hugging Face cache, and "
                          f"HF_HUB_OFFLINE is set (no download)")
    try:
        info = HfApi().model_info(name, timeout=HUB_CHECK_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - every failure here means: not loadable now
        text = str(e).strip().splitlines()
        raise ConfigError(f"{what}: {name!r} is not a local directory and the Hugging Face hub did not provide it "
                          f"({type(e).__name__}{': ' + text[0] if text else ''}); set HF_HUB_OFFLINE=1 to use "
                          f"only the local cache") from None
    files = {s.rfilename for s in (info.siblings or [])}
    if files and probe not in files:
        raise ConfigError(f"{what}: the hub repository {name!r} has no {probe} (not a transformers model)")


@contextlib.contextmanager
def hf_quiet():
    """No transformers progress bars ("Loading weights", "Writing model shards") inside the block."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_lm(path: str, device):
    """A causal LM from ``path`` (directory or hub id) in float32 on ``device``, without progress bars."""
    import torch
    from transformers import AutoModelForCausalLM

    with hf_quiet():
        try:
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except TypeError:  # older transformers
            lm = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return lm.to(device)


def load_tokenizer(path: str):
    """The tokenizer of ``path``, padding and truncating on the left, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.truncation_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"--tokenizer: {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
