"""End to end: the share of a PPO step spent in pama_ext ops on a random GPT-2-small, from
torch.profiler, bench_gpu.py's ``e2e`` section. Modes: ``update`` (a PPO update written here: scoring
forward, token_rewards, multi_gae, policy forward, pama_policy_loss + multi_value_loss, backward,
AdamW) and ``trainer`` (pama_ext's PPOTrainer.step, rollout with generate included; needs
transformers).
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch
import torch.nn as nn

from pama_ext import ops

from . import common
from .gae import GAMMA, LAM
from .models import LM, VOCAB


def pama_share(prof, wall_ms: float) -> Dict[str, float]:
    """Host time inside top-level ``pama_ext::`` ops and device time of pama kernels, from a profile."""
    host_us = 0.0
    n_ops = 0
    for e in prof.events():
        if not e.name.startswith("pama_ext::"):
            continue
        p, nested = e.cpu_parent, False
        while p is not None:
            if p.name.startswith("pama_ext::"):
                nested = True
                break
            p = p.cpu_parent
        if not nested:
            host_us += e.cpu_time_total
            n_ops += 1
    dev_pama = dev_all = 0.0
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = common.device_time_us(e)
        dev_all += t
        if "pama::" in e.key:
            dev_pama += t
    return {"pama_host_ms": host_us / 1e3, "pama_ops": n_ops, "pama_device_ms": dev_pama / 1e3,
            "device_busy_ms": dev_all / 1e3, "share_host": host_us / 1e3 / wall_ms,
            "share_device": dev_pama / 1e3 / wall_ms}


def e2e_update(args, device) -> Dict[str, object]:
    """A PPO step's scoring + update phase on a random GPT-2-small, written with pama_ext ops."""
    n, B, P, T = 2, args.e2e_batch, 64, args.e2e_response
    lm = LM("gpt2-small", args.model_specs["gpt2-small"], device, args.seed, dtype_override="float32")
    ref = LM("gpt2-small", args.model_specs["gpt2-small"], device, args.seed + 1,
             dtype_override="float32")  # frozen reference policy
    ref.model.requires_grad_(False)
    heads = nn.Linear(lm.d_model, n).to(device)
    opt = torch.optim.AdamW(lm.params + list(heads.parameters()), lr=1e-5)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB, (B, P + T), generator=g).to(device)
    mask = common.make_mask(B, T, args.seed, device, torch.bool)
    scores = torch.randn(n, B, generator=g).to(device)

    def step():
        with torch.no_grad():  # rollout scoring: old log-probs + values, reference log-probs
            old_logp, h = lm.token_logp(ids, T)
            values = heads(h).float().permute(2, 0, 1).contiguous()
            ref_logp, _ = ref.token_logp(ids, T)
        r = ops.token_rewards(scores, old_logp, ref_logp, mask, beta_kl=0.02)
        adv, ret = ops.multi_gae(r, values, mask, GAMMA, LAM)
        for mb in range(0, B, args.e2e_minibatch):
            sl = slice(mb, mb + args.e2e_minibatch)
            logp, h = lm.token_logp(ids[sl], T)
            v = heads(h).float().permute(2, 0, 1)
            pl, _ = ops.pama_policy_loss(logp, old_logp[sl], adv[:, sl], mask[sl], method="pama",
                                         granularity="token", check_finite=False)
            vl, _ = ops.multi_value_loss(v, values[:, sl], ret[:, sl], mask[sl], clip=0.2, check_finite=False)
            opt.zero_grad(set_to_none=True)
            (pl + 0.1 * vl).backward()
            torch.nn.utils.clip_grad_norm_(lm.params, 1.0)
            opt.step()

    step()  # warm-up (allocator, cuBLAS, optimizer state)
    wall = common.wall_ms(step, 3)
    prof, pwall = common.profile_call(step)
    out = {"mode": "update", "model": lm.impl, "n": n, "B": B, "T": T, "step_ms": wall, "profiled_step_ms": pwall}
    out.update(pama_share(prof, pwall))
    del lm, ref, heads, opt
    torch.cuda.empty_cache()
    return out


def word_tokenizer(vocab: int):
    """An offline word-level tokenizer with GPT-2's vocabulary size ("w<i>" words, eos = last id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="w0")


def distinct_words(prompts, responses):
    return [len(set(r.split())) / max(1, len(r.split())) for r in responses]


def e2e_trainer(args, device) -> Dict[str, object]:
    """pama_ext.trainer's PPOTrainer.step on a random GPT-2-small (rollout with generate included)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tr = common.trainer_api()
    torch.manual_seed(args.seed)
    spec = args.model_specs["gpt2-small"]
    with torch.device(device):
        lm = GPT2LMHeadModel(GPT2Config(n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"]))
    lm.eval()  # a fresh model is in training mode (dropout); the trainer runs it in eval mode
    tok = word_tokenizer(lm.config.vocab_size)
    cfg = tr.TrainConfig(model="random-gpt2-small", objectives=["length", "py:pama_ext.benchmarks.e2e:distinct_words"],
                         method="pama", granularity="token", batch_size=args.e2e_batch,
                         minibatch_size=args.e2e_minibatch, ppo_epochs=1, max_new_tokens=args.e2e_response,
                         max_prompt_tokens=64, device=device.type, progress=False, seed=args.seed)
    objectives = [tr.Objective("length", tr.LengthReward(cfg.length_l0, cfg.length_lo, cfg.length_hi)),
                  tr.Objective("distinct", distinct_words)]
    g = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 50000, (32,), generator=g)) for _ in range(256)]
    policy = tr.PolicyWithValueHeads(lm, 2)
    trainer = tr.PPOTrainer(cfg, policy, tr.frozen_copy(lm), tok, objectives, prompts, device)
    trainer.step()  # warm-up
    common.sync_all()
    t0 = time.perf_counter()
    res = trainer.step()
    common.sync_all()
    wall = (time.perf_counter() - t0) * 1e3
    prof, pwall = common.profile_call(trainer.step)
    out = {"mode": "trainer", "model": "transformers.GPT2LMHeadModel", "n": 2, "B": args.e2e_batch,
           "T": args.e2e_response, "step_ms": wall, "profiled_step_ms": pwall,
           "update_ms": 1e3 * res["time"]["update"], "rollout_ms": 1e3 * res["time"]["rollout"]}
    out.update(pama_share(prof, pwall))
    out["share_host_of_update"] = out["pama_host_ms"] / max(out["update_ms"], 1e-9)
    del trainer, policy, lm
    torch.cuda.empty_cache()
    return out


def section(args, device, budget) -> None:
    rows: List[Dict[str, object]] = []
    for mode, fn in (("update", e2e_update), ("trainer", e2e_trainer)):
        if budget.over():
            rows.append({"mode": mode, "status": "skipped", "reason": budget.reason()})
            continue
        print(f"  .. e2e {mode}", flush=True)
        try:
            r = fn(args, device)
            r["status"] = "ok"
        except ImportError as e:
            r = {"mode": mode, "status": "skipped", "reason": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001 - report and go on to the next mode
            r = {"mode": mode, "status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        common.write_csv(rows, "bench_gpu_e2e", args.tag, args.out)
    head = ("| mode | model | B×T | step ms | profiled step ms | pama host ms | pama device ms | "
            "share (host) | share (device) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['mode']} | {r.get('status')}: {r.get('reason', '')[:120]} |||||||")
            continue
        on_gpu = device.type == "cuda"  # on the CPU the ops' host time is their compute time
        lines.append(f"| {r['mode']} | {r['model']} | {r['B']}×{r['T']} | {r['step_ms']:.1f} | "
                     f"{r['profiled_step_ms']:.1f} | {r['pama_host_ms']:.2f} | "
                     f"{format(r['pama_device_ms'], '.3f') if on_gpu else 'n/a'} | {100 * r['share_host']:.2f}% | "
                     f"{format(100 * r['share_device'], '.3f') + '%' if on_gpu else 'n/a'} |")
    md = common.section_header(args, "e2e", "Share of a PPO step spent in pama_ext ops, random GPT-2-small, n = 2 objectives. "
                 "`update`: scoring forward (policy + reference, no grad), token_rewards, multi_gae, then per "
                 "minibatch a policy forward, pama_policy_loss + multi_value_loss, backward, AdamW. `trainer`: "
                 "pama_ext.trainer PPOTrainer.step (generate included; offline word-level tokenizer with GPT-2's "
                 "vocabulary size). Host share = time inside top-level `pama_ext::` ops (torch.profiler, "
                 "autograd backward ops included) / profiled step wall time; device share = device time of pama "
                 "kernels / profiled step wall time. Target ≤ 2%.")
    md += lines + [""]
    common.write_section(args, "e2e", rows, md)


