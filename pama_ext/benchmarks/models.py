"""The random GPT-2-shaped models of the model benchmarks (headline, e2e): transformers'
GPT2LMHeadModel when importable, else a plain-PyTorch GPT-2 of the same parameter shapes."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# GPT-2 shapes: "gpt2-small" = transformers' GPT2Config() defaults (124M); "gpt2-1b" ≈ 1.0B parameters
MODELS: Dict[str, Dict[str, object]] = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, dtype="float32"),
    "gpt2-1b": dict(n_layer=24, n_embd=1792, n_head=14, dtype="bfloat16"),
}
# tiny shapes of the developer smoke run (bench_gpu.py --smoke-cpu): code paths only
SMOKE_MODELS: Dict[str, Dict[str, object]] = {
    "gpt2-small": dict(n_layer=2, n_embd=64, n_head=2, dtype="float32"),
    "gpt2-1b": dict(n_layer=2, n_embd=96, n_head=2, dtype="bfloat16"),
}
VOCAB, N_POSITIONS = 50257, 1024


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
        x = x + self.c_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT2(nn.Module):
    """GPT-2 in plain PyTorch (same parameter shapes as transformers' GPT2LMHeadModel, tied head);
    used when transformers is not installed."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, vocab: int = VOCAB, n_positions: int = N_POSITIONS):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def hidden(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)[None]
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x)

    def lm_head(self, h):
        return F.linear(h, self.wte.weight)



class LM:
    """A random GPT-2-shaped causal LM: ``hidden(ids) -> [B, L, d]`` and ``lm_head(h) -> logits``.
    ``spec``: n_layer, n_embd, n_head, dtype (an entry of MODELS)."""

    def __init__(self, name: str, spec: Dict[str, object], device, seed: int, dtype_override: Optional[str] = None):
        self.name = name
        self.dtype = getattr(torch, dtype_override or spec["dtype"])
        torch.manual_seed(seed)
        try:
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"],
                             vocab_size=VOCAB, n_positions=N_POSITIONS)
            with torch.device(device):
                self.model = GPT2LMHeadModel(cfg)
            self.impl = "transformers.GPT2LMHeadModel"
            self._hidden = lambda ids: self.model.transformer(input_ids=ids, use_cache=False)[0]
            self._head = self.model.lm_head
        except ImportError:
            with torch.device(device):
                self.model = TorchGPT2(spec["n_layer"], spec["n_embd"], spec["n_head"])
            self.impl = "plain PyTorch GPT-2 (transformers not installed)"
            self._hidden, self._head = self.model.hidden, self.model.lm_head
        self.model.to(self.dtype).eval()  # dropout off, as PPO trainers run the policy
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.d_model = spec["n_embd"]


    def token_logp(self, ids: torch.Tensor, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T] float32 of the last T tokens, hidden states at the positions that predict them)."""
        h = self._hidden(ids)
        L = ids.shape[1]
        h = h[:, L - T - 1:L - 1]
        logits = self._head(h).float()
        lp = logits.gather(-1, ids[:, L - T:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return lp, h
