"""``HpcmlWork``: the torch ``Work`` of one collective, backed by hpcml requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from hpcml.comm import Request


class HpcmlWork(dist.Work):
    """The pending result of one torch.distributed call over the ``"hpcml"`` backend.

    It holds the :class:`hpcml.comm.Request` objects the call started and the steps that finish
    it once they complete (copying a staged buffer back into the caller's tensors, dividing a
    sum for ``AVG``). ``wait()`` completes every request (each wait is watched by hpcml's
    collective watchdog, which ends the job instead of hanging: torch's ``timeout`` argument is
    not used) and then runs those steps, once. ``get_future()`` does the same and returns a
    future already holding ``result`` (torch's DDP calls it right after starting an allreduce,
    so the allreduce finishes there). Not thread-safe; not collective."""

    def __init__(self, requests: Sequence[Request], finish: Sequence[Callable[[], Any]],
                 result: list[torch.Tensor]) -> None:
        super().__init__()
        self._requests, self._finish, self._result = list(requests), list(finish), result
        self._done = False

    def _complete(self) -> None:
        if not self._done:
            for request in self._requests:
                request.wait()
            for step in self._finish:
                step()
            self._done = True

    def wait(self, timeout: Any = None) -> bool:  # noqa: ARG002 (the watchdog times waits)
        self._complete()
        return True

    def is_completed(self) -> bool:
        if not self._done and all(r.test() is not None for r in self._requests):
            self._complete()
        return self._done

    def is_success(self) -> bool:
        return self._done

    def exception(self) -> None:
        return None

    def result(self) -> list[torch.Tensor]:
        self._complete()
        return self._result

    def get_future(self) -> Future:
        self._complete()
        future: Future = Future()
        future.set_result(self._result)
        return future

    def _source_rank(self) -> int:
        """The rank a receive from any source got its message from (after ``wait()``)."""
        self._complete()
        return self._requests[0].status.source

    source_rank = _source_rank
