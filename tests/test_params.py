"""Papermill-level contracts of every parameterised notebook (issue 14): bad parameters fail in the check cell right after the
parameters cell, before any theory or training runs, naming every bad value and the valid ones; `--help-notebook` lists every
parameter with its comment."""
import json, re, subprocess, sys
from pathlib import Path
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"

# notebook -> (bad parameters, substrings the error must contain)
BAD = {
    "05_limit.ipynb": ({"noise": 1.5, "methods": ["CE", "FOO"], "seeds": 0, "noize": 0.8},
                       ["noise=1.5: valid: a rate 0 <= r < 1", "methods=['CE', 'FOO']: valid: one or a list of None, 'CE'",
                        "seeds=0: valid: an integer with 1 <= x", "unknown parameter noize=0.8; valid parameters: scale, experiment"]),
    "06_sln.ipynb": ({"scale": "full", "noise_types": ["symmetric", "pair"], "ema": 1.0},
                     ["scale='full': valid: one of 'quick', 'paper'", "noise_types=['symmetric', 'pair']: valid: one or a list of None",
                      "ema=1.0: valid: a number with 0 < x < 1, or None"]),
    "07_dmi.ipynb": ({"experiment": "cifar", "case": 4, "scale": "quick"},
                     ["experiment='cifar': valid:", "case=4: valid:"]),
    "08_cdr_aux.ipynb": ({"noise_type": "uniformm", "lamb": -1.0, "cdr_rule": "both"},
                         ["noise_type='uniformm': valid:", "lamb=-1.0: valid:", "cdr_rule='both': valid:"]),
    "10_benchmarks.ipynb": ({"dataset": "cifar10", "reps": 0, "stack_sizes": [0]},
                            ["dataset='cifar10': valid: one of 'mnist', 'mnist5k'", "reps=0: valid: an integer with 1 <= x",
                             "stack_sizes=[0]: valid: a non-empty list of integers >= 1"]),
}


def _param_cells(nb: dict) -> tuple[int, int]:
    "Indices of the parameters cell and of the check cell after it."
    cells = nb["cells"]
    p = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    k = next(i for i, c in enumerate(cells) if "check-parameters" in c.get("metadata", {}).get("tags", []))
    return p, k


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_parameters_fail_before_anything_runs(name, tmp_path):
    params, expected = BAD[name]
    out = tmp_path / name
    with pytest.raises(pm.PapermillExecutionError) as ei:
        pm.execute_notebook(str(NBS / name), str(out), parameters=params, cwd=str(NBS), kernel_name="python3", progress_bar=False)
    err = ei.value
    assert err.ename == "ValueError", (err.ename, err.evalue)
    for s in expected: assert s in err.evalue, f"{s!r} not in the error:\n{err.evalue}"
    nb = json.loads(out.read_text())
    p, k = _param_cells(nb)
    assert k <= p + 3, "the check cell must follow the parameters cell (and papermill's injected cell)"
    ran = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and c.get("execution_count")]
    assert max(ran) <= k + 1, f"cells after the check cell ran: {[i for i in ran if i > k + 1]}"   # +1: the injected cell shifts it
    assert p < 8, "the parameters cell must sit at the top, before the theory"


@pytest.mark.parametrize("name", sorted(BAD))
def test_help_notebook_lists_every_parameter(name):
    r = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(NBS / name)], capture_output=True, text=True, cwd=ROOT)
    text = r.stdout + r.stderr
    assert r.returncode == 0 and "Unable to parse" not in text, text
    nb = json.loads((NBS / name).read_text())
    p, _ = _param_cells(nb)
    names = [l.split("=")[0].strip() for l in "".join(nb["cells"][p]["source"]).splitlines() if "=" in l and not l.startswith((" ", "#"))]
    for n in names: assert f"  {n}: " in text, f"{n} missing from --help-notebook:\n{text}"


GOOD = {"05_limit.ipynb": {"noise": 0.8}, "06_sln.ipynb": {"seeds": 2}, "07_dmi.ipynb": {"case": [1, 2, 3]},
        "08_cdr_aux.ipynb": {"seeds": 2}, "10_benchmarks.ipynb": {"reps": 2, "stack_sizes": [1, 8]}}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_parameters_pass_the_check(name, tmp_path):
    "The defaults plus a valid override pass the check cell (run on the notebook cut right after it)."
    nb = json.loads((NBS / name).read_text())
    _, k = _param_cells(nb)
    nb["cells"] = nb["cells"][:k + 1]
    cut = tmp_path / f"head_{name}"; cut.write_text(json.dumps(nb))
    pm.execute_notebook(str(cut), str(tmp_path / "out.ipynb"), parameters=GOOD[name], cwd=str(NBS), kernel_name="python3", progress_bar=False)


def _out_name_via_papermill(name: str, params: dict, tmp_path) -> str:
    "The output folder name a notebook derives for `params`: papermill runs its parameters and check cells, then asks `out_name`."
    nb = json.loads((NBS / name).read_text())
    _, k = _param_cells(nb)
    probe = {"cell_type": "code", "id": "probe000", "metadata": {}, "execution_count": None, "outputs": [],
             "source": ["from noisyrepro.core import out_name, parameter_defaults\n",
                        "print('OUT_NAME=' + out_name(scale if 'scale' in PARAMS else 'quick', PARAMS, parameter_defaults(In, PARAMS)))"]}
    nb["cells"] = nb["cells"][:k + 1] + [probe]
    cut = tmp_path / f"probe_{name}"; cut.write_text(json.dumps(nb))
    out = tmp_path / f"probe_out_{len(list(tmp_path.iterdir()))}.ipynb"
    pm.execute_notebook(str(cut), str(out), parameters=params, cwd=str(NBS), kernel_name="python3", progress_bar=False)
    text = "".join("".join(o.get("text", "")) for o in json.loads(out.read_text())["cells"][-1]["outputs"])
    return re.search(r"OUT_NAME=(\S+)", text).group(1)


@pytest.mark.parametrize("name,a,b", [("05_limit.ipynb", {"noise": 0.5}, {"noise": 0.8}),
                                      ("08_cdr_aux.ipynb", {"noise_type": "pairflip", "noise": 0.4}, {"noise_type": "pairflip", "noise": 0.7})])
def test_outputs_are_named_by_the_parameters_that_differ(name, a, b, tmp_path):
    "`-p noise 0.5` then `-p noise 0.8` write two folders, not one overwritten (issue 14); the defaults keep the plain scale name."
    na, nb_, n0 = (_out_name_via_papermill(name, p, tmp_path) for p in (a, b, {}))
    assert n0 == "quick", n0
    assert na != nb_ and nb_ != n0, (na, nb_, n0)                     # (05's default noise is 0.5: `-p noise 0.5` is the default folder)
    assert _out_name_via_papermill(name, b | {"device": "cpu"}, tmp_path) == nb_, "the device does not change results, nor the folder"
    how = {"stack": 4, "ckpt_every": 5, "eval_test": "best"}                      # how runs train, not what they record
    assert _out_name_via_papermill(name, b | how, tmp_path) == nb_, "stacking and checkpoint options do not change the folder"
