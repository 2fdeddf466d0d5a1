"""The preference trainer (pama_ext.dpo) on a small tiny world: every method takes a few steps with finite
losses and changed parameters, raco / cagrad accumulate exact full-batch per-objective gradients over
micro-batches, the configuration errors name the flag, and the CLI runs. Budgets are tiny: these tests
check the machinery, not learning quality (that is make demo-dpo's job)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("yaml")
pytest.importorskip("tqdm")

from pama_ext import gradient_gram, multi_dpo_loss  # noqa: E402
from pama_testutils import all_finite, dpo_config, dpo_policy, dpo_world  # noqa: E402
from pama_ext.dpo.config import DPOConfig  # noqa: E402
from pama_ext.pareto import cagrad_weights  # noqa: E402
from pama_ext.lm.config import ConfigError  # noqa: E402

from pama_ext.dpo.config import METHODS, MOPO_METHODS  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:the cached tiny world:UserWarning")


# world_cache: the session fixture of conftest.py (a small tiny world shared with the PPO trainer tests)


def _cfg(world_cache, tmp_path, **kw):
    return dpo_config(world_cache, tmp_path / "run", **kw)


@pytest.fixture(scope="module")
def setup(world_cache, tmp_path_factory):
    """(world, judges, tokenizer, reference, data) shared by the step tests."""
    return dpo_world(_cfg(world_cache, tmp_path_factory.mktemp("x")))


def _policy(world):
    return dpo_policy(world)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_steps_with_finite_loss_and_changes_the_parameters(method, setup, world_cache, tmp_path):
    from pama_ext.dpo.methods import make_trainer

    world, judges, tok, ref, data = setup
    cfg = _cfg(world_cache, tmp_path, method=method, mopo_t0=2, steps=3,
               **({"batch_size": 2, "micro_batch_size": 4} if method in MOPO_METHODS else {}))
    policy = _policy(world)
    before = [p.detach().clone() for p in policy.lm.parameters()]
    tr = make_trainer(cfg, policy, ref, tok, data, judges, torch.device("cpu"))
    for _ in range(cfg.steps):
        tr.step()
    rows = tr.flush_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(all_finite(r) for r in rows), rows
    key = "loss" if method in MOPO_METHODS else "losses"
    assert all(r[key] is not None for r in rows)
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, policy.lm.parameters()))
    assert changed > 0
    if method in ("raco", "cagrad"):
        assert all(len(r["coeffs"]) == 2 for r in rows)
    if method in MOPO_METHODS:
        assert all(1.0 <= r["ess"] <= r["ess"] / r["ess_frac"] + 1e-6 for r in rows)
        assert all(min(r["lam"]) >= 0 and min(r["chi"]) > 0 for r in rows)


@pytest.mark.parametrize("method", ["raco", "cagrad"])
def test_gradient_buffers_hold_the_full_batch_gradients(method, setup, world_cache, tmp_path):
    """Micro-batch accumulation gives each objective's gradient of the full-batch loss, and the update
    written into .grad is Σ a_i g_i with a = cagrad_weights(G, w) of their Gram."""
    from pama_ext.dpo import methods as Mth
    from pama_ext.dpo.data import encode_responses

    world, judges, tok, ref, data = setup
    cfg = _cfg(world_cache, tmp_path, method=method, lr=1e-30, batch_size=5, micro_batch_size=2, weights=[0.7, 0.3])
    policy = _policy(world)
    tr = Mth.make_trainer(cfg, policy, ref, tok, data, judges, torch.device("cpu"))
    captured = {}
    orig = Mth.combine_gradients

    def spy(grads, coeffs, params, **kw):
        captured["coeffs"] = coeffs.clone()
        orig(grads, coeffs, params, **kw)
        captured["grad"] = [p.grad.clone() for p in params]

    Mth.combine_gradients = spy
    try:
        tr.step()
    finally:
        Mth.combine_gradients = orig
    idx = tr.sampler.order[:5]
    # independent: the full batch in one forward, one backward per objective
    t = torch.tensor(idx)
    prompts = [tr.data.prompts[i] for i in idx]
    ids, am, rm = encode_responses(tok, prompts + prompts, [tr.data.chosen[i] for i in idx] +
                                   [tr.data.rejected[i] for i in idx], cfg.max_prompt_tokens,
                                   cfg.max_response_tokens, "cpu")
    lp = Mth.sequence_logps(policy, ids, am, rm)
    losses, _ = multi_dpo_loss(lp[:5], lp[5:], tr.ref_c[t], tr.ref_r[t], tr.labels[:, t], 0.2)  # RACO's β
    full = [torch.autograd.grad(losses[i], tr.params, retain_graph=True, allow_unused=True) for i in range(2)]
    for i in range(2):
        for buf, g in zip(tr.bufs[i], full[i]):
            torch.testing.assert_close(buf, torch.zeros_like(buf) if g is None else g, rtol=1e-4, atol=1e-7)
    G = gradient_gram([[g if g is not None else torch.zeros_like(p) for g, p in zip(full[i], tr.params)]
                       for i in range(2)])
    a = cagrad_weights(G, torch.tensor([0.7, 0.3]), c=0.4, clip=(method == "raco"))
    torch.testing.assert_close(captured["coeffs"], a, rtol=1e-4, atol=1e-6)
    for k, p in enumerate(tr.params):
        want = sum(a[i] * (full[i][k] if full[i][k] is not None else torch.zeros_like(p)) for i in range(2))
        torch.testing.assert_close(captured["grad"][k], want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_modpo_is_dpo_on_the_target_with_judge_margins(setup, world_cache, tmp_path, length_normalize):
    """MODPO's loss equals −log σ((1/w_k)(β h − Σ_{j≠k} w_j Δr_j)) oriented by the target label (algorithms §7),
    with h length-normalised under --length-normalize."""
    from pama_ext.dpo import methods as Mth
    from pama_ext.dpo.data import encode_responses
    from pama_ext.lm.rewards import score_all

    world, judges, tok, ref, data = setup
    cfg = _cfg(world_cache, tmp_path, method="modpo", weights=[0.6, 0.4], beta=0.3, length_normalize=length_normalize)
    policy = _policy(world)
    tr = Mth.make_trainer(cfg, policy, ref, tok, data, judges, torch.device("cpu"))
    idx = list(range(min(4, tr.n_pairs)))
    losses, _, _ = tr._losses(idx)
    d = tr.data
    P = [d.prompts[i] for i in idx]
    with torch.no_grad():
        lp = []
        for texts in ([d.chosen[i] for i in idx], [d.rejected[i] for i in idx]):
            ids, am, rm = encode_responses(tok, P, texts, cfg.max_prompt_tokens, cfg.max_response_tokens, "cpu")
            lp.append((Mth.sequence_logps(policy, ids, am, rm), rm.sum(-1).float()))
    (pc, lc), (pr, lr) = lp
    rc, rr = tr.ref_c[idx], tr.ref_r[idx]
    h = (pc - rc) / lc - (pr - rr) / lr if length_normalize else (pc - rc) - (pr - rr)
    sc, sr = score_all(judges, P, [d.chosen[i] for i in idx]), score_all(judges, P, [d.rejected[i] for i in idx])
    s = d.labels[0, idx]
    z = s * (0.3 * h - 0.4 * (sc[1] - sr[1])) / 0.6
    want = -torch.nn.functional.logsigmoid(z).mean()
    torch.testing.assert_close(losses.detach().reshape(()), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(method="dpo"), "--method: expected one of raco, cagrad, dpo-lw, modpo, mopo, mopo-lb; got 'dpo'"),
    (dict(weights=[1.0]), "--weights: expected 2 weights"),
    (dict(method="modpo", weights=[0.0, 1.0]), "--weights: modpo divides by the weight of its target objective"),
    (dict(mopo_primary="humor"), "--mopo-primary: expected one of the objectives"),
    (dict(modpo_target="humor"), "--modpo-target: expected one of the objectives"),
    (dict(beta=0.0), "--beta: expected a positive finite number; got 0.0"),
    (dict(mopo_threshold_beta=1.5), "--mopo-threshold-beta: expected a number in (0, 1]"),
    (dict(responses_per_prompt=1), "--responses-per-prompt: expected at least 2"),
    (dict(data="/nonexistent.jsonl"), "--data: no such file"),
    (dict(model="gpt2"), "--data: 'tiny' samples pairs on the tiny world's prompts"),
    (dict(mopo_t0=-1), "--mopo-t0: expected a non-negative finite number"),
    (dict(batch_size=2, micro_batch_size=4), "--micro-batch-size: must be at most --batch-size (2); got 4"),
    (dict(cagrad_c=float("nan")), "--cagrad-c: expected a non-negative finite number"),
    (dict(method="modpo", weights=[1e-310, 1.0]), "--weights: modpo's temperature --beta / (weight of 'sentiment')"),
])
def test_bad_config_values_name_the_flag(changes, message):
    with pytest.raises(ConfigError) as ei:
        DPOConfig(**changes).validate()
    assert str(ei.value).startswith(message), str(ei.value)


def test_bad_data_file_is_a_config_error_naming_the_row(world_cache, tmp_path):
    from pama_ext.dpo.train import train_dpo

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "This movie", "chosen": "was good.", "rejected": "was bad.",
                             "labels": {"sentiment": 1}}) + "\n")
    with pytest.raises(ConfigError, match=r"--data: .*d.jsonl:1: missing label for objective 'length'"):
        train_dpo(_cfg(world_cache, tmp_path, data=str(p)))


def test_cli_help_lists_every_flag(capsys):
    import dataclasses

    from pama_ext.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["dpo", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(DPOConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_cli_tiny_run_writes_the_run_directory(world_cache, tmp_path, capsys):
    # the pairs of a first run feed a second one through --data (the JSONL path of the loader)
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "pama_ext.cli", "dpo", "--model", "tiny", "--tiny-world-cache", world_cache,
            "--method", "raco", "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--pool-prompts", "4",
            "--responses-per-prompt", "3", "--max-new-tokens", "8", "--eval-size", "2", "--eval-samples", "1",
            "--output-dir", str(out), "--no-progress", "--log-every", "1", "--tie-margin", "0", "--threads", "1"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| raco |" in r.stdout
    for f in ("config.yaml", "pairs.jsonl", "data.json", "metrics.jsonl", "eval.json", "samples.jsonl", "final.md",
              "model/config.json"):
        assert (out / f).exists(), f
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["win_rate"]) == {"sentiment", "length"} and all(0 <= v <= 1 for v in ev["win_rate"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # in-process from here (the entry point is the same function): an existing run is refused without
    # --overwrite, and mopo trains on the saved pairs through the JSONL loader
    from pama_ext.cli import main

    base = args[3:-2]  # without --threads (a process-wide setting)
    assert main(base) == 2
    assert "--output-dir" in capsys.readouterr().err
    out2 = tmp_path / "cli2"
    args2 = list(base)
    args2[args2.index("raco")] = "mopo"
    args2[args2.index(str(out))] = str(out2)
    args2 += ["--data", str(out / "pairs.jsonl"), "--mopo-t0", "1"]
    assert main(args2) == 0
    info = json.loads((out2 / "data.json").read_text())
    assert info["pool"]["responses"] >= 2 and info["conflict_rate"] >= 0
    ev = json.loads((out2 / "eval.json").read_text())
    assert ev["mean_ess"] >= 1.0


@pytest.mark.parametrize("method, batch, expect", [("raco", 8, 8), ("raco", 32, 16), ("dpo-lw", 1, 1), ("mopo", 2, 16)])
def test_micro_batch_default_follows_the_batch_size(method, batch, expect):
    from pama_ext.dpo.config import MICRO_BATCH_DEFAULT

    cfg = DPOConfig(method=method, batch_size=batch).validate()  # --batch-size 8 alone failed before
    assert cfg.micro_batch_size == expect
    if method != "mopo":
        assert expect == min(batch, MICRO_BATCH_DEFAULT)
    assert DPOConfig(batch_size=8, micro_batch_size=3).validate().micro_batch_size == 3


def test_config_rejects_every_beta_the_dpo_op_rejects():
    """The temperature multi_dpo_loss gets (cfg.loss_beta) is accepted by the op whenever the configuration
    validates, and --beta values the op rejects are configuration errors naming the flag."""
    nan, inf = float("nan"), float("inf")
    z = torch.zeros(2)
    labels = torch.tensor([[1.0, -1.0]])
    for method in ("raco", "modpo"):
        for beta in (None, -1.0, 0.0, 1e-3, 0.5, 1e300, inf, nan):
            for weights in (None, [0.5, 0.5], [1e-310, 1.0], [1e-300, 1.0]):
                cfg = DPOConfig(method=method, beta=beta, weights=weights)
                try:
                    cfg.validate()
                    ok = True
                except ConfigError as e:
                    assert str(e).startswith(("--beta:", "--weights:")), str(e)
                    ok = False
                try:
                    multi_dpo_loss(z, z, z, z, labels, cfg.loss_beta)
                    op_ok = True
                except (ValueError, RuntimeError):
                    op_ok = False
                assert op_ok or not ok, (method, beta, weights)


def test_tie_only_data_is_a_clear_error_and_blocks_no_rerun(world_cache, tmp_path, capsys):
    from pama_ext.cli import main

    p = tmp_path / "ties.jsonl"
    row = {"prompt": "This movie", "chosen": "was good.", "rejected": "was bad.", "labels": {"sentiment": 0, "length": 0}}
    p.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, chosen="was fine.")) + "\n")
    out = tmp_path / "runs" / "ties"
    args = ["dpo", "--model", "tiny", "--tiny-world-cache", world_cache, "--data", str(p), "--method", "dpo-lw",
            "--steps", "1", "--batch-size", "2", "--eval-size", "2", "--eval-samples", "1", "--max-new-tokens", "4",
            "--output-dir", str(out), "--no-progress", "--log-every", "0", "--no-plots", "--no-save-model"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pama-ext dpo: error: --data: {p}: all 2 pairs are ties"), err
    assert not (tmp_path / "runs").exists()  # nothing left that blocks the corrected rerun
    p.write_text(json.dumps(dict(row, labels={"sentiment": 1, "length": 0})) + "\n")
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "eval.json").is_file()


def test_non_utf8_data_file_is_a_one_line_cli_error(world_cache, tmp_path, capsys):
    from pama_ext.cli import main

    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b", "labels": {"sentiment": 1, "length": 1}}\n')
    out = tmp_path / "out"
    assert main(["dpo", "--model", "tiny", "--tiny-world-cache", world_cache, "--data", str(p), "--output-dir",
                 str(out), "--no-progress", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pama-ext dpo: error: --data: {p}:1: not valid UTF-8"), err
    assert not out.exists()


def test_ctrl_c_is_one_line_and_leaves_nothing(world_cache, tmp_path, monkeypatch, capsys):
    from pama_ext.cli import main
    from pama_ext.dpo import methods as Mth

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Mth.PairTrainer, "step", interrupted)
    out = tmp_path / "runs" / "stopped"
    args = ["dpo", "--model", "tiny", "--tiny-world-cache", world_cache, "--method", "dpo-lw", "--steps", "2",
            "--batch-size", "4", "--pool-prompts", "4", "--responses-per-prompt", "3", "--max-new-tokens", "6",
            "--eval-size", "2", "--eval-samples", "1", "--tie-margin", "0", "--output-dir", str(out), "--no-progress",
            "--log-every", "0", "--no-plots", "--no-save-model"]
    try:
        rc = main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the CLI")
    err = capsys.readouterr().err
    assert rc == 130 and err.strip() == ("pama-ext dpo: stopped before the first checkpoint (the partial output was "
                                         "removed): run again"), err
    assert not (tmp_path / "runs").exists()
