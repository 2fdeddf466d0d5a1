"""Security and crash safety of ``pama-ext train`` (issue 11 §3): --resume unpickles no code, corrupt
checkpoints are one clear error or fall back to the previous checkpoint, killed saves leave nothing
that lingers, Ctrl-C stops cleanly at a resumable step, a missing --model fails fast, a failed run
blocks no rerun, and every flag an op would reject is rejected up front.

Budgets are the tiny ones of test_trainer.py (1-3 PPO steps of 4 responses)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")
pytest.importorskip("tqdm")

from pama_ext import ops  # noqa: E402
from pama_ext.trainer.config import ConfigError, TrainConfig, flag  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")

SMALL = dict(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=6, eval_size=4, eval_batch_size=4,
             progress=False, log_every=0, plots=False)


@pytest.fixture
def base_cfg(world_cache, tmp_path):
    def make(**kw):
        d = dict(model="tiny", tiny_world_cache=world_cache, output_dir=str(tmp_path / "run"), threads=None, **SMALL)
        d.update(kw)
        return TrainConfig(**d)
    return make


def _cli(world_cache, out, *extra):
    """``pama-ext train`` arguments of the small run in ``out``."""
    args = ["train", "--model", "tiny", "--tiny-world-cache", world_cache, "--output-dir", str(out)]
    for k, v in SMALL.items():
        args += [flag(k)] if v is True else ([f"--no-{flag(k)[2:]}"] if v is False else [flag(k), str(v)])
    return args + list(extra)


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _metrics(out):
    return _strip_time([json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()])


def _one_error_line(err: str, prefix: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def _rewrite_manifest_entry(ck: Path, name: str) -> None:
    """What a forger does: record the new file's size and hash in checkpoint.json (when it lists files)."""
    man = json.loads((ck / "checkpoint.json").read_text())
    if "files" in man:
        data = (ck / name).read_bytes()
        man["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ck / "checkpoint.json").write_text(json.dumps(man))


# -------------------------------------------------------------------------------------------------
# 1. --resume unpickles no code
# -------------------------------------------------------------------------------------------------
class _SideEffect:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_trainer_state_holds_only_tensors_and_plain_values(base_cfg):
    from pama_ext.trainer.train import train

    r = train(base_cfg(steps=1))
    ck = Path(r["output_dir"]) / "checkpoint"
    state = torch.load(ck / "trainer_state.pt", weights_only=True)  # raised on the numpy RNG state before
    assert state["trainer"]["step"] == 1 and set(state["rng"]) >= {"torch", "numpy", "python"}
    torch.load(ck / "value_heads.pt", weights_only=True)


def test_rng_states_round_trip_exactly():
    import random

    import numpy as np

    from pama_ext.lm.checkpoint import rng_states, set_rng_states

    random.gauss(0, 1)  # a cached Gaussian in both generators
    np.random.standard_normal()
    s = rng_states()
    expect = (torch.rand(3), np.random.standard_normal(3), np.random.randint(0, 2**31, 3), random.random(),
              random.gauss(0, 1))
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_states(s)
    got = (torch.rand(3), np.random.standard_normal(3), np.random.randint(0, 2**31, 3), random.random(),
           random.gauss(0, 1))
    assert torch.equal(expect[0], got[0]) and (expect[1] == got[1]).all() and (expect[2] == got[2]).all()
    assert expect[3:] == got[3:]


def test_resume_refuses_a_pickled_object_and_runs_none_of_it(base_cfg, tmp_path, capsys):
    from pama_ext.cli import main
    from pama_ext.trainer.train import train

    r = train(base_cfg(steps=1))
    ck = Path(r["output_dir"]) / "checkpoint"
    state = torch.load(ck / "trainer_state.pt", weights_only=False)  # (trusted: we just wrote it)
    marker = tmp_path / "code_ran"
    state["init_eval"] = {"payload": _SideEffect(str(marker))}
    torch.save(state, ck / "trainer_state.pt")
    _rewrite_manifest_entry(ck, "trainer_state.pt")

    rc = main(["train", "--output-dir", r["output_dir"], "--resume", "--steps", "2"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's pickled object ran"
    assert rc == 2
    line = _one_error_line(err, "pama-ext train: error: ")
    assert str(ck / "trainer_state.pt") in line and "refused to load" in line and "io.open" in line


# -------------------------------------------------------------------------------------------------
# 2. truncated or corrupt checkpoints
# -------------------------------------------------------------------------------------------------
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _scramble(p: Path) -> None:  # same size, different content (what a crash can leave on some file systems)
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, says", [
    ("trainer_state.pt", _truncate, "truncated or corrupt"),
    ("model.safetensors", _scramble, "corrupt (its SHA-256 differs"),
    ("value_heads.pt", os.remove, "missing"),
])
def test_corrupt_checkpoint_without_an_earlier_one_is_one_clear_error(base_cfg, capsys, name, damage, says):
    from pama_ext.cli import main
    from pama_ext.trainer.train import train

    r = train(base_cfg(steps=1))
    ck = Path(r["output_dir"]) / "checkpoint"
    damage(ck / name)
    rc = main(["train", "--output-dir", r["output_dir"], "--resume", "--steps", "2"])
    line = _one_error_line(capsys.readouterr().err, "pama-ext train: error: ")
    assert rc == 2
    assert str(ck / name) in line and says in line and "no earlier checkpoint" in line, line


def test_corrupt_checkpoint_falls_back_to_the_previous_one(base_cfg, tmp_path, capsys):
    from pama_ext.trainer.train import train

    a = train(base_cfg(output_dir=str(tmp_path / "straight"), steps=3))
    train(base_cfg(output_dir=str(tmp_path / "resumed"), steps=2, save_every=1))
    out = tmp_path / "resumed"
    assert json.loads((out / "checkpoint.prev" / "checkpoint.json").read_text())["step"] == 1
    _scramble(out / "checkpoint" / "model.safetensors")
    capsys.readouterr()
    b = train(base_cfg(output_dir=str(out), steps=3, resume=True))
    err = capsys.readouterr().err
    assert str(out / "checkpoint" / "model.safetensors") in err and "resuming from the previous checkpoint (step 1)" \
        in err, err
    assert (out / "checkpoint.corrupt" / "model.safetensors").is_file()
    # the fallback is the same run: bitwise what an uninterrupted run gives
    assert _strip_time(a["metrics"]) == _strip_time(b["metrics"]) == _metrics(out)
    assert a["final_eval"] == b["final_eval"]


def test_load_checkpoint_names_a_corrupt_file(base_cfg):
    from pama_ext.lm.checkpoint import CheckpointError
    from pama_ext.trainer.train import load_checkpoint, train

    r = train(base_cfg(steps=1))
    ck = Path(r["output_dir"]) / "checkpoint"
    _truncate(ck / "value_heads.pt")
    with pytest.raises(CheckpointError, match=r"value_heads.pt: truncated or corrupt"):
        load_checkpoint(r["output_dir"])


# -------------------------------------------------------------------------------------------------
# 3. killed saves
# -------------------------------------------------------------------------------------------------
def test_stale_temporaries_are_removed_on_the_next_start(base_cfg):
    from pama_ext.trainer.train import train

    r = train(base_cfg(steps=1))
    out = Path(r["output_dir"])
    left = [out / ".checkpoint.tmp-k1ll3d", out / ".metrics.jsonl.tmp-a_b1", out / "samples" / ".step_000001.jsonl.tmp-x9"]
    left[0].mkdir()
    (left[0] / "model.safetensors").write_bytes(b"partial")
    left[1].write_text('{"step": 1')
    left[2].write_text("partial")
    (out / "notes.txt").write_text("mine")
    train(base_cfg(steps=2, resume=True))
    assert not any(p.exists() for p in left)
    assert (out / "notes.txt").read_text() == "mine"
    left[0].mkdir()
    train(base_cfg(steps=1, overwrite=True))
    assert not left[0].exists() and (out / "notes.txt").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to map descriptors to paths")
def test_checkpoint_files_are_fsynced_before_the_rename(base_cfg, monkeypatch):
    from pama_ext.trainer.train import train

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = train(base_cfg(steps=1))
    out = Path(r["output_dir"]).resolve()
    ck = out / "checkpoint"
    names = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())
    assert "trainer_state.pt" in names and "model.safetensors" in names
    for name in names:  # synced under the temporary name, i.e. before the rename into place
        assert any(Path(s).parent.name.startswith(".checkpoint.tmp-") and Path(s).parent.parent == out
                   and s.endswith("/" + name) for s in synced), name
    assert str(out) in synced  # the directory holding the renamed checkpoint


# -------------------------------------------------------------------------------------------------
# 4. Ctrl-C
# -------------------------------------------------------------------------------------------------
def _call(main, args):
    try:
        return main(args)
    except KeyboardInterrupt as e:  # would end the whole pytest session
        pytest.fail(f"KeyboardInterrupt escaped the CLI: {e!r}")


def test_sigint_finishes_the_step_saves_and_resume_continues_bitwise(base_cfg, world_cache, tmp_path, monkeypatch,
                                                                     capsys):
    from pama_ext.cli import main
    from pama_ext.trainer import ppo
    from pama_ext.trainer.train import train

    a = train(base_cfg(output_dir=str(tmp_path / "straight"), steps=3))
    real = ppo.PPOTrainer.step

    def step(self, bars):
        if self.step_idx == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 2 runs
        return real(self, bars)

    monkeypatch.setattr(ppo.PPOTrainer, "step", step)
    out = tmp_path / "stopped"
    capsys.readouterr()
    rc = _call(main, _cli(world_cache, out, "--steps", "3"))
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "pama-ext train: stopped at step 2; continue with --resume" in err and "Traceback" not in err, err
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    monkeypatch.setattr(ppo.PPOTrainer, "step", real)
    assert _call(main, ["train", "--output-dir", str(out), "--resume"]) == 0
    assert _metrics(out) == _strip_time(a["metrics"])


def test_interrupt_before_any_checkpoint_leaves_nothing(world_cache, tmp_path, monkeypatch, capsys):
    from pama_ext.cli import main
    from pama_ext.trainer import ppo

    real = ppo.PPOTrainer.step

    def step(self, bars):
        if self.step_idx == 1:
            raise KeyboardInterrupt  # a second Ctrl-C: stops at once, inside step 2
        return real(self, bars)

    monkeypatch.setattr(ppo.PPOTrainer, "step", step)
    out = tmp_path / "parent" / "run"
    rc = _call(main, _cli(world_cache, out, "--steps", "3"))
    err = capsys.readouterr().err
    assert rc == 130 and "stopped at step 1 before any checkpoint was saved; nothing to resume" in err, err
    assert "Traceback" not in err and not (tmp_path / "parent").exists()
    # with a checkpoint at step 1 the message points at it
    rc = _call(main, _cli(world_cache, out, "--steps", "3", "--save-every", "1"))
    err = capsys.readouterr().err
    assert rc == 130 and "stopped at step 1; continue with --resume" in err, err


# -------------------------------------------------------------------------------------------------
# 5. --model that names nothing, failed runs
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("This movie\nThe plot\n")
    return str(p)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_model_path_is_one_line_and_leaves_no_directory(tmp_path, prompts_file, capsys, no_network):
    from pama_ext.cli import main

    out = tmp_path / "out"
    missing = tmp_path / "no" / "such" / "model"
    rc = main(["train", "--model", str(missing), "--train-prompts", prompts_file, "--eval-prompts", prompts_file,
               "--output-dir", str(out)])
    line = _one_error_line(capsys.readouterr().err, "pama-ext train: error: --model: ")
    assert rc == 2 and "no such directory" in line and str(missing) in line
    assert not out.exists()
    (tmp_path / "empty_dir").mkdir()
    rc = main(["train", "--model", str(tmp_path / "empty_dir"), "--train-prompts", prompts_file, "--eval-prompts",
               prompts_file, "--output-dir", str(out)])
    line = _one_error_line(capsys.readouterr().err, "pama-ext train: error: --model: ")
    assert rc == 2 and "without config.json" in line and not out.exists()


@pytest.mark.parametrize("command", ["train", "dpo"])
def test_hub_id_not_in_the_cache_fails_at_once_offline(tmp_path, prompts_file, capsys, monkeypatch, no_network,
                                                       command):
    from pama_ext.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    name = "pama-ext-test-no-such-org/no-such-model"
    extra = (["--train-prompts", prompts_file] if command == "train" else ["--data", _pairs_file(tmp_path)])
    rc = main([command, "--model", name, "--eval-prompts", prompts_file, "--output-dir", str(out), *extra])
    line = _one_error_line(capsys.readouterr().err, f"pama-ext {command}: error: --model: ")
    assert rc == 2 and name in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert not out.exists()


def test_hub_id_is_checked_once_up_front_online(tmp_path, prompts_file, capsys, monkeypatch, no_network):
    """Without HF_HUB_OFFLINE, one hub request (with a timeout, no retries) decides before anything is written."""
    import huggingface_hub

    from pama_ext.cli import main
    from pama_ext.lm.hf import HUB_CHECK_TIMEOUT

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []
    answer = {}

    def model_info(self, repo_id, **kw):
        calls.append((repo_id, kw.get("timeout")))
        if "error" in answer:
            raise answer["error"]
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in answer["files"]])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    out = tmp_path / "out"
    args = ["train", "--model", "some-org/some-model", "--train-prompts", prompts_file, "--eval-prompts",
            prompts_file, "--output-dir", str(out)]
    answer["error"] = ConnectionError("no route to the hub")
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "pama-ext train: error: --model: 'some-org/some-model' ")
    assert "(ConnectionError: no route to the hub)" in line and "HF_HUB_OFFLINE=1" in line
    assert calls == [("some-org/some-model", HUB_CHECK_TIMEOUT)] and not out.exists()
    del answer["error"]
    answer["files"] = ["README.md", "model.onnx"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "pama-ext train: error: --model: ")
    assert "has no config.json" in line and not out.exists()


def _pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "This movie", "chosen": "was great.", "rejected": "was dull.",
                             "labels": {"sentiment": 1, "length": -1}}) + "\n")
    return str(p)


def test_failed_runs_leave_nothing_that_blocks_a_corrected_rerun(base_cfg, tmp_path, monkeypatch, capsys,
                                                                 world_cache):
    import sys
    import textwrap

    from pama_ext.cli import main
    from pama_ext.lm.rewards import RewardError
    from pama_ext.trainer.train import train

    # a validation error found after the output directory was prepared
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "run"
    assert main(_cli(world_cache, out, "--train-prompts", str(empty))) == 2
    assert "--train-prompts: no prompts found" in capsys.readouterr().err
    assert not out.exists()
    # a reward function that fails in the first evaluation (after config.yaml and samples were written)
    (tmp_path / "broken_reward_mod.py").write_text(textwrap.dedent("""
        def reward(prompts, responses):
            raise KeyError("oops")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("broken_reward_mod", None)
    with pytest.raises(RewardError):
        train(base_cfg(objectives=["sentiment", "py:broken_reward_mod:reward"]))
    assert not out.exists()
    r = train(base_cfg(steps=1))  # the corrected rerun needs no --overwrite
    assert len(r["metrics"]) == 1


# -------------------------------------------------------------------------------------------------
# 6. every flag an op would reject is rejected by the configuration, naming the flag
# -------------------------------------------------------------------------------------------------
INF, NAN = math.inf, math.nan
OP_FLAGS = {
    "cliprange": [-0.1, 0.0, 0.5, 0.999, 1.0, 1.5, INF, NAN],
    "cliprange_high": [None, -0.1, 0.0, 1.0, 5.0, INF, NAN],
    "dual_clip": [None, 0.5, 1.0, 1.01, 3.0, INF, NAN],
    "cliprange_value": [-0.1, 0.0, 0.2, 1.0, INF, NAN],
    "gamma": [-0.1, 0.0, 0.5, 1.0, 1.01, INF, NAN],
    "lam": [-0.1, 0.0, 0.95, 1.0, 1.01, INF, NAN],
    "kl_coef": [-0.1, 0.0, 0.1, INF, NAN],
    "kl_loss_coef": [-0.1, 0.0, 0.1, INF, NAN],
}


def _ops_accept(cfg: TrainConfig) -> bool:
    """Whether the fused ops accept ``cfg``'s values, passed as the trainer passes them."""
    from pama_ext.trainer.ppo import PPOTrainer

    g = torch.Generator().manual_seed(0)
    n, B, T = 2, 3, 4
    logp = -torch.rand(B, T, generator=g)
    old, ref = logp + 0.05 * torch.randn(B, T, generator=g), logp + 0.05 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    values = torch.randn(n, B, T, generator=g)
    fake = types.SimpleNamespace(cfg=cfg, group=None, prefs=torch.full((n,), 1.0 / n))
    fake._loss_kwargs = lambda: PPOTrainer._loss_kwargs(fake)
    try:
        rewards = ops.token_rewards(torch.randn(n, B, generator=g), old, ref, mask, cfg.kl_coef)
        adv, ret = ops.multi_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        PPOTrainer.policy_loss(fake, logp, old, adv, mask, ref, None, False)
        ops.multi_value_loss(values, values + 0.1, ret, mask, clip=cfg.cliprange_value, agg=cfg.agg)
    except (ValueError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("name", sorted(OP_FLAGS))
def test_config_rejects_every_value_the_ops_reject(name):
    rejected_by_op = 0
    for v in OP_FLAGS[name]:
        cfg = TrainConfig(method="pama", **{name: v})
        try:
            TrainConfig(**{name: v}).validate()
            config_ok = True
        except ConfigError as e:
            assert str(e).startswith(flag(name) + ":"), str(e)
            config_ok = False
        if not _ops_accept(cfg):
            rejected_by_op += 1
            assert not config_ok, f"{flag(name)} {v!r}: the op rejects it but the configuration accepts it"
    if name in ("cliprange", "dual_clip", "cliprange_value"):
        assert rejected_by_op, "the table holds no value the op rejects"


def test_cliprange_of_one_or_more_names_the_flag():
    for v in (1.0, 2.0):
        with pytest.raises(ConfigError, match=r"^--cliprange: expected a number in \[0, 1\); got"):
            TrainConfig(cliprange=v).validate()


def test_demo_ctrl_c_is_one_line(monkeypatch, tmp_path, capsys):
    """Ctrl-C during `make demo` (TrainingStopped from a run) ends with one line and exit 130."""
    from pama_ext import tiny_world
    from pama_ext.trainer import demo, train as train_mod

    class World:
        def describe(self):
            return "world"

    def stopped(cfg):
        raise train_mod.TrainingStopped(1, None)

    monkeypatch.setattr(tiny_world, "build_tiny_world", lambda **kw: World())
    monkeypatch.setattr(train_mod, "train", stopped)
    assert demo.main(["--output-dir", str(tmp_path / "demo"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "stopped during" in err and "Traceback" not in err


def test_a_plot_killed_mid_save_leaves_only_a_temporary_the_next_run_removes(tmp_path, monkeypatch):
    """save_figure writes under the package's temporary naming; a crash inside savefig (after bytes hit
    the disk) leaves a file remove_stale_temporaries recognises, and the target is never half-written."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pama_ext.lm.files import is_temporary, remove_stale_temporaries
    from pama_ext.lm.plots import save_figure

    fig = plt.figure()
    target = tmp_path / "rewards.png"
    seen = []

    def killed(fname, **kw):
        seen.append(os.path.basename(fname))
        Path(fname).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", killed)
    monkeypatch.setattr(os, "remove", lambda p: None)  # as if the process died before its cleanup
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, str(target))
    monkeypatch.undo()
    assert not target.exists() and len(seen) == 1 and is_temporary(seen[0]), seen
    assert remove_stale_temporaries(tmp_path) == [seen[0]]
    assert list(tmp_path.iterdir()) == []
    out = save_figure(fig, str(target))
    plt.close(fig)
    assert out == str(target) and target.read_bytes()[:4] == b"\x89PNG" and list(tmp_path.iterdir()) == [target]
