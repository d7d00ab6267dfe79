"""Profiling: torch profiler traces for a window of steps, and NVTX ranges for Nsight Systems.

The engine marks its stages with `profiler.stage(name)` (schedule, prepare inputs, forward,
sample, detokenize). Inside a profiling window they appear as named regions in the trace; with
`nvtx` on they are also NVTX ranges, and the window is bracketed by cudaProfilerStart/Stop so
`nsys profile --capture-range=cudaProfilerApi` records just that window.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

STAGES = ("schedule", "prepare inputs", "forward", "sample", "detokenize")


class Profiler:
    def __init__(self, profile_dir: str | None, nvtx: bool) -> None:
        self.profile_dir = profile_dir
        self.nvtx = nvtx and torch.cuda.is_available()
        self._profile: torch.profiler.profile | None = None
        self.last_trace: str | None = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._profile is None and not self.nvtx:
            yield
            return
        with contextlib.ExitStack() as stack:
            if self.nvtx:
                stack.enter_context(torch.cuda.nvtx.range(name))
            if self._profile is not None:
                stack.enter_context(torch.profiler.record_function(name))
            yield

    def start(self, profile_dir: str | None = None) -> None:
        """Begin a window; traces go to `profile_dir` (or the engine's --profile-dir)."""
        directory = profile_dir or self.profile_dir
        if directory is None:
            raise ValueError("profiling needs a directory: set profile_dir (--profile-dir)")
        if self._profile is not None:
            raise ValueError("a profile is already running; stop it first")
        self.profile_dir = directory
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities, record_shapes=False)
        self._profile.__enter__()
        if self.nvtx:
            torch.cuda.profiler.start()

    def stop(self) -> str:
        """End the window and write its Chrome/Perfetto JSON trace; returns the file path."""
        if self._profile is None:
            raise ValueError("no profile is running")
        if self.nvtx:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        assert self.profile_dir is not None
        os.makedirs(self.profile_dir, exist_ok=True)
        path = os.path.join(
            self.profile_dir, f"compiled_llm-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        profile.export_chrome_trace(path)
        self.last_trace = path
        logger.info("wrote profiler trace %s", path)
        return path
