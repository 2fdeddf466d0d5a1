"""The trainer's memory and precision options on the tiny world: --fused-linear, --gradient-checkpointing,
--dtype (and their combination). Each is checked for what it claims: the fused log-probs and the
checkpointed blocks leave the float32 step unchanged (same metrics, same weights) while the fused path
never builds the [B, T, V] logits and the blocks really run twice; --dtype runs the forward in the
autocast dtype and keeps float32 weights."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")

from pama_ext.trainer import ppo  # noqa: E402
from pama_ext.trainer.config import DTYPES, ConfigError, TrainConfig  # noqa: E402
from pama_testutils import all_finite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")

COMPARED = ("loss", "pg_loss", "vf_loss", "grad_norm", "approx_kl", "clipfrac", "weights")


@pytest.fixture
def run(world_cache, tmp_path, monkeypatch):
    """train() with small settings; returns (result, the trainer's policy, what the probe recorded)."""
    from pama_ext.trainer.train import train

    def go(probe=None, **kw):
        seen = {}
        real_init = ppo.PPOTrainer.__init__

        def init(self, cfg, policy, *a, **k):
            real_init(self, cfg, policy, *a, **k)
            seen["policy"] = policy
            seen["trainer"] = self
            if probe is not None:
                probe(policy, seen)

        monkeypatch.setattr(ppo.PPOTrainer, "__init__", init)
        d = dict(model="tiny", tiny_world_cache=world_cache, steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1,
                 max_new_tokens=6, eval_size=4, eval_batch_size=4, output_dir=str(tmp_path / f"run{len(kw)}"),
                 overwrite=True, progress=False, log_every=0, plots=False, threads=None)
        d.update(kw)
        r = train(TrainConfig(**d))
        monkeypatch.setattr(ppo.PPOTrainer, "__init__", real_init)
        return r, seen["policy"], seen

    return go


def _same_step(a, b, rtol, atol):
    ma, mb = a[0]["metrics"][0], b[0]["metrics"][0]
    for k in COMPARED:
        torch.testing.assert_close(torch.tensor(ma[k], dtype=torch.float64), torch.tensor(mb[k], dtype=torch.float64),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
    pa, pb = dict(a[1].named_parameters()), dict(b[1].named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _largest_logits(policy, seen):
    """Records the largest last dimension equal to the vocabulary of any tensor the update's graph holds."""
    V = policy.lm.get_output_embeddings().weight.shape[0]
    seen["vocab_tensors"] = 0

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == V:
            seen["vocab_tensors"] += 1
        return t

    seen["hooks"] = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    seen["hooks"].__enter__()


def test_fused_linear_same_step_without_logits(run):
    plain = run(probe=_largest_logits, fused_linear=False)
    plain[2]["hooks"].__exit__(None, None, None)
    fused = run(probe=_largest_logits, fused_linear=True)
    fused[2]["hooks"].__exit__(None, None, None)
    assert plain[2]["vocab_tensors"] > 0, "the probe must see the unfused [B, T, V] logits"
    assert fused[2]["vocab_tensors"] == 0, "--fused-linear kept a [B, T, V] tensor for the backward"
    assert fused[1].fused_linear and not plain[1].fused_linear
    _same_step(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,single", [
    (dict(), True),  # pama / token
    (dict(method="linear", kl_loss_coef=0.1), True),
    (dict(method="morlhf"), True),
    (dict(granularity="sequence"), False),  # the weights read the ratios: log-probs first
    (dict(update_norm="active", kl_loss_coef=0.1), False),  # a k3 loss of its own on the log-probs
])
def test_fused_linear_loss_path_same_step(run, monkeypatch, kw, single):
    """--fused-linear forms the policy loss with fused_linear_policy_loss's single pass exactly where
    the trainer says (PPOTrainer.fused_loss_path), and the step is the unfused one either way."""
    calls = []
    real = ppo.fused_linear_policy_loss

    def spy(*a, **k):
        calls.append(k.get("single_pass"))
        return real(*a, **k)

    monkeypatch.setattr(ppo, "fused_linear_policy_loss", spy)
    plain = run(fused_linear=False, **kw)
    assert not calls
    fused = run(fused_linear=True, **kw)
    trainer = fused[2]["trainer"]
    assert trainer.fused_loss_path() == single
    assert calls == ([True] * len(calls) if single else []) and (len(calls) > 0) == single
    _same_step(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,on", [
    (dict(), True), (dict(method="linear"), True), (dict(method="morlhf"), True),
    (dict(granularity="batch"), False), (dict(method="mgda-ub"), False),
    (dict(update_norm="active", kl_loss_coef=0.1), False),
])
def test_fused_linear_default_is_on_where_the_single_pass_applies(run, kw, on):
    """--fused-linear unset: on exactly where the update's loss takes the single pass (no extra
    output-layer matmul); test_fused_linear_loss_path_same_step covers --fused-linear / --no-fused-linear
    given explicitly."""
    r, policy, seen = run(steps=1, **kw)
    assert seen["trainer"].cfg.fused_linear is None
    assert policy.fused_linear == on and seen["trainer"].fused_loss_path() == on
    assert all_finite(r["metrics"][0])


def _count_block_calls(policy, seen):
    """Counts the calls of each block's first submodule (its recomputation runs them again)."""
    seen["calls"] = 0
    blocks = [m for m in policy.lm.modules() if type(m).__name__.endswith("Block")]
    assert blocks

    def hook(*_):
        seen["calls"] += 1

    for b in blocks:
        next(b.children()).register_forward_hook(hook)


def test_gradient_checkpointing_recomputes_and_keeps_the_step(run):
    plain = run(probe=_count_block_calls)
    ckpt = run(probe=_count_block_calls, gradient_checkpointing=True)
    assert ckpt[2]["calls"] > plain[2]["calls"], "no block ran again in the backward"
    assert ckpt[1]._checkpointed and not plain[1]._checkpointed
    assert not any(m.training for m in ckpt[1].modules() if isinstance(m, torch.nn.Dropout))
    _same_step(ckpt, plain, rtol=1e-5, atol=1e-6)


def _record_matmul_dtypes(policy, seen):
    """The output layer's result dtype in the update's forward (the one run with gradients)."""
    seen["dtypes"] = set()
    head = policy.lm.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: seen["dtypes"].add(o.dtype) if torch.is_grad_enabled() else None)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_autocasts_the_forward(run, monkeypatch, dtype, torch_dtype):
    """The output layer runs in the autocast dtype: the module itself (--no-fused-linear), and the
    hidden states and weight handed to the fused loss (the default here, pama / token)."""
    r, policy, seen = run(probe=_record_matmul_dtypes, dtype=dtype, fused_linear=False)
    assert seen["dtypes"] == {torch_dtype}, seen["dtypes"]
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    m = r["metrics"][0]
    assert all_finite(m) and m["skipped"] == 0
    fused_dtypes = set()
    real = ppo.fused_linear_policy_loss

    def spy(hidden, weight, *a, **k):
        fused_dtypes.update((hidden.dtype, weight.dtype))
        return real(hidden, weight, *a, **k)

    monkeypatch.setattr(ppo, "fused_linear_policy_loss", spy)
    r, policy, _ = run(dtype=dtype)
    assert policy.fused_linear and fused_dtypes == {torch_dtype}, fused_dtypes
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert all_finite(r["metrics"][0]) and r["metrics"][0]["skipped"] == 0


def test_all_lean_options_together(run):
    r, policy, _ = run(dtype="bf16", fused_linear=True, gradient_checkpointing=True, method="mgda-ub")
    m = r["metrics"][0]
    assert all_finite(m) and m["skipped"] == 0 and m["updates"] == 2


def test_dtype_names_are_one_list():
    assert set(ppo.AUTOCAST_DTYPES) == set(DTYPES)


def test_bad_dtype_names_the_flag():
    with pytest.raises(ConfigError, match="--dtype"):
        TrainConfig(dtype="fp8").validate()


# ------------------------------------------------------------------------------------------------
# LoRA (peft)
# ------------------------------------------------------------------------------------------------
def test_lora_trains_adapters_against_the_disabled_adapter_reference(run, world_cache, tmp_path):
    pytest.importorskip("peft")
    import pathlib

    from pama_ext.lm.hf import load_lm
    from pama_ext.lm.lora import AdapterDisabled, is_lora
    from pama_ext.lm.policy import reference_logp

    r, policy, seen = run(lora_r=4, lora_alpha=8.0, steps=2)
    trainer = seen["trainer"]
    assert isinstance(trainer.ref_lm, AdapterDisabled) and is_lora(policy.lm)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_heads") for n in trainable), trainable
    base_path = next(pathlib.Path(world_cache).glob("*/config.json")).parent
    base = load_lm(str(base_path), "cpu").eval()
    base_sd = base.state_dict()
    for n, p in policy.lm.named_parameters():  # the frozen weights are the base model's, untouched
        if not p.requires_grad:
            key = n.replace(".base_layer", "")
            torch.testing.assert_close(p, base_sd[key], rtol=0, atol=0)
    ro = trainer.last_rollout
    T = ro.mask.shape[1]
    with torch.no_grad():
        ref = reference_logp(trainer.ref_lm, ro.input_ids, ro.attention_mask, T)
        want = reference_logp(base, ro.input_ids, ro.attention_mask, T)
        pol = policy(ro.input_ids, ro.attention_mask, T).logp
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)  # the reference is the base model
    assert (pol - want).abs().max() > 1e-4, "the adapters did not change the policy"
    # the checkpoint is a plain LM with the adapters merged: it scores as the policy does
    saved = load_lm(str(pathlib.Path(r["output_dir"]) / "checkpoint"), "cpu").eval()
    assert not is_lora(saved)
    with torch.no_grad():
        torch.testing.assert_close(reference_logp(saved, ro.input_ids, ro.attention_mask, T), pol,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes,message", [
    (dict(lora_r=-1), "--lora-r"),
    (dict(lora_r=4, lora_alpha=0.0), "--lora-alpha"),
    (dict(lora_r=4, resume=True), "--resume: not supported with --lora-r"),
    (dict(lora_targets=[]), "--lora-targets"),
])
def test_bad_lora_settings_name_the_flag(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


def test_lora_unknown_target_names_the_flag(run):
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="--lora-targets"):
        run(lora_r=2, lora_targets=["no_such_module"])


# ------------------------------------------------------------------------------------------------
# models whose logits are not lm_head(last hidden state)
# ------------------------------------------------------------------------------------------------
def _tiny_lm(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gemma2-softcap":
        cfg = tf.Gemma2Config(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=1.5)
        return tf.Gemma2ForCausalLM(cfg).eval()
    if kind == "cohere-scale":
        cfg = tf.CohereConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, logit_scale=3.0)
        return tf.CohereForCausalLM(cfg).eval()
    cfg = tf.GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(cfg).eval()

    class Shifted(tf.GPT2LMHeadModel):  # post-processing no config declares
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 0.5 + 1.0
            return out

    return Shifted(cfg).eval()


@pytest.mark.parametrize("kind", ["gemma2-softcap", "cohere-scale", "gpt2"])
@pytest.mark.parametrize("fused", [False, True])
def test_declared_logit_transforms_give_the_models_log_probs(kind, fused):
    """Soft-capped (Gemma 2) and scaled (Cohere) logits: the policy's and the reference's log-probs are
    the model's own (log_softmax of its logits / temperature), unfused and through the fused op, and
    the single-pass loss of the trainer gets the same (scale, softcap)."""
    from pama_ext.lm.policy import PolicyWithValueHeads, fused_scale_softcap, reference_logp

    lm = _tiny_lm(kind)
    policy = PolicyWithValueHeads(lm, 2)
    policy.fused_linear = fused
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, 9), generator=g)
    am = torch.ones_like(ids)
    T, temp = 5, 0.7
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=am).logits.float()[:, -T - 1:-1] / temp
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
        got = policy(ids, am, T, temperature=temp).logp
        ref = reference_logp(lm, ids, am, T, temp, fused_linear=fused)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    scale, cap = fused_scale_softcap(policy.head_transform, temp)
    assert (cap is not None) == (kind == "gemma2-softcap")
    assert scale == pytest.approx({"cohere-scale": 3.0}.get(kind, 1.0) / temp)


def test_undeclared_logit_post_processing_is_refused():
    from pama_ext.lm.policy import PolicyWithValueHeads

    with pytest.raises(ValueError, match="not lm_head"):
        PolicyWithValueHeads(_tiny_lm("shifted"), 2)
