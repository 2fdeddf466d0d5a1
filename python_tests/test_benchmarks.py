"""The benchmarks (pama_ext/benchmarks, shipped with the package) still run: every GPU benchmark section
on tiny CPU shapes (bench_gpu's developer smoke mode), every op family of the bench_ops sweep, the
other suites' smoke runs, the argument rules of bench_gpu --cpu, and `pama-ext bench`'s options, so a
broken script is found here rather than in a lent GPU session."""
from __future__ import annotations

import ast
import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pama_ext import cli
from pama_ext.benchmarks import SUITES, bench_gpu, bench_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = pathlib.Path(bench_ops.__file__).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           PYTHONPATH=os.pathsep.join(p for p in (str(BENCH_DIR.parent.parent), os.environ.get("PYTHONPATH")) if p))


def _run(module, *argv, timeout=600):
    r = subprocess.run([sys.executable, "-m", f"pama_ext.benchmarks.{module}", *argv], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _rows(path):
    assert path.is_file(), f"no {path.name}"
    rows = list(csv.DictReader(open(path)))
    assert rows, f"{path.name} is empty"
    return rows


def test_bench_gpu_runs_every_section(tmp_path):
    pytest.importorskip("transformers")  # the e2e trainer mode
    out = tmp_path / "results"
    r = _run("bench_gpu", "--smoke-cpu", "--quick", "--no-compile", "--no-plot", "--out", str(out))
    for section in bench_gpu.SECTIONS:
        rows = _rows(out / f"bench_gpu_{section}_cpu_smoke.csv")
        statuses = {row.get("status") for row in rows} - {None}
        # "skipped" rows are the torch.compile baselines (--no-compile); an error is a broken script
        assert statuses <= {"ok", "skipped"}, f"{section}: {statuses}: {rows}"
        if section != "bandwidth":
            assert "ok" in statuses, f"{section} measured nothing; stdout tail: {r.stdout[-1500:]}"
    assert (out / "bench_gpu_cpu_smoke.md").is_file()


def test_bench_ops_runs_every_op_family(tmp_path):
    out = tmp_path / "results"
    _run("bench_ops", "--quick", "--no-compile", "--no-plot", "--ops", ",".join(bench_ops.FAMILIES), "--ns", "1,2",
         "--threads", "1,2", "--force", "--out", str(out))
    rows = _rows(out / "bench_ops_cpu.csv")
    assert {r["op"] for r in rows} == set(bench_ops.FAMILIES)
    assert {r["threads"] for r in rows} == {"1", "2"}
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["impl"] == "fused" or (r["impl"] == "fused_ppo" and r["n"] == "1"):
            assert r["status"] == "ok" and float(r["max_abs_err_vs_eager"]) < 1e-3, r
        if r["op"] == "gae" and r["impl"] in ("loop", "loop_folded"):
            assert r["status"] == "ok", r
    assert (out / "bench_ops_cpu.md").is_file()


def test_bench_ops_refuses_to_write_on_a_loaded_machine(tmp_path):
    """Above --max-load the results are printed, not written (exit 3); --force writes them."""
    argv = [sys.executable, "-m", "pama_ext.benchmarks.bench_ops", "--quick", "--no-compile", "--no-plot", "--ops",
            "gae", "--ns", "1", "--sizes", "4x64", "--threads", "1", "--max-load", "-1", "--out", str(tmp_path)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "NOT WRITTEN" in r.stderr and not (tmp_path / "bench_ops_cpu.csv").exists()
    assert bench_ops.load_gate((0.2, 0, 0), (2.3, 0, 0), 2, 0.5) is None  # its own 2 threads do not count
    assert "above --max-load" in bench_ops.load_gate((0.7, 0, 0), (0.7, 0, 0), 1, 0.5)
    assert "above --max-load" in bench_ops.load_gate((0.1, 0, 0), (3.0, 0, 0), 2, 0.5)


def test_plain_baselines_compute_what_they_stand_for():
    """The plain PPO loss is pama_policy_loss under PLAIN_PPO_OPTIONS at n = 1 (loss and gradient);
    the folded GAE loop is the per-objective loop (both ignore the mask: full mask here)."""
    from pama_ext import reference
    from pama_ext.benchmarks import baselines

    g = torch.Generator().manual_seed(5)
    B, T = 6, 33
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(1, B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    grads = []
    losses = []
    for f in (lambda lp: reference.pama_policy_loss(lp, old, adv, mask, **baselines.PLAIN_PPO_OPTIONS)[0],
              lambda lp: baselines.plain_ppo_loss(lp, old, adv, mask)[0]):
        lp = (old + 0.4 * torch.randn(B, T, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
        lp.requires_grad_(True)
        loss = f(lp)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lp.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    r = torch.randn(3, B, T, generator=g, dtype=torch.float64)
    v = torch.randn(3, B, T, generator=g, dtype=torch.float64)
    full = torch.ones(B, T, dtype=torch.bool)
    for a, b in zip(baselines.gae_python_loop_folded(r, v, full, 0.99, 0.9), baselines.gae_python_loop(r, v, full, 0.99, 0.9)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module,argv,files", [
    ("gradient_gram", ["--quick", "--no-plot", "--max-repeats", "3", "--budget", "0.05"],
     ["bench_gradient_gram_cpu.csv", "bench_gradient_gram_cpu.md"]),
    ("gram_solvers", ["--quick"], ["bench_gram_solvers_cpu.csv", "bench_gram_solvers_cpu.md"]),
    ("distributed", ["--quick", "--repeats", "2"], ["bench_distributed_cpu.csv", "bench_distributed_cpu.md"]),
])
def test_other_suites_run(module, argv, files, tmp_path):
    _run(module, *argv, "--out", str(tmp_path))
    for name in files:
        assert (tmp_path / name).is_file(), name
    rows = _rows(tmp_path / files[0])
    assert all(r.get("status", "ok") == "ok" for r in rows)


def test_plot_ops_redraws(tmp_path):
    pytest.importorskip("matplotlib")
    _run("bench_ops", "--quick", "--no-compile", "--no-plot", "--ns", "2", "--sizes", "4x64", "--threads", "1", "--force",
         "--out", str(tmp_path))
    _run("plot_ops", str(tmp_path / "bench_ops_cpu.csv"), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--cpu", "--only", "policy_loss"], "--cpu runs only headline, e2e"),
    (["--cpu", "--smoke-cpu"], "exclude each other"),
    (["--only", "nope"], "unknown section"),
    (["--models", "gpt2-huge"], "unknown"),
])
def test_bench_gpu_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--ops", "nope"], "--ops: unknown op"),
                                          (["--dtype", "floaty"], "--dtype: not a torch dtype")])
def test_bench_ops_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_ops.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bench_gpu_cpu_defaults():
    args = bench_gpu.parse_args(["--cpu"])
    assert args.sections == ["headline", "e2e"]
    assert args.models == ["gpt2-small"]
    assert args.headline_bt == bench_gpu.CPU_HEADLINE_BT
    assert (args.e2e_batch, args.e2e_minibatch, args.e2e_response) == (8, 4, 64)
    gpu = bench_gpu.parse_args([])
    assert gpu.sections == list(bench_gpu.SECTIONS) and gpu.models == ["gpt2-small", "gpt2-1b"]
    assert gpu.headline_bt == bench_gpu.HEADLINE_BT and gpu.e2e_batch == 32


def test_cli_bench_help_shows_the_suites_and_their_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for suite in SUITES:
        assert suite in out
    assert "passed through" not in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "ops", "--help"])
    out = capsys.readouterr().out
    for flag in ("--quick", "--ops", "--sizes", "--no-compile", "--gae-compile-max-t"):
        assert flag in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "gpu", "--help"])
    assert "--only" in capsys.readouterr().out


def test_cli_bench_runs_a_suite(tmp_path, capsys):
    assert cli.main(["bench", "gram-solvers", "--quick", "--ns", "2", "--methods", "mgda", "--out",
                     str(tmp_path)]) == 0
    assert (tmp_path / "bench_gram_solvers_cpu.csv").is_file()
    with pytest.raises(SystemExit):
        cli.main(["bench", "ops", "--ops", "nope"])
    assert "--ops: unknown op" in capsys.readouterr().err


def test_no_benchmark_imports_a_private_name_from_another_module():
    for path in BENCH_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                bad = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not bad, f"{path.name} imports {bad} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.value.id not in ("torch", "self", "os", "sys"):
                pytest.fail(f"{path.name} uses {node.value.id}.{node.attr}")


def test_fused_linear_suite_runs(tmp_path):
    """pama-ext bench fused-linear on tiny shapes: every implementation measured (liger skipped with
    its reason where liger-kernel is not installed), the table written."""
    _run("fused_linear", "--hidden", "16", "--vocabs", "64", "--tokens", "32", "--seq-len", "16", "--ns", "1",
         "--repeats", "1", "--out", str(tmp_path))
    rows = _rows(tmp_path / "bench_fused_linear_cpu.csv")
    assert {r["impl"] for r in rows} == {"unfused", "liger", "fused-1pass", "fused-2pass"}
    for r in rows:
        ok = r["status"] == "ok" or (r["impl"] == "liger" and "not installed" in r["reason"])
        assert ok, r
        if r["status"] == "ok":
            assert float(r["median_ms"]) > 0 and float(r["peak_rss_mb"]) > 0
    assert (tmp_path / "bench_fused_linear_cpu.md").is_file()


def test_fused_linear_cases_option(tmp_path):
    """--cases runs exactly the listed sub-grids (liger only at n = 1) and --repeats 0 times the first call."""
    _run("fused_linear", "--hidden", "8", "--seq-len", "16", "--repeats", "0", "--out", str(tmp_path),
         "--cases", "64:32:1,2:unfused,fused-1pass;128:16:2:fused-2pass,liger")
    rows = _rows(tmp_path / "bench_fused_linear_cpu.csv")
    got = sorted((r["impl"], int(r["n"]), int(r["V"]), int(r["tokens"])) for r in rows)
    assert got == sorted([("unfused", 1, 64, 32), ("fused-1pass", 1, 64, 32), ("unfused", 2, 64, 32),
                          ("fused-1pass", 2, 64, 32), ("fused-2pass", 2, 128, 16)])
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) == float(r["first_ms"]) > 0


def test_trainer_scale_suite_runs(tmp_path):
    """pama-ext bench trainer-scale on a tiny GPT-2 shape: each configuration steps once in its own
    process with finite numbers, the lean one through the fused loss, and the table is written."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    _run("trainer_scale", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "300", "--batch", "2",
         "--response", "4", "--prompt", "3", "--configs", "fp32,bf16+lora+ckpt+fused", "--out", str(tmp_path))
    rows = _rows(tmp_path / "bench_trainer_scale_cpu.csv")
    assert [r["config"] for r in rows] == ["fp32", "bf16+lora+ckpt+fused"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["finite"] == "True" and r["skipped"] == "0"
        assert float(r["peak_rss_mb"]) >= float(r["setup_rss_mb"]) > 0 and float(r["step_s"]) > 0
    assert rows[1]["fused_loss"] == "True" and int(rows[1]["trainable"]) < int(rows[0]["trainable"])
    assert (tmp_path / "bench_trainer_scale_cpu.md").is_file()


def test_trainer_scale_rejects_bad_configs():
    from pama_ext.benchmarks import trainer_scale

    assert trainer_scale.config_fields("bf16+lora+ckpt+fused") == dict(
        dtype="bf16", lora_r=16, lora_alpha=32.0, gradient_checkpointing=True, fused_linear=True)
    assert trainer_scale.config_fields("fp32") == dict(dtype="fp32", fused_linear=False)
    for bad in ("fp32+bf16", "bf16+nope", ""):
        with pytest.raises(SystemExit, match="--configs"):
            trainer_scale.config_fields(bad)


def test_fused_linear_interleaved_mode(tmp_path):
    """--interleave times every implementation round-robin in one process per (V, B·T, n): one row per
    implementation (liger at n = 1 only) and the ratio table."""
    _run("fused_linear", "--hidden", "8", "--seq-len", "16", "--interleave", "1", "--out", str(tmp_path),
         "--cases", "64:32:1,2:unfused,liger,fused-1pass,fused-2pass")
    rows = _rows(tmp_path / "bench_fused_linear_interleaved_cpu.csv")
    got = sorted((r["impl"], int(r["n"])) for r in rows)
    want = [(i, n) for i in ("unfused", "fused-1pass", "fused-2pass") for n in (1, 2)]
    if importlib.util.find_spec("liger_kernel") is not None:  # left out where not installed
        want.append(("liger", 1))
    assert got == sorted(want)
    assert all(r["status"] == "ok" for r in rows), rows
    assert "2-pass / 1-pass" in (tmp_path / "bench_fused_linear_interleaved_cpu.md").read_text()


@pytest.mark.parametrize("name", ["ptxas_sm80.txt", "ptxas_sm90.txt", "sass_summary_sm80.txt",
                                  "sass_summary_sm90.txt"])
def test_committed_gpu_reports_match_the_library_sources(name):
    """The per-arch resource reports (`make gpu-report`) that BENCHMARKS.md and docs/kernels.md quote
    were made from this tree's kernels: their header records the library-source digest. Run from a copy
    of the tests without the package sources (tools/verify_wheel.sh), the reference is the digest the
    installed library was built from."""
    from pama_ext import abi

    lines = pathlib.Path(ROOT, "benchmarks", "results", name).read_text().splitlines()
    recorded = [line.split()[3] for line in lines[:4] if line.startswith("# library sources: ")]
    assert recorded, f"{name}: no '# library sources:' line; regenerate with `make gpu-report`"
    if os.path.isfile(os.path.join(ROOT, "pama_ext", "schemas.def")):
        tree = abi.source_digest(ROOT)
    else:
        from pama_ext import _build_info

        tree = _build_info.SOURCE_DIGEST
    assert recorded[0] == tree, (
        f"benchmarks/results/{name} was made from other library sources ({recorded[0]}) than this tree's "
        f"({tree}): regenerate it with `make gpu-report` after changing csrc/")
