"""The multi-objective PPO step and the five methods (docs/algorithms.md §1-§6).

One step::

    rollout (generate; old_logp, ref_logp, values[n])  ->  scores R[n, B] from the objectives
    -> token_rewards (KL penalty with the adaptive coefficient)  ->  multi_gae
    -> whiten per objective over the batch  ->  ppo_epochs x shuffled minibatches:
         recompute logp and values with grad; policy loss (per method) + vf_coef * value loss;
         AdamW step after clip_grad_norm  ->  KL controller update (one host scalar per step)

Methods (``--method``; what each passes to the op is its row of :data:`~pama_ext.trainer.config.METHOD_TABLE`):

- ``pama``:    ``pama_policy_loss(noon=True, method="pama", granularity=...)`` (Noon PPO + Theorem 1).
- ``linear``:  ``pama_policy_loss(method="linear", prefs=w)``, Noon configurable (default off).
- ``morlhf``:  rewards scalarised to ``sum_i w_i R_i`` (n = 1), one value head, standard PPO
               (``pama_policy_loss`` with n = 1, ``noon=False``, ``method="linear"``).
- ``mgda-ub``: per-objective standard PPO losses L_i; their gradients w.r.t. the final hidden states
               give the Gram matrix (``gradient_gram``), ``c = pareto.mgda_weights(G)`` (the native
               exact solver) and the update backpropagates ``sum_i c_i L_i`` (c detached).
- ``mgda``:    the same with full parameter gradients (n backward passes; O(n^2 d); slow by design):
               ``combine_gradients`` adds ``sum_i c_i g_i`` into ``.grad`` (no n x d buffer).

A non-finite loss or gradient norm skips that optimizer update with a warning and is counted in
the step's metrics (``skipped``); the parameters are never touched by it.

Data parallelism (``torchrun``, ``group`` set): rank r holds rows ``[r*B/k, (r+1)*B/k)`` of every
global batch (its prompts, generations in seeded chunks, scores), whitening and every statistic of
the fused ops are global (``group=``), the model is wrapped in DistributedDataParallel and the
backward loss is multiplied by the world size (DDP averages gradients; the ops' loss is the global
one). The minibatches of an epoch are drawn from one global permutation: each rank takes, in
permutation order, the rows of its shard, ``minibatch_size / k`` per minibatch. With one minibatch per
epoch this is exactly the single-process minibatch; with several, each global minibatch is a
stratified sample over the shards rather than one process's consecutive permutation slice.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import distributed as dp
from .. import combine_gradients, gradient_gram, ops, pareto
from .. import functional
from ..vocab import stats_layout
from ..fused_linear import fused_linear_policy_loss, single_pass_eligible
from ..lm.policy import PolicyWithValueHeads, fused_head_inputs, fused_scale_softcap
from ..lm.rewards import Objective, score_all
from ..lm.rollout import GenSettings, Rollout, collect_rollout
from ..lm.seeding import EpochSampler, derive_seed
from .config import TrainConfig

__all__ = ["AdaptiveKLController", "PPOTrainer", "masked_whiten", "AUTOCAST_DTYPES"]

#: --dtype -> the autocast dtype (None: no autocast)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AdaptiveKLController:
    """TRL's adaptive KL controller: ``beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, init: float, target: float, horizon: float, adaptive: bool = True):
        self.value = float(init)
        self.target, self.horizon, self.adaptive = float(target), float(horizon), bool(adaptive)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not self.adaptive or not math.isfinite(current_kl):
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "adaptive": self.adaptive}

    def load_state_dict(self, s: Dict[str, float]) -> None:
        self.value = float(s["value"])


#: --update-norm active: the smallest active fraction divided by (a minibatch with no active token has a zero
#: policy-gradient loss anyway; the floor only keeps the division finite)
ACTIVE_FLOOR = 1e-3


def disagreement(adv: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the valid tokens on which the objectives' advantages ``adv`` [n, B, T] do not all have the same
    sign (some > 0, some <= 0): the tokens on which Noon's min-combination can starve one objective. 0 for n = 1.
    A device tensor (no host sync)."""
    pos = adv > 0
    split = pos.any(0) & ~pos.all(0)
    m = functional.float_mask(mask, adv.dtype)
    return (split.to(adv.dtype) * m).sum() / m.sum().clamp(min=1)


# Whitening of each objective over the masked tokens of the rollout batch (algorithms §3).
masked_whiten = functional.masked_whiten


class PPOTrainer:
    """Holds the policy, the reference, the optimizer and every piece of state a step needs."""

    def __init__(self, cfg: TrainConfig, policy: PolicyWithValueHeads, ref_lm, tokenizer,
                 objectives: Sequence[Objective], train_prompts: Sequence[str], device: torch.device,
                 group=None):
        self.cfg, self.policy, self.ref_lm, self.tokenizer = cfg, policy, ref_lm, tokenizer
        self.objectives = list(objectives)
        self.train_prompts = list(train_prompts)
        if not self.train_prompts:
            raise ValueError("--train-prompts: no training prompts")
        self.device = device
        self.prefs = torch.tensor(cfg.normalized_weights(), dtype=torch.float32, device=device)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.lm_params = [p for p in policy.lm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "data", 0))
        self.prompt_order = EpochSampler(len(self.train_prompts), self.gen)
        self.step_idx = 0
        self.skipped_total = 0
        self.gen_settings = GenSettings(cfg.max_new_tokens, True, cfg.temperature, cfg.top_k, cfg.top_p)
        self.group = group
        self.world = dp.world_size(group)
        self.rank = 0 if group is None else torch.distributed.get_rank(group)
        #: --fused-linear as given, else on exactly where the update's loss takes the single pass
        self.fused_linear = self._single_pass_options() if cfg.fused_linear is None else bool(cfg.fused_linear)
        policy.fused_linear = self.fused_linear
        if cfg.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        self.model = policy  # what the update's forward runs through (DDP under torchrun)
        if group is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                                 process_group=group)

    # --------------------------------------------------------------------------------------------
    # state (for --resume)
    # --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "step": self.step_idx,
            "skipped_total": self.skipped_total,
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "data_generator": self.gen.get_state(),
            **self.prompt_order.state_dict(),  # order, pos
        }

    def load_state_dict(self, s: Dict) -> None:
        self.step_idx = int(s["step"])
        self.skipped_total = int(s["skipped_total"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.kl_ctl.load_state_dict(s["kl_ctl"])
        self.gen.set_state(s["data_generator"])
        self.prompt_order.load_state_dict(s)

    # --------------------------------------------------------------------------------------------
    def autocast(self):
        """The forward passes' precision (``--dtype``): autocast to bf16 / fp16, nothing for fp32. The
        parameters, optimizer and losses stay float32 (the policy returns float32 log-probs and values)."""
        dt = AUTOCAST_DTYPES[self.cfg.dtype]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    def _loss_kwargs(self) -> Dict:
        c = self.cfg
        return dict(eps_lo=c.cliprange, eps_hi=c.eps_hi, dual_clip=c.dual_clip, agg=c.agg, check_finite=False,
                    group=self.group)

    def batch_whiten(self, adv: Tensor, mask: Tensor) -> Tensor:
        """--whiten batch over the global batch: (A - mean) / std per objective; with --noon-order noon-first,
        max(A, 0) / std(max(A, 0)) (Noon first, then unit variance without re-centring; the op's Noon is then
        the identity)."""
        n = adv.shape[0]
        lay = stats_layout(n)
        if self.cfg.noon_order == "noon-first":
            adv = adv.clamp(min=0)
            mom = ops.objective_moments(adv, mask, group=self.group)
            return functional.whiten_with(adv, torch.zeros_like(mom[lay["mean"]]), mom[lay["var"]])
        mom = ops.objective_moments(adv, mask, group=self.group)
        return functional.whiten_with(adv, mom[lay["mean"]], mom[lay["var"]])

    def _k3_loss(self, logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
        return functional.agg_loss(functional.k3_kl(logp, ref_logp), mask, self.cfg.agg)

    def _single_pass_options(self) -> bool:
        """Whether the options let the update's policy loss take the fused op's single pass: a method
        whose combined advantage needs no log-prob (:func:`pama_ext.fused_linear.single_pass_eligible`
        with the method's objectives) and no separate k3 loss under ``--update-norm active``."""
        c = self.cfg
        spec = c.method_spec
        if spec.op_method is None or (c.update_norm == "active" and c.kl_loss_coef):
            return False
        return single_pass_eligible(spec.op_method, c.granularity if spec.granularity else "token", c.n_heads)

    def fused_loss_path(self) -> bool:
        """Whether the update forms the policy loss with :func:`pama_ext.fused_linear_policy_loss` on its
        single pass (``--fused-linear`` on, and :meth:`_single_pass_options`); otherwise the policy's
        forward returns the log-probs (through ``fused_linear_logp`` when ``--fused-linear`` is on) and
        the loss runs on them."""
        return self.fused_linear and self._single_pass_options()

    def policy_loss(self, logp: Optional[Tensor], old_logp: Tensor, adv: Tensor, mask: Tensor, ref_logp: Tensor,
                    hidden: Tensor, whiten_in_op: bool, head: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None,
                    targets: Optional[Tensor] = None):
        """(loss, metrics, per-objective losses or None). For mgda the caller does the backward.
        ``logp`` None (:meth:`fused_loss_path`): the loss is formed by the fused op's single pass from
        ``head`` (the output layer's hidden, weight, bias: ``pama_ext.lm.policy.fused_head_inputs``) and
        the response tokens ``targets``."""
        c = self.cfg
        spec = c.method_spec
        kw = self._loss_kwargs()
        if spec.op_method is not None:  # one fused loss over the objectives
            extra = dict(noon=c.use_noon, method=spec.op_method)
            if spec.granularity:
                extra["granularity"] = c.granularity
            if spec.prefs or (spec.steerable and c.weights is not None):
                extra["prefs"] = self.prefs
            norm = c.update_norm == "active"
            extra.update(whiten=whiten_in_op, beta_loss=0.0 if norm else c.kl_loss_coef, **kw)
            if logp is None:
                scale, cap = fused_scale_softcap(self.policy.head_transform, c.temperature)
                loss, m = fused_linear_policy_loss(*head, targets, mask, old_logp, adv, ref_logp, logit_scale=scale,
                                                   softcap=cap, single_pass=True, **extra)
            else:
                loss, m = ops.pama_policy_loss(logp, old_logp, adv, mask, ref_logp, **extra)
            if norm:
                # mean over the active tokens: the same gradient direction, scaled by 1 / active fraction
                # (no host sync: the scale stays a tensor); the KL loss keeps its own scale
                loss = loss / m["active"].detach().clamp(min=ACTIVE_FLOOR)
                m = dict(m, pg_loss=loss.detach())
                if c.kl_loss_coef:
                    kl_loss = self._k3_loss(logp, ref_logp, mask)
                    loss = loss + c.kl_loss_coef * kl_loss
                    m["kl_loss"] = kl_loss.detach()
            if spec.scalarised:
                m = dict(m, weights=self.prefs)
            return loss, m, None
        # mgda-ub / mgda: standard per-objective PPO losses
        losses, mets = [], []
        for i in range(adv.shape[0]):
            li, mi = ops.pama_policy_loss(logp, old_logp, adv[i:i + 1], mask, whiten=whiten_in_op, noon=False,
                                          method="linear", **dict(kw, group=None))
            losses.append(li)
            mets.append(mi)
        if spec.mgda_gradients == "hidden":
            grads = [torch.autograd.grad(li, hidden, retain_graph=True) for li in losses]
            weights = pareto.mgda_weights(gradient_gram(grads)).to(logp.dtype).detach()
        else:
            weights = None  # computed by the caller from full parameter gradients
        m = {
            "pg_loss": torch.stack([mi["pg_loss"] for mi in mets]),
            "kl_loss": torch.zeros((), device=logp.device),
            "clipfrac": torch.stack([mi["clipfrac"] for mi in mets]).mean(),
            "approx_kl": mets[0]["approx_kl"],
            "active": torch.stack([mi["active"] for mi in mets]).mean(),
            "abar": torch.cat([mi["abar"] for mi in mets]),
            "pos": torch.cat([mi["pos"] for mi in mets]),
        }
        kl_loss = self._k3_loss(logp, ref_logp, mask) if c.kl_loss_coef else None
        if kl_loss is not None:
            m["kl_loss"] = kl_loss.detach()
        if weights is None:
            return None, m, (losses, kl_loss)
        loss = (weights * torch.stack(losses)).sum()
        m["pg_loss"] = loss.detach()
        m["weights"] = weights
        if kl_loss is not None:
            loss = loss + c.kl_loss_coef * kl_loss
        return loss, m, None

    # --------------------------------------------------------------------------------------------
    def _mgda_backward(self, losses: List[Tensor], other: Tensor) -> Tensor:
        """Full MGDA: n parameter-gradient passes, their Gram, the min-norm weights c; backpropagates
        ``other`` and adds ``sum_i c_i g_i`` into ``.grad``."""
        params = self.lm_params
        grads = [torch.autograd.grad(li, params, retain_graph=True, allow_unused=True) for li in losses]
        weights = pareto.mgda_weights(gradient_gram(grads)).to(params[0].dtype)
        other.backward()
        combine_gradients(grads, weights, params, accumulate=True)
        return weights

    def step(self, bars: Optional[Dict] = None) -> Dict:
        """One PPO step; returns the step's metrics (plain Python numbers)."""
        c, dev = self.cfg, self.device
        t0 = time.perf_counter()
        self.policy.eval()  # dropout off, as TRL/verl do for PPO
        per = c.batch_size // self.world  # this rank's rows: [lo, lo + per) of the global batch
        lo = self.rank * per
        prompts = [self.train_prompts[i] for i in self.prompt_order.take(c.batch_size)][lo:lo + per]
        bar = bars.get("rollout") if bars else None
        if bar is not None:
            bar.reset(total=per)
        gen_chunk = min(c.rollout_chunk, per)
        with self.autocast():
            ro: Rollout = collect_rollout(self.policy, self.ref_lm, self.tokenizer, prompts, self.gen_settings,
                                          derive_seed(c.seed, "rollout", self.step_idx), c.max_prompt_tokens,
                                          c.minibatch_size, bar=bar, gen_chunk=gen_chunk, first_chunk=lo // gen_chunk)
        t1 = time.perf_counter()
        scores = score_all(self.objectives, ro.prompts, ro.responses).to(dev)  # [n, B]
        t2 = time.perf_counter()

        mask = ro.mask
        train_scores = (self.prefs[:, None] * scores).sum(0, keepdim=True) if c.method_spec.scalarised else scores
        kl_coef = self.kl_ctl.value
        rewards = ops.token_rewards(train_scores, ro.old_logp, ro.ref_logp, mask, kl_coef)
        adv, ret = ops.multi_gae(rewards, ro.values, mask, c.gamma, c.lam)
        whiten_in_op = c.whiten == "minibatch"
        if c.whiten == "batch":  # over the global batch
            adv = self.batch_whiten(adv, mask)

        B, T = mask.shape
        # starvation monitor: sign disagreement of the (whitened) advantages, one device scalar per step
        disagree = disagreement(adv if c.whiten == "batch" else functional.masked_whiten(adv, mask), mask)
        if self.group is not None:
            disagree = dp.all_reduce_sum(disagree.reshape(1), self.group).reshape(()) / self.world
        mets: Dict[str, List[Tensor]] = {}
        skipped = 0
        n_updates = 0
        bar = bars.get("update") if bars else None
        mb = c.minibatch_size // self.world
        n_mb = math.ceil(B / mb)
        if bar is not None:
            bar.reset(total=c.ppo_epochs * n_mb)
        for _epoch in range(c.ppo_epochs):
            perm = torch.randperm(c.batch_size, generator=self.gen)
            if self.world > 1:  # this shard's rows, in global permutation order
                perm = perm[(perm >= lo) & (perm < lo + B)] - lo
            perm = perm.to(dev)
            for k in range(n_mb):
                idx = perm[k * mb:(k + 1) * mb]
                ok = self._update(ro, idx, adv, ret, T, whiten_in_op, mets)
                n_updates += 1
                skipped += 0 if ok else 1
                if bar is not None:
                    bar.update(1)
        t3 = time.perf_counter()

        # one read-back of the step's numbers
        with torch.no_grad():
            seq_kl = self._gather_rows(functional.zero_padding(ro.old_logp - ro.ref_logp, mask).sum(-1))
            scalars = {k: torch.stack(v).float().mean(0) for k, v in mets.items()}
            scalars["disagree"] = disagree.float()
            scores = self._gather_rows(scores)
            resp_len = self._gather_rows(mask.sum(-1).float())
            chars = torch.tensor([float(sum(len(r) for r in ro.responses)), float(len(ro.responses))], device=dev)
            if self.group is not None:
                chars = dp.all_reduce_sum(chars, self.group)
        kl_mean = seq_kl.mean().item()
        self.kl_ctl.update(kl_mean, c.batch_size)
        self.step_idx += 1
        self.skipped_total += skipped
        names = [o.name for o in self.objectives]
        sc = scores.cpu()
        out = {
            "step": self.step_idx,
            "rewards": dict(zip(names, sc.mean(1).tolist())),
            "rewards_std": dict(zip(names, sc.std(1, unbiased=False).tolist())),
            "kl": kl_mean,
            "kl_coef": kl_coef,
            "response_len": resp_len.mean().item(),
            "response_chars": (chars[0] / chars[1].clamp(min=1)).item(),
        }
        for k, v in scalars.items():
            out[k] = v.tolist()
        out.update({
            "updates": n_updates,
            "skipped": skipped,
            "skipped_total": self.skipped_total,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time": {"rollout": t1 - t0, "reward": t2 - t1, "update": t3 - t2, "step": time.perf_counter() - t0},
        })
        self.last_rollout = ro
        return out

    def _gather_rows(self, x: Tensor) -> Tensor:
        """The global batch of a per-row tensor (rows last), concatenated in rank order."""
        if self.group is None:
            return x
        rows = dp.all_gather_rows(x.reshape(-1), self.group)  # [k, numel]
        return rows.view(self.world, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], -1)

    def _update(self, ro: Rollout, idx: Tensor, adv: Tensor, ret: Tensor, T: int, whiten_in_op: bool,
                mets: Dict[str, List[Tensor]]) -> bool:
        c = self.cfg
        ids, am, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.mask[idx]
        old_logp, ref_logp = ro.old_logp[idx], ro.ref_logp[idx]
        if c.ratio_to == "ref":  # the ratio (and its clip) against the frozen reference
            old_logp = ref_logp
        temp = c.temperature
        fused = self.fused_loss_path()
        with self.autocast():
            out = self.model(ids, am, T, temperature=temp, with_values=True, with_logp=not fused)
            # the output layer's inputs in the dtype it runs in under autocast
            head = fused_head_inputs(self.policy.lm.get_output_embeddings(), out.hidden) if fused else None
        pg, pm, mgda_parts = self.policy_loss(out.logp, old_logp, adv[:, idx], mask, ref_logp, out.hidden,
                                              whiten_in_op, head=head, targets=ids[:, ids.shape[1] - T:])
        vl, vm = ops.multi_value_loss(out.values, ro.values[:, idx], ret[:, idx], mask, clip=c.cliprange_value,
                                      agg=c.agg, check_finite=False, group=self.group)
        self.optimizer.zero_grad(set_to_none=True)
        if mgda_parts is not None:
            losses, kl_loss = mgda_parts
            other = c.vf_coef * vl + (c.kl_loss_coef * kl_loss if kl_loss is not None else 0.0)
            weights = self._mgda_backward(losses, other)
            pg = (weights.detach() * torch.stack(losses).detach()).sum()
            pm = dict(pm, pg_loss=pg, weights=weights)
            loss = pg + c.vf_coef * vl.detach()
        else:
            loss = pg + c.vf_coef * vl
            (loss * self.world).backward() if self.world > 1 else loss.backward()  # DDP averages over ranks
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        # the one read-back per optimizer update: skip it when the loss or the gradient is not finite
        if not bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
            bad_loss = not bool(torch.isfinite(loss.detach()))
            return self._skip("loss" if bad_loss else "gradient norm", loss if bad_loss else gnorm)
        self.optimizer.step()
        rec = {
            "loss": loss.detach(), "pg_loss": pm["pg_loss"].detach().float().reshape(()),
            "vf_loss": vl.detach(), "kl_loss": pm["kl_loss"].detach().float(),
            "clipfrac": pm["clipfrac"], "approx_kl": pm["approx_kl"], "active": pm["active"],
            "vf_clipfrac": vm["clipfrac"], "grad_norm": gnorm.detach(),
            "weights": pm["weights"].detach().float(), "abar": pm["abar"], "pos": pm["pos"],
            "head_loss": vm["head_loss"],
        }
        for k, v in rec.items():
            mets.setdefault(k, []).append(v.detach().float().to(self.device))
        return True

    def _skip(self, what: str, value: Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        warnings.warn(f"step {self.step_idx + 1}: non-finite {what} ({value.item()}); the optimizer update is "
                      f"skipped", RuntimeWarning, stacklevel=3)
        return False
