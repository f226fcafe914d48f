"""Multi-host start-up: find the coordinator, join it, or stay single-process.

`initialize_distributed()` must run before anything touches the JAX backend. Where
the cluster description comes from, first match wins:
  (a) function arguments, else FLAXCHAT_COORDINATOR / FLAXCHAT_NUM_PROCESSES /
      FLAXCHAT_PROCESS_ID;
  (b) Metaflow @parallel: MF_PARALLEL_MAIN_IP / MF_PARALLEL_NUM_NODES /
      MF_PARALLEL_NODE_INDEX, port FLAXCHAT_COORDINATOR_PORT (default 8476);
  (c) multi-host TPU (TPU_WORKER_HOSTNAMES with several hosts, or MEGASCALE_* for
      multi-slice) or FLAXCHAT_AUTO_DISTRIBUTED=1: JAX's own cluster auto-detection;
  (d) none of these: one process, nothing to do.

Why a rendezvous of our own before `jax.distributed.initialize`: when a peer or the
coordinator never shows up, JAX's C++ client aborts the whole process
(DEADLINE_EXCEEDED, SIGABRT) instead of raising. So for (a)/(b) every process first
checks in with process 0 over a plain TCP socket on the coordinator port; only when
all have arrived does process 0 release the port to JAX's coordination service. A
missing peer or unreachable coordinator becomes a `DistributedInitError` that names
the address, the timeout and what to check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_COORDINATOR_PORT = 8476
_HELLO, _GO = b"flaxchat-hello", b"flaxchat-go"


class DistributedInitError(RuntimeError):
    """Joining the multi-process job failed; the message says what to check."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    coordinator: str | None     # host:port; None when JAX auto-detects it
    num_processes: int | None
    process_id: int | None
    source: str                  # "args" | "env" | "metaflow" | "auto" | "single"


_ACTIVE: ClusterSpec | None = None


def _int_env(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedInitError(f"{name}={env[name]!r} must be an integer") from None


def detect_cluster(env: dict[str, str] | None = None, coordinator: str | None = None,
                   num_processes: int | None = None, process_id: int | None = None) -> ClusterSpec:
    """Work out the cluster layout from arguments and the environment (no side effects)."""
    env = dict(os.environ if env is None else env)
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise DistributedInitError(
                "pass all of coordinator, num_processes and process_id, or none of them")
        return _checked(ClusterSpec(coordinator, int(num_processes), int(process_id), "args"))
    names = ("FLAXCHAT_COORDINATOR", "FLAXCHAT_NUM_PROCESSES", "FLAXCHAT_PROCESS_ID")
    if any(n in env for n in names):
        missing = [n for n in names if n not in env]
        if missing:
            raise DistributedInitError(f"{', '.join(missing)} not set: set all of {', '.join(names)} or none")
        return _checked(ClusterSpec(env[names[0]], _int_env(env, names[1]), _int_env(env, names[2]), "env"))
    if "MF_PARALLEL_MAIN_IP" in env and "MF_PARALLEL_NUM_NODES" in env:
        port = _int_env(env, "FLAXCHAT_COORDINATOR_PORT") if "FLAXCHAT_COORDINATOR_PORT" in env \
            else DEFAULT_COORDINATOR_PORT
        return _checked(ClusterSpec(f"{env['MF_PARALLEL_MAIN_IP']}:{port}", _int_env(env, "MF_PARALLEL_NUM_NODES"),
                                    _int_env(env, "MF_PARALLEL_NODE_INDEX"), "metaflow"))
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(tpu_hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env or env.get("FLAXCHAT_AUTO_DISTRIBUTED") == "1":
        return ClusterSpec(None, None, None, "auto")
    return ClusterSpec(None, 1, 0, "single")


def _checked(spec: ClusterSpec) -> ClusterSpec:
    if spec.num_processes is None or spec.num_processes < 1:
        raise DistributedInitError(f"num_processes={spec.num_processes} must be >= 1")
    if not 0 <= (spec.process_id or 0) < spec.num_processes:
        raise DistributedInitError(f"process_id={spec.process_id} must be in [0, {spec.num_processes})")
    if spec.num_processes > 1:
        _split_address(spec.coordinator or "")
    return spec


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedInitError(f"coordinator address {address!r} must look like host:port")
    return host.strip("[]"), int(port)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: float = 300) -> ClusterSpec:
    """Join the multi-process job described by args/env (see module doc); idempotent.

    Returns the layout in use. Raises DistributedInitError instead of hanging when the
    coordinator or a peer is not there within `timeout_s`."""
    global _ACTIVE
    spec = detect_cluster(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
    if _ACTIVE is not None:
        if spec.source not in ("single", _ACTIVE.source) and spec != _ACTIVE:
            raise DistributedInitError(f"already initialized as {_ACTIVE}; cannot re-initialize as {spec}")
        return _ACTIVE
    if jax.distributed.is_initialized():   # someone (a launcher, a notebook) did it already
        _ACTIVE = ClusterSpec(None, jax.process_count(), jax.process_index(), "preexisting")
        return _ACTIVE
    if spec.source == "single" or spec.num_processes == 1:
        _ACTIVE = spec
        return spec
    _use_gloo_on_cpu()
    timeout = max(1, int(timeout_s))
    if spec.source == "auto":
        log.info("flaxchat: joining the cluster JAX auto-detects (TPU/GKE), timeout %ss", timeout)
        jax.distributed.initialize(initialization_timeout=timeout)
    else:
        assert spec.coordinator is not None and spec.num_processes is not None and spec.process_id is not None
        _rendezvous(spec.coordinator, spec.num_processes, spec.process_id, timeout_s)
        log.info("flaxchat: process %d/%d joining coordinator %s", spec.process_id, spec.num_processes,
                 spec.coordinator)
        try:
            jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                       initialization_timeout=timeout)
        except RuntimeError as err:   # e.g. the backend was already in use
            raise DistributedInitError(
                f"jax.distributed.initialize({spec.coordinator}, process {spec.process_id}/{spec.num_processes}) "
                f"failed: {err}; call initialize_distributed() before any other JAX call") from err
    _ACTIVE = spec
    return spec


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on CPU need gloo (already the default on recent jax)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError) as err:   # flag renamed/removed in some jax release
        log.debug("could not select gloo CPU collectives: %s", err)


# --------------------------------------------------------------------------- rendezvous

def _hint(address: str, num_processes: int, timeout_s: float) -> str:
    return (f"check that process 0 runs on that host and listens on that port, that the port is open "
            f"between the hosts (firewall / network policy), and that all {num_processes} processes "
            f"were started (raise the timeout, now {timeout_s:g}s, if they start slowly)")


def _rendezvous(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        _gather_peers(address, port, num_processes, deadline, timeout_s)
    else:
        _check_in(address, host, port, process_id, num_processes, deadline, timeout_s)


def _gather_peers(address: str, port: int, num_processes: int, deadline: float, timeout_s: float) -> None:
    """Process 0: wait until every peer has said hello, then tell them all to go."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("", port))
    except OSError as err:
        server.close()
        raise DistributedInitError(
            f"coordinator (process 0) cannot listen on port {port} of {address}: {err}; "
            f"another job may hold it: set FLAXCHAT_COORDINATOR_PORT / the coordinator address to a free port") from err
    server.listen(num_processes)
    peers: dict[int, socket.socket] = {}
    try:
        while len(peers) < num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, num_processes)) - set(peers))
                raise DistributedInitError(
                    f"coordinator {address} waited {timeout_s:g}s but processes {missing} never checked in; "
                    + _hint(address, num_processes, timeout_s))
            server.settimeout(min(left, 1.0))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = conn.recv(64).split()
                peer = int(message[1]) if len(message) == 2 and message[0] == _HELLO else -1
            except (OSError, ValueError):
                peer = -1
            if not 0 < peer < num_processes or peer in peers:
                conn.close()   # a stranger or a duplicate: ignore it
                continue
            peers[peer] = conn
        for conn in peers.values():
            conn.sendall(_GO + b"\n")
        for conn in peers.values():   # let the peers close first so the port is not left in TIME_WAIT here
            conn.settimeout(5.0)
            try:
                conn.recv(16)
            except OSError:
                pass
    finally:
        for conn in peers.values():
            conn.close()
        server.close()


def _check_in(address: str, host: str, port: int, process_id: int, num_processes: int,
              deadline: float, timeout_s: float) -> None:
    """A peer: keep trying to reach process 0 until the deadline, then wait for 'go'."""
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))) as conn:
                conn.sendall(_HELLO + b" %d\n" % process_id)
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                if conn.recv(64).startswith(_GO):
                    return
                last_error = ConnectionError("the coordinator closed the connection without a go-ahead")
        except OSError as err:   # refused, unreachable, DNS not ready yet, timed out: retry
            last_error = err
        time.sleep(0.2)
    raise DistributedInitError(
        f"process {process_id}/{num_processes} could not reach the coordinator at {address} within "
        f"{timeout_s:g}s (last error: {last_error}); " + _hint(address, num_processes, timeout_s))


# --------------------------------------------------------------------------- small host data

def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (on every process).

    For small host-side state that differs per process and must reach process 0, e.g. each
    data loader's position for a checkpoint's `meta` (which orbax writes from process 0
    only). Two tiny collectives (lengths, then bytes padded to a power of two so that the
    gather compiles for a handful of sizes only); every process must call it."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value, separators=(",", ":")).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    width = 1 << max(6, int(sizes.max() - 1).bit_length())
    padded = np.zeros(width, np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), width)
    return [json.loads(rows[p, :n].tobytes().decode("utf-8")) for p, n in enumerate(sizes)]
