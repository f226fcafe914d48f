"""bench/machine.py: the CPU line every CPU benchmark table starts with (its figures depend on it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from machine import cpu_description  # noqa: E402

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw
"""


def test_names_the_model_and_its_widest_vector_isa():
    desc = cpu_description(ZEN5)
    assert desc.startswith("AMD EPYC (family 26 model 2), ") and desc.endswith(" cores, avx512f")
    assert cpu_description(ZEN5.replace(" avx512f avx512bw", "")).endswith(", avx2")
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU implementer\t: 0x41\n"
    assert cpu_description(arm).startswith("unknown CPU, ") and cpu_description(arm).endswith(", asimd")
    assert cpu_description("").startswith("unknown CPU, ")


def test_reads_this_machine():
    assert " cores, " in cpu_description()
