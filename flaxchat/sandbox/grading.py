"""The parent's side of a graded run: how the verdict of executed code is made unforgeable.

The trusted inputs (tests, setup) and a fresh per-run token travel to the child in an anonymous
memory file that the candidate process closes before any untrusted code runs; only the tests'
process, after `check()` returned, writes the token back on the verdict pipe. The parent counts a
pass only for exactly that token (see execute.py's module docstring for the whole design).
"""

from __future__ import annotations

import json
import os
import secrets

from flaxchat.sandbox.capture import Capture

MESSAGE_BYTES = 16 * 1024 * 1024  # largest argument list or result passed in a graded run


class GradingChannel:
    """The parent's side of a graded run: the secret memfd (tests, setup, token) and the verdict pipe."""

    def __init__(self, grading: dict):
        self.token = secrets.token_hex(16)
        secret = {**grading, "token": self.token}
        self.secret_fd = os.memfd_create("flaxchat-grading", os.MFD_CLOEXEC)
        data = json.dumps(secret).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.secret_fd, view):]
        self.verdict_r, self.verdict_w = os.pipe()
        self.config = {"secret_fd": self.secret_fd, "verdict_fd": self.verdict_w,
                       "entry_point": grading["entry_point"], "max_message_bytes": MESSAGE_BYTES}
        self.verdict = Capture(256, keep_tail=False)
        self.reader = os.fdopen(self.verdict_r, "rb", buffering=0)

    @property
    def pass_fds(self) -> tuple[int, int]:
        return self.secret_fd, self.verdict_w

    def close_child_ends(self) -> None:
        for name in ("secret_fd", "verdict_w"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def passed(self) -> bool:
        return not self.verdict.truncated and self.verdict.text() == self.token + "\n"

    def close(self) -> None:
        self.close_child_ends()
        self.reader.close()
