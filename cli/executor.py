"""Run independent tasks on this machine or on a Ray cluster, and hand each result back
to the driver as soon as it is done, so that the driver alone writes results.

    ap = cli.Parser(prog="python -m mytool")
    executor.add_arguments(ap)          # --executor, --address, --cpus-per-task, --gpus-per-task
    args = ap.parse_args()
    ex = executor.from_args(args, device=args.device)  # checked BEFORE any work: ValueError
    print(ex.describe())                # the resources the tasks will get
    with ex:
        for task, result in ex.map(fit_batch, tasks):   # in the order they finish
            if isinstance(result, executor.TaskFailed):
                ...                     # retried (Ray's max_retries), then reported here
            else:
                ...                     # e.g. write it atomically

``fn`` must be a module-level function (Ray sends it to the workers by reference) taking
one task and returning a picklable result; a task's own failures are best returned as
data, an exception that escapes it makes the task a :class:`TaskFailed`.

- ``--executor auto`` (default): ``ray`` where ``--address``, ``--cpus-per-task`` or
  ``--gpus-per-task`` is given, or where the caller says the job is long
  (``long_job``), the device is a CPU with two cores or more and Ray is installed: then
  a local Ray instance runs one one-thread task per core (on this 2-core machine two
  one-thread workers fit the Figure 2 grid about 2× faster than one two-thread process);
  if that instance does not start, the tasks run locally and the first line says why.
  Otherwise ``local``.
- ``--executor local``: the tasks run one after another in this process.
- ``--executor ray``: each task is a Ray task asking for ``--cpus-per-task`` CPUs
  (default 1; torch in the task uses that many threads) and ``--gpus-per-task`` GPUs
  (fractional allowed, e.g. 0.25: four tasks share one GPU; default 1 with
  ``--device cuda``, else 0). ``--address`` picks the cluster: none starts a local Ray
  instance on this machine (no dashboard), ``auto`` joins the cluster this machine is a
  node of (``ray start --head`` / ``ray start --address``, see docs/cluster.md),
  ``HOST:PORT`` (or ``ray://HOST:PORT``) a cluster elsewhere. A task whose worker dies
  or raises is retried ``retries`` times (Ray's ``max_retries``/``retry_exceptions``),
  then reported as failed without stopping the others.

Checked before any work, each a one-line ``ValueError`` (exit 2 under :func:`cli.run`):
Ray not installed, an address that does not answer, more CPUs or GPUs per task than
any node of the cluster has, ``--device cuda`` with no GPU for the tasks, flags that
make no sense for the local executor.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .parser import nonneg_float, positive_float

EXECUTORS = ("auto", "local", "ray")
#: times a failed Ray task is tried again before it is reported
RETRIES = 2
#: seconds to wait for a cluster address to answer
CONNECT_TIMEOUT = 5.0


class TaskFailed:
    """The outcome of a task that failed (after its retries): ``reason`` is one line."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"TaskFailed({self.reason!r})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The executor flags: ``--executor``, ``--address``, ``--cpus-per-task``, ``--gpus-per-task``."""
    g = parser.add_argument_group("where the tasks run")
    g.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="auto (default): Ray on this machine's cores for a long CPU job "
                        "(or where a Ray flag is given), else local; local: one after "
                        "another in this process; ray: Ray tasks")
    g.add_argument("--address", metavar="ADDR",
                   help="Ray cluster: none = a local Ray instance, auto = the cluster this "
                        "machine has joined (ray start), HOST:PORT = a head node")
    g.add_argument("--cpus-per-task", type=positive_float, metavar="N",
                   help="CPUs each Ray task asks for, torch threads in it (default 1)")
    g.add_argument("--gpus-per-task", type=nonneg_float, metavar="G",
                   help="GPUs each Ray task asks for, fractional allowed (default 1 with "
                        "--device cuda, else 0)")


def from_args(args: argparse.Namespace, device: str = "cpu", *, long_job: bool = False) -> Executor:
    """The executor the flags ask for, validated and connected (see the module docstring).
    ``long_job``: the caller's judgement that the work is long enough to pay for starting
    a local Ray instance (20-40 s here), which ``--executor auto`` then does."""
    return make(getattr(args, "executor", "local") or "local", address=getattr(args, "address", None),
                cpus_per_task=getattr(args, "cpus_per_task", None),
                gpus_per_task=getattr(args, "gpus_per_task", None), device=device,
                long_job=long_job)


def cpus_here() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def choose(kind: str, *, address: str | None = None, cpus_per_task: float | None = None,
           gpus_per_task: float | None = None, device: str = "cpu", long_job: bool = False) -> str:
    """``local`` or ``ray``: what ``--executor auto`` means here (any other kind as it is)."""
    if kind != "auto":
        return kind
    if any(v is not None for v in (address, cpus_per_task, gpus_per_task)):
        return "ray"
    if not long_job or str(device).strip().split(":")[0] != "cpu" or cpus_here() < 2:
        return "local"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "local"
    return "ray"


def make(kind: str = "local", *, address: str | None = None, cpus_per_task: float | None = None,
         gpus_per_task: float | None = None, device: str = "cpu",
         retries: int = RETRIES, num_cpus: int | None = None, long_job: bool = False) -> Executor:
    """A validated executor. ``num_cpus``: CPUs of a local Ray instance started here
    (default: all of this machine's). ``kind="auto"``: see :func:`choose`."""
    if kind not in EXECUTORS:
        raise ValueError(f"--executor {kind}: use {', '.join(EXECUTORS)}")
    if kind == "auto":
        chosen = choose(kind, address=address, cpus_per_task=cpus_per_task,
                        gpus_per_task=gpus_per_task, device=device, long_job=long_job)
        flags = any(v is not None for v in (address, cpus_per_task, gpus_per_task))
        if chosen == "local" or flags:
            return make(chosen, address=address, cpus_per_task=cpus_per_task,
                        gpus_per_task=gpus_per_task, device=device, retries=retries,
                        num_cpus=num_cpus)
        try:
            ex = make("ray", device=device, retries=retries, num_cpus=num_cpus)
        except ValueError as e:  # the local instance did not start: run here, and say so
            ex = LocalExecutor()
            ex.note = f"--executor auto: Ray did not start here ({e}), so one process"
            return ex
        ex.note = "--executor auto for a long job (--executor local: one process)"
        return ex
    cuda = str(device).startswith("cuda")
    if kind == "local":
        for flag, val in (("--address", address), ("--cpus-per-task", cpus_per_task),
                          ("--gpus-per-task", gpus_per_task)):
            if val is not None:
                raise ValueError(f"{flag} is for --executor ray (the local executor runs the "
                                 "tasks in this process)")
        return LocalExecutor()
    for flag, val in (("--cpus-per-task", cpus_per_task), ("--gpus-per-task", gpus_per_task)):
        if val is not None and not math.isfinite(val):
            raise ValueError(f"{flag} must be finite, got {val}")
    cpus = 1.0 if cpus_per_task is None else float(cpus_per_task)
    gpus = (1.0 if cuda else 0.0) if gpus_per_task is None else float(gpus_per_task)
    if cpus <= 0:
        raise ValueError(f"--cpus-per-task must be > 0, got {cpus:g}")
    if gpus < 0:
        raise ValueError(f"--gpus-per-task must be >= 0, got {gpus:g}")
    if gpus > 1 and not float(gpus).is_integer():
        raise ValueError(f"--gpus-per-task {gpus:g}: a fraction of one GPU or a whole number of GPUs")
    if cuda and gpus == 0:
        raise ValueError("--device cuda with --executor ray needs --gpus-per-task > 0 "
                         "(the tasks must ask Ray for a GPU)")
    return RayExecutor(address, cpus, gpus, retries=retries, num_cpus=num_cpus)


# --------------------------------------------------------------------------- #
# local
# --------------------------------------------------------------------------- #
class Executor:
    """What both executors offer."""

    kind = "?"
    #: said after describe()'s line, e.g. why --executor auto chose this executor
    note = ""
    #: how many tasks run at once
    slots = 1

    def describe(self) -> str:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class LocalExecutor(Executor):
    """The tasks one after another in this process; an exception fails its task only."""

    kind = "local"

    def describe(self) -> str:
        try:
            import torch
            threads = f", {torch.get_num_threads()} torch threads"
        except ImportError:  # pragma: no cover
            threads = ""
        return (f"executor: local (this process, {cpus_here()} CPUs{threads})"
                + (f"; {self.note}" if self.note else ""))

    def map(self, fn, tasks):
        for task in tasks:
            try:
                result = fn(task)
            except Exception as e:  # noqa: BLE001 - reported as this task's failure
                result = TaskFailed(_reason(e))
            yield task, result


# --------------------------------------------------------------------------- #
# Ray
# --------------------------------------------------------------------------- #
def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray, which is not installed: "
                         "pip install -e '.[cluster]'") from None
    return ray


#: the client's opening of an HTTP/2 (gRPC) connection: the preface, then an empty SETTINGS frame
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address answers a TCP connection and speaks gRPC
    there: Ray's GCS (and its client server) answer the HTTP/2 preface with a SETTINGS
    frame. Ray itself would wait without end on a port where something accepts and stays
    silent. With ``RAY_USE_TLS`` set, only the TCP connection is checked."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--address {address}: give auto or HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "", "false"):
                conn.settimeout(CONNECT_TIMEOUT)
                conn.sendall(_H2_HELLO)
                head = b""
                while len(head) < 9 and (chunk := conn.recv(9 - len(head))):
                    head += chunk
                if len(head) < 9 or head[3] != 4:  # the frame type of SETTINGS
                    raise ValueError(f"--address {address}: something answers there, but not "
                                     "a Ray cluster (no gRPC reply); give the head node's GCS "
                                     "port, 6379 by default")
    except TimeoutError:
        raise ValueError(f"--address {address}: no Ray cluster answers there (no reply in "
                         f"{CONNECT_TIMEOUT:g} s)") from None
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ValueError(f"--address {address}: no Ray cluster answers there ({why})") from None


def _call(fn, task, threads: int):
    """Run in a Ray worker: torch with as many threads as the task has CPUs, then fn(task)."""
    try:
        import torch
        torch.set_num_threads(max(1, threads))
    except ImportError:  # pragma: no cover - a task that does not use torch
        pass
    return fn(task)


class RayExecutor(Executor):
    """Each task a Ray task with its CPU/GPU request, retried, results as they finish."""

    kind = "ray"

    def __init__(self, address: str | None, cpus: float, gpus: float, *, retries: int = RETRIES,
                 num_cpus: int | None = None):
        ray = _import_ray()
        self.ray, self.cpus, self.gpus, self.retries = ray, cpus, gpus, int(retries)
        self.address = address
        if address not in (None, "", "auto"):
            _check_reachable(address)
        self.owned = False  # whether close() shuts the instance down
        if not ray.is_initialized():
            try:
                _init(ray, address=address or None, num_cpus=None if address else num_cpus)
            except Exception as e:  # noqa: BLE001 - Ray raises bare Exceptions on start-up
                where = f"at {address}" if address else "on this machine"
                hint = ""
                if address not in (None, "", "auto") and os.environ.get("RAY_AUTH_MODE") != "token":
                    hint = ("; a cluster with token authentication needs RAY_AUTH_MODE=token "
                            "and its token (docs/cluster.md)")
                raise ValueError(f"--executor ray: could not start or join a Ray cluster {where} "
                                 f"({_reason(e)}){hint}") from None
            self.owned = True
        try:
            self._check_resources()
        except ValueError:
            self.close()
            raise
        self._remote = ray.remote(_call)

    def _nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def _check_resources(self) -> None:
        nodes = self._nodes()
        cpu = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
        gpu = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
        if self.cpus > cpu:
            raise ValueError(f"--cpus-per-task {self.cpus:g} is more than any node of the Ray "
                             f"cluster has ({cpu:g} CPUs at most)")
        if self.gpus > gpu:
            have = "no GPU" if gpu == 0 else f"{gpu:g} GPUs at most on a node"
            raise ValueError(f"--gpus-per-task {self.gpus:g} is more than the Ray cluster has ({have})")

    def largest_node_memory(self) -> int:
        """Bytes of memory of the largest node (Ray's "memory" resource)."""
        return int(max((n["Resources"].get("memory", 0.0) for n in self._nodes()), default=0.0))

    @property
    def slots(self) -> int:
        """Tasks the cluster runs at once (its CPUs and GPUs over each task's request)."""
        tot = self.ray.cluster_resources()
        cpu, gpu = tot.get("CPU", 0.0), tot.get("GPU", 0.0)
        return max(1, int(min(cpu / self.cpus, gpu / self.gpus if self.gpus else math.inf)))

    def describe(self) -> str:
        nodes = self._nodes()
        tot = self.ray.cluster_resources()
        cpu, gpu = tot.get("CPU", 0.0), tot.get("GPU", 0.0)
        mem = tot.get("memory", 0.0) / 2**30
        per = self.slots
        where = self.address or "a local instance on this machine"
        return (f"executor: ray ({where}): {len(nodes)} node(s), {cpu:g} CPUs, {gpu:g} GPUs, "
                f"{mem:.1f} GiB memory; each task {self.cpus:g} CPU, {self.gpus:g} GPU: up to "
                f"{int(per)} at once" + (f"; {self.note}" if self.note else ""))

    def map(self, fn, tasks):
        ray = self.ray
        remote = self._remote.options(num_cpus=self.cpus, num_gpus=self.gpus,
                                      max_retries=self.retries, retry_exceptions=True)
        threads = max(1, int(self.cpus))
        pending = {}
        for task in tasks:
            pending[remote.remote(fn, task, threads)] = task
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - failed after its retries
                    cause = getattr(e, "cause", None)
                    result = TaskFailed(_reason(cause if isinstance(cause, BaseException) else e))
                yield task, result
        finally:
            for ref in pending:  # the driver stops (Ctrl-C, an error): the rest is not needed
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001, S110 - already finished or gone
                    pass

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


def local_ray(num_cpus: int = 2, num_gpus: int = 0) -> None:
    """Start (once per process) a small local Ray instance, no dashboard; later
    :class:`RayExecutor` s reuse it and leave it running (tests share one per session).
    ``num_gpus`` declares GPUs to Ray's scheduler (on a machine without one: to test the
    scheduling of GPU requests only)."""
    ray = _import_ray()
    if not ray.is_initialized():
        _init(ray, num_cpus=num_cpus, num_gpus=num_gpus)


def _local_runtime_env() -> dict:
    """For an instance started here: the workers import what the driver imports (its
    ``sys.path``, e.g. a source checkout or a test folder, as ``PYTHONPATH``)."""
    import sys

    paths = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def _init(ray, tries: int = 3, **kw) -> None:
    """``ray.init`` without the dashboard or log forwarding; a local start that times out
    (Ray waits 30 s for its raylet, too little on a loaded machine) is tried again. An
    instance started here gets the driver's ``sys.path``. Ray's notice that it enabled
    token authentication (its default for a new local instance) is not printed: stderr
    keeps the tool's own lines."""
    if not kw.get("address"):
        kw.setdefault("runtime_env", _local_runtime_env())
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # joining starts no process of Ray's here, so its C++ client's retry lines (one a
        # second, e.g. at a port where something else answers) can be held back; a local
        # start is not wrapped, its raylet and GCS would inherit the file
        with _held_stderr() if kw.get("address") else contextlib.nullcontext():
            _init_tries(ray, tries, **kw)
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _held_stderr():
    """File descriptor 2 goes to a temporary file for the block: what Ray's C++ core
    writes there while it connects is dropped, so a failed join is the tool's one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _init_tries(ray, tries: int, **kw) -> None:
    for attempt in range(tries):
        try:
            ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=False, **kw)
            return
        except Exception as e:  # Ray raises a bare Exception on a slow start
            if "timed out during startup" not in str(e) or attempt == tries - 1 or kw.get("address"):
                raise
            ray.shutdown()
