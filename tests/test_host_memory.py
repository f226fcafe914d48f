"""flaxchat.host_memory: with FLAXCHAT_HOST_MALLOC=keep, XLA:CPU reuses freed buffers instead of faulting in new pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, resource
    import flaxchat, jax, jax.numpy as jnp
    from flaxchat import host_memory
    f = jax.jit(lambda x: jnp.tanh(x * 2.0) + 1.0)     # a 256 MiB temporary + output per call
    x = jnp.ones((64 << 20,), jnp.float32)
    for _ in range(3):
        f(x).block_until_ready()
    faults = []
    for _ in range(8):          # the heap takes a few calls to settle; the steady state is what counts
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": host_memory.keep_freed_memory(), "faults": min(faults)}))
""")


def probe(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's; elsewhere it is a no-op")
def test_keep_reuses_freed_buffers():
    kept, system = probe(FLAXCHAT_HOST_MALLOC="keep"), probe(FLAXCHAT_HOST_MALLOC="")
    assert kept["applied"] and not system["applied"]
    pages = (256 << 20) // 4096
    # the system allocator maps and zero-fills the big buffers again on every call
    assert system["faults"] > pages // 2, system
    assert kept["faults"] < pages // 20, (kept, system)


@pytest.mark.parametrize("value", [None, "", "system"])
def test_off_unless_asked(monkeypatch, value):
    from flaxchat import host_memory
    monkeypatch.setattr(host_memory, "_applied", None)
    if value is None:
        monkeypatch.delenv("FLAXCHAT_HOST_MALLOC", raising=False)
    else:
        monkeypatch.setenv("FLAXCHAT_HOST_MALLOC", value)
    assert host_memory.keep_freed_memory() is False
