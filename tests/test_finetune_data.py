"""The offline VADER corpora and the digits transfer split (finetune.data)."""

import numpy as np
import pytest

from finetune import data

needs_corpora = pytest.mark.skipif(
    not data.have_corpora(),
    reason=f"VADER tarball not in {data.data_dir()}; run `{data.FETCH_COMMAND}`")


@needs_corpora
@pytest.mark.parametrize("name", list(data.CORPORA))
def test_corpus_sizes_match_published_counts(name):
    texts, scores = data.load_corpus(name)
    assert len(texts) == len(scores) == data.CORPORA[name][1]
    assert all(isinstance(t, str) and t for t in texts)


@needs_corpora
@pytest.mark.parametrize("name", list(data.CORPORA))
def test_scores_are_mean_ratings_on_the_minus4_to_4_scale(name):
    _, scores = data.load_corpus(name)
    assert scores.dtype == np.float64
    assert np.all(scores >= -4) and np.all(scores <= 4)
    assert scores.min() < -1 and scores.max() > 1  # both polarities present


@needs_corpora
def test_first_movie_snippet_is_parsed_with_its_score():
    texts, scores = data.load_corpus("movie")
    assert texts[0].startswith("The Rock is destined to be the 21st Century's new")
    assert scores[0] == pytest.approx(2.26666666667)


@needs_corpora
def test_load_corpus_returns_copies_not_the_cache():
    _, s1 = data.load_corpus("tweets")
    s1[:] = 99.0
    _, s2 = data.load_corpus("tweets")
    assert s2.max() <= 4


@needs_corpora
@pytest.mark.parametrize("name", list(data.CORPORA))
def test_binary_labels_drop_neutral_items_and_are_not_too_unbalanced(name):
    _, scores = data.load_corpus(name)
    keep, y = data.binary_labels(scores)
    assert set(np.unique(y)) == {-1.0, 1.0}
    assert np.all(np.abs(scores[keep]) >= 0.5)
    dropped = np.setdiff1d(np.arange(len(scores)), keep)
    assert np.all(np.abs(scores[dropped]) < 0.5)
    assert np.array_equal(y, np.sign(scores[keep]))
    frac_pos = (y > 0).mean()
    assert 0.25 < frac_pos < 0.75


def test_binary_labels_threshold_and_bad_input():
    keep, y = data.binary_labels(np.array([-2.0, -0.2, 0.0, 0.3, 0.5, 3.1]))
    assert keep.tolist() == [0, 4, 5]
    assert y.tolist() == [-1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="1-d"):
        data.binary_labels(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="neutral"):
        data.binary_labels(np.zeros(3), neutral=0.0)


def test_parse_ground_truth_reads_three_tab_fields_and_rejects_others():
    ids, texts, scores = data.parse_ground_truth(b"1\t-0.5\tbad film\n2\t2\tgreat\tfun\n\n")
    assert ids == ["1", "2"] and texts == ["bad film", "great\tfun"]
    assert scores.tolist() == [-0.5, 2.0]
    with pytest.raises(ValueError, match="line 1"):
        data.parse_ground_truth(b"1 -0.5 no tabs\n")


def test_missing_tarball_error_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_EXPRESSIVITY_DATA", str(tmp_path))
    data._inner_files.cache_clear()
    data._load.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="python -m finetune.data fetch"):
            data.load_corpus("movie")
    finally:
        data._inner_files.cache_clear()
        data._load.cache_clear()


def test_unknown_corpus_is_a_value_error():
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("imdb")


def test_cli_without_tarball_prints_one_error_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFT_EXPRESSIVITY_DATA", str(tmp_path))
    data._inner_files.cache_clear()
    data._load.cache_clear()
    try:
        assert data.main(["info"]) == 2
    finally:
        data._inner_files.cache_clear()
        data._load.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "fetch" in err[0]


def test_digits_transfer_split_source_0_to_7_target_8_and_9():
    pytest.importorskip("sklearn")
    d = data.load_digits_transfer(seed=0)
    assert set(np.unique(d["y_source"])) == set(range(8))
    assert set(np.unique(d["y_target"])) == {8, 9} == set(np.unique(d["y_test"]))
    assert d["x_source"].shape[1] == 64 and d["x_source"].max() <= 1.0
    n_89 = len(d["y_target"]) + len(d["y_test"])
    assert len(d["y_source"]) + n_89 == 1797
    # fine-tuning and test images are disjoint (no 8/9 image in both halves)
    tr = {r.tobytes() for r in d["x_target"]}
    te = {r.tobytes() for r in d["x_test"]}
    assert not tr & te
    d2 = data.load_digits_transfer(seed=0)
    assert np.array_equal(d["x_test"], d2["x_test"])
    d3 = data.load_digits_transfer(seed=1)
    assert not np.array_equal(d["y_test"], d3["y_test"]) or not np.array_equal(
        d["x_test"], d3["x_test"])


# --------------------------------------------------------------------------- #
# python -m finetune.data: bad input is one line, exit 2
# --------------------------------------------------------------------------- #
from clicheck import call, interrupted, one_line  # noqa: E402


@pytest.mark.parametrize("argv, words", [
    (["bogus"], "argument cmd: invalid choice: 'bogus'"),
    (["fetch", "--dest", "/etc/hostname"], "--dest /etc/hostname is a file; give a folder"),
    (["fetch", "--dest", "/proc/no/dir"], "--dest /proc/no/dir: cannot write"),
    (["fetch", "--bogus"], "unrecognized arguments: --bogus"),
    (["info", "extra"], "unrecognized arguments: extra"),
])
def test_cli_bad_input_one_line_exit_2(argv, words, capsys):
    one_line(call(data.main, argv, capsys), words=words)


def test_cli_missing_or_corrupt_tarball_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_EXPRESSIVITY_DATA", str(tmp_path))
    data._inner_files.cache_clear()
    data._load.cache_clear()
    try:
        one_line(call(data.main, ["info"], capsys), words="not found; fetch it once with")
        (tmp_path / data.TARBALL).write_bytes(b"not a tarball")
        one_line(call(data.main, [], capsys), words=f"is not the vaderSentiment "
                                                     f"{data.VADER_VERSION} sdist")
    finally:
        data._inner_files.cache_clear()
        data._load.cache_clear()


def test_cli_fetch_that_cannot_download_is_one_line(capsys, monkeypatch, tmp_path):
    import subprocess

    def offline(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "run", offline)
    one_line(call(data.main, ["fetch", "--dest", tmp_path], capsys),
             words="pip download vaderSentiment==3.3.2` failed (exit 1)")
    assert list(tmp_path.iterdir()) == []  # the temporary download folder is gone


def test_cli_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, tmp_path):
    assert interrupted(data.main, ["fetch", "--dest", tmp_path], capsys, monkeypatch, data,
                       "fetch").startswith("interrupted: nothing was saved")
