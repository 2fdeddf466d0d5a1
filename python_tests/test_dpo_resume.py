"""``pama-ext dpo --resume``: N steps in one go and k steps, stop, resume to N give bitwise the same
parameters, metrics and evaluation (every state a step depends on is in the checkpoint: optimizer, data
order, MOPO's duals, reference weights and lagged log-probs, RNG states); the checkpoint is the PPO
trainer's verified format; a setting that may not change is an error naming the flag."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")

from pama_ext.dpo.config import DPOConfig  # noqa: E402
from pama_ext.lm.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")


def _cfg(world_cache, out, **kw):
    d = dict(model="tiny", data="tiny", tiny_world_cache=world_cache, steps=4, batch_size=4, micro_batch_size=2,
             pool_prompts=6, responses_per_prompt=3, max_new_tokens=8, max_response_tokens=12, eval_size=3,
             eval_samples=1, output_dir=str(out), progress=False, log_every=0, plots=False, save_model=False,
             lr=1e-2, tie_margin=0.0)
    d.update(kw)
    return DPOConfig(**d)


def _params(run: Path):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _rows(run: Path, name: str):
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method, extra", [("raco", {}), ("dpo-lw", {}),
                                           ("mopo", {"mopo_t0": 1, "mopo_epsilon": 0.15}),
                                           ("mopo-lb", {"mopo_t0": 1})])
def test_resume_is_bitwise_the_uninterrupted_run(world_cache, tmp_path, method, extra):
    from pama_ext.dpo.train import train_dpo

    a, b = tmp_path / "straight", tmp_path / "resumed"
    train_dpo(_cfg(world_cache, a, method=method, **extra))
    train_dpo(_cfg(world_cache, b, method=method, steps=2, **extra))
    assert json.loads((b / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    train_dpo(_cfg(world_cache, b, method=method, resume=True, **extra))
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    ma, mb = _rows(a, "metrics.jsonl"), _rows(b, "metrics.jsonl")
    assert [m["step"] for m in mb] == [1, 2, 3, 4] and ma == mb
    ea, eb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
    assert ea == eb
    # the resumed state really differs from a fresh start: the parameters moved
    from pama_ext.lm.hf import load_lm
    from pama_ext.dpo.train import prepare_world

    base = load_lm(prepare_world(_cfg(world_cache, a).validate())["model_path"], "cpu").state_dict()
    assert any(not torch.equal(base[k], pa[k]) for k in pa if k in base)


def test_resume_checks_the_settings_and_the_checkpoint(world_cache, tmp_path, capsys):
    from pama_ext.cli import main
    from pama_ext.dpo.train import train_dpo

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train_dpo(_cfg(world_cache, out, resume=True))
    train_dpo(_cfg(world_cache, out, method="dpo-lw", steps=1))
    with pytest.raises(ConfigError, match=r"^--lr: the run in .* was made with 0.01; got 0.5"):
        train_dpo(_cfg(world_cache, out, method="dpo-lw", lr=0.5, resume=True))
    with pytest.raises(ConfigError, match=r"already holds a run; pass --resume to continue it"):
        train_dpo(_cfg(world_cache, out, method="dpo-lw", steps=1))
    # the trainer state is loaded with weights_only: a pickled object is refused, naming the file
    ck = out / "checkpoint"
    assert (ck / "value_heads.pt").is_file()
    from pama_ext.lm.checkpoint import verify_checkpoint

    verify_checkpoint(ck)
    (ck / "trainer_state.pt").write_bytes(b"not a torch file")
    (out / "checkpoint.prev").mkdir(exist_ok=True)  # an empty, unusable earlier one
    rc = main(["dpo", "--model", "tiny", "--tiny-world-cache", world_cache, "--method", "dpo-lw", "--steps", "2",
               "--output-dir", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "trainer_state.pt: truncated or corrupt" in err, err
