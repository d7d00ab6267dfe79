"""What the engine's helper processes (tensor-parallel workers, the grammar matchers) share:
ending themselves once the process that started them is gone."""

from __future__ import annotations

import os
import threading
import time

PARENT_CHECK_S = 1.0  # how often a helper checks that its parent still exists


def exit_with_parent(parent_pid: int) -> None:
    """Start a daemon thread that ends this process (exit code 1) as soon as `parent_pid` is no
    longer its parent (killed, or ended with os._exit, which runs no cleanup of ours)."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
