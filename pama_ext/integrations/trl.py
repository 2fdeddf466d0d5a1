"""TRL adapter: ``PamaGRPOTrainer``, a ``trl.GRPOTrainer`` that combines its reward functions with PAMA.

TRL's GRPOTrainer sums the (weighted) rewards of its ``reward_funcs`` into one reward per completion
and normalises it within each prompt's group. ``PamaGRPOTrainer`` keeps ``reward_funcs=[...]`` as the
objectives: each objective's rewards are group-normalised on their own (the same mean/std rule as
TRL's, per objective), and the per-objective advantages are combined token by token by
:func:`pama_ext.pama_policy_loss` (``method`` / ``granularity`` configurable) instead of being summed.

Everything else (generation, reference model, KL term ``beta``, clipping ``epsilon`` /
``epsilon_high``, loss normalisation of ``loss_type`` ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo``)
follows the GRPOConfig. With one reward function, ``method="linear", noon=False, whiten=False`` the
loss is TRL's own GRPO loss.

The loss comes by default straight from the model's last hidden states and output-layer weight
through :func:`pama_ext.fused_linear_policy_loss` (``fused_linear=True``: the logits never exist;
see :class:`PamaGRPOTrainer`), or with ``fused_linear=False`` from TRL's own per-token log-probs.

The loss path never reads a value back to the host: the loss metrics are kept as device tensors
and turned into numbers only when the trainer logs.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from trl import GRPOTrainer

from .. import ops
from ..fused_linear import fused_linear_logp, fused_linear_policy_loss
from ..lm.policy import check_logits_transform, fused_head_inputs, fused_scale_softcap, logits_transform
from ._common import call_policy_loss, check_pama_options, loss_call_options, rescale_to_global

__all__ = ["PamaGRPOTrainer", "group_normalized_advantages", "LOSS_TYPE_AGG", "trl_normalized_loss",
           "causal_lm", "call_through_wrapper"]

#: TRL loss types and the aggregation of the fused loss whose sums each one normalises.
LOSS_TYPE_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum",
    "dapo": "token-mean",
}


def trl_normalized_loss(loss: Tensor, mask: Tensor, loss_type: str, *, max_completion_length: int,
                        accumulation: float = 1.0, dapo_normalizer: Any = None, group: Optional[Any] = None) -> Tensor:
    """TRL 1.16's ``loss_type`` normalisation of the fused loss, on device (no host read).

    ``loss`` is :func:`pama_ext.pama_policy_loss` with ``agg=LOSS_TYPE_AGG[loss_type]`` on the micro-batch
    ``mask`` ``[B, T]`` (with ``group=group`` when set): a sum over the non-empty rows (``seq-mean-*``) or
    tokens divided by their count, over the group's shards with a group. TRL instead divides this
    micro-batch's sum by

    - ``grpo``: ``B``, every row counted, fully masked (e.g. truncated) ones included;
    - ``dr_grpo``: ``B * max_completion_length``, the same ``B``;
    - ``bnpo``: the micro-batch's active tokens (at least 1);
    - ``dapo``: ``dapo_normalizer`` (the generation batch's active tokens per process and accumulation
      window, already including gradient accumulation);

    and the first three by ``accumulation`` (the gradient accumulation steps). The loss is multiplied
    by ``count / denominator``, ``count`` being the op's own count (all-reduced over ``group``), so
    that each rank's gradient is that of its own TRL loss and DDP's averaging over ranks is TRL's.
    """
    agg = LOSS_TYPE_AGG.get(loss_type)
    if agg is None:
        raise ValueError(f"loss_type: expected one of {sorted(LOSS_TYPE_AGG)}, got {loss_type!r}")
    if loss_type == "dapo":
        if dapo_normalizer is None:
            raise ValueError("dapo_normalizer: required for loss_type='dapo'")
        return rescale_to_global(loss, mask, agg, batch_num_tokens=dapo_normalizer, group=group)
    if loss_type == "bnpo":
        loss = rescale_to_global(loss, mask, agg, batch_num_tokens=(mask != 0).sum().clamp(min=1), group=group)
    else:
        rows = mask.shape[0] * (max_completion_length if loss_type == "dr_grpo" else 1)
        loss = rescale_to_global(loss, mask, agg, global_batch_size=rows, group=group)
    return loss / accumulation


def group_normalized_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group",
                                eps: float = 1e-4) -> Tensor:
    """Per-objective GRPO advantages ``[N, n]`` from rewards ``[N, n]`` (``N`` = groups x ``num_generations``).

    For each objective separately: ``r - mean_group(r)``, divided by ``std_group(r) + eps``
    (``scale_rewards="group"``), by the objective's std over the whole batch (``"batch"``) or not at
    all (``"none"``); std unbiased, NaN rewards (a reward function returned None) are ignored in the
    statistics and get advantage 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected [N, n], got shape {tuple(rewards.shape)}")
    N, n = rewards.shape
    if num_generations < 1 or N % num_generations != 0:
        raise ValueError(f"num_generations: {num_generations} does not divide the {N} completions")
    grouped = rewards.view(-1, num_generations, n)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = (grouped - mean).view(N, n)
    if scale_rewards == "group":
        std = _nanstd(grouped, dim=1).expand_as(grouped).reshape(N, n) if num_generations > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = _nanstd(rewards, dim=0) if N > 1 else torch.zeros(1, n, device=rewards.device, dtype=rewards.dtype)
        adv = adv / (std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards: expected 'group', 'batch' or 'none', got {scale_rewards!r}")
    return torch.nan_to_num(adv, nan=0.0)


def token_advantages(obj: Tensor, T: int, dtype: torch.dtype) -> Tensor:
    """The per-sequence objective advantages ``[B, n]`` as the loss takes them: ``[n, B, T]``, every token
    of a completion with its sequence's advantage."""
    return obj.to(dtype).t()[:, :, None].expand(-1, -1, T).contiguous()


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM of a (possibly PEFT-wrapped, already unwrapped from DDP) model: a
    ``PeftModel``'s base model (its adapter layers are inside it), else ``model`` itself."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def call_through_wrapper(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as the forward of ``module`` called through ``wrapper(*args, **kwargs)``
    (DDP and the like), so that the wrapper's forward runs (DDP prepares its gradient reduction there;
    it also moves the arguments to the module's device) although ``fn`` calls submodules of ``module``
    directly. ``module.forward`` is restored before ``fn`` runs (``fn`` may call it) and in every case
    afterwards. Without a wrapper (``wrapper is module``) just ``fn(*args, **kwargs)``."""
    if wrapper is module:
        return fn(*args, **kwargs)
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")

    def restore() -> None:
        if had_own:
            module.forward = own
        else:
            module.__dict__.pop("forward", None)

    def redirected(*a: Any, **k: Any) -> Any:
        restore()
        return fn(*a, **k)

    module.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


def _nanstd(x: Tensor, dim: int) -> Tensor:
    """Unbiased standard deviation over ``dim`` ignoring NaNs (keepdim)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    ss = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True)
    return torch.sqrt(ss / (count - 1))


class PamaGRPOTrainer(GRPOTrainer):
    """GRPO with per-objective advantages combined by the PAMA policy loss.

    Takes every argument of ``trl.GRPOTrainer`` (``reward_funcs=[...]``: one objective each) plus,
    keyword-only:

    - ``method``: ``"pama"`` (closed-form Pareto weights), ``"linear"`` (weighted sum with ``prefs``,
      which default to GRPOConfig's ``reward_weights``) or ``"mgda"``;
    - ``granularity``: ``"token"``, ``"sequence"`` or ``"batch"`` (for ``pama``);
    - ``noon`` (default True): drop negative advantages (Noon PPO); ``whiten`` (default False: the
      advantages are already group-normalised);
    - ``prefs``: objective weights of ``linear``;
    - ``process_group``: a ``torch.distributed`` process group over which the loss statistics are
      all-reduced (passed to the op only when set);
    - ``check_finite``: raise on NaN/Inf inputs;
    - ``fused_linear`` (default True): the loss straight from the model's last hidden states and
      output-layer weight with :func:`pama_ext.fused_linear_policy_loss` (completion positions only,
      the logits divided by GRPOConfig's ``temperature`` through its ``logit_scale``; the ``[B, T, V]``
      logits never exist). With rollout log-probs (``old_per_token_logps``, e.g. ``num_iterations >
      1``) and options whose combined advantage does not depend on the ratios (``linear``, or
      ``pama`` at token granularity or with one reward function) it is the op's single pass: 3
      output-layer matmuls per micro-batch, against 4 for TRL's tiled LM head; otherwise the log-probs
      come from :func:`pama_ext.fused_linear_logp` (4 matmuls, as TRL's). The ``entropy`` metric is
      not logged on this path (the op does not compute it). The model's logits must be
      ``lm_head(base_model(...))`` or one of the transforms :func:`pama_ext.lm.policy.logits_transform`
      reads from the config (checked at construction: ValueError otherwise); text-only models, no
      DeepSpeed / FSDP (the op reads the output layer's weight directly). ``False``: TRL's own
      log-probs (``fused_lm_head=True``), then the loss.

    Unsupported GRPOConfig settings (sequence-level importance sampling, entropy masks or bonus,
    off-policy masks, vLLM importance-sampling correction, two-sided ``delta``, MoE aux loss, loss types
    other than grpo/bnpo/dr_grpo/dapo) raise at construction, naming the setting.
    """

    def __init__(self, *args: Any, method: str = "pama", granularity: str = "token", noon: bool = True,
                 whiten: bool = False, prefs: Optional[Any] = None, process_group: Optional[Any] = None,
                 check_finite: bool = True, fused_linear: bool = True, **kwargs: Any) -> None:
        prefs_t = check_pama_options(method, granularity, prefs)
        if not isinstance(fused_linear, bool):
            raise ValueError(f"fused_linear: expected True or False, got {fused_linear!r}")
        super().__init__(*args, **kwargs)
        self.pama_method, self.pama_granularity = method, granularity
        self.pama_noon, self.pama_whiten = bool(noon), bool(whiten)
        self.pama_group, self.pama_check_finite = process_group, bool(check_finite)
        n = len(self.reward_funcs)
        if prefs_t is None and method == "linear":
            prefs_t = self.reward_weights.detach().to(torch.float32).clone()
        if prefs_t is not None and prefs_t.numel() != n:
            raise ValueError(f"prefs: {prefs_t.numel()} weights for {n} reward functions")
        self.pama_prefs = prefs_t
        self._check_supported()
        self.pama_fused_linear = fused_linear
        #: (scale, softcap) of the model's logits on top of its output layer (fused_linear only)
        self._pama_head_transform = self._check_fused_linear() if fused_linear else None
        self._pama_agg = LOSS_TYPE_AGG[self.loss_type]
        self._pama_rewards: Optional[Tensor] = None
        self._pama_pending: Dict[str, Dict[str, List[Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # -- configuration ---------------------------------------------------------------------------
    def _check_supported(self) -> None:
        a = self.args
        bad = []
        if self.loss_type not in LOSS_TYPE_AGG:
            bad.append(f"loss_type={self.loss_type!r} (supported: {sorted(LOSS_TYPE_AGG)})")
        if getattr(self, "importance_sampling_level", "token") != "token":
            bad.append(f"importance_sampling_level={self.importance_sampling_level!r} (only 'token')")
        if getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            bad.append(f"top_entropy_quantile={self.top_entropy_quantile} (only 1.0)")
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            bad.append("off_policy_mask_threshold (only None)")
        if getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False):
            bad.append("vllm_importance_sampling_correction=True with use_vllm (only False)")
        if getattr(a, "delta", None) is not None:
            bad.append(f"delta={a.delta} (only None)")
        if self.beta != 0.0 and getattr(a, "use_bias_correction_kl", False):
            bad.append("use_bias_correction_kl=True with beta != 0 (the KL term is not importance-weighted here; "
                       "set it to False)")
        if getattr(self, "_entropy_bonus_enabled", False):
            bad.append("entropy_coef / adaptive entropy (only off)")
        if getattr(self, "aux_loss_enabled", False):
            bad.append("router aux loss (only off)")
        if bad:
            raise ValueError("PamaGRPOTrainer does not support these GRPOConfig settings: " + "; ".join(bad))

    def _check_fused_linear(self):
        """The (scale, softcap) of the policy's logits for ``fused_linear=True``, after checking that the
        fused path can compute its log-probs; ValueError naming ``fused_linear`` otherwise."""
        lm = causal_lm(self.model)
        head_weight = getattr(lm.get_output_embeddings(), "weight", None)
        why = None
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            why = "DeepSpeed / FSDP shard the output layer's weight, which the fused op reads directly"
        elif getattr(lm, "config", None) is None or lm.config.get_text_config() is not lm.config:
            why = f"{type(lm).__name__} is not a text-only causal LM (multimodal inputs are not passed)"
        elif not isinstance(head_weight, torch.Tensor) or head_weight.dim() != 2:
            why = f"{type(lm).__name__} has no [V, H] output-layer weight"
        if why is not None:
            raise ValueError(f"fused_linear=True: {why}; pass fused_linear=False")
        transform = logits_transform(lm)
        check_logits_transform(lm, transform, "PamaGRPOTrainer(fused_linear=True) (pass fused_linear=False)")
        return transform

    # -- rewards and advantages ------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pama_rewards = rewards  # [N_all, n], gathered over the processes
        return rewards

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self._pama_rewards = None
        output = super()._generate_and_score_completions(inputs)
        rewards = self._pama_rewards
        if rewards is None:
            raise RuntimeError("PamaGRPOTrainer: GRPOTrainer did not compute per-function rewards")
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        adv = group_normalized_advantages(rewards, num_generations, self.scale_rewards)
        local = output["completion_ids"].shape[0]
        start = self.accelerator.process_index * local
        output["objective_advantages"] = adv[start : start + local].contiguous()  # [B_local, n]
        return output

    # -- loss ------------------------------------------------------------------------------------
    def _pama_loss_options(self) -> Dict[str, Any]:
        """The policy-loss options from the trainer's settings (both paths)."""
        return dict(eps_lo=self.epsilon_low, eps_hi=self.epsilon_high, dual_clip=None, noon=self.pama_noon,
                    whiten=self.pama_whiten, method=self.pama_method, granularity=self.pama_granularity,
                    agg=self._pama_agg, beta_loss=float(self.beta), check_finite=self.pama_check_finite)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        old_logp = inputs.get("old_per_token_logps")
        ref_logp = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        obj = inputs["objective_advantages"]  # [B, n]
        entropies = None
        if self.pama_fused_linear:
            loss, metrics = self._fused_linear_loss(model, input_ids, attention_mask, completion_ids, mask, old_logp,
                                                    ref_logp, obj)
        else:
            extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                            "mm_token_type_ids", "image_position_ids") if k in inputs}
            logp, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, T, compute_entropy=True, **extra
            )
            old_logp = logp.detach() if old_logp is None else old_logp
            adv = token_advantages(obj, T, logp.dtype)
            loss, metrics = call_policy_loss(logp, old_logp, adv, mask, ref_logp, self.pama_group,
                                             prefs=self.pama_prefs, **self._pama_loss_options())
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        dapo_normalizer = None
        if self.loss_type == "dapo":
            # TRL normalises by the active tokens of the whole generation batch, not of this micro-batch
            dapo_normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                dapo_normalizer = dapo_normalizer * accum / self.args.steps_per_generation
        loss = trl_normalized_loss(loss, mask, self.loss_type, max_completion_length=self.max_completion_length,
                                   accumulation=accum, dapo_normalizer=dapo_normalizer, group=self.pama_group)

        pending = self._pama_pending[mode]
        if entropies is not None:
            m = mask.to(entropies.dtype)
            pending["entropy"].append((entropies.detach() * m).sum() / m.sum().clamp(min=1.0))
        pending["clip_ratio/region_mean"].append(metrics["clipfrac"].detach())
        pending["pama/approx_kl"].append(metrics["approx_kl"].detach())
        pending["pama/active"].append(metrics["active"].detach())
        if self.beta != 0.0:
            pending["kl"].append(metrics["kl_loss"].detach())
        for i, name in enumerate(self.reward_func_names):
            pending[f"pama/weights/{name}"].append(metrics["weights"][i].detach())
            pending[f"pama/pos/{name}"].append(metrics["pos"][i].detach())
        return loss

    def _fused_linear_loss(self, model, input_ids, attention_mask, completion_ids, mask, old_logp, ref_logp, obj):
        """``(loss, metrics)`` of the policy loss through the fused output layer (``fused_linear=True``): the
        backbone's last hidden states at the positions that predict the completion, the output layer's
        weight and bias, and the logits' transform and temperature as ``logit_scale`` / ``softcap``. Run
        as the forward of the (DDP-)wrapped model, so that the wrapper's hooks see the call."""
        unwrapped = self.accelerator.unwrap_model(model)
        T = completion_ids.size(1)

        def forward(input_ids, attention_mask):
            lm = causal_lm(unwrapped)
            with self.accelerator.autocast():
                h = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
                lm_head = lm.get_output_embeddings()
                h = h[:, -T - 1:-1].to(lm_head.weight.device)  # position t predicts token t + 1
                if self.args.cast_lm_head_to_fp32:  # TRL's option: the output layer in float32 (its weight already is)
                    head = (h.float(), lm_head.weight, lm_head.bias)
                else:
                    head = fused_head_inputs(lm_head, h)  # in the autocast dtype, as the output layer would run
            scale, cap = fused_scale_softcap(self._pama_head_transform, self.temperature)
            ids, m = completion_ids.to(h.device), mask.to(h.device)
            dtype = torch.float32 if old_logp is None else old_logp.dtype
            adv = token_advantages(obj, T, dtype)
            options = loss_call_options(adv, adv, self.pama_group, self.pama_prefs, **self._pama_loss_options())
            if old_logp is None:  # on-policy: the ratio is exp(logp - logp.detach()); the log-probs come first
                logp = fused_linear_logp(*head, ids, m, out_dtype=dtype, logit_scale=scale, softcap=cap)
                return ops.pama_policy_loss(logp, logp.detach(), adv, m, ref_logp, **options)
            return fused_linear_policy_loss(*head, ids, m, old_logp, adv, ref_logp, logit_scale=scale, softcap=cap,
                                            **options)

        return call_through_wrapper(model, unwrapped, forward, input_ids, attention_mask)

    # -- logging ---------------------------------------------------------------------------------
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Turn the pending device-tensor metrics into numbers (one host read per logging step)."""
        for mode, pending in self._pama_pending.items():
            for key, values in pending.items():
                if values:
                    value = self.accelerator.gather(torch.stack(values).mean().reshape(1)).mean()
                    self._metrics[mode][key].append(float(value))
            pending.clear()
        super().log(logs, start_time)
