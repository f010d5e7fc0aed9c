"""Contracts of noisyrepro.results: the results.csv row, resuming sweeps, summaries, paper numbers, comparisons, rendering."""
import json, math, os, subprocess, sys, threading
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from noisyrepro.core import read_rows
from noisyrepro.results import (RESULT_COLUMNS, compare, done_keys, is_done, load_results, paper_numbers, pivot_table,
                                record_result, render_table, summarize)


def row(**kw):
    "A valid results row (fake numbers), updated with `kw`."
    r = dict(paper="LIMIT", experiment="t", dataset="mnist", noise_type="symmetric", noise=0.5, n_train=1000, method="CE",
             hparams={"lr": 1e-3, "beta": 1.0}, seed=0, best_epoch=3, val_acc=0.7, test_acc=0.8, last_test_acc=0.79,
             train_seconds=1.0, scale="test", device="cpu (fake)", run_key="k0")
    return r | kw


def test_record_result_roundtrip(tmp_path):
    p = record_result(tmp_path, row())
    assert p == tmp_path / "results.csv"
    (r,) = read_rows(p)
    assert list(r) == list(RESULT_COLUMNS)
    assert r["hparams"] == '{"beta":1.0,"lr":0.001}'
    assert json.loads(r["hparams"]) == {"beta": 1.0, "lr": 0.001}


@pytest.mark.parametrize("bad,msg", [
    ({"test_acc": 80.0}, "test_acc=80.0 is not a fraction"),
    ({"val_acc": -0.1}, "val_acc=-0.1 is not a fraction"),
    ({"noise": 40}, "noise=40 is not a fraction"),
    ({"run_key": ""}, "run_key is empty"),
])
def test_record_result_rejects_bad_values(tmp_path, bad, msg):
    with pytest.raises(ValueError, match=msg): record_result(tmp_path, row(**bad))
    assert not (tmp_path / "results.csv").exists()


def test_record_result_names_missing_columns(tmp_path):
    r = row(); del r["seed"]; del r["scale"]
    with pytest.raises(ValueError, match="missing column\\(s\\) seed, scale"): record_result(tmp_path, r)


def test_duplicate_run_key_refused_and_done_keys(tmp_path):
    assert done_keys(tmp_path) == set() and not is_done(tmp_path, "k0")
    record_result(tmp_path, row())
    record_result(tmp_path, row(run_key="k1", seed=1))
    with pytest.raises(ValueError, match="already in"): record_result(tmp_path, row(seed=5))
    assert done_keys(tmp_path) == {"k0", "k1"} and is_done(tmp_path, "k1") and not is_done(tmp_path, "k2")


def test_failed_replace_leaves_file_intact(tmp_path, monkeypatch):
    record_result(tmp_path, row())
    before = (tmp_path / "results.csv").read_bytes()
    def boom(*a, **k): raise KeyboardInterrupt("killed during replace")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt): record_result(tmp_path, row(run_key="k1"))
    monkeypatch.undo()
    assert (tmp_path / "results.csv").read_bytes() == before
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_concurrent_writers_lose_no_rows(tmp_path):
    code = ("import sys; from noisyrepro.results import record_result\n"
            "base = dict.fromkeys(%r, 'x') | dict(noise=0.1, val_acc=0.5, test_acc=0.5, last_test_acc=0.5)\n"
            "for i in range(15): record_result(sys.argv[1], base | dict(run_key=f'{sys.argv[2]}-{i}'))") % (RESULT_COLUMNS,)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"p{j}"]) for j in range(2)]
    ths = [threading.Thread(target=lambda t=t: [record_result(tmp_path, row(run_key=f"t{t}-{i}")) for i in range(15)]) for t in range(2)]
    for th in ths: th.start()
    for th in ths: th.join()
    assert all(p.wait(60) == 0 for p in procs)
    assert len(read_rows(tmp_path / "results.csv")) == 60 and len(done_keys(tmp_path)) == 60


def test_load_results_types_and_errors(tmp_path):
    record_result(tmp_path, row(n_train=None, val_acc=None))
    df = load_results(tmp_path)
    assert str(df.n_train.dtype) == "Int64" and df.n_train.isna().all()
    assert df.test_acc.dtype == np.float64 and math.isnan(df.val_acc.iloc[0])
    assert len(load_results(tmp_path / "results.csv")) == 1
    empty = tmp_path / "empty"; empty.mkdir()
    assert len(load_results(empty)) == 0 and list(load_results(empty).columns) == list(RESULT_COLUMNS)
    with pytest.raises(FileNotFoundError, match="no results at"): load_results(tmp_path / "nope")


@pytest.fixture
def fake(tmp_path):
    "Fake results: CE at n=1000 (3 seeds), CE on the full set (2 seeds), MAE on the full set (1 seed)."
    for m, n, accs in [("CE", 1000, [0.80, 0.82, 0.87]), ("CE", None, [0.96, 0.98]), ("MAE", None, [0.9])]:
        for s, a in enumerate(accs): record_result(tmp_path, row(method=m, n_train=n, seed=s, test_acc=a, run_key=f"{m}{n}{s}"))
    return load_results(tmp_path)


def test_summarize_matches_hand_computation(fake):
    s = summarize(fake)
    assert len(s) == 3  # the n_train-missing groups are kept
    ce = s[(s.method == "CE") & (s.n_train == 1000)].iloc[0]
    assert ce["mean"] == pytest.approx(83.0) and ce["std"] == pytest.approx(math.sqrt(13)) and ce["n"] == 3
    full = s[s.n_train.isna()].set_index("method")
    assert full.loc["CE", "std"] == pytest.approx(math.sqrt(2)) and full.loc["CE", "n"] == 2
    assert math.isnan(full.loc["MAE", "std"]) and full.loc["MAE", "n"] == 1
    assert s.scale.iloc[0] == "test" and s.device.iloc[0] == "cpu (fake)"
    assert summarize(fake, metric="train_seconds")["mean"].iloc[0] == pytest.approx(1.0)  # not scaled to percent


def test_summarize_errors(fake):
    with pytest.raises(ValueError, match="available columns"): summarize(fake, metric="accuracy")
    mixed = pd.concat([fake, fake.iloc[:1].assign(run_key="dup", hparams="{}")])
    with pytest.raises(ValueError, match="select one configuration"): summarize(mixed)


def test_paper_numbers_counts_and_values():
    allp = paper_numbers()
    assert list(allp.columns) == ["paper", "table", "dataset", "noise_type", "noise", "n_train", "method", "metric", "mean", "std", "note"]
    assert len(paper_numbers("limit", 4)) + len(paper_numbers("LIMIT", "table5")) == 132
    assert len(allp) == 388
    t6 = paper_numbers("limit", 6)
    assert t6.set_index(["method", "noise"]).loc[("LIMIT_L+init", 0.6), "mean"] == 82.9
    t5 = paper_numbers("limit", 5)
    r = t5[(t5.method == "CE+LN") & (t5.noise == 0.8) & t5.n_train.isna()].iloc[0]
    assert (r["mean"], r["std"]) == (74.5, 19.1)
    s1 = paper_numbers("sln", 1).query("metric == 'test_acc'").set_index(["method", "noise_type"])
    assert (s1.loc[("SLN-MO-LC", "asymmetric"), "mean"], s1.loc[("SLN-MO-LC", "asymmetric"), "std"]) == (87.85, 0.41)
    assert paper_numbers("dmi").set_index("method").loc["DMI", "mean"] == 72.46
    c = paper_numbers("CDR+AUX", 1)
    assert c[(c.method == "CDR+AUX") & (c.noise_type == "asymmetric") & (c.noise == 0.7)]["mean"].item() == 71.64
    starred = paper_numbers("sln", 3).query("metric == 'test_acc' and note.str.contains('Patrini')")
    assert sorted(starred.method) == ["Backward", "CE", "Forward"] and starred["std"].isna().all()


def test_paper_numbers_errors():
    with pytest.raises(ValueError, match="valid papers: LIMIT \\(limit\\), SLN \\(sln\\)"): paper_numbers("mentornet")
    with pytest.raises(ValueError, match="valid tables: LIMIT 4, LIMIT 5, LIMIT 6, LIMIT 7"): paper_numbers("limit", 1)


def test_compare_diff_not_run_and_never_filled(fake):
    paper = paper_numbers("limit", 4)
    cmp = compare(summarize(fake), paper)
    assert len(cmp) == 66
    ce = cmp[(cmp.method == "CE") & (cmp.noise == 0.5) & (cmp.n_train == 1000)].iloc[0]
    assert ce["diff"] == pytest.approx(83.0 - 71.8) and ce["ours"] == "83.0 ± 3.6 (n=3)" and ce["paper"] == "71.8 ± 4.3"
    nr = cmp[cmp.ours == "not run"]
    assert len(nr) == 63 and nr[["ours_mean", "ours_std", "ours_n", "diff"]].isna().all().all()
    assert cmp.paper_mean.notna().all()


def test_compare_extra_rows_method_map_and_duplicates(fake):
    ours = summarize(fake.assign(method=fake.method.replace({"MAE": "mae_loss"})))
    paper = paper_numbers("limit", 4)
    assert (compare(ours, paper).paper == "not in paper").sum() == 1
    assert (compare(ours, paper, method_map={"mae_loss": "MAE"}).paper == "not in paper").sum() == 0
    with pytest.raises(ValueError, match="filter it first"): compare(ours, paper_numbers("sln", 3))
    with pytest.raises(ValueError, match="summarize"): compare(fake, paper)


def test_pivot_table_cells(fake):
    pt = pivot_table(compare(summarize(fake), paper_numbers("limit", 4)))
    assert pt.shape == (11, 6) and pt.index[0] == "CE"
    assert pt.loc["CE", "noise=0.5, n_train=1000"] == "83.0 ± 3.6 / 71.8 ± 4.3"
    assert pt.loc["MAE", "noise=0.5, n_train=all"] == "90.0 / 98.1 ± 0.1"
    assert pt.loc["FW", "noise=0, n_train=all"] == "not run / 99.2 ± 0.1"
    with pytest.raises(ValueError, match="several rows share one"): pivot_table(compare(summarize(fake), paper_numbers("limit", 4)), columns="noise")


def test_render_table_files_and_caption(fake, tmp_path):
    pt = pivot_table(compare(summarize(fake), paper_numbers("limit", 4)))
    with pytest.raises(ValueError, match="selection rule"): render_table(pt, tmp_path / "figs", "t4", "Fake table.")   # no rule, no table
    md, png = render_table(pt, tmp_path / "figs", "t4", "Fake table.", selection="fake rule")
    text = md.read_text().splitlines()
    assert text[0] == "**Fake table. Scale: test. Hardware: cpu (fake). Selection: fake rule.**"
    assert text[2].startswith("| method | noise=0, n_train=1000 |") and len(text) == 15
    assert png.read_bytes()[:4] == b"\x89PNG"
    md2, _ = render_table(pd.DataFrame({"a": [1.234]}), tmp_path, "plain", "Plain.", scale="s", device="d", digits=2, selection="r")
    assert md2.read_text().splitlines()[-1] == "| 1.234 |"  # non-statistic floats are not rounded
    with pytest.raises(ValueError, match="must state scale, hardware and selection rule"): render_table(pd.DataFrame({"a": [1]}), tmp_path, "x", "c")
    with pytest.raises(ValueError, match="not a plain file name"): render_table(pt, tmp_path, "a/b", "c")


def test_run_experiment_logs_one_line_per_run(tmp_path, capsys):
    "Every finished, skipped or resumed run writes one line to stderr (papermill shows it with --log-output) (issue 14)."
    import dataclasses
    from noisyrepro.models import get_model
    from noisyrepro.experiment import run_experiment
    from noisyrepro.splits import noisy_splits
    from noisyrepro.train import TrainConfig
    sp = noisy_splits("mnist5k", "symmetric", 0.5, n_train=64, seed=0)
    meta = {"paper": "demo", "experiment": "log", "dataset": "mnist5k", "noise_type": "symmetric", "noise": 0.5, "scale": "test"}
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", progress=False)
    for _ in range(2): run_experiment(tmp_path, meta, lambda: get_model("lenet", 10, seed=0), sp, "CE", cfg=cfg)
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[noisyrepro]")]
    assert len(err) == 2 and err[0].startswith("[noisyrepro] finished CE() seed 0, run ") and " test " in err[0] and err[0].endswith(" s")
    assert err[1].startswith("[noisyrepro] skipped (recorded) CE() seed 0")
