"""What a method's merge step costs, as Table 1 of Liao et al. (ICCV 2025) reports it: the extra
peak memory (CPU and GPU) and the wall time of fusing the concepts.

:func:`measure` runs one step and returns its cost; :func:`sequence_totals` sums the stages of a
run for ``summary.json``. "Extra" peak memory is the step's peak minus what was in use just before
it: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
``memory_allocated`` before; on the CPU the process's resident set (``VmHWM`` of
``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0) minus
``VmRSS`` before. Where the peak cannot be reset (other systems, a read-only ``/proc``) the CPU
figure is left out (``None``) rather than guessed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def reset_cpu_peak() -> bool:
    """Reset the process's peak resident set to its current one (False where that is not possible)."""
    try:
        _CLEAR.write_text("5")
    except OSError:
        return False
    return True


def measure(step: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, dict]:
    """Run ``step()``; return its result and ``{merge_seconds, merge_cpu_peak_bytes,
    merge_cuda_peak_bytes}`` (extra peak bytes over the memory in use before the step; the CUDA
    entry only on a CUDA ``device``, the CPU one None where the peak cannot be reset)."""
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    rss_before = _status_kib("VmRSS")
    can_reset = rss_before is not None and reset_cpu_peak()
    t0 = time.perf_counter()
    result = step()
    if cuda:
        torch.cuda.synchronize(device)
    cost: dict[str, Any] = {"merge_seconds": round(time.perf_counter() - t0, 4)}
    peak = _status_kib("VmHWM") if can_reset else None
    cost["merge_cpu_peak_bytes"] = max(0, peak - rss_before) * 1024 if peak is not None else None
    if cuda:
        cost["merge_cuda_peak_bytes"] = max(0, int(torch.cuda.max_memory_allocated(device)) - int(cuda_before))
    return result, cost


def sequence_totals(stages: list[dict]) -> dict:
    """The fusion cost of a whole sequence from its stages' entries, in the layout
    ``evaluation.aggregate`` tabulates (Table 1's columns): ``time_s`` the total merge time over
    the stages, ``memory_mb_cpu`` / ``memory_mb_gpu`` the largest extra peak of any stage in MiB
    (memory is not additive over stages; None where not measured), plus the byte figures and the
    last stage's (the merge of every concept so far)."""
    timed = [s for s in stages if "merge_seconds" in s]
    if not timed:
        return {}

    def largest(key: str):
        values = [int(s[key]) for s in timed if s.get(key) is not None]
        return max(values) if values else None

    cpu, gpu, last = largest("merge_cpu_peak_bytes"), largest("merge_cuda_peak_bytes"), timed[-1]
    return dict(
        time_s=round(sum(float(s["merge_seconds"]) for s in timed), 4),
        memory_mb_cpu=None if cpu is None else round(cpu / 2**20, 1),
        memory_mb_gpu=None if gpu is None else round(gpu / 2**20, 1),
        stages=len(timed), max_cpu_peak_bytes=cpu, max_cuda_peak_bytes=gpu,
        last_stage=dict(stage=last.get("stage"), seconds=last["merge_seconds"], cpu_peak_bytes=last.get("merge_cpu_peak_bytes"),
                        cuda_peak_bytes=last.get("merge_cuda_peak_bytes")),
    )
