"""``cli.eta``: the time left of tasks run a few at a time, from their estimated work,
checked on simulated schedules where each task's time is its work at a fixed rate."""

from __future__ import annotations

import heapq
import random

import pytest

from cli.eta import Eta


def simulate(works: list[float], slots: int, rate: float = 2.0):
    """List scheduling as the executors do it: ``slots`` workers, each taking the next task
    in order when free. Yields (task, finish time, true seconds left) per finish."""
    order = list(enumerate(works))
    running: list[tuple[float, int]] = []
    queue = list(order)
    for _ in range(min(slots, len(queue))):
        k, w = queue.pop(0)
        heapq.heappush(running, (w / rate, k))
    finishes = []
    while running:
        t, k = heapq.heappop(running)
        if queue:
            k2, w2 = queue.pop(0)
            heapq.heappush(running, (t + w2 / rate, k2))
        finishes.append((k, t))
    end = finishes[-1][1]
    return [(k, t, end - t) for k, t in finishes]


def test_one_slot_and_times_proportional_to_work_give_the_exact_time_left():
    works = [5.0, 3.0, 3.0, 2.0, 1.0, 0.5]
    eta = Eta(list(enumerate(works)), slots=1, t0=0.0)
    for k, t, truth in simulate(works, 1):
        assert eta.finished(k, t) == pytest.approx(truth, abs=1e-9)


@pytest.mark.parametrize("slots", [2, 4])
def test_parallel_slots_are_credited_for_their_running_tasks(slots):
    """Largest first, as the sweep hands them out: within 20% of the truth while at least
    twice as many tasks as slots are left, where the estimate from finished work alone
    (elapsed / work done × work left) reads up to ``slots`` times too long."""
    rng = random.Random(0)
    works = sorted((rng.uniform(1, 10) for _ in range(40)), reverse=True)
    eta = Eta(list(enumerate(works)), slots=slots, t0=0.0)
    total, done = sum(works), 0.0
    naive_worst = 0.0
    for i, (k, t, truth) in enumerate(simulate(works, slots)):
        left = eta.finished(k, t)
        done += works[k]
        if len(works) - i - 1 >= 2 * slots:
            assert left == pytest.approx(truth, rel=0.2), (i, left, truth)
            naive_worst = max(naive_worst, t / done * (total - done) / truth)
    assert naive_worst > 0.8 * slots


def test_the_last_finish_leaves_nothing():
    eta = Eta([("a", 1.0), ("b", 2.0)], slots=2, t0=0.0)
    assert eta.finished("a", 1.0) > 0
    assert eta.finished("b", 2.0) == 0.0
