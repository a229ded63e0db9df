"""The trainer on real (tiny) models: it learns with every method, our LoRA equals PEFT's
LoRA step for step, runs are seeded and resume exactly, divergence is never a result,
and the command fails the careful way."""

from __future__ import annotations

import json

import pytest
import torch

import theory
from finetune import adapters as A
from finetune import run as frun
from finetune.data import have_corpora
from finetune.train import Diverged, RunConfig, train

pytestmark = pytest.mark.skipif(not have_corpora(), reason="VADER corpora not fetched")

METHODS = [m for m in theory.available() if m != "full"]
TINY = dict(model="tiny-gpt2", task="movie", steps=12, batch=8, eval_every=12)


def _cfg(method="lora", **kw):
    return RunConfig(method=method, rank=2, **{**TINY, **kw})


@pytest.mark.parametrize("method", ["full", *METHODS])
def test_a_few_steps_lower_the_heldout_loss(method):
    rec = train(_cfg(method))
    assert rec["metric"] < rec["metric_before"] - 1e-3, (rec["metric_before"], rec["metric"])
    assert len(rec["losses"]) == 12 and all(map(lambda v: v == v, rec["losses"]))


@pytest.mark.parametrize("method", ["lora", "abba", "vera", "smoa"])
def test_trainable_parameters_are_the_registry_count(method):
    rec = train(_cfg(method, steps=1), return_model=True)
    layers = A.adapted_layers(rec["model"])
    assert len(layers) == 8
    assert rec["trainable_params"] == sum(lay.n_params() for lay in layers.values())
    for path, (d, w0) in rec["deltas"].items():
        assert d.shape == w0.shape == layers[path].w0.shape


def test_our_lora_and_peft_lora_give_the_same_loss_curve():
    ours = train(_cfg("lora", steps=15))
    theirs = train(_cfg("lora", steps=15, impl="peft", init="ours"))
    assert theirs["trainable_params"] == ours["trainable_params"]
    torch.testing.assert_close(torch.tensor(theirs["losses"]), torch.tensor(ours["losses"]),
                               rtol=1e-5, atol=1e-6)
    for path, (d, _) in ours["deltas"].items():
        torch.testing.assert_close(theirs["deltas"][path][0], d, rtol=1e-4, atol=1e-6)


def test_a_different_update_rule_gives_a_different_curve():
    """The equality above is not vacuous: PEFT's own init (other factors) differs."""
    ours = train(_cfg("lora", steps=5))
    theirs = train(_cfg("lora", steps=5, impl="peft"))
    assert ours["losses"] != theirs["losses"]


def test_same_seed_same_numbers_other_seed_other_numbers():
    a, b, c = train(_cfg("abba")), train(_cfg("abba")), train(_cfg("abba", seed=1))
    assert a["losses"] == b["losses"] and a["metric"] == b["metric"]
    assert a["losses"] != c["losses"]


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path):
    full = train(_cfg("loha"))

    def stop(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg("loha"), run_dir=tmp_path, checkpoint_every=5, on_step=stop)
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = train(_cfg("loha"), run_dir=tmp_path, checkpoint_every=5)
    assert resumed["resumed"]
    assert resumed["losses"] == full["losses"]
    for path, (d, _) in full["deltas"].items():
        assert torch.equal(resumed["deltas"][path][0], d)


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    def stop(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg("lora"), run_dir=tmp_path, on_step=stop)
    with pytest.raises(ValueError, match="another configuration"):
        train(_cfg("lora", lr=0.5), run_dir=tmp_path)


def test_alpha_lora_trains_alpha_on_a_held_out_slice():
    rec = train(_cfg("alpha_lora", steps=21, alpha_every=10), return_model=True)
    assert len(rec["alpha_losses"]) == 3  # steps 0, 10, 20
    assert rec["task"]["n_alpha"] > 0
    moved = [abs(v["mean"] - 1.0) + v["std"] for v in rec["alpha"].values()]
    assert len(moved) == 8 and max(moved) > 1e-3


def test_divergence_raises_and_is_not_a_result():
    with pytest.raises(Diverged, match="non-finite|became"):
        train(_cfg("lora", lr=1e6, steps=30, eval_every=5))


def test_digits_toy_learns_eight_versus_nine():
    rec = train(RunConfig(model="mlp", task="digits", method="abba", rank=2, steps=300))
    assert rec["metric_before"] < 0.1 < 0.9 < rec["metric"]  # 8 and 9 unseen in pre-training
    assert rec["final_eval"]["train_loss"] < 0.1 < rec["losses"][0]


# --------------------------------------------------------------------------- #
# the command
# --------------------------------------------------------------------------- #
def _main(argv, capsys):
    try:
        code = frun.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_runs_writes_the_files_and_never_recomputes(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--steps", "4", "--method", "abba", "--rank", "2",
            "--no-progress"]
    code, out, err = _main(argv, capsys)
    assert code == 0, err
    d = next(tmp_path.glob("tiny-gpt2/movie/abba-*"))
    rec = json.loads((d / "run.json").read_text())
    assert rec["trainable_params"] > 0 and len(rec["losses"]) == 4
    assert {"deltas.safetensors", "adapter.safetensors", "run.json"} <= {p.name for p in d.iterdir()}
    assert not (d / "checkpoint.pt").exists()
    mtime = (d / "run.json").stat().st_mtime_ns
    code, out, err = _main(argv, capsys)
    assert code == 0 and "not recomputed" in out
    assert (d / "run.json").stat().st_mtime_ns == mtime
    # the deltas file is a reconstruction target
    from reconstruction.run import main as rmain
    assert rmain(["--target", f"{d / 'deltas.safetensors'}:*.attn.c_proj", "--method", "lora",
                  "--rank", "2", "--json", "-"]) == 0


def test_cli_divergence_exits_1_records_failure_and_retries(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--steps", "30", "--eval-every", "5", "--lr", "1e6",
            "--no-progress"]
    code, out, err = _main(argv, capsys)
    assert code == 1 and err.startswith("failed: ") and err.count("\n") == 1
    d = next(tmp_path.glob("tiny-gpt2/movie/lora-*"))
    assert (d / "failed.json").is_file() and not (d / "run.json").exists()
    code, out, err = _main(argv, capsys)  # retried, not skipped
    assert code == 1 and "not recomputed" not in out


def test_cli_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, capsys, monkeypatch):
    import finetune.train as ftrain

    real = ftrain.train

    def interrupted(cfg, **kw):
        def stop(step, loss):
            if step == 3:
                raise KeyboardInterrupt
        return real(cfg, **{**kw, "on_step": stop})

    monkeypatch.setattr(frun, "train", interrupted)
    code, out, err = _main(["--out", str(tmp_path), "--steps", "6", "--no-progress"], capsys)
    assert code == 130 and err.startswith("interrupted: checkpoint saved") and err.count("\n") == 1
    assert next(tmp_path.glob("tiny-gpt2/movie/lora-*/checkpoint.pt")).is_file()
    monkeypatch.setattr(frun, "train", real)
    code, out, err = _main(["--out", str(tmp_path), "--steps", "6", "--no-progress"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("argv, words", [
    (["--model", "bert"], "--model 'bert' unknown"),
    (["--task", "digits"], "not a task of --model tiny-gpt2"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--targets", "q_proj"], "matches no linear layer"),
    (["--rank", "65"], "too large"),
    (["--set", "r9=1"], "unknown config field"),
    (["--optimizer", "sgdx"], "--optimizer 'sgdx' unknown"),
    (["--impl", "peft", "--method", "abba"], "PEFT has no 'abba'"),
    (["--method", "full", "--impl", "peft"], "PEFT has no 'full'"),
    (["--lr", "inf"], "finite"),
    (["--steps", "0"], ">= 1"),
    (["--device", "tpu"], "--device"),
    (["--json", "/proc/x/y.json"], "cannot write"),
    (["--batch", "100000000"], "lower --batch"),  # refused, not killed by the OOM killer
])
def test_cli_bad_input_is_one_line_exit_2(argv, words, tmp_path, capsys):
    code, out, err = _main(["--out", str(tmp_path), "--no-progress", *argv], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("*/*/*/run.json"))


def test_cli_missing_corpus_names_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFT_EXPRESSIVITY_DATA", str(tmp_path / "empty"))
    code, out, err = _main(["--out", str(tmp_path)], capsys)
    assert code == 2 and "python -m finetune.data fetch" in err


def test_cli_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    cfg = frun.config_from_args(frun.build_parser().parse_args(["--steps", "4"]))
    from finetune.runs import run_dir
    d = run_dir(tmp_path, cfg)
    d.mkdir(parents=True)
    (d / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, out, err = _main(["--out", str(tmp_path), "--steps", "4", "--no-progress"], capsys)
    assert code == 2 and "unreadable" in err and err.count("\n") == 1
