"""A new user's short run, through papermill (issue 14): each paper notebook's experiment half with `-p epochs 2` and small
data finishes, its claim checks say `skipped: ...` instead of failing, provenance, results, tables and the scorecard are
written (to this run's folders, never the repository's `outputs/`), and the same command again trains nothing.

The theory half is left out to keep CI short (`nbdev_test` runs it): the cut notebook is the parameters cell, the check cell,
the paper module's names, and every cell from `## Experiments` on, unchanged."""
import json, re
from pathlib import Path
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
src = lambda c: "".join(c["source"])

# notebook -> (its module, papermill parameters of a short run)
SMOKE = {
    "06_sln.ipynb": ("noisyrepro.sln", {"epochs": 2, "n_train": 200, "val": 50}),
    "07_dmi.ipynb": ("noisyrepro.dmi", {"epochs": 1, "n_train": 300}),
    "05_limit.ipynb": ("noisyrepro.limit", {"epochs": 2}),
    "08_cdr_aux.ipynb": ("noisyrepro.cdr_aux", {"epochs": 1, "noise_type": "pairflip", "noise": 0.4, "seeds": 1, "lambdas": 3.0,
                                                "methods": ["SGD", "CDR+AUX"], "compare_rules": False}),
}


def _cut(name: str, module: str, dest: Path) -> Path:
    "The notebook cut to parameters, check, the module's names and the experiment half."
    nb = json.loads((NBS / name).read_text()); cells = nb["cells"]
    tag = lambda i, t: t in cells[i].get("metadata", {}).get("tags", [])
    k = next(i for i in range(len(cells)) if tag(i, "check-parameters"))
    e = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and src(c).startswith("## Experiments"))
    imports = [l + "\n" for c in cells[k + 1:e] if c["cell_type"] == "code" for l in src(c).splitlines()   # the theory half's imports
               if l.startswith(("import ", "from ")) and "__future__" not in l]
    head = {"cell_type": "code", "id": "smokehd0", "metadata": {}, "execution_count": None, "outputs": [],
            "source": [f"import {module} as _m\n", "globals().update({k: v for k, v in vars(_m).items() if not k.startswith('__')})\n",
                       *dict.fromkeys(imports)]}
    nb["cells"] = cells[:k + 1] + [head] + cells[e:]
    dest.write_text(json.dumps(nb)); return dest


def _outputs_text(path: Path) -> str:
    "Everything the executed notebook printed."
    return "".join("".join(o.get("text", "")) for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", []))


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_short_run_skips_claims_writes_provenance_and_resumes(name, tmp_path, monkeypatch):
    monkeypatch.delenv("IN_TEST", raising=False)                        # a user's run, not nbdev_test's smoke configuration
    module, params = SMOKE[name]
    cut, out = _cut(name, module, tmp_path / f"cut_{name}"), tmp_path / "out"
    run = lambda i: pm.execute_notebook(str(cut), str(tmp_path / f"run{i}.ipynb"), parameters=params | {"out_dir": str(out)},
                                        cwd=str(tmp_path), kernel_name="python3", progress_bar=False)
    run(1)
    text = _outputs_text(tmp_path / "run1.ipynb")
    assert re.search(rf"skipped: .*needs? .*\b{params['epochs']}\b", text), "a claim check did not say why it was skipped:\n" + text[-3000:]
    for f in ("provenance.json", "results.csv"): assert (out / f).exists(), f
    assert list(out.glob("*.md")) and list(out.glob("*.png")), "no table was rendered"
    assert json.loads((out / "provenance.json").read_text())["git_commit"]
    assert (tmp_path / "outputs" / "SCORECARD.md").exists(), "the scorecard goes to the run's own outputs/, not the repository's"
    rows = (out / "results.csv").read_text()
    run(2)
    assert (out / "results.csv").read_text() == rows, "the same command again trained (and recorded) runs"
