"""The records kept in ``records/finetune`` rebuild the README's MiniLM table with no
tensors and no training, and say what the README says of it: 3 seeds of every row, our
adapters and PEFT's agree within the seeds' spread, the Hadamard-product adapters trail
LoRA at the common learning rate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import finetune.train as ftrain
from finetune import compare as C

RECORDS = Path(__file__).resolve().parents[1] / "records" / "finetune"
ARGV = ["--model", "minilm", "--task", "movie", "--rank", "8", "--steps", "100",
        "--eval-every", "50", "--methods", "all", "--seeds", "3", "--impl", "both",
        "--report-only", "--no-progress", "--no-figure", "--name", "table"]


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """A copy of the kept records under tmp_path/finetune, with training forbidden."""
    shutil.copytree(RECORDS, tmp_path / "finetune")

    def no_training(*a, **k):
        raise AssertionError("report-only trained a run")

    monkeypatch.setattr(ftrain, "train", no_training)
    return tmp_path / "finetune"


@pytest.mark.skipif(not (RECORDS / "minilm" / "movie").is_dir(), reason="no kept records")
def test_kept_minilm_records_rebuild_the_readme_table(kept, tmp_path, capsys):
    assert C.main([*ARGV, "--out", str(kept)]) == 0, capsys.readouterr().err
    comp = json.loads((tmp_path / "finetune/minilm/movie/table.json").read_text())
    rows = {r["label"]: r for r in comp["rows"]}
    assert len(rows) == 20 and all(r["seeds"] == [0, 1, 2] for r in rows.values())
    for m in ("lora", "hira", "loha", "dora", "miss"):
        ours, peft = rows[m], rows[f"{m} (PEFT)"]
        spread = max(ours["metric_sd"], peft["metric_sd"])
        assert abs(ours["metric_mean"] - peft["metric_mean"]) <= 2 * spread, m
    for m in ("abba", "hira", "loha", "smoa"):
        assert rows[m]["metric_mean"] < rows["lora"]["metric_mean"] - 0.03, m
    assert rows["lora"]["reconstruction_error"] < rows["abba"]["reconstruction_error"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lora = rows["lora"]
    assert (f"| lora | 332,546 | {lora['metric_mean']:.3f} ± {lora['metric_sd']:.3f} (3) |"
            in readme)


@pytest.mark.skipif(not (RECORDS / "minilm" / "movie").is_dir(), reason="no kept records")
def test_a_comparison_json_read_back_prints_the_table_it_was_written_with():
    # strict JSON keeps NaN (full FT's cosine with itself, no forgetting) as null
    d = RECORDS / "minilm" / "movie"
    comp = C.read_comparison(d / "table.json")
    assert C.format_table(comp) + "\n" == (d / "table.txt").read_text()


SMOLLM = ["--model", "smollm2", "--task", "tweets", "--rank", "8", "--steps", "200",
          "--eval-every", "100", "--methods", "lora,abba,hira,loha,dora,alpha_lora",
          "--lr-set", "abba=4e-3", "--lr-set", "hira=4e-3", "--lr-set", "loha=4e-3",
          "--no-fit", "--report-only", "--no-progress", "--no-figure", "--name", "table"]


@pytest.mark.skipif(not (RECORDS / "smollm2" / "tweets").is_dir(), reason="no kept records")
def test_kept_smollm2_records_rebuild_the_readme_table(kept, tmp_path, capsys):
    assert C.main([*SMOLLM, "--out", str(kept)]) == 0, capsys.readouterr().err
    comp = json.loads((tmp_path / "finetune/smollm2/tweets/table.json").read_text())
    rows = {r["label"]: r for r in comp["rows"]}
    assert sorted(rows) == sorted(["full", "lora", "abba", "hira", "loha", "dora", "alpha_lora"])
    assert comp["steps"] == 200 and all(r["seeds"] == [0] for r in rows.values())
    # every adapter learns (held-out loss well below the base model's) and ends within
    # 0.05 of full fine-tuning or below it, as the README says
    for r in rows.values():
        assert r["metric_mean"] < r["metric_before"] - 1.0, r["label"]
        assert r["metric_mean"] <= rows["full"]["metric_mean"] + 0.05, r["label"]
    assert rows["lora"]["numerical_rank"] <= 8 < rows["abba"]["numerical_rank"] <= 16
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lora = rows["lora"]
    assert f"| lora | 921,600 | {lora['metric_mean']:.3f} (1) |" in readme
