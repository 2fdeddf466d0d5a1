"""Rollout: sample responses with the policy, then score them with the policy, its value heads and
the frozen reference, all without gradients.

Prompts are left-padded (decoder-only batched generation). ``generate`` samples with temperature,
top-k and top-p; every call runs under a forked RNG seeded explicitly (``seed``), so the sample
stream of a step depends only on (run seed, step) -- this is what makes ``--resume`` exact and keeps
evaluation from disturbing training. The response mask keeps the tokens up to and including the
first EOS (all generated tokens when there is none); positions after it are padding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .policy import PolicyWithValueHeads, reference_logp

__all__ = ["GenSettings", "Rollout", "tokenize_prompts", "generate_responses", "response_mask", "collect_rollout",
           "eos_ids", "seeded"]


@dataclass
class GenSettings:
    max_new_tokens: int = 24
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Rollout:
    prompts: List[str]
    responses: List[str]
    input_ids: Tensor  # [B, P + T] prompt (left-padded) + response (pad after the first EOS)
    attention_mask: Tensor  # [B, P + T]
    mask: Tensor  # [B, T] bool response mask
    old_logp: Tensor  # [B, T] float32
    ref_logp: Tensor  # [B, T] float32
    values: Optional[Tensor]  # [n, B, T] float32

    @property
    def response_len(self) -> int:
        return self.mask.shape[1]

    def __len__(self) -> int:
        return len(self.prompts)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run the block with the global torch RNG seeded to ``seed``, restoring the outer state after."""
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def eos_ids(tokenizer, lm) -> List[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(gc_eos, int):
        ids.add(gc_eos)
    elif isinstance(gc_eos, (list, tuple)):
        ids.update(int(i) for i in gc_eos)
    return sorted(ids)


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int, device) -> Tuple[Tensor, Tensor]:
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def response_mask(resp: Tensor, eos: Iterable[int]) -> Tensor:
    """True for the tokens up to and including the first EOS of each row."""
    eos_t = torch.tensor(list(eos), dtype=resp.dtype, device=resp.device)
    is_eos = torch.isin(resp, eos_t).long() if eos_t.numel() else torch.zeros_like(resp)
    return (is_eos.cumsum(-1) - is_eos) == 0


def _generation_config(lm, tokenizer, s: GenSettings):
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=0, do_sample=s.do_sample, num_beams=1,
              pad_token_id=pad_id(tokenizer), eos_token_id=eos_ids(tokenizer, lm) or None,
              bos_token_id=tokenizer.bos_token_id)
    if s.do_sample:
        kw.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return GenerationConfig(**kw)


@torch.no_grad()
def generate_responses(lm, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, s: GenSettings, seed: int,
                       chunk_size: int = 64, bar=None, first_chunk: int = 0) -> Tuple[Tensor, Tensor]:
    """``(response_ids [B, T], response_mask [B, T] bool)``; tokens after the first EOS are padding.

    Rows are generated ``chunk_size`` at a time; chunk k (counting from ``first_chunk``, its index in
    the global batch of a sharded run) is sampled with seed ``seed + k`` from its own prompts with
    their common left padding removed, so what a chunk generates does not depend on the other rows.
    """
    gc = _generation_config(lm, tokenizer, s)
    pid = pad_id(tokenizer)
    eos = eos_ids(tokenizer, lm)
    P = prompt_ids.shape[1]
    chunks = []
    was_training = lm.training
    lm.eval()
    try:
        for k, i in enumerate(range(0, prompt_ids.shape[0], chunk_size)):
            ids, am = prompt_ids[i:i + chunk_size], prompt_mask[i:i + chunk_size]
            keep = int(P - am.any(0).long().argmax().item()) if am.any() else P  # drop all-padding columns
            with seeded((seed + first_chunk + k) & 0x7FFFFFFFFFFFFFFF, prompt_ids.device):
                out = lm.generate(input_ids=ids[:, P - keep:], attention_mask=am[:, P - keep:], generation_config=gc)
            chunks.append(out[:, keep:])
            if bar is not None:
                bar.update(min(chunk_size, prompt_ids.shape[0] - i))
    finally:
        lm.train(was_training)
    T = max(1, max(c.shape[1] for c in chunks))
    resp = torch.full((prompt_ids.shape[0], T), pid, dtype=prompt_ids.dtype, device=prompt_ids.device)
    r = 0
    for c in chunks:
        resp[r:r + c.shape[0], :c.shape[1]] = c
        r += c.shape[0]
    if min(c.shape[1] for c in chunks) == 0:  # nothing generated at all: treat as one EOS
        resp[:, 0] = eos[0] if eos else pid
    mask = response_mask(resp, eos)
    resp = resp.masked_fill(~mask, pid)
    return resp, mask


def decode(tokenizer, resp: Tensor, mask: Tensor) -> List[str]:
    ids = resp.masked_fill(~mask, pad_id(tokenizer))
    return [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]


@torch.no_grad()
def score_sequences(policy: PolicyWithValueHeads, ref_lm, input_ids: Tensor, attention_mask: Tensor, T: int,
                    temperature: float, chunk_size: int, with_values: bool = True):
    """(old_logp, ref_logp, values) for a batch of full sequences, in chunks, without gradients."""
    old, ref, vals = [], [], []
    for i in range(0, input_ids.shape[0], chunk_size):
        ids, am = input_ids[i:i + chunk_size], attention_mask[i:i + chunk_size]
        out = policy(ids, am, T, temperature=temperature, with_values=with_values)
        old.append(out.logp)
        if with_values:
            vals.append(out.values)
        ref.append(reference_logp(ref_lm, ids, am, T, temperature, fused_linear=policy.fused_linear))
    return torch.cat(old), torch.cat(ref), (torch.cat(vals, dim=1) if with_values else None)


def collect_rollout(policy: PolicyWithValueHeads, ref_lm, tokenizer, prompts: Sequence[str], s: GenSettings,
                    seed: int, max_prompt_tokens: int, chunk_size: int, bar=None,
                    with_values: bool = True, gen_chunk: int = 64, first_chunk: int = 0) -> Rollout:
    """Generate, decode and score one batch. ``chunk_size``: rows per scoring forward;
    ``gen_chunk``/``first_chunk``: see :func:`generate_responses`."""
    device = next(policy.parameters()).device
    p_ids, p_mask = tokenize_prompts(tokenizer, prompts, max_prompt_tokens, device)
    resp, mask = generate_responses(policy.lm, tokenizer, p_ids, p_mask, s, seed, chunk_size=gen_chunk, bar=bar,
                                    first_chunk=first_chunk)
    input_ids = torch.cat([p_ids, resp], dim=1)
    attention_mask = torch.cat([p_mask, mask.to(p_mask.dtype)], dim=1)
    T = resp.shape[1]
    temp = s.temperature if s.do_sample else 1.0
    old_logp, ref_logp, values = score_sequences(policy, ref_lm, input_ids, attention_mask, T, temp, chunk_size,
                                                 with_values=with_values)
    return Rollout(prompts=list(prompts), responses=decode(tokenizer, resp, mask), input_ids=input_ids,
                   attention_mask=attention_mask, mask=mask, old_logp=old_logp, ref_logp=ref_logp, values=values)
