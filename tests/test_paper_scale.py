"""The device script of issue 13 (.ci/device_paper.sh) and the estimates of nbs/11_paper_scale.ipynb: the script parses, each of
its papermill commands (the stacked default set and the unstacked fallbacks) uses only parameters of its notebook, among them
stack/ckpt_every/eval_test, and passes that notebook's check cell, its overrides pass `Protocol.at("paper", ...)` (through the
notebook's own mapping cells), CI never calls it, the notebook's stack plan is `stack_units`'s, and the FLOP and kernel
counters give known counts."""
import ast, json, shlex, subprocess
from pathlib import Path
import papermill as pm
import pytest
import torch, torch.nn as nn
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
NBS, SCRIPT, NB = ROOT / "nbs", ROOT / ".ci" / "device_paper.sh", ROOT / "nbs" / "11_paper_scale.ipynb"


def _resolve(v: str):
    "A `-p` value as papermill's CLI resolves it."
    if v in ("True", "False", "None"): return {"True": True, "False": False, "None": None}[v]
    for t in (int, float):
        try: return t(v)
        except ValueError: pass
    return v


def _commands() -> list[dict]:
    "The `run NAME EST_S papermill NB OUT -p ... -y ...` and `fallback NAME FOR EST_S papermill ...` lines of the script, parsed independently of the notebook."
    out = []
    for line in SCRIPT.read_text().splitlines():
        w = shlex.split(line, comments=True)
        if "papermill" not in w: continue
        fb = w[0] == "fallback"
        assert w[0] in ("run", "fallback") and w[4 if fb else 3] == "papermill", line
        if fb: w = w[:2] + w[3:]                                    # drop FOR, kept below
        nb, params, i = Path(w[4]).stem, {}, 6
        while i < len(w):
            if w[i] == "-p": params[w[i + 1]] = _resolve(w[i + 2]); i += 3
            elif w[i] == "-y": params |= yaml.safe_load(w[i + 1]); i += 2
            else: raise AssertionError(f"unexpected word {w[i]!r} in {line}")
        out.append({"name": w[1], "fallback_for": shlex.split(line)[2] if fb else None, "est_s": int(w[2]), "notebook": nb, "output": w[5], "params": params})
    return out


def _param_cell(nb: str) -> dict:
    "The names and defaults of a notebook's parameters cell."
    cells = json.loads((NBS / f"{nb}.ipynb").read_text())["cells"]
    src = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])
    return {t.id: ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.Assign) for t in n.targets}


def test_script_parses_and_ci_never_calls_it():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and "timeout" in text
    assert "device_paper" not in (ROOT / ".ci" / "run").read_text()


def test_script_has_one_stacked_command_and_one_fallback_per_paper_with_device_and_out_dir():
    cmds = _commands()
    assert [c["notebook"] for c in cmds] == ["05_limit"] * 2 + ["07_dmi"] * 2 + ["06_sln"] * 2 + ["08_cdr_aux"] * 2, cmds
    assert [c["name"] for c in cmds] == [n for m in ("limit", "dmi", "sln", "cdr") for n in (m, m + "_small")]
    assert len({c["output"] for c in cmds}) == len(cmds)                                   # no two commands write one notebook
    for c in cmds:
        p = c["params"]
        assert p["device"] == "cuda" and p["out_dir"] == f"outputs/{c['notebook']}/paper_gpu", p
        assert c["output"].startswith(p["out_dir"] + "/") and 0 < c["est_s"] <= 600, c
        if c["fallback_for"]: assert c["name"] == c["fallback_for"] + "_small" and not {"stack", "ckpt_every", "eval_test"} & set(p), c
        else: assert p.get("eval_test") == "best" and "ckpt_every" in p, c
    assert sum(c["params"].get("stack", 1) > 1 for c in cmds) >= 3                          # the default set is stacked where stacking helps


def test_script_fallback_runs_after_a_failure_but_not_after_a_timeout(tmp_path):
    "The script's `fallback` logic, run with a fake `start` (bash): a failed stacked command brings its fallback, a timeout (124) does not."
    text = SCRIPT.read_text()
    body = text[text.index("# run NAME EST_S papermill"):text.index("# 1. LIMIT")]
    script = tmp_path / "t.sh"
    assert "run()" in body and "fallback()" in body and "start() {" not in body
    script.write_text("set -euo pipefail\ndeclare -A RC=()\nWANT=' a b '\nlog() { :; }\nstart() { echo \"start $1\"; RC[$1]=${FAKE_RC[$1]:-0}; }\n" + body +
                      "declare -A FAKE_RC=([a]=1 [b]=124)\nrun a 1 x\nfallback a_small a 1 x\nrun b 1 x\nfallback b_small b 1 x\nrun c 1 x\nfallback c_small c 1 x\n")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stdout.splitlines() if l.startswith("start")] == ["start a", "start a_small", "start b"], r.stdout


def test_every_parameter_is_in_its_notebooks_parameters_cell():
    for c in _commands():
        names = _param_cell(c["notebook"])
        bad = sorted(set(c["params"]) - set(names))
        assert not bad, f"{c['name']}: {bad} are not parameters of nbs/{c['notebook']}.ipynb ({', '.join(names)})"
        assert names["out_dir"] is None and names["device"] == "auto"          # each notebook takes out_dir and device
        assert (names["stack"], names["ckpt_every"], names["eval_test"]) == (1, 1, "every")   # the cost options, off by default


def _cut_after_check(nb_path: Path, tmp_path: Path) -> Path:
    nb = json.loads(nb_path.read_text())
    k = next(i for i, c in enumerate(nb["cells"]) if "check-parameters" in c["metadata"].get("tags", []))
    nb["cells"] = nb["cells"][:k + 1]
    cut = tmp_path / f"head_{nb_path.name}"; cut.write_text(json.dumps(nb))
    return cut


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: c["name"])
def test_command_passes_its_notebooks_check_cell(cmd, tmp_path):
    "The notebook's own check cell accepts the command's values (device cuda replaced by cpu: no GPU here)."
    params = cmd["params"] | {"device": "cpu", "out_dir": str(tmp_path / "o")}
    pm.execute_notebook(str(_cut_after_check(NBS / f"{cmd['notebook']}.ipynb", tmp_path)), str(tmp_path / "out.ipynb"),
                        parameters=params, cwd=str(NBS), kernel_name="python3", progress_bar=False)


def _notebook_functions() -> dict:
    "The mapping cells of nbs/11_paper_scale.ipynb (parameters -> protocols, and the script parser), executed in a fresh namespace."
    import noisyrepro.cdr_aux as cdr, noisyrepro.dmi as dmi, noisyrepro.limit as limit, noisyrepro.sln as sln
    from noisyrepro.experiment import NOISE
    ns = {"ast": ast, "json": json, "shlex": shlex, "yaml": yaml, "Path": Path, "ROOT": ROOT, "SCRIPT": SCRIPT, "NOISE": NOISE}
    for mod in (limit, sln, dmi, cdr): ns |= {k: getattr(mod, k) for k in mod.__all__}
    cells = ["".join(c["source"]) for c in json.loads(NB.read_text())["cells"] if c["cell_type"] == "code"]
    from noisyrepro.experiment import expand, stack_units
    ns |= {"expand": expand, "stack_units": stack_units}
    for head in ("def nb_parameters", "def limit_protocols", "def command_runs"):
        exec(next(s for s in cells if s.startswith(head)), ns)
    return ns


def test_overrides_pass_protocol_at_paper_through_the_notebooks_mapping():
    ns = _notebook_functions()
    assert [{k: v for k, v in c.items() if k != "output"} for c in _commands()] == ns["script_commands"]()   # both parsers agree
    for c in _commands():
        Ps = ns["protocols_of"](c["notebook"], c["params"])
        assert Ps and all(P.scale == ("quick" if c["notebook"] == "06_sln" else "paper") for P in Ps), c   # SLN: the MNIST stand-in
        if c["notebook"] != "06_sln":
            for P in Ps: P.at("paper")                                                                   # and the preset itself checks
    limit = next(c for c in _commands() if c["notebook"] == "05_limit")
    with pytest.raises(ValueError, match="noise rate 1.5"): ns["protocols_of"]("05_limit", limit["params"] | {"noise": [1.5]})
    with pytest.raises(ValueError, match="unknown parameter"): ns["protocols_of"]("05_limit", {"seedz": 1})


def test_work_units_are_stack_units_and_wait_for_their_bases():
    "The notebook's plan of stacks: every run once, one signature and at most K per stack, a DMI run after the CE-DMI run it starts from."
    from noisyrepro.experiment import stack_signature_of
    ns = _notebook_functions()
    (name, runs), = ns["command_runs"]("07_dmi", dict(scale="paper", experiment="fmnist", case=1, seeds=2, noise=[0.0, 0.4, 0.7]))
    assert any(r.needs for r in runs)
    for K in (1, 3, 64):
        units = ns["work_units"](runs, K, set())
        where = {r.key: i for i, u in enumerate(units) for r in u}
        assert sorted(where) == sorted(r.key for r in runs) and sum(map(len, units)) == len(runs)
        assert all(len(u) <= K and len({stack_signature_of(r) for r in u}) == 1 for u in units)
        assert all(where[r.needs[1]] < where[r.key] for r in runs if r.needs)
        if K == 64: assert sorted(map(len, units)) == sorted(map(len, ns["stack_units"](runs, 64)))   # no base outside: the stacks stay whole
    assert ns["curve_methods"]("06_sln", {}) == {"CE", "SLN", "SLN-MO", "SLN-MO-LC"} and ns["curve_methods"]("05_limit", {}) == set()


def test_bad_estimate_parameters_fail_in_the_check_cell(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as ei:
        pm.execute_notebook(str(_cut_after_check(NB, tmp_path)), str(tmp_path / "out.ipynb"), parameters={"mfu": 2.0, "stak": [4]},
                            cwd=str(NBS), kernel_name="python3", progress_bar=False)
    assert "mfu=2.0: valid" in ei.value.evalue and "unknown parameter stak" in ei.value.evalue, ei.value.evalue


def test_flop_counter_counts_a_linear_layer():
    "One Linear layer: 2·in·out FLOPs per example forward (bias adds are not counted), and 3x that for a training step."
    lin, x = nn.Linear(20, 30), torch.randn(5, 20, requires_grad=True)
    with FlopCounterMode(display=False) as fc: lin(x)
    assert fc.get_total_flops() == 2 * 20 * 30 * 5
    with FlopCounterMode(display=False) as fc: lin(x).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * 20 * 30 * 5                       # forward, grad of input, grad of weight


def test_notebook_forward_flops_and_kernel_count():
    "The notebook's `forward_flops` and `kernel_ops` on cases whose counts are known."
    src = next("".join(c["source"]) for c in json.loads(NB.read_text())["cells"] if "def kernel_ops" in "".join(c["source"]))
    src = src.split("\n_ckdir")[0].replace('_base = load_dataset("mnist5k")', "_base = None")    # the helpers only, no data
    ns = {}
    exec("import dataclasses, os, torch\nfrom torch.utils.flop_counter import FlopCounterMode\nfrom torch.profiler import profile, ProfilerActivity\n"
         "load_dataset = subset = None\n" + src, ns)
    assert ns["forward_flops"](nn.Linear(20, 30), torch.randn(4, 20)) == 2 * 20 * 30
    x, y = torch.randn(8, 8), torch.randn(64)
    assert ns["kernel_ops"](lambda: torch.relu(x.view(64) + y)) == 2               # add, relu; the view launches nothing
    assert ns["kernel_ops"](lambda: x.t().reshape(4, 16).unsqueeze(0)) == 1        # the reshape of a transposed tensor copies
    ts = [torch.zeros(3) for _ in range(5)]
    assert ns["kernel_ops"](lambda: torch._foreach_add_(ts, 1.0)) == 1             # a multi-tensor op: one launch on CUDA, not one per tensor
