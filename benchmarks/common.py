"""Shared helpers of the pama_ext benchmarks: timing, copy bandwidth, peak memory, inputs, CSV.

Timing
  * CPU: ``warmup`` untimed calls, then ``k`` timed calls (``time.perf_counter``), each on the next
    of several pre-generated input sets (rotation keeps one set from sitting in cache across
    repeats); we report the median and the 20th/80th percentiles in milliseconds.
  * CUDA: ``triton.testing.do_bench`` (it flushes L2 between calls) when triton is importable,
    otherwise CUDA events around each call; the same rotation over input sets is used.

Everything here works on CPU; the CUDA paths are only taken with ``device="cuda"``.
"""
from __future__ import annotations

import csv
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {name!r}")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: torch.device) -> str:
    """One line naming the hardware the numbers come from."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}"
    return (
        f"{cpu_model_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}"
    )


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        xs = sorted(samples_ms)
        return cls(statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs))


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted sequence."""
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


@dataclass
class TimingPlan:
    """How long to time one (implementation, shape): ``budget_s`` of timed calls, clamped to
    ``[min_repeats, max_repeats]`` calls, after ``warmup`` untimed calls."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    budget_s: float = 1.0


def time_cpu(fn: Callable[[int], object], n_sets: int, plan: TimingPlan) -> Timing:
    """Times ``fn(i)`` (``i`` = index of the input set to use) on the CPU.

    The number of repeats is chosen from the warm-up calls so that the timed calls take about
    ``plan.budget_s``; the input set rotates on every call.
    """
    call = 0
    t_warm = []
    for _ in range(max(1, plan.warmup)):
        t0 = time.perf_counter()
        fn(call % n_sets)
        t_warm.append(time.perf_counter() - t0)
        call += 1
    est = min(t_warm)
    k = int(plan.budget_s / max(est, 1e-6))
    k = max(plan.min_repeats, min(plan.max_repeats, k))
    samples = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn(call % n_sets)
        samples.append((time.perf_counter() - t0) * 1e3)
        call += 1
    return Timing.from_samples(samples)


def time_cuda(fn: Callable[[int], object], n_sets: int, plan: TimingPlan) -> Timing:
    """Times ``fn(i)`` on the GPU: triton's do_bench if importable, else CUDA events."""
    state = {"call": 0}

    def step():
        fn(state["call"] % n_sets)
        state["call"] += 1

    try:
        from triton.testing import do_bench  # type: ignore
    except Exception:  # noqa: BLE001 - triton absent or broken: fall back to events
        do_bench = None
    if do_bench is not None:
        rep_ms = max(25.0, plan.budget_s * 1e3)
        med, p20, p80 = do_bench(step, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), -1)  # do_bench picks the count
    for _ in range(max(1, plan.warmup)):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    k = max(plan.min_repeats, min(plan.max_repeats * 4, int(plan.budget_s / max(est, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
    for s, e in zip(starts, ends):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fn(fn: Callable[[int], object], n_sets: int, plan: TimingPlan, device: torch.device) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, n_sets, plan)
    return time_cpu(fn, n_sets, plan)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def malloc_returns_large_blocks() -> None:
    """glibc keeps freed blocks below its (dynamically raised) mmap threshold in the heap, which hides
    allocations from the resident set; a fixed 64 KiB threshold makes every large tensor an mmap that
    is returned on free, so the RSS peak measures the call's own allocations. Call once, before the
    tensors of a CPU memory measurement are made."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak extra memory of one call ``fn()`` in MB (10^6 bytes).

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU: the
    process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above its
    resident set before the call (see :func:`malloc_returns_large_blocks`); None where /proc does
    not allow it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 1e6
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _proc_status_kb("VmRSS")
    except (OSError, RuntimeError):
        return None
    fn()
    return (_proc_status_kb("VmHWM") - base) / 1e3


# ------------------------------------------------------------------------------------------------
# copy bandwidth
# ------------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(device: torch.device, mbytes: int = 256, repeats: int = 10) -> float:
    """Measured copy bandwidth in GB/s: ``dst.copy_(src)`` of a ``mbytes`` MB float32 tensor,
    counting bytes read + bytes written (2 x size) over the median time."""
    numel = mbytes * 2**20 // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * numel * 4 / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------------
# inputs (seeded)
# ------------------------------------------------------------------------------------------------
def _gen(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def make_mask(B: int, T: int, seed: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """[B, T] response mask: row b is in on its first L_b tokens, L_b uniform in [T/4, T]."""
    g = _gen(seed, device)
    lens = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    return mask.to(dtype).to(device)


def make_policy_inputs(
    n: int, B: int, T: int, seed: int, device: torch.device, dtype=torch.float32, mask_dtype=torch.float32
) -> Dict[str, torch.Tensor]:
    """logp / old_logp ``[B, T]`` (log-probs, ratio spread so some tokens clip), advantages
    ``[n, B, T]`` (per-objective offsets and scales), mask ``[B, T]``. ``logp`` is a leaf with
    ``requires_grad=True``."""
    g = _gen(seed, device)
    old = -torch.rand(B, T, generator=g).mul_(3.0)
    logp = old + 0.15 * torch.randn(B, T, generator=g)
    scale = 0.5 + torch.rand(n, 1, 1, generator=g) * 2.0
    offset = torch.randn(n, 1, 1, generator=g) * 0.3
    adv = torch.randn(n, B, T, generator=g) * scale + offset
    mask = make_mask(B, T, seed + 7919, device, mask_dtype)
    return {
        "logp": logp.to(device=device, dtype=dtype).requires_grad_(True),
        "old_logp": old.to(device=device, dtype=dtype),
        "advantages": adv.to(device=device, dtype=dtype),
        "mask": mask,
    }


def make_gae_inputs(
    n: int, B: int, T: int, seed: int, device: torch.device, dtype=torch.float32, mask_dtype=torch.float32
) -> Dict[str, torch.Tensor]:
    """rewards ``[n, B, T]`` (small per-token terms plus a score on each row's last in-token),
    values ``[n, B, T]``, mask ``[B, T]``."""
    g = _gen(seed, device)
    mask = make_mask(B, T, seed + 7919, device, mask_dtype).cpu()
    m = mask != 0
    last = m.cumsum(-1).eq(m.sum(-1, keepdim=True)) & m  # one-hot of the last in-token
    rewards = 0.01 * torch.randn(n, B, T, generator=g) + last.to(torch.float32) * torch.randn(n, B, 1, generator=g)
    values = torch.randn(n, B, T, generator=g) * 0.5
    return {
        "rewards": rewards.to(device=device, dtype=dtype),
        "values": values.to(device=device, dtype=dtype),
        "mask": mask.to(device),
    }


def num_input_sets(bytes_per_set: int, target_bytes: int = 64 * 2**20, lo: int = 3, hi: int = 32) -> int:
    """How many input sets to rotate through: enough to span ``target_bytes`` (larger than the
    last-level cache of most machines), within ``[lo, hi]``."""
    return max(lo, min(hi, math.ceil(target_bytes / max(1, bytes_per_set))))


def tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ------------------------------------------------------------------------------------------------
# output files (atomic: temp file in the same folder, then rename)
# ------------------------------------------------------------------------------------------------
def _atomic_write(path: str, write: Callable[[str], None]) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_csv(rows: List[Dict[str, object]], name: str, device: str, out_dir: str = RESULTS_DIR) -> str:
    """Writes ``rows`` to ``<out_dir>/<name>_<device>.csv`` atomically; returns the path."""
    path = os.path.join(out_dir, f"{name}_{device}.csv")
    fields: List[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(v) for k, v in r.items()})

    return _atomic_write(path, write)


def write_text(path: str, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return _atomic_write(path, write)


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v
