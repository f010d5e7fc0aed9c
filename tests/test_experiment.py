"""The sweep engine under real processes (issue 12): a sweep killed with SIGKILL at any moment and restarted loses nothing
that was recorded and re-runs at most what was in flight; two sweeps started at once on one folder record each run once;
worker pools; Ray when it is installed. The data are the offline MNIST subset (`mnist5k`, real MNIST images)."""
import fcntl, json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
from noisyrepro.core import read_rows
from noisyrepro.experiment import Protocol, expand, sweep

ROOT = Path(__file__).resolve().parent.parent

# six CE runs of a few seconds each on one core
PROTO = dict(name="killtest", paper="CDR+AUX", module="noisyrepro.train", dataset="mnist5k", model="lenet", methods=("CE",),
             settings=(("symmetric", 0.3),), seeds=(1, 2, 3, 4, 5, 6), n_train=(1500,), splits={"val": 0.1},
             train={"epochs": 6, "batch_size": 64, "lr": 1e-3, "progress": False})

DRIVER = textwrap.dedent("""
    import json, sys
    from noisyrepro.experiment import Protocol, sweep
    p = Protocol(**json.loads(sys.argv[1]))
    sweep(p, sys.argv[2], workers=int(sys.argv[3]), progress=False)
""")


def _start(out, workers: int) -> subprocess.Popen:
    "A sweep in its own process group (so a test can SIGKILL the driver and its workers at once); stderr captured."
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(PROTO), str(out), str(workers)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _keys(out) -> list[str]: return [r["run_key"] for r in read_rows(Path(out) / "results.csv")]


def _log(text: str, what: str) -> list[str]:
    "Run keys of the '[noisyrepro] <what> ...' lines of a sweep's stderr."
    return re.findall(rf"\[noisyrepro\] {what} .* run (\w+)", text)


def _held(out) -> set[str]:
    "Run keys whose lease another process holds right now."
    held = set()
    for f in Path(out).glob("runs/*/lease"):
        with open(f) as h:
            try: fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.flock(h, fcntl.LOCK_UN)
            except BlockingIOError: held.add(f.parent.name)
    return held


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_then_restart_loses_nothing(tmp_path, workers):
    out = tmp_path / "sweep"
    p = _start(out, workers)
    t0 = time.time()
    while len(_keys(out)) < 2 or not list(out.glob("runs/*/ckpt.pt")):   # two runs recorded and one run part-trained
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 300, "the sweep did not get going"
        time.sleep(0.2)
    recorded = {r["run_key"]: r for r in read_rows(out / "results.csv")}
    in_flight = _held(out) | {c.parent.name for c in out.glob("runs/*/ckpt.pt")}
    os.killpg(p.pid, signal.SIGKILL)                                      # the driver and every worker, mid-run
    _, err1 = p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert in_flight - set(recorded), "nothing was in flight at the kill; the test did not test a kill mid-run"

    q = _start(out, workers)
    _, err2 = q.communicate(timeout=600)
    assert q.returncode == 0, err2
    keys = _keys(out)
    all_keys = {r.key for r in expand(Protocol(**PROTO))}
    assert sorted(keys) == sorted(all_keys), "every run recorded exactly once"
    rows = {r["run_key"]: r for r in read_rows(out / "results.csv")}
    for k, r in recorded.items(): assert rows[k] == r, "a recorded row changed"
    trained_again = set(_log(err2, "finished"))
    assert not trained_again & set(recorded), "a recorded run was trained again"
    assert set(_log(err2, "resuming")) <= in_flight | set(_log(err1, "resuming")), "only runs with a checkpoint resume"
    assert set(_log(err2, "resuming")) & in_flight, "the run killed mid-run did not resume from its checkpoint"
    assert trained_again == all_keys - set(recorded)


def test_two_sweeps_at_once_record_each_run_once(tmp_path):
    out = tmp_path / "sweep"
    a, b = _start(out, 1), _start(out, 1)
    (_, ea), (_, eb) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (ea[-2000:], eb[-2000:])
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 6
    fa, fb = _log(ea, "finished"), _log(eb, "finished")
    assert sorted(fa + fb) == sorted(keys), "each run trained by exactly one of the two sweeps"
    assert fa and fb, "both sweeps did part of the work"


def test_worker_failure_is_reported_and_recorded_runs_kept(tmp_path):
    "A run that fails in a worker (here: more training examples than mnist5k has) fails the sweep naming the worker's exit code; the good run stays recorded."
    good = Protocol(**(PROTO | {"seeds": (1,), "train": PROTO["train"] | {"epochs": 1}}))
    bad = Protocol(**(PROTO | {"seeds": (1,), "n_train": (1500, 10**7), "train": PROTO["train"] | {"epochs": 1}}))
    sweep(good, tmp_path / "sweep", progress=False)
    with pytest.raises(RuntimeError, match="worker 0 exit code 1.*1 of 2 runs are recorded.*run the sweep again to continue"):
        sweep(bad, tmp_path / "sweep", workers=2, progress=False)
    assert _keys(tmp_path / "sweep") == [r.key for r in expand(good)]


def test_ray_backend_matches_local(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' to test backend='ray'")
    p = Protocol(**(PROTO | {"seeds": (1, 2), "train": PROTO["train"] | {"epochs": 2}}))
    local = sweep(p, tmp_path / "local", progress=False).rows.set_index("run_key")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}})
    try: remote = sweep(p, tmp_path / "ray", backend="ray", progress=False).rows.set_index("run_key")
    finally: ray.shutdown()
    assert sorted(remote.index) == sorted(local.index)
    for k in local.index: assert abs(remote.test_acc[k] - local.test_acc[k]) < 0.005, (k, remote.test_acc[k], local.test_acc[k])
    again = sweep(p, tmp_path / "ray", backend="ray", progress=False)
    assert again.trained == 0


def test_one_worker_killed_the_others_finish_its_run(tmp_path):
    "SIGKILL one worker of two mid-run: its lease dies with it, the other worker resumes that run from its checkpoint and finishes the plan; the driver then reports the dead worker."
    out = tmp_path / "sweep"
    p = _start(out, 2)
    t0 = time.time()
    victim = None
    while victim is None:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 300, "the sweep did not get going"
        for ck in out.glob("runs/*/ckpt.pt"):                             # a run with at least one epoch done, still leased
            if ck.parent.name in _held(out):
                victim = (ck.parent.name, json.loads((ck.parent / "lease").read_text())["pid"]); break
        time.sleep(0.2)
    key, pid = victim
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0 and "exit code -9" in err and "run the sweep again to continue" in err, err[-3000:]
    keys = _keys(out)
    assert sorted(keys) == sorted(r.key for r in expand(Protocol(**PROTO))), "the surviving worker finished every run, each once"
    assert key in _log(err, "resuming"), "the killed worker's run was resumed from its checkpoint"


def test_worker_pool_keeps_fit_results_for_figures(tmp_path):
    "keep_result works with workers > 1: the workers save the FitResults and the driver returns them (and again on a re-run)."
    p = Protocol(**(PROTO | {"seeds": (1, 2), "train": PROTO["train"] | {"epochs": 2}}))
    s = sweep(p, tmp_path, workers=2, keep_result=("CE",), progress=False)
    assert s.trained == 2 and sorted(s.results) == sorted(r.key for r in expand(p))
    assert all(len(r.history) == 2 for r in s.results.values())
    again = sweep(p, tmp_path, workers=2, keep_result=("CE",), progress=False)
    assert again.trained == 0 and [again.results[k].history for k in sorted(again.results)] == [s.results[k].history for k in sorted(s.results)]
