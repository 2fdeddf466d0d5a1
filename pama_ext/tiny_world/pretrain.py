"""The tiny world's model: a tiny ``GPT2LMHeadModel`` (1.1M parameters: 4 layers, width 144, 96
positions) pretrained on the corpus on CPU for a bounded wall time (default 120 s) or a fixed number of
steps, so that it continues a prompt such as "This movie" with plausible review text. Half of the
training sequences use shifted position ids, so the model is also robust to a left-padded forward pass
that does not pass ``position_ids`` (``generate`` passes them; a trainer's own forward should too)."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["TinyWorldConfig", "make_model", "encode_corpus", "held_out_loss", "pretrain_model", "generate_text"]


@dataclass
class TinyWorldConfig:
    """Everything that determines a tiny world (besides the wall-time budget)."""
    seed: int = 0
    n_reviews: int = 40_000
    n_eval_reviews: int = 500
    n_train_prompts: int = 400
    n_eval_prompts: int = 80
    n_positions: int = 96
    n_embd: int = 144
    n_layer: int = 4
    n_head: int = 4
    activation: str = "gelu"  # exact GELU: one kernel (GPT-2's tanh approximation costs several)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_clip: float = 1.0
    shifted_position_frac: float = 0.5
    n_build_samples: int = 5  # sample generations stored in world.json
    threads: Optional[int] = None  # None: all available cores (timed builds may switch to 1 if faster)


def make_model(cfg: TinyWorldConfig, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    conf = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function=cfg.activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = GPT2LMHeadModel(conf)
    model.loss_type = "ForCausalLM"  # the class name does not say so; avoids a warning from transformers
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return model


def encode_corpus(tokenizer, texts: Sequence[str], max_len: int) -> List[List[int]]:
    eos = tokenizer.eos_token_id
    seqs = [ids + [eos] for ids in tokenizer(list(texts), padding=False, truncation=False)["input_ids"]]
    too_long = sum(len(s) > max_len for s in seqs)
    if too_long:
        warnings.warn(f"tiny_world: {too_long} reviews longer than {max_len} tokens were dropped")
    return [s for s in seqs if len(s) <= max_len]


def _batches(seqs: List[List[int]], batch_size: int, g: torch.Generator) -> List[List[int]]:
    """Index batches of similar-length sequences (little padding), in random order."""
    perm = torch.randperm(len(seqs), generator=g).tolist()
    chunk = batch_size * 32
    out = []
    for i in range(0, len(perm), chunk):
        part = sorted(perm[i:i + chunk], key=lambda j: len(seqs[j]))
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in order if len(out[i]) == batch_size or len(out) == 1]


def _collate(seqs, idx, pad_id: int, n_positions: int, shift_frac: float, g: Optional[torch.Generator]):
    L = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), L), dtype=torch.long)
    for r, i in enumerate(idx):
        s = seqs[i]
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    pos = torch.arange(L).expand(len(idx), L).clone()
    if g is not None and shift_frac > 0 and n_positions > L:
        # Robustness to left padding without position_ids: some rows start at a random offset.
        shift = torch.randint(0, n_positions - L + 1, (len(idx), 1), generator=g)
        use = torch.rand((len(idx), 1), generator=g) < shift_frac
        pos = pos + shift * use
    return ids, mask, labels, pos


def _lr_at(step: int, progress: float, warmup: int, cfg: TinyWorldConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` x lr as
    ``progress`` (fraction of the steps, or of the time budget, used so far) goes 0 -> 1."""
    w = min(1.0, (step + 1) / max(1, warmup))
    t = min(1.0, max(0.0, progress))
    return cfg.lr * w * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def held_out_loss(model, seqs, pad_id: int, batch_size: int = 128) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        idx = list(range(i, min(i + batch_size, len(seqs))))
        ids, mask, labels, pos = _collate(seqs, idx, pad_id, 0, 0.0, None)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        tgt = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")
        tot += loss.item()
        n += int((tgt != -100).sum())
    model.train()
    return tot / max(1, n)


def pretrain_model(model, seqs: List[List[int]], pad_id: int, cfg: TinyWorldConfig, seconds: float,
           steps: Optional[int], progress: bool, threads: int = 1,
           adaptive: bool = True) -> Dict[str, Any]:
    """Pretrain ``model`` on ``seqs``: ``steps`` optimizer steps with ``threads`` threads (reproducible),
    or, when ``steps`` is None, for ``seconds`` of wall time with the LR schedule driven by the fraction
    of the budget used, so that it always completes. In the timed mode the thread count is chosen by
    measurement when ``adaptive``: every 100 steps a few steps run with the other setting (``threads``
    or 1; on a busy machine one thread can be several times faster than two) and the faster one is
    kept."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    g = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused CPU AdamW in this torch
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    timed = steps is None
    warmup = cfg.warmup_steps if timed else max(1, min(cfg.warmup_steps, steps // 5))
    current = threads
    per_token: Dict[int, List[float]] = {threads: [], 1: []}  # recent seconds per token
    probe_left = 0
    bar = tqdm(total=steps if not timed else None, disable=not progress, desc="tiny world: pretraining",
               unit="step", dynamic_ncols=True, leave=True)
    t0 = time.perf_counter()
    recent: List[float] = []
    ema, step, tokens, epoch, lv = None, 0, 0, 0, float("nan")
    batches: List[List[int]] = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "pass an attention_mask": not needed here (see below)
    try:
        while True:
            elapsed = time.perf_counter() - t0
            frac = elapsed / seconds if timed else step / steps
            if (timed and elapsed >= seconds and step > 0) or (not timed and step >= steps):
                break
            use = current
            if timed and adaptive and threads > 1:
                if step > 0 and step % 100 == 1:  # probe the other setting for 4 steps
                    probe_left = 4
                if probe_left > 0:
                    use = 1 if current == threads else threads
                    probe_left -= 1
            torch.set_num_threads(use)
            ts = time.perf_counter()
            if not batches:
                batches = _batches(seqs, cfg.batch_size, g)
                epoch += 1
            idx = batches.pop()
            ids, mask, labels, pos = _collate(seqs, idx, pad_id, cfg.n_positions,
                                              cfg.shifted_position_frac, g)
            lr = _lr_at(step, frac, warmup, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            # Right padding + causal attention: real tokens never see the pads, so no mask is needed
            # (and the attention takes its fast causal path); the pads' labels are -100.
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"tiny world pretraining: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            lv = loss.item()
            n_tok = int(mask.sum())
            if step > 0:  # step 0 pays one-off costs
                per_token[use] = (per_token[use] + [(time.perf_counter() - ts) / n_tok])[-8:]
            if timed and adaptive and threads > 1 and probe_left == 0 and per_token[1] and per_token[threads]:
                med = {k: sorted(v)[len(v) // 2] for k, v in per_token.items()}
                current = min(med, key=med.get)
            step += 1
            tokens += n_tok
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            recent = (recent + [lv])[-20:]
            if timed and step % 10 == 0:
                el = time.perf_counter() - t0
                bar.total = max(step, int(step * seconds / max(el, 1e-6)))
            bar.update(1)
            if step % 5 == 0:
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", threads=current)
        if timed:
            bar.total = step
            bar.refresh()
    finally:
        hf_logging.set_verbosity(verbosity)
        bar.close()
    return {"steps": step, "train_loss": sum(recent) / max(1, len(recent)), "train_loss_ema": ema,
            "tokens_seen": tokens, "epochs": round(tokens / max(1, sum(map(len, seqs))), 3),
            "threads": current,
            "seconds_per_1k_tokens": {str(k): round(1000 * sorted(v)[len(v) // 2], 4)
                                      for k, v in per_token.items() if v},
            "train_seconds_actual": round(time.perf_counter() - t0, 2)}


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48,
                  do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                  seed: Optional[int] = 0) -> List[str]:
    """Continue each prompt; returns prompt + continuation as text."""
    if seed is not None:
        torch.manual_seed(seed)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    kw = dict(do_sample=do_sample)
    if do_sample:
        kw.update(temperature=temperature, top_k=top_k)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kw)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
