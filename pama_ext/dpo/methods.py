"""The update of each preference method: :class:`PairTrainer` (raco, cagrad, dpo-lw, modpo) and
:class:`MopoTrainer` (mopo).

Every loss goes through the pama_ext ops: ``multi_dpo_loss`` (per-objective DPO losses on shared
pairs), ``gradient_gram`` / ``combine_gradients`` (the n x n Gram of the per-objective gradients and
the combined update) and ``pama_ext.pareto.cagrad_weights`` (algorithms §6 CAGrad-clip / RACO coefficients).

raco / cagrad, per optimizer step (algorithms §7, "solve per optimizer step"):

1. for each micro-batch: the n per-objective losses (one forward over chosen + rejected), then n
   backward passes (``autograd.grad``) added into n gradient buffers, each scaled by the micro-batch's
   share of the step's pairs, so the buffers hold the gradients of the step's full-batch losses;
2. ``G = gradient_gram(buffers)``; ``a = cagrad_weights(G, w, c, clip)`` (clip on for raco, off for cagrad);
3. ``combine_gradients(buffers, a, params)`` writes Σ_i a_i g_i into ``.grad``; clip; optimizer step.

MODPO (algorithms §7): L = −log σ((1/w_k)·[β h − Σ_{j≠k} w_j (r_j(x, y_w) − r_j(x, y_l))]) on objective k's
labels, with r_j the judges' scores. It is ``multi_dpo_loss`` with temperature β/w_k on a margin
shifted by m/β (m = Σ_{j≠k} w_j Δr_j, oriented as the pair is stored; the label's sign then orients
the whole argument) -- the shift enters through the chosen log-probs, so no DPO formula is repeated.

Nothing in a step reads a value back to the host: the metrics stay on the device and are read at the
logging interval (``flush_metrics``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import combine_gradients, gradient_gram, multi_dpo_loss
from ..distributed import all_reduce_sum, world_size
from ..lm.config import ConfigError
from ..lm.seeding import EpochSampler, derive_seed
from ..pareto import cagrad_weights
from . import mopo as M
from .config import DPOConfig
from .data import PrefData, ResponsePool, encode_responses, response_pool

__all__ = ["PairTrainer", "MopoTrainer", "sequence_logps", "make_trainer", "train_margin_reward", "implicit_rewards",
           "objective_data", "margin_reward_config"]


def sequence_logps(policy, input_ids: Tensor, attention_mask: Tensor, resp_mask: Tensor) -> Tensor:
    """``[B]`` summed token log-probs of the responses (``policy``: a PolicyWithValueHeads)."""
    out = policy(input_ids, attention_mask, resp_mask.shape[1], with_values=False)
    return (out.logp * resp_mask).sum(-1)


@torch.no_grad()
def reference_sequence_logps(ref_lm, tokenizer, prompts: Sequence[str], responses: Sequence[str], cfg: DPOConfig,
                             device, chunk: int = 128, cache: Optional[Dict] = None):
    """(summed log-probs [N], token counts [N]) of ``responses`` under the frozen reference. ``cache`` (a dict
    keyed by (prompt, response), shared by runs with the same reference and token limits) skips known ones."""
    from ..lm.policy import reference_logp

    cache = {} if cache is None else cache
    todo = sorted({(p, r) for p, r in zip(prompts, responses) if (p, r) not in cache})
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        ids, am, rm = encode_responses(tokenizer, [p for p, _ in part], [r for _, r in part], cfg.max_prompt_tokens,
                                       cfg.max_response_tokens, device)
        lp = (reference_logp(ref_lm, ids, am, rm.shape[1]) * rm).sum(-1).tolist()
        for key, v, n in zip(part, lp, rm.sum(-1).tolist()):
            cache[key] = (v, float(n))
    vals = [cache[(p, r)] for p, r in zip(prompts, responses)]
    return (torch.tensor([v for v, _ in vals], dtype=torch.float32, device=device),
            torch.tensor([n for _, n in vals], dtype=torch.float32, device=device))


class _Base:
    def __init__(self, cfg: DPOConfig, policy, ref_lm, tokenizer, device, group=None):
        self.cfg, self.policy, self.ref_lm, self.tokenizer, self.device = cfg, policy, ref_lm, tokenizer, device
        # data parallel: every rank draws the same global batch and takes its contiguous shard (uneven when
        # the batch does not divide); the gradients are summed over the ranks before anything uses them
        self.pg = group  # the process group (MopoTrainer's self.group is its pool's prompt index)
        self.rank = 0 if group is None else torch.distributed.get_rank(group)
        self.world = world_size(group)
        self.params = [p for p in policy.lm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "dpo-data", 0))
        self.sampler: Optional[EpochSampler] = None  # the epochs over the pairs / prompts (set by the subclass)
        self.step_idx = 0
        self._pending: List[Dict[str, Tensor]] = []
        self.w = torch.tensor(cfg.normalized_weights(), dtype=torch.float32, device=device)

    def shard(self, items: Sequence) -> Sequence:
        """This rank's contiguous part of the global batch ``items`` (all of it without a group)."""
        n = len(items)
        return items[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def reduce(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place (one all-reduce of their concatenation; no-op without a group)."""
        if self.pg is None or not tensors:
            return
        flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]), self.pg)
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()

    def reduce_grads(self) -> None:
        """``.grad`` of every parameter summed over the ranks (a rank with no rows contributes zeros)."""
        if self.pg is None:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reduce([p.grad for p in self.params])

    def _finish_step(self, metrics: Dict[str, Tensor]) -> None:
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0
                                               else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["grad_norm"] = gnorm.detach()
        self.step_idx += 1
        self._pending.append({k: v.detach().float() for k, v in metrics.items()})

    def state_dict(self) -> Dict:
        """Everything a step depends on besides the parameters and the global RNGs (tensors and plain values,
        for a ``weights_only`` checkpoint): the step, the optimizer, the data generator and the epoch order."""
        if self._pending:
            raise RuntimeError("flush_metrics() before state_dict(): the pending metrics are not part of the state")
        return {"step": self.step_idx, "optimizer": self.optimizer.state_dict(), "generator": self.gen.get_state(),
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, s: Dict) -> None:
        self.step_idx = int(s["step"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.gen.set_state(s["generator"])
        self.sampler.load_state_dict(s["sampler"])

    def flush_metrics(self) -> List[Dict]:
        """Read the pending steps' metrics back to the host (the only read-back of the loop)."""
        rows = []
        first = self.step_idx - len(self._pending) + 1
        for i, m in enumerate(self._pending):
            row = {"step": first + i}
            for k, v in m.items():
                row[k] = v.tolist()
            rows.append(row)
        self._pending = []
        return rows


def margin_reward_config(cfg: DPOConfig, objective: str) -> DPOConfig:
    """MODPO's first stage for ``objective``: DPO on that objective's labels alone (``dpo-lw`` with one objective),
    ``--modpo-margin-steps`` steps, every other optimisation setting of the run."""
    return dataclasses.replace(cfg, method="dpo-lw", objectives=[objective], weights=None, modpo_target=None,
                               mopo_primary=None, steps=cfg.margin_steps)


def objective_data(data: PrefData, objective: str) -> PrefData:
    """The pairs with a label on ``objective`` (a tie or no label gives DPO no gradient), with that label alone."""
    i = data.objectives.index(objective)
    idx = (data.labels[i] != 0).nonzero().flatten().tolist()
    sub = data.subset(idx)
    return PrefData([objective], sub.prompts, sub.chosen, sub.rejected, sub.labels[i:i + 1].clone(), sub.info)


def train_margin_reward(cfg: DPOConfig, objective: str, init_policy, ref_lm, tokenizer, data: PrefData, device,
                        ref_cache: Optional[Dict] = None, group=None):
    """MODPO's first stage for one objective: a copy of ``init_policy`` (the reference) trained by DPO on
    ``objective``'s labels of ``data`` (data parallel under ``group``, like any pair method). Its implicit
    reward r(x, y) = β·[log π_r(y|x) − log π_ref(y|x)] (per token under --length-normalize) is the margin reward
    model of MODPO's second stage. Returns the trained policy."""
    mcfg = margin_reward_config(cfg, objective)
    sub = objective_data(data, objective)
    if len(sub) == 0:
        raise ConfigError(f"--modpo-margin: objective {objective!r} has no labelled pair to train its margin reward "
                          f"model on (give it weight 0, or a judge)")
    policy = copy.deepcopy(init_policy)
    tr = PairTrainer(mcfg, policy, ref_lm, tokenizer, sub, None, device, ref_cache=ref_cache, group=group)
    while tr.step_idx < mcfg.steps:
        tr.step()
    tr.flush_metrics()
    for p in policy.parameters():
        p.requires_grad_(False)
    return policy


@torch.no_grad()
def implicit_rewards(cfg: DPOConfig, reward_policy, ref_lm, tokenizer, prompts: Sequence[str],
                     responses: Sequence[str], device, ref_cache: Optional[Dict] = None) -> Tensor:
    """``[N]``: β·[log π_r(y|x) − log π_ref(y|x)] of a margin reward model (divided by the token count under
    --length-normalize, the scale of the DPO margin then)."""
    lp, n = reference_sequence_logps(reward_policy.lm, tokenizer, prompts, responses, cfg, device)
    lr, _ = reference_sequence_logps(ref_lm, tokenizer, prompts, responses, cfg, device, cache=ref_cache)
    r = cfg.dpo_beta * (lp - lr)
    return r / n.clamp_min(1.0) if cfg.length_normalize else r


class PairTrainer(_Base):
    """raco, cagrad, dpo-lw and modpo on preference pairs."""

    def __init__(self, cfg: DPOConfig, policy, ref_lm, tokenizer, data: PrefData, judges, device,
                 ref_cache: Optional[Dict] = None, group=None, margin: Optional[Tensor] = None,
                 margin_cache: Optional[Dict] = None):
        super().__init__(cfg, policy, ref_lm, tokenizer, device, group)
        labels = data.labels
        if cfg.method == "modpo":
            keep = (labels[cfg.modpo_index] != 0)
        else:
            keep = (labels != 0).any(0)  # all-tie rows carry no DPO gradient
        idx = keep.nonzero().flatten().tolist()
        if not idx:
            what = (f"objective {cfg.objectives[cfg.modpo_index]!r}" if cfg.method == "modpo" else "any objective")
            raise ConfigError(f"--data: {data.info.get('source', cfg.data)}: all {len(data)} pairs are ties (label 0) "
                              f"for {what}; DPO learns nothing from ties")
        self.data = data.subset(idx)
        self.labels = self.data.labels.to(device)
        n = len(self.data)
        rc, lc = reference_sequence_logps(ref_lm, tokenizer, self.data.prompts, self.data.chosen, cfg, device,
                                          cache=ref_cache)
        rr, lr = reference_sequence_logps(ref_lm, tokenizer, self.data.prompts, self.data.rejected, cfg, device,
                                          cache=ref_cache)
        self.ref_c, self.ref_r, self.len_c, self.len_r = rc, rr, lc, lr
        self.margin = None
        self.margin_info: Dict[str, Dict] = {}
        if cfg.method == "modpo" and margin is not None:  # --resume: the margins of the run's first stage
            self.margin = margin.to(device)
        elif cfg.method == "modpo":
            from ..lm.rewards import score_all

            self.margin = torch.zeros(len(self.data), device=device)
            judged = [o for o in cfg.judged if o in cfg.margin_judged]  # the judges' objectives used, in order
            if judged:
                sc = score_all(judges, self.data.prompts, self.data.chosen).to(device)
                sr = score_all(judges, self.data.prompts, self.data.rejected).to(device)
                ji = [cfg.judged.index(o) for o in judged]
                wj = torch.stack([self.w[cfg.objectives.index(o)] for o in judged])
                self.margin = (wj[:, None] * (sc[ji] - sr[ji])).sum(0)  # Σ_j w_j (r_j(chosen) − r_j(rejected))
                self.margin_info.update({o: {"source": "judge"} for o in judged})
            # MODPO's first stage: a margin reward model per objective trained on its labels (full data)
            cache = {} if margin_cache is None else margin_cache
            for o in cfg.margin_learned:
                key = (o, json.dumps(margin_reward_config(cfg, o).to_dict(), sort_keys=True, default=str))
                if key not in cache:
                    rp = train_margin_reward(cfg, o, policy, ref_lm, tokenizer, data, device, ref_cache, group)
                    rc_o = implicit_rewards(cfg, rp, ref_lm, tokenizer, data.prompts, data.chosen, device, ref_cache)
                    rr_o = implicit_rewards(cfg, rp, ref_lm, tokenizer, data.prompts, data.rejected, device, ref_cache)
                    j = data.objectives.index(o)
                    lab = data.labels[j].to(device)
                    acc = ((lab * (rc_o - rr_o)) > 0).float()[lab != 0].mean()
                    cache[key] = (dict(zip(zip(data.prompts, data.chosen, data.rejected), (rc_o - rr_o).tolist())),
                                  {"source": "labels", "steps": cfg.margin_steps, "pairs": int((lab != 0).sum()),
                                   "train_pair_accuracy": float(acc)})
                diff, meta = cache[key]
                d = torch.tensor([diff[(p, c, r)] for p, c, r in zip(self.data.prompts, self.data.chosen,
                                                                      self.data.rejected)], device=device)
                self.margin = self.margin + self.w[cfg.objectives.index(o)] * d
                self.margin_info[o] = meta
        self.n_pairs = n
        self.sampler = EpochSampler(n, self.gen)
        n_obj = len(cfg.objectives)
        if cfg.method in ("raco", "cagrad"):
            self.bufs = [[torch.zeros_like(p) for p in self.params] for _ in range(n_obj)]

    def state_dict(self) -> Dict:
        s = super().state_dict()
        if self.margin is not None:  # modpo: the first stage's outcome, so --resume does not train it again
            s["modpo_margin"] = self.margin.detach().clone()
        return s

    def _losses(self, idx: List[int]):
        c = self.cfg
        dev = self.device
        t = torch.tensor(idx, dtype=torch.long, device=dev)
        prompts = [self.data.prompts[i] for i in idx]
        texts = [self.data.chosen[i] for i in idx] + [self.data.rejected[i] for i in idx]
        ids, am, rm = encode_responses(self.tokenizer, prompts + prompts, texts, c.max_prompt_tokens,
                                       c.max_response_tokens, dev)
        lp = sequence_logps(self.policy, ids, am, rm)
        B = len(idx)
        pc, pr = lp[:B], lp[B:]
        lens = dict(chosen_lengths=self.len_c[t], rejected_lengths=self.len_r[t]) if c.length_normalize else {}
        if c.method == "modpo":
            k = c.modpo_index
            shift = self.margin[t] / c.dpo_beta
            if c.length_normalize:
                shift = shift * self.len_c[t]
            losses, coef = multi_dpo_loss(pc - shift, pr, self.ref_c[t], self.ref_r[t], self.labels[k:k + 1, t],
                                          c.loss_beta, **lens)
            return losses, coef, (pc - self.ref_c[t]) - (pr - self.ref_r[t])
        losses, coef = multi_dpo_loss(pc, pr, self.ref_c[t], self.ref_r[t], self.labels[:, t], c.loss_beta, **lens)
        return losses, coef, (pc - self.ref_c[t]) - (pr - self.ref_r[t])

    def step(self) -> None:
        c = self.cfg
        idx = self.sampler.take(c.batch_size)
        B = len(idx)
        self.policy.eval()  # dropout off, as the PPO trainer does (deterministic updates)
        loss_sum, acc = None, None
        full = c.method in ("raco", "cagrad")
        if full:
            for row in self.bufs:
                for g in row:
                    g.zero_()
        mine = self.shard(idx)
        for s in range(0, len(mine), c.micro_batch_size):
            mb = mine[s:s + c.micro_batch_size]
            share = len(mb) / B  # of the global batch: the ranks' sums are the global batch's gradients
            losses, _coef, h = self._losses(mb)
            if full:
                n = losses.shape[0]
                for i in range(n):
                    gs = torch.autograd.grad(losses[i] * share, self.params, retain_graph=i < n - 1, allow_unused=True)
                    for buf, g in zip(self.bufs[i], gs):
                        if g is not None:
                            buf.add_(g)
            elif c.method == "dpo-lw":
                ((self.w * losses).sum() * share).backward()
            else:  # modpo
                (losses.sum() * share).backward()
            ls = losses.detach() * share
            loss_sum = ls if loss_sum is None else loss_sum + ls
            a = (h.detach() > 0).float().mean() * share
            acc = a if acc is None else acc + a
        if loss_sum is None:  # a rank whose shard is empty
            loss_sum = torch.zeros(self.labels.shape[0] if c.method != "modpo" else 1, device=self.device)
            acc = torch.zeros((), device=self.device)
        metrics = {"losses": loss_sum, "margin_positive": acc}
        if self.pg is not None:
            self.reduce([loss_sum, acc])
            if full:
                self.reduce([g for row in self.bufs for g in row])
            else:
                self.reduce_grads()
        if full:
            G = gradient_gram(self.bufs)
            a = cagrad_weights(G, self.w, c=c.cagrad_c, clip=(c.method == "raco"))
            combine_gradients(self.bufs, a.to(self.bufs[0][0].dtype), self.params)
            metrics["coeffs"] = a
            metrics["gram"] = G.reshape(-1)
            gn = torch.sqrt(torch.diagonal(G).clamp_min(0))
            metrics["cos"] = (G[0, -1] / (gn[0] * gn[-1]).clamp_min(1e-30)) if G.shape[0] > 1 else torch.ones(())
        self._finish_step(metrics)


class MopoTrainer(_Base):
    """MOPO and MOPO-LB (docs/dpo.md, "mopo") on the stored responses of a :class:`ResponsePool`."""

    def __init__(self, cfg: DPOConfig, policy, ref_lm, tokenizer, data: PrefData, device,
                 ref_cache: Optional[Dict] = None, group=None):
        super().__init__(cfg, policy, ref_lm, tokenizer, device, group)
        pool: ResponsePool = response_pool(data)
        self.pool = pool
        self.sampler = EpochSampler(pool.n_prompts, self.gen)
        k = cfg.mopo_index
        others = [j for j in range(len(cfg.objectives)) if j != k]
        self.primary = pool.winrate[k].to(device)
        self.secondary = pool.winrate[others].to(device)  # [K−1, R]
        self.secondary_names = [cfg.objectives[j] for j in others]
        self.group = pool.group.to(device)
        P = pool.n_prompts
        members: List[List[int]] = [[] for _ in range(P)]
        for r, g in enumerate(pool.group.tolist()):
            members[g].append(r)
        self.members = members
        self.log_base0 = M.uniform_log_base(self.group, P)
        self.log_base = self.log_base0.clone()
        self.pool_prompt_of = [pool.prompts[g] for g in pool.group.tolist()]
        self.logp_ref0, _ = reference_sequence_logps(ref_lm, tokenizer, self.pool_prompt_of, pool.responses, cfg,
                                                     device, cache=ref_cache)
        self.lag_logp = self.logp_ref0.clone()  # π_ψ at step 0 is π_ref⁰
        g0 = M.secondary_values(self.secondary, self.log_base0, P, cfg.mopo_epsilon)
        b0 = cfg.mopo_threshold_beta * g0
        self.duals = M.MopoDuals.init(b0)
        self.pool_info = {"prompts": P, "responses": len(pool), "mean_responses_per_prompt": len(pool) / max(P, 1),
                          "secondary_of_reference": M.secondary_values(self.secondary, self.log_base0, P).tolist(),
                          "robust_secondary_of_reference": g0.tolist(), "b0": b0.tolist()}

    def state_dict(self) -> Dict:
        s = super().state_dict()
        s["mopo"] = {"duals": {k: v.clone() for k, v in self.duals.state_dict().items()},
                     "log_base": self.log_base.clone(), "lag_logp": self.lag_logp.clone()}
        return s

    def load_state_dict(self, s: Dict) -> None:
        super().load_state_dict(s)
        m = s["mopo"]
        self.duals = M.MopoDuals(**{k: v.to(self.device) for k, v in m["duals"].items()})
        self.log_base = m["log_base"].to(self.device)
        self.lag_logp = m["lag_logp"].to(self.device)

    @torch.no_grad()
    def _pool_logps(self) -> Tensor:
        was = self.policy.training
        self.policy.eval()
        out = []
        c = self.cfg
        prompts = self.pool_prompt_of
        for i in range(0, len(prompts), 128):
            ids, am, rm = encode_responses(self.tokenizer, prompts[i:i + 128], self.pool.responses[i:i + 128],
                                           c.max_prompt_tokens, c.max_response_tokens, self.device)
            out.append(sequence_logps(self.policy, ids, am, rm))
        self.policy.train(was)
        return torch.cat(out)

    def _ratchet(self) -> None:
        """Every t0 steps: π_ref ← π_ψ^(t−t0) (lag ratio on the stored responses), b ← β ⊙ G(π_ψ^(t−t0))."""
        c, P = self.cfg, self.pool.n_prompts
        self.log_base = M.lag_log_base(self.lag_logp, self.logp_ref0, self.log_base0, self.group, P)
        self.duals.b = c.mopo_threshold_beta * M.secondary_values(self.secondary, self.log_base, P, c.mopo_epsilon)
        self.lag_logp = self._pool_logps()

    def step(self) -> None:
        c = self.cfg
        if c.mopo_t0 and self.step_idx > 0 and self.step_idx % c.mopo_t0 == 0:
            self._ratchet()
        prompts = self.sampler.take(min(c.batch_size, self.pool.n_prompts))
        idx_l, grp_l = [], []
        for j, g in enumerate(prompts):
            idx_l += self.members[g]
            grp_l += [j] * len(self.members[g])
        Mb = len(prompts)
        idx = torch.tensor(idx_l, dtype=torch.long, device=self.device)
        grp = torch.tensor(grp_l, dtype=torch.long, device=self.device)
        lb = self.log_base[idx]
        if c.barrier_sigma:  # mopo-lb: the barrier's multipliers on the whole pool (exact root, see barrier_lambda)
            g = M.barrier_lambda(self.duals, self.primary, self.secondary, self.log_base, self.group,
                                 self.pool.n_prompts, c.mopo_tau, c.mopo_epsilon, c.barrier_sigma)
            dm = {"lower_bound": g}
            log_rho = M.tilt_log_weights(self.primary[idx], self.secondary[:, idx], self.duals.lam, c.mopo_tau, lb,
                                         grp, Mb)
        else:
            log_rho, dm = M.dual_step(self.duals, self.primary[idx], self.secondary[:, idx], lb, grp, Mb, c.mopo_tau,
                                      c.mopo_epsilon, c.mopo_dual_lr)
        W = M.bc_weights(log_rho, lb, Mb)
        self.policy.eval()  # dropout off, as the PPO trainer does (deterministic updates)
        loss_sum = torch.zeros((), device=self.device)
        pos = self.shard(range(len(idx_l)))  # this rank's responses of the batch (the weights W are global)
        texts = [self.pool.responses[idx_l[j]] for j in pos]
        ptexts = [self.pool_prompt_of[idx_l[j]] for j in pos]
        w_mine = W[pos.start:pos.stop]
        for s in range(0, len(pos), c.micro_batch_size):
            ids, am, rm = encode_responses(self.tokenizer, ptexts[s:s + c.micro_batch_size],
                                           texts[s:s + c.micro_batch_size], c.max_prompt_tokens,
                                           c.max_response_tokens, self.device)
            lp = sequence_logps(self.policy, ids, am, rm)
            loss = -(w_mine[s:s + c.micro_batch_size] * lp).sum()
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        if self.pg is not None:
            self.reduce([loss_sum])
            self.reduce_grads()
        tilted = (torch.exp(log_rho) * self.secondary[:, idx] * torch.exp(lb)).sum(-1) / Mb
        tilted_p = (torch.exp(log_rho) * self.primary[idx] * torch.exp(lb)).sum() / Mb
        self._finish_step({"loss": loss_sum, "ess": M.effective_sample_size(W), "ess_frac":
                           M.effective_sample_size(W) / len(idx_l), "lam": self.duals.lam.clone(),
                           "chi": self.duals.chi.clone(), "b": self.duals.b.clone(), "lower_bound": dm["lower_bound"],
                           "tilted_secondary": tilted, "tilted_primary": tilted_p})


def make_trainer(cfg: DPOConfig, policy, ref_lm, tokenizer, data: PrefData, judges, device,
                 ref_cache: Optional[Dict] = None, group=None, state: Optional[Dict] = None,
                 margin_cache: Optional[Dict] = None):
    """The trainer of ``cfg.method``; ``group``: a torch.distributed group to share each step's batch with;
    ``state``: the trainer state of a checkpoint being resumed (modpo takes its first stage's margins from it);
    ``margin_cache``: modpo's first-stage margins shared by the runs of a sweep (they do not depend on w)."""
    if cfg.is_mopo:
        return MopoTrainer(cfg, policy, ref_lm, tokenizer, data, device, ref_cache=ref_cache, group=group)
    margin = None if state is None else state.get("modpo_margin")
    return PairTrainer(cfg, policy, ref_lm, tokenizer, data, judges, device, ref_cache=ref_cache, group=group,
                       margin=margin, margin_cache=margin_cache)
