"""The CPU a benchmark ran on, for the first line of its output.

CPU figures, and the side-by-side ratios against nanochat with them, depend on the machine: the same
`pretrain_bench.py --nanochat` run gave 1.26x at B=8 on a 2-core AVX2 EPYC and 2.41x on a 2-core
AVX-512 one (XLA's fp32 matmuls doubled in speed, torch's CPU step barely moved). So every CPU table
says which CPU made it.
"""

from __future__ import annotations

import os
from pathlib import Path

VECTOR_ISAS = ("avx512f", "avx2", "asimd")     # widest first: what fp32 matmul kernels can use


def cpu_description(cpuinfo: str | None = None) -> str:
    """'<model name>, <n> cores, <widest vector ISA>' from /proc/cpuinfo (or the text given);
    'unknown CPU' where there is none (macOS)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or fields.get("Hardware") or "unknown CPU"
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = next((f for f in VECTOR_ISAS if f in flags), "no avx2")
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {isa}"
