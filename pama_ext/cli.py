"""`pama-ext` command line: `train` (multi-objective PPO), `dpo` (preference-data alignment), `info` (build and
kernel report), `bench` (op benchmarks)."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import List, Optional

OPS = (
    "token_rewards",
    "multi_gae",
    "objective_stats",
    "pareto_weights",
    "pama_policy_loss",
    "multi_value_loss",
    "multi_dpo_loss",
    "gradient_gram",
    "combine_gradients",
    "gram_weights",
)


def _kernel_table() -> List[str]:
    import torch

    from . import _native

    lines = []
    for op in OPS:
        if not _native.NATIVE_AVAILABLE:
            lines.append(f"  {op:<20} cpu: reference (python)   cuda: reference (python)")
            continue
        handle = getattr(torch.ops.pama_ext, op).default
        cpu = torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CPU")
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA")
        lines.append(
            f"  {op:<20} cpu: {'fused kernel' if cpu else 'missing':<20} cuda: {'fused kernel' if cuda else 'not built'}"
        )
    return lines


def cmd_info(_args) -> int:
    import torch

    import pama_ext
    from . import _native

    print(f"pama_ext        {pama_ext.__version__}")
    print(f"python          {platform.python_version()} ({sys.executable})")
    print(f"torch           {torch.__version__} (CUDA runtime {torch.version.cuda})")
    print(f"cuda available  {torch.cuda.is_available()}" + (
        f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    if _native.NATIVE_AVAILABLE:
        try:
            from . import _build_info as bi

            print(f"built with      torch {bi.BUILT_WITH_TORCH}, CUDA {bi.BUILT_WITH_CUDA}")
            print(f"CUDA archs      {bi.CUDA_ARCHS or '(none: CPU-only build)'}")
        except ImportError:
            print("built with      (no build info)")
        print(f"compiled lib    {os.path.abspath(pama_ext._C.__file__)}")
    else:
        print(f"compiled lib    NOT LOADED: {_native.NATIVE_ERROR}")
    print("ops:")
    for line in _kernel_table():
        print(line)
    return 0


def cmd_bench(args) -> int:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_ops.py")
    if not os.path.exists(script):
        print("pama-ext bench: benchmarks/bench_ops.py is part of the source tree; run it from a checkout.",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script, *args.rest])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pama-ext", description="pama_ext: fused multi-objective alignment ops")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print versions, compiled CUDA archs and kernels per op")
    p_info.set_defaults(func=cmd_info)
    p_bench = sub.add_parser("bench", help="run benchmarks/bench_ops.py (arguments are passed through)")
    p_bench.add_argument("rest", nargs=argparse.REMAINDER)
    p_bench.set_defaults(func=cmd_bench)
    from .trainer.train import add_train_subcommand  # imports no transformers

    add_train_subcommand(sub)
    from .dpo.train import add_dpo_subcommand  # imports no transformers

    add_dpo_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
