"""SIGTERM / Ctrl+C during training: finish the step, save, exit."""

from __future__ import annotations

import signal
import threading

from nanochat_jax.core.common import print0


class StopRequest:
    """Turns SIGTERM and SIGINT into a flag the loop polls, so that it saves a final checkpoint and exits.

        stop = StopRequest().install()
        for step in ...:
            ...
            if stop.requested: ckpt.save(step, state, ..., force=True); break
        stop.uninstall()

    A second Ctrl+C raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then exiting "
               f"(Ctrl+C again to abort now)")

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
