"""The policy: a Hugging Face causal LM with n scalar value heads on its final hidden state.

One forward pass over ``prompt + response`` gives, for the T response positions, the token
log-probs (logits shifted by one, computed in float32, divided by the sampling temperature as TRL and
verl do), the n values and the final hidden states they were computed from (MGDA-UB differentiates
the per-objective losses with respect to those).

Assumption: ``logits = f(lm.get_output_embeddings()(lm.base_model(...).last_hidden_state))`` with
``f`` the identity (GPT-2, Llama, Mistral, Qwen and most causal LMs) or one of the transforms a
config declares (:func:`logits_transform`: Gemma 2/3's final soft-capping, Cohere's ``logit_scale``,
Granite's ``logits_scaling``); :class:`PolicyWithValueHeads` checks it once at construction against
the model's own logits and raises a clear error for any other post-processing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["PolicyWithValueHeads", "PolicyOutput", "frozen_copy", "position_ids_from_mask", "hidden_size",
           "fused_head_inputs", "logits_transform", "transformed_logits", "fused_scale_softcap", "PLAIN_HEAD",
           "check_logits_transform"]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding -- the same rule ``generate`` uses (pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def hidden_size(lm: nn.Module) -> int:
    cfg = lm.config
    for name in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return int(lm.get_output_embeddings().weight.shape[1])


@dataclass
class PolicyOutput:
    logp: Optional[Tensor]  # [B, T] float32 (None when the forward was asked for no log-probs)
    values: Optional[Tensor]  # [n, B, T] float32
    hidden: Tensor  # [B, T, H] final hidden states at the positions that predict the response tokens


#: (scale, softcap) of an output layer whose logits are lm_head(h) unchanged
PLAIN_HEAD = (1.0, None)


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def logits_transform(lm) -> Tuple[float, Optional[float]]:
    """``(scale, softcap)`` of a causal LM whose logits are ``z = scale · lm_head(h)``, then
    ``softcap · tanh(z / softcap)`` when ``softcap`` is not None, read from ``lm.config``: Gemma 2 / 3
    ``final_logit_softcapping``, Cohere ``logit_scale`` (multiplies), Granite ``logits_scaling``
    (divides). ``(1.0, None)`` for every other model (and for ``lm`` without a config)."""
    cfg = getattr(lm, "config", None)
    scale = 1.0
    mul, div = _number(getattr(cfg, "logit_scale", None)), _number(getattr(cfg, "logits_scaling", None))
    if mul is not None:
        scale *= mul
    if div:
        scale /= div
    cap = _number(getattr(cfg, "final_logit_softcapping", None))
    return scale, cap if cap is not None and cap > 0 else None


def transformed_logits(logits: Tensor, transform: Tuple[float, Optional[float]]) -> Tensor:
    """``logits`` through a :func:`logits_transform`."""
    scale, cap = transform
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def fused_scale_softcap(transform: Tuple[float, Optional[float]], temperature: float
                        ) -> Tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` of :mod:`pama_ext.fused_linear` for a :func:`logits_transform` followed
    by the division by ``temperature``: ``c·tanh(s·z/c)/τ = (c/τ)·tanh((s/τ)·z/(c/τ))``, so both scale
    and cap are divided by τ."""
    scale, cap = transform
    return scale / temperature, None if cap is None else cap / temperature


def _response_logp(lm_head: nn.Module, h: Tensor, targets: Tensor, temperature: float,
                   transform: Tuple[float, Optional[float]] = PLAIN_HEAD) -> Tensor:
    logits = transformed_logits(lm_head(h).float(), transform)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def fused_head_inputs(lm_head: nn.Module, h: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(hidden, weight, bias)`` of the output layer ``lm_head`` for :mod:`pama_ext.fused_linear`, in the
    autocast dtype when autocast is on (as the output layer would run there), else in the weight's."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    return h, weight, bias


def _fused_response_logp(lm_head: nn.Module, h: Tensor, targets: Tensor, temperature: float,
                         transform: Tuple[float, Optional[float]] = PLAIN_HEAD) -> Tensor:
    """:func:`_response_logp` through :func:`pama_ext.fused_linear_logp` (no ``[B, T, V]`` logits)."""
    from ..fused_linear import fused_linear_logp

    scale, cap = fused_scale_softcap(transform, temperature)
    return fused_linear_logp(*fused_head_inputs(lm_head, h), targets, logit_scale=scale, softcap=cap)


def _trunk(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out[0]


@torch.no_grad()
def check_logits_transform(lm: nn.Module, transform: Tuple[float, Optional[float]], user: str) -> None:
    """Raises ValueError unless ``lm``'s logits are ``transformed_logits(lm_head(base_model(...)), transform)``
    (checked once on a short sequence against the model's own logits). ``user`` names who relies on
    it in the message (e.g. "the trainer")."""
    dev = next(lm.parameters()).device
    ids = torch.arange(6, device=dev).remainder(lm.get_output_embeddings().weight.shape[0])[None]
    am = torch.ones_like(ids)
    training = lm.training
    lm.eval()  # no dropout in either forward
    try:
        ref = lm(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits.float()
        mine = transformed_logits(lm.get_output_embeddings()(_trunk(lm, ids, am)).float(), transform)
    finally:
        lm.train(training)
    if ref.shape != mine.shape or not torch.allclose(ref, mine, atol=1e-4, rtol=1e-4):
        raise ValueError(f"{type(lm).__name__}: its logits are not lm_head(base_model(...)), nor that under a "
                         f"transform its config declares ((scale, softcap) = {transform}: "
                         f"pama_ext.lm.policy.logits_transform); {user} does not support other post-processed "
                         "logits")


class PolicyWithValueHeads(nn.Module):
    """``lm`` (trained) plus ``value_heads = nn.Linear(hidden, n_heads)`` (zero-initialised)."""

    def __init__(self, lm: nn.Module, n_heads: int, check: bool = True):
        super().__init__()
        self.lm = lm
        self.value_heads = nn.Linear(hidden_size(lm), n_heads)
        nn.init.zeros_(self.value_heads.weight)
        nn.init.zeros_(self.value_heads.bias)
        self.value_heads.to(next(lm.parameters()).device)
        #: log-probs through pama_ext.fused_linear_logp (the logits never materialised); --fused-linear
        self.fused_linear = False
        #: (scale, softcap) of the model's logits on top of its output layer (logits_transform)
        self.head_transform = logits_transform(lm)
        self._checkpointed: list = []
        if check:
            check_logits_transform(lm, self.head_transform, "the trainer")

    def enable_gradient_checkpointing(self) -> None:
        """The LM's own gradient checkpointing (``gradient_checkpointing_enable``), active whether or not
        the policy is in training mode: :meth:`forward` sets ``training = True`` on the checkpointed blocks
        themselves (their switch; their dropout submodules stay as they are, off under the trainer's
        ``eval()``), since generation and ``eval()`` reset it."""
        if not getattr(self.lm, "supports_gradient_checkpointing", False):
            raise ValueError(f"--gradient-checkpointing: {type(self.lm).__name__} does not support gradient "
                             "checkpointing")
        kwargs = {"use_reentrant": False}
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._checkpointed = [m for m in self.lm.modules() if getattr(m, "gradient_checkpointing", False) is True]
        if not self._checkpointed:
            raise ValueError(f"--gradient-checkpointing: no checkpointable block found in {type(self.lm).__name__}")

    @property
    def n_heads(self) -> int:
        return self.value_heads.out_features

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int, temperature: float = 1.0,
                with_values: bool = True, with_logp: bool = True) -> PolicyOutput:
        """``input_ids``/``attention_mask``: ``[B, P + T]`` (prompt left-padded, then the response).
        ``with_logp=False``: no output layer (the caller feeds ``hidden`` to a fused loss)."""
        T = response_len
        L = input_ids.shape[1]
        for m in self._checkpointed:  # the blocks' checkpointing switch (only acts when gradients are on)
            m.training = True
        h_all = _trunk(self.lm, input_ids, attention_mask)
        h = h_all[:, L - T - 1:L - 1]  # positions that predict the response tokens
        logp = None
        if with_logp:
            response_logp = _fused_response_logp if self.fused_linear else _response_logp
            logp = response_logp(self.lm.get_output_embeddings(), h, input_ids[:, L - T:], temperature,
                                 self.head_transform)
        values = self.value_heads(h).float().permute(2, 0, 1) if with_values else None
        return PolicyOutput(logp=logp, values=values, hidden=h)


def frozen_copy(lm: nn.Module) -> nn.Module:
    """The reference policy: a deep copy with no gradients, in eval mode."""
    ref = copy.deepcopy(lm)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


@torch.no_grad()
def reference_logp(ref_lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_len: int,
                   temperature: float = 1.0, fused_linear: bool = False) -> Tensor:
    """The response log-probs of ``ref_lm`` (no gradients); ``fused_linear``: through
    :func:`pama_ext.fused_linear_logp`, the ``[B, T, V]`` logits never built (as the policy's)."""
    T = response_len
    L = input_ids.shape[1]
    h = _trunk(ref_lm, input_ids, attention_mask)[:, L - T - 1:L - 1]
    response_logp = _fused_response_logp if fused_linear else _response_logp
    return response_logp(ref_lm.get_output_embeddings(), h, input_ids[:, L - T:], temperature,
                         logits_transform(ref_lm))
