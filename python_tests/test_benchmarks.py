"""The benchmark scripts still run: every GPU benchmark section on tiny CPU shapes (bench_gpu.py's
developer smoke mode), so a broken script is found here rather than in a lent GPU session, and the
argument rules of bench_gpu.py --cpu."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SECTIONS = ("bandwidth", "policy_loss", "gae", "stats", "headline", "e2e")

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(BENCH, "bench_gpu.py")),
                                reason="benchmarks/ is not next to the tests (installed-wheel run)")


def _bench_gpu():
    sys.path.insert(0, BENCH)
    try:
        import bench_gpu
    finally:
        sys.path.remove(BENCH)
    return bench_gpu


def test_bench_gpu_runs_every_section(tmp_path):
    pytest.importorskip("transformers")  # the e2e trainer mode
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_gpu.py"), "--smoke-cpu", "--quick", "--no-compile", "--no-plot",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for section in SECTIONS:
        path = out / f"bench_gpu_{section}_cpu_smoke.csv"
        assert path.is_file(), f"no {path.name}; stdout tail: {r.stdout[-1500:]}"
        rows = list(csv.DictReader(open(path)))
        assert rows, f"{path.name} is empty"
        statuses = {row.get("status") for row in rows} - {None}
        # "skipped" rows are the torch.compile baselines (--no-compile); an error is a broken script
        assert statuses <= {"ok", "skipped"}, f"{path.name}: {statuses}: {rows}"
        if section != "bandwidth":
            assert "ok" in statuses, f"{path.name} measured nothing"
    assert (out / "bench_gpu_cpu_smoke.md").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--cpu", "--only", "policy_loss"], "--cpu runs only headline, e2e"),
    (["--cpu", "--smoke-cpu"], "exclude each other"),
    (["--only", "nope"], "unknown section"),
    (["--models", "gpt2-huge"], "unknown"),
])
def test_bench_gpu_rejects_bad_arguments(argv, message, capsys):
    bench_gpu = _bench_gpu()
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bench_gpu_cpu_defaults():
    bench_gpu = _bench_gpu()
    args = bench_gpu.parse_args(["--cpu"])
    assert args.sections == ["headline", "e2e"]
    assert args.models == ["gpt2-small"]
    assert args.headline_bt == bench_gpu.CPU_HEADLINE_BT
    assert (args.e2e_batch, args.e2e_minibatch, args.e2e_response) == (8, 4, 64)
    gpu = bench_gpu.parse_args([])
    assert gpu.sections == list(bench_gpu.SECTIONS) and gpu.models == ["gpt2-small", "gpt2-1b"]
    assert gpu.headline_bt == bench_gpu.HEADLINE_BT and gpu.e2e_batch == 32
