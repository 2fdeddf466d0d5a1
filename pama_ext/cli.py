"""`pama-ext` command line: `train` (multi-objective PPO), `dpo` (preference-data alignment), `compare` (methods x
seeds x settings with intervals and verdicts), `info` (build and kernel report), `bench` (op benchmarks)."""
from __future__ import annotations

import argparse
import os
import platform
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


def library_sources_line(built: Optional[str]) -> str:
    """The digest of the sources the loaded library was built from (pama_ext.abi.source_digest) and, in a
    source tree (csrc/ next to the package: an editable install), whether the tree still matches it."""
    from . import abi

    if built is None:
        return "(not recorded: built before the digest existed)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "csrc")):
        return built
    same = abi.source_digest(root) == built
    return f"{built} ({'matches this source tree' if same else 'this source tree differs: rebuild'} {root})"

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
            print(f"library sources {library_sources_line(getattr(bi, 'SOURCE_DIGEST', None))}")
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
    if args.suite is None:
        args.bench_parser.print_help()
        return 2
    module = args.bench_module
    if getattr(module, "check_args", None) is not None:
        module.check_args(args, args.suite_parser)
    return module.run(args)


def add_bench_subcommand(sub) -> None:
    """`pama-ext bench SUITE [options]`: the benchmarks that ship with the package
    (pama_ext/benchmarks), each suite's own options under `pama-ext bench SUITE --help`."""
    import importlib

    from .benchmarks import SUITES

    p_bench = sub.add_parser(
        "bench", help="run a benchmark suite (pama-ext bench SUITE --help for its options)",
        description="Benchmarks of the fused ops against their baselines (reference eager, torch.compile, the "
                    "peers' formulations). Results go to --out (default: a source checkout's benchmarks/results, "
                    "else ./bench_results). `pama-ext bench SUITE --help` lists a suite's options.")
    p_bench.set_defaults(func=cmd_bench, suite=None, bench_parser=p_bench)
    suites = p_bench.add_subparsers(dest="suite", metavar="SUITE")
    for name, (module_name, summary) in SUITES.items():
        module = importlib.import_module(f".benchmarks.{module_name}", __package__)
        sp = suites.add_parser(name, help=summary, description=(module.__doc__ or summary).split("\n\n")[0])
        module.add_arguments(sp)
        sp.set_defaults(bench_module=module, suite_parser=sp)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pama-ext", description="pama_ext: fused multi-objective alignment ops")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print versions, compiled CUDA archs and kernels per op")
    p_info.set_defaults(func=cmd_info)
    add_bench_subcommand(sub)
    from .trainer.train import add_train_subcommand  # imports no transformers

    add_train_subcommand(sub)
    from .dpo.train import add_dpo_subcommand  # imports no transformers

    add_dpo_subcommand(sub)
    from .compare.cli import add_compare_subcommand  # imports no torch

    add_compare_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
