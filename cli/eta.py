"""The time left of tasks that run ``slots`` at a time, from their estimated work.

The tasks are handed out in a known order (``order``) to ``slots`` workers, each
starting the next task as one finishes (Ray's and the local executor's behaviour for
tasks of equal requests). From the finishes seen so far the estimate keeps

- when each task started (the slot it took was freed by the finish before it),
- the rate: finished work over the slot-seconds it took,
- credit for the tasks still running: the work they did since they started, at that rate
  (at most ``RUNNING_CAP`` of their estimate),

and says ``(work left - credit) / (rate · slots)`` (fewer slots once fewer tasks are
left than slots). Without the credit, the first
finish of two parallel workers would read twice the time left (two slots busy for the
elapsed time, one task's work counted).

    eta = Eta([(task_id, work), ...], slots=2, t0=time.perf_counter())
    left = eta.finished(task_id, now)     # seconds, after each finish
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

#: a running task is credited at most this share of its estimated work
RUNNING_CAP = 0.9


class Eta:
    def __init__(self, order: Iterable[tuple[Hashable, float]], slots: int, t0: float):
        self.work = dict(order)
        self.queue = list(self.work)
        self.slots = max(1, int(slots))
        self.started: dict[Hashable, float] = {}
        self.left = sum(self.work.values())
        self.done_work = 0.0
        self.busy = 0.0
        for _ in range(min(self.slots, len(self.queue))):
            self.started[self.queue.pop(0)] = t0

    def finished(self, task: Hashable, now: float) -> float:
        """Note that ``task`` finished at ``now``; the estimated seconds left."""
        start = self.started.pop(task, now)
        if task in self.queue:  # finished out of the expected order
            self.queue.remove(task)
        work = self.work.get(task, 0.0)
        self.left -= work
        self.done_work += work
        self.busy += max(now - start, 0.0)
        if self.queue:
            self.started[self.queue.pop(0)] = now
        if self.left <= 0 or self.done_work <= 0 or self.busy <= 0:
            return 0.0
        rate = self.done_work / self.busy  # work per slot-second
        credit = sum(min(rate * (now - t), RUNNING_CAP * self.work[k])
                     for k, t in self.started.items())
        busy_slots = min(self.slots, len(self.started) + len(self.queue))
        return max(self.left - credit, 0.0) / (rate * max(busy_slots, 1))
