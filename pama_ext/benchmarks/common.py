"""Shared helpers of the pama_ext benchmarks: timing, copy bandwidth, peak memory, inputs, result rows,
tables and files, the run budget, profiler helpers, and the one place the benchmarks import the trainer.

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
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# the folder that holds the pama_ext package: a source checkout's root (or site-packages)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _default_results_dir() -> str:
    """A source checkout's ``benchmarks/results`` (where BENCHMARKS.md's raw rows live); for an
    installed package, ``bench_results`` in the current folder."""
    checkout = os.path.join(PACKAGE_PARENT, "benchmarks")
    if os.path.isdir(checkout):
        return os.path.join(checkout, "results")
    return os.path.join(os.getcwd(), "bench_results")


RESULTS_DIR = _default_results_dir()


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


def first_call_then_repeats(step: Callable[[], object], repeats: int) -> Dict[str, object]:
    """One CPU case of a fresh-process benchmark: the first ``step()`` with its peak extra memory
    (:func:`peak_memory_mb`) and wall time, then ``repeats`` timed calls; the process's peak resident
    set at the end. Keys: extra_mb, peak_rss_mb, first_ms, median_ms (the first call's time when
    ``repeats`` is 0), repeats (all times in ms, memory in MB)."""
    t0 = time.perf_counter()
    extra = peak_memory_mb(step, torch.device("cpu"))  # the first call, in this fresh process
    first = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux
    return dict(extra_mb=extra, peak_rss_mb=peak, first_ms=first,
                median_ms=statistics.median(times) if times else first, repeats=len(times))


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
def atomic_write(path: str, write: Callable[[str], None]) -> str:
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

    return atomic_write(path, write)


def write_text(path: str, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


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


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_sizes(s: Optional[str]) -> Optional[List[Tuple[int, ...]]]:
    """``"8x256,64x1024"`` -> ``[(8, 256), (64, 1024)]``; None stays None."""
    return [tuple(int(v) for v in x.lower().split("x")) for x in s.split(",")] if s else None


def parse_ints(s: Optional[str]) -> Optional[List[int]]:
    return [int(v) for v in s.split(",")] if s else None


def load_average(la: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in la)


def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command as the user typed it (``pama-ext bench ...`` or ``python -m <module> ...``), for the
    reports."""
    if argv is not None:
        return f"python -m {module} " + " ".join(argv)
    prog = os.path.basename(sys.argv[0])
    if prog.startswith("pama-ext"):
        return " ".join(["pama-ext", *sys.argv[1:]])
    if prog == "__main__.py" and os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0]))) == "pama_ext":
        return " ".join(["python -m pama_ext", *sys.argv[1:]])
    return " ".join([f"python -m {module}", *sys.argv[1:]])


# ------------------------------------------------------------------------------------------------
# result rows: one dict per (op, shape, implementation)
# ------------------------------------------------------------------------------------------------
COLUMNS = ["op", "n", "B", "T", "tokens", "impl", "dtype", "status", "median_ms", "p20_ms", "p80_ms",
           "repeats", "speedup_of_fused", "bytes", "gbps", "frac_copy_bw", "peak_mem_mb", "compile_s",
           "max_abs_err_vs_eager", "reason"]


def timed_row(fn: Callable[[int], object], n_sets: int, plan: TimingPlan, device: torch.device) -> Dict[str, object]:
    """A measured row: median / p20 / p80 of ``fn(i)``; peak memory on CUDA only (a CPU resident-set
    peak of these small calls says nothing)."""
    t = time_fn(fn, n_sets, plan, device)
    row = {"status": "ok", "reason": "", "median_ms": t.median_ms, "p20_ms": t.p20_ms,
           "p80_ms": t.p80_ms, "repeats": t.repeats}
    row["peak_mem_mb"] = peak_memory_mb(lambda: fn(0), device) if device.type == "cuda" else None
    return row


def skipped(reason: str) -> Dict[str, object]:
    return {"status": "skipped", "reason": reason}


def add_rate(row: Dict[str, object], nbytes: int, copy_bw: float) -> None:
    """Achieved bandwidth of an ok row: GB/s of ``nbytes`` over its median, as a fraction of the copy
    bandwidth, and the time the copy roofline allows."""
    if row.get("status") == "ok":
        row["bytes"] = nbytes
        row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
        row["frac_copy_bw"] = row["gbps"] / copy_bw
        row["roofline_ms"] = nbytes / (copy_bw * 1e9) * 1e3


def append_rows(rows: List[Dict[str, object]], base: Dict[str, object], res: Dict[str, Dict], impls: Sequence[str],
                nbytes: int, copy_bw: float) -> None:
    """One row per implementation, with its speed-up over fused and achieved bandwidth."""
    fused_ms = res["fused"]["median_ms"]
    for impl in impls:
        r = dict(base, impl=impl, **res[impl])
        if r.get("status") == "ok":
            r["speedup_of_fused"] = r["median_ms"] / fused_ms
            add_rate(r, nbytes, copy_bw)
        rows.append(r)


def order_columns(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    out = []
    for r in rows:
        o = {k: r.get(k) for k in COLUMNS}
        o.update({k: v for k, v in r.items() if k not in o})
        out.append(o)
    return out


def index_rows(rows, keys=("dtype", "n", "B", "T")) -> Dict[Tuple, Dict[str, Dict]]:
    """``{(key values): {impl: row}}``."""
    out: Dict[Tuple, Dict[str, Dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), {})[r["impl"]] = r
    return out


def ok_median(impls: Dict[str, Dict], impl: str):
    r = impls.get(impl)
    return r.get("median_ms") if r and r.get("status") == "ok" else None


def ok_speedup(impls: Dict[str, Dict], impl: str):
    r = impls.get(impl)
    return r.get("speedup_of_fused") if r and r.get("status") == "ok" else None


def fmt_ms(v) -> str:
    if v is None or v == "":
        return "—"
    v = float(v)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_ratio(v) -> str:
    if v is None or v == "":
        return "—"
    v = float(v)
    return f"{v:.1f}×" if v < 100 else f"{v:.0f}×"


def fmt_pct(v) -> str:
    return "—" if v in (None, "") else f"{100 * float(v):.0f}%"


# ------------------------------------------------------------------------------------------------
# run control: progress lines, the wall-clock budget, time-boxed child processes
# ------------------------------------------------------------------------------------------------
class Progress:
    """A progress sink with tqdm's ``set_postfix_str``: one printed line per config."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def set_postfix_str(self, s: str) -> None:
        if self.enabled:
            print(f"  .. {s}", flush=True)


class Budget:
    """Wall-clock budget of a whole run (``--time-limit``): sections ask before each config."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.seconds > 0 and self.elapsed() > self.seconds

    def reason(self) -> str:
        return f"--time-limit {self.seconds:.0f} s reached before this config"


def run_child(module: str, argv: Sequence[str], timeout: float) -> Tuple[Optional[int], str, str]:
    """Runs ``python -m <module> <argv>`` with this process's pama_ext first on the path, in its own
    session so that on a time-out the child and the workers it started are killed together.
    Returns ``(returncode, stdout, stderr)``; returncode None after a time-out."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return None, "", ""
    return proc.returncode, stdout, stderr


def finish_cpu_report(rows: List[Dict[str, object]], name: str, out: str,
                      table: Callable[[List[Dict[str, object]], str], str], desc: str, load: str, cmd: str) -> None:
    """Writes ``<name>_cpu.csv`` and ``<name>_cpu.md`` (``table(rows, header)``, the header naming the
    device, the load average at the start (``load``) and now, and the command) under ``out``, and
    prints the table."""
    load_end = load_average(os.getloadavg())
    os.makedirs(out, exist_ok=True)
    csv_path = write_csv(rows, name, "cpu", out)
    md = table(rows, f"{desc}; load average {load} at the start, {load_end} at the end; `{cmd}`")
    write_text(os.path.join(out, f"{name}_cpu.md"), md)
    print(md)
    print(f"wrote {csv_path}")


def child_result(module: str, argv: Sequence[str], timeout: float) -> Dict[str, object]:
    """:func:`run_child`, whose last stdout line is a JSON object: ``{"status": "ok", **that object}``,
    or ``{"status": "error", "reason": ...}`` (time-out, or the last line of stderr)."""
    rc, out, err = run_child(module, argv, timeout)
    if rc == 0:
        return dict(status="ok", **json.loads(out.strip().splitlines()[-1]))
    reason = "timeout" if rc is None else (err.strip().splitlines() or ["?"])[-1][:300]
    return dict(status="error", reason=reason)


# ------------------------------------------------------------------------------------------------
# devices, profiler and wall-clock helpers of the GPU suite (they also run on the CPU)
# ------------------------------------------------------------------------------------------------
def sync_all() -> None:
    """Synchronises CUDA when it is in use (a no-op on CPU-only runs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def device_tag(device: torch.device) -> str:
    """The device name in lower case (``nvidia_h100_80gb_hbm3``; ``cpu``), for file names."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def device_time_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_call(fn: Callable[[], object]):
    """``(torch.profiler profile, wall ms)`` of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    sync_all()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync_all()
        wall = (time.perf_counter() - t0) * 1e3
    return prof, wall


def wall_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` synchronised calls, ms."""
    ts = []
    for _ in range(repeats):
        sync_all()
        t0 = time.perf_counter()
        fn()
        sync_all()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def event_time(fn: Callable[[], object], warmup: int, repeats: int) -> Timing:
    """CUDA-event time of each of ``repeats`` calls (wall clock without CUDA)."""
    for _ in range(warmup):
        fn()
    sync_all()
    ts = []
    cuda = torch.cuda.is_available()
    for _ in range(repeats):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(ts)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError as e:
        print(f"plot skipped: {e}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------------
# the PPO trainer, for the end-to-end benchmark: the one place the benchmarks import pama_ext.trainer
# ------------------------------------------------------------------------------------------------
def trainer_api() -> SimpleNamespace:
    """The trainer's public pieces the e2e benchmark drives (imports transformers on first use)."""
    from pama_ext.trainer.config import TrainConfig
    from pama_ext.lm.policy import PolicyWithValueHeads, frozen_copy
    from pama_ext.trainer.ppo import PPOTrainer
    from pama_ext.lm.rewards import LengthReward, Objective

    return SimpleNamespace(TrainConfig=TrainConfig, PolicyWithValueHeads=PolicyWithValueHeads,
                           frozen_copy=frozen_copy, PPOTrainer=PPOTrainer, LengthReward=LengthReward,
                           Objective=Objective)


# ------------------------------------------------------------------------------------------------
# the GPU suite's report files (bench_gpu.py): one CSV + table per section, and the combined report
# ------------------------------------------------------------------------------------------------
GPU_SECTIONS = ("bandwidth", "policy_loss", "gae", "stats", "headline", "e2e")


def section_header(args, section: str, what: str) -> List[str]:
    return [f"## {section}", "", what, "", f"- device: {args.desc}; copy bandwidth {args.copy_bw:.0f} GB/s",
            f"- command: `{args.command}`", ""]


def write_section(args, section: str, rows: List[Dict[str, object]], md_lines: List[str]) -> None:
    """``bench_gpu_<section>_<tag>.csv`` and ``.md``, then ``bench_gpu_<tag>.md``: every section's table
    present in the folder, in section order."""
    from pama_ext import NATIVE_AVAILABLE, __version__

    tag = args.tag
    csv_path = write_csv(rows, f"bench_gpu_{section}", tag, args.out)
    md_path = write_text(os.path.join(args.out, f"bench_gpu_{section}_{tag}.md"), "\n".join(md_lines) + "\n")
    print(f"wrote {csv_path}\nwrote {md_path}", flush=True)
    parts = [f"# bench_gpu on {args.desc}\n",
             f"- copy bandwidth (measured, read + write): {args.copy_bw:.0f} GB/s",
             f"- pama_ext {__version__}, native library "
             f"{'loaded' if NATIVE_AVAILABLE else 'NOT loaded'}; updated {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
    for s in GPU_SECTIONS:
        p = os.path.join(args.out, f"bench_gpu_{s}_{tag}.md")
        if os.path.exists(p):
            with open(p) as f:
                parts.append(f.read())
    write_text(os.path.join(args.out, f"bench_gpu_{tag}.md"), "\n".join(parts))


def plot_rates(args, rows, section_name, title, baseline_impls) -> None:
    """``bench_gpu_<section>_<tag>.png``: fused % of copy bandwidth, and speed-up over each baseline, vs
    tokens (shared by the policy-loss and GAE sections)."""
    if args.no_plot:
        return
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    keys = sorted({(r["dtype"], r["n"]) for r in ok if r["impl"] == "fused"})
    cmap = plt.cm.viridis
    for k, (dt, n) in enumerate(keys):
        c = cmap(k / max(1, len(keys) - 1) * 0.9)
        ls = "-" if dt == "float32" else "--"
        pts = sorted((r["tokens"], r["frac_copy_bw"] * 100) for r in ok
                     if r["impl"] == "fused" and r["dtype"] == dt and r["n"] == n)
        if pts:
            axes[0].plot(*zip(*pts), ls, marker="o", color=c, label=f"{dt} n={n}")
        for impl, marker in zip(baseline_impls, "s^D"):
            pts = sorted((r["tokens"], r["speedup_of_fused"]) for r in ok
                         if r["impl"] == impl and r["dtype"] == dt and r["n"] == n)
            if pts:
                axes[1].plot(*zip(*pts), ls, marker=marker, color=c, label=f"{dt} n={n} vs {impl}")
    axes[0].axhline(100, color="grey", lw=0.8)
    axes[0].axhline(80 if section_name == "policy_loss" else 60, color="red", lw=0.8, ls=":", label="target")
    axes[0].set_ylabel("fused: % of measured copy bandwidth")
    axes[1].axhline(1, color="grey", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("speedup of fused (baseline time / fused time)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("tokens (B×T)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title} — {args.desc}", fontsize=9)
    save_figure(plt, fig, args, section_name)


def save_figure(plt, fig, args, section_name: str) -> str:
    """Writes the GPU suite's ``bench_gpu_<section>_<tag>.png`` and closes the figure."""
    fig.tight_layout()
    png = os.path.join(args.out, f"bench_gpu_{section_name}_{args.tag}.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")
    return png


def fused_eager_compile(label: str, runner: Callable[[Callable], Callable[[int], object]], fused: Callable,
                        eager: Callable, make_compiled: Callable[[], Callable], n_sets: int, args, B: int, T: int,
                        device: torch.device, plan: TimingPlan, bar, err: float) -> Dict[str, Dict]:
    """bench_ops's three rows of an op family: ``runner(fn)`` gives ``fn(i)`` on input set i. ``compile``
    is a fresh ``make_compiled()`` per shape (the first call, the compile, timed apart), skipped with
    --no-compile and, under --quick, beyond the smallest size."""
    out: Dict[str, Dict] = {}
    bar.set_postfix_str(f"{label} fused")
    out["fused"] = timed_row(runner(fused), n_sets, plan, device)
    out["fused"]["max_abs_err_vs_eager"] = err
    bar.set_postfix_str(f"{label} eager")
    out["eager"] = timed_row(runner(eager), n_sets, plan, device)
    if args.no_compile:
        out["compile"] = skipped("--no-compile")
    elif args.quick and (B, T) != tuple(args.sizes[0]):
        out["compile"] = skipped("--quick: compiled at the smallest size only")
    else:
        bar.set_postfix_str(f"{label} compile")
        torch._dynamo.reset()
        out["compile"] = compiled_row(runner(make_compiled()), n_sets, plan, device)
    return out


def compiled_row(fn: Callable[[int], object], n_sets: int, plan: TimingPlan, device: torch.device) -> Dict[str, object]:
    """:func:`timed_row` of a torch.compile'd call, its first call (the compile) timed apart as
    ``compile_s``."""
    t0 = time.perf_counter()
    fn(0)
    sync(device)
    compile_s = time.perf_counter() - t0
    row = timed_row(fn, n_sets, plan, device)
    row["compile_s"] = compile_s
    return row


def input_sets(make_inputs: Callable[..., Dict[str, torch.Tensor]], n: int, B: int, T: int, args,
               device: torch.device) -> Tuple[int, List[Dict[str, torch.Tensor]]]:
    """``(n_sets, sets)``: seeded input sets ``make_inputs(n, B, T, seed, device, dtype, mask_dtype)``
    (``args``: seed, dtype, mask_dtype), as many as :func:`num_input_sets` asks for."""
    probe = make_inputs(n, B, T, 0, device, args.dtype, args.mask_dtype)
    n_sets = num_input_sets(tensor_bytes(*probe.values()))
    return n_sets, [make_inputs(n, B, T, args.seed + s, device, args.dtype, args.mask_dtype) for s in range(n_sets)]


def max_abs_err_fwd_bwd(fused: Callable[[], torch.Tensor], eager: Callable[[], torch.Tensor],
                        leaves: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference of two implementations' outputs and of the gradients the backward
    of their sum leaves on ``leaves`` (each call returns the loss(es); the gradients are reset before)."""
    outs = []
    for call in (fused, eager):
        for t in leaves:
            t.grad = None
        out = call()
        out.sum().backward()
        outs.append([out.detach().float()] + [t.grad.float().clone() for t in leaves])
    return max(float((a - b).abs().max()) for a, b in zip(*outs))
