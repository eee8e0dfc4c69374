"""Helpers shared by the benchmark scripts: machine facts, memory, bandwidth, isolation, output.

Benchmarks are scripts, not tests: they print a table and write a JSON file. Everything here is
plain Python + torch so a script can import it with `from _common import ...` when run as
`python benchmarks/<script>.py` (the script's folder is on sys.path).

Peak RSS is read from /proc (Linux). Each measured configuration can run in its own Python
process (`run_isolated`) so its peak RSS is not inflated by whatever ran before it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

MB = 1024 * 1024

# -- machine ----------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, bf16 support, cores, threads, versions, current load."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15min": load_average(),
    }


# -- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Highest RSS of this process since it started or since the last `reset_peak_rss()`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource  # non-Linux fallback: lifetime peak only (ru_maxrss is KiB on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux >= 4.0: writing 5 to clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- bandwidth --------------------------------------------------------------------------------


def copy_bandwidth(size_mb: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth of a large tensor copy, STREAM "copy" convention: (read + written) / time.

    The buffer is far larger than the last-level cache so the copy streams from DRAM. The best
    of `repeats` copies is kept: on a shared machine it is the least disturbed measurement.
    """
    n = size_mb * MB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst, outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    best = min(times)
    moved = 2 * n * 4
    return {
        "size_mb": size_mb,
        "threads": torch.get_num_threads(),
        "best_gb_per_s": moved / best / 1e9,
        "median_gb_per_s": moved / sorted(times)[len(times) // 2] / 1e9,
        "convention": "bytes read + bytes written per second (STREAM copy), best of %d" % repeats,
    }


# -- isolation --------------------------------------------------------------------------------


def run_isolated(script: str | Path, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `python script --worker SPEC_JSON --worker-out FILE` and return the JSON it wrote.

    The child's stderr passes through (progress); a failure raises with the child's exit code.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--worker-out", str(out)]
        proc = subprocess.run(cmd, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}) for {spec}")
        return json.loads(out.read_text())


def worker_main(argv: Sequence[str], run: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If argv asks for worker mode, run `run(spec)`, write its JSON and return True."""
    if "--worker" not in argv:
        return False
    spec = json.loads(argv[argv.index("--worker") + 1])
    out = Path(argv[argv.index("--worker-out") + 1])
    out.write_text(json.dumps(run(spec)))
    return True


# -- output -----------------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Plain-text table; `columns` are (key, header) pairs, floats shown with 3 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON, via a temp file and rename so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path
