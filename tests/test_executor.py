"""``cli.executor``: the flags, the checks made before any work (one-line ValueError),
results handed back as tasks finish, a failing task retried then reported without
stopping the others, and GPU requests scheduled by Ray (fractional ones shared)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import pytest

import cli
from cli import executor as X


def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError("three is not welcome\nsecond line")
    return x


def count_attempts(path):
    """Append a line per attempt, fail every time."""
    with open(path, "a") as f:
        f.write("attempt\n")
    raise RuntimeError("always fails")


def gpu_ids(_):
    import ray
    return [str(i) for i in ray.get_gpu_ids()]


def _ray():
    pytest.importorskip("ray")
    X.local_ray(num_cpus=2, num_gpus=1)  # shared with tests/test_sweep.py; the GPU is declared only


def test_flags_are_added_by_one_helper_and_validated_by_the_parser(capsys):
    ap = cli.Parser(prog="tool")
    X.add_arguments(ap)
    a = ap.parse_args(["--executor", "ray", "--address", "auto", "--cpus-per-task", "2",
                       "--gpus-per-task", "0.25"])
    assert (a.executor, a.address, a.cpus_per_task, a.gpus_per_task) == ("ray", "auto", 2.0, 0.25)
    assert ap.parse_args([]).executor == "auto"
    for bad in (["--executor", "slurm"], ["--gpus-per-task", "-1"], ["--cpus-per-task", "0"],
                ["--gpus-per-task", "inf"]):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(bad)
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_local_executor_yields_every_task_and_a_failure_does_not_stop_the_rest():
    ex = X.make("local")
    got = list(ex.map(fail_on_three, [1, 2, 3, 4]))
    assert [t for t, _ in got] == [1, 2, 3, 4]
    assert [r for t, r in got if t != 3] == [1, 2, 4]
    failed = dict(got)[3]
    assert isinstance(failed, X.TaskFailed) and failed.reason == "ValueError: three is not welcome"
    assert "local" in ex.describe()


@pytest.mark.parametrize("kw,cpus,ray_installed,chosen", [
    (dict(), 2, True, "local"),                                     # a short job
    (dict(long_job=True), 2, True, "ray"),                          # long, 2 cores, Ray
    (dict(long_job=True), 1, True, "local"),                        # one core: nothing to spread
    (dict(long_job=True), 2, False, "local"),                       # no Ray
    (dict(long_job=True, device="cuda"), 2, True, "local"),         # one GPU, this process
    (dict(long_job=True, device="tpu"), 2, True, "local"),          # not a CPU: checked here
    (dict(address="auto"), 2, True, "ray"),                         # a Ray flag asks for Ray
    (dict(cpus_per_task=2.0), 1, False, "ray"),                     # (and then needs it)
    (dict(gpus_per_task=0.5, device="cuda"), 2, True, "ray"),
])
def test_auto_is_ray_for_a_long_cpu_job_on_several_cores_or_when_a_ray_flag_is_given(
        monkeypatch, kw, cpus, ray_installed, chosen):
    monkeypatch.setattr(X, "cpus_here", lambda: cpus)
    if not ray_installed:
        monkeypatch.setitem(sys.modules, "ray", None)
    assert X.choose("auto", **kw) == chosen
    assert X.choose("local", **kw) == "local" and X.choose("ray", **kw) == "ray"


def test_auto_runs_here_and_says_why_when_ray_does_not_start(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setattr(X, "cpus_here", lambda: 2)

    def no_start(*a, **k):
        raise ValueError("--executor ray: could not start or join a Ray cluster on this machine")

    monkeypatch.setattr(X, "RayExecutor", no_start)
    ex = X.make("auto", long_job=True)
    assert ex.kind == "local"
    assert ex.describe().endswith("; --executor auto: Ray did not start here (--executor ray: "
                                  "could not start or join a Ray cluster on this machine), so "
                                  "one process")
    with pytest.raises(ValueError, match="could not start"):  # asked for by a flag: an error
        X.make("auto", long_job=True, cpus_per_task=1.0)


def test_auto_for_a_long_job_is_a_ray_executor_that_says_it_chose(monkeypatch):
    _ray()
    monkeypatch.setattr(X, "cpus_here", lambda: 2)
    ex = X.make("auto", long_job=True)
    assert ex.kind == "ray" and ex.slots == 2 and (ex.cpus, ex.gpus) == (1.0, 0.0)
    assert ex.describe().endswith("; --executor auto for a long job (--executor local: one process)")
    assert sorted(r for _, r in ex.map(square, [1, 2, 3])) == [1, 4, 9]


@pytest.mark.parametrize("kw,says", [
    (dict(address="auto"), "--address is for --executor ray"),
    (dict(cpus_per_task=2.0), "--cpus-per-task is for --executor ray"),
    (dict(gpus_per_task=0.5), "--gpus-per-task is for --executor ray"),
])
def test_local_executor_refuses_the_cluster_flags(kw, says):
    with pytest.raises(ValueError, match=says):
        X.make("local", **kw)


def test_ray_checks_come_before_any_work():
    with pytest.raises(ValueError, match="a fraction of one GPU or a whole number"):
        X.make("ray", gpus_per_task=1.5)
    with pytest.raises(ValueError, match="--device cuda with --executor ray needs --gpus-per-task > 0"):
        X.make("ray", gpus_per_task=0.0, device="cuda")
    with pytest.raises(ValueError, match="give auto or HOST:PORT"):
        X.make("ray", address="nowhere")


def test_an_unreachable_address_is_one_line_and_quick():
    pytest.importorskip("ray")
    with pytest.raises(ValueError) as e:
        X.make("ray", address="127.0.0.1:1")
    assert str(e.value).startswith("--address 127.0.0.1:1: no Ray cluster answers there")
    assert "\n" not in str(e.value)


def _listener(reply: bytes | None):
    """A local TCP port that accepts; it answers the first bytes it gets with ``reply``,
    or stays silent (``None``)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)
            if reply is not None:
                conn.recv(64)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def test_a_port_that_accepts_and_stays_silent_is_refused_by_the_probe_not_waited_on():
    """Ray's own join waits without end there (measured: over 300 s)."""
    pytest.importorskip("ray")
    srv, addr = _listener(None)
    with srv, pytest.raises(ValueError) as e:  # our probe's own timeout says so, not Ray
        X.make("ray", address=addr)
    assert str(e.value) == f"--address {addr}: no Ray cluster answers there (no reply in 5 s)"


def test_a_port_where_something_else_answers_is_not_taken_for_a_ray_cluster():
    pytest.importorskip("ray")
    srv, addr = _listener(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with srv, pytest.raises(ValueError) as e:
        X.make("ray", address=addr)
    assert str(e.value).startswith(f"--address {addr}: something answers there, but not a Ray cluster")
    assert "\n" not in str(e.value)


def test_ray_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r"needs Ray, which is not installed: pip install -e '\.\[cluster\]'"):
        X.make("ray")


def test_ray_gives_every_result_once_and_retries_a_failing_task_before_reporting_it(tmp_path):
    _ray()
    ex = X.make("ray", retries=2)
    assert not ex.owned and "1 GPUs" in ex.describe()
    got = dict(ex.map(square, range(6)))
    assert got == {i: i * i for i in range(6)}
    log = tmp_path / "attempts"
    (_, res), = list(ex.map(count_attempts, [str(log)]))
    assert isinstance(res, X.TaskFailed) and res.reason == "RuntimeError: always fails"
    assert log.read_text().count("attempt") == 3  # the first try and 2 retries
    mixed = dict(ex.map(fail_on_three, [1, 3, 5]))
    assert mixed[1] == 1 and mixed[5] == 5 and isinstance(mixed[3], X.TaskFailed)


def test_gpu_requests_are_scheduled_and_checked_against_the_cluster():
    """The instance declares one GPU (no CUDA here: the scheduling only)."""
    _ray()
    quarter = X.make("ray", gpus_per_task=0.25)
    assert all(ids == ["0"] for _, ids in quarter.map(gpu_ids, range(4)))
    with pytest.raises(ValueError, match=r"--gpus-per-task 2 is more than the Ray cluster has "
                                         r"\(1 GPUs at most on a node\)"):
        X.make("ray", gpus_per_task=2.0)
    with pytest.raises(ValueError, match=r"--cpus-per-task 64 is more than any node"):
        X.make("ray", cpus_per_task=64.0)


def test_docs_show_how_to_start_and_join_a_cluster():
    text = (Path(__file__).resolve().parent.parent / "docs" / "cluster.md").read_text()
    for needle in ("ray start --head", "ray start --address", "--executor ray", "sbatch",
                   "--address auto", "--gpus-per-task"):
        assert needle in text, needle
    assert os.path.basename(X.__file__) == "executor.py"
