"""Reading a sandboxed child's output under limits and deadlines (flaxchat.sandbox's plumbing).

The child's stdout and stderr are read concurrently through a selector (a full pipe must never
block the child while the parent waits on the other), each into a `Capture` that keeps at most a
byte budget: the head and, for stderr, the tail, where a traceback's last line lives. Waiting for
exit uses WNOWAIT so the child stays unreaped: its pid keeps pinning the process group that the
sandbox kills as a whole.
"""

from __future__ import annotations

import os
import selectors
import time

READ_CHUNK = 65536


class Capture:
    """At most `limit` bytes of a stream, read as it comes: its head and, with keep_tail, its end."""

    def __init__(self, limit: int, keep_tail: bool):
        self.tail_limit = limit // 2 if keep_tail else 0
        self.head_limit = limit - self.tail_limit
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if self.tail_limit and chunk:
            self.tail += chunk[-self.tail_limit:]
            del self.tail[: max(0, len(self.tail) - self.tail_limit)]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        head = self.head.decode("utf-8", errors="replace")
        if not self.tail:
            return head
        dropped = self.total - len(self.head) - len(self.tail)
        marker = f"\n...[{dropped} bytes truncated]...\n" if dropped else ""
        return head[: self.head_limit - len(marker)] + marker + self.tail.decode("utf-8", errors="replace")


def pump(streams: dict, deadline: float) -> bool:
    """Read every stream into its capture until all reach end of file; False at the deadline."""
    selector = selectors.DefaultSelector()
    for stream, capture in streams.items():
        os.set_blocking(stream.fileno(), False)
        selector.register(stream.fileno(), selectors.EVENT_READ, capture)
    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in selector.select(remaining):
                try:
                    chunk = os.read(key.fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fd)
        return True
    finally:
        selector.close()


def exited(pid: int, deadline: float) -> bool:
    """Wait for the child to exit WITHOUT reaping it, so its pid still pins the process group."""
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
