"""Stacked runs (noisyrepro.stack) against the same runs alone: the paper methods the notebook does not cover (L_DMI from a
CE state, dropout, BatchNorm under vmap, a step without gradient), checkpoints shared with `fit`, and stacked sweeps with
worker processes. The notebook nbs/04d_stack.ipynb checks CE, LIMIT, SLN-MO and CDR+AUX."""
import dataclasses

import pytest
import torch

import noisyrepro.dmi  # noqa: F401  (registers DMI)
from noisyrepro.experiment import Protocol, expand, stack_units, sweep
from noisyrepro.data import load_dataset
from noisyrepro.models import get_model
from noisyrepro.results import read_rows
from noisyrepro.splits import noisy_splits
from noisyrepro.stack import fit_stack
from noisyrepro.train import Method, TrainConfig, fit, get_method

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def data():
    return [noisy_splits("mnist5k", "symmetric", 0.4, n_train=250, val=128, seed=s) for s in SEEDS]


def _cfgs(**kw):
    return [TrainConfig(**({"epochs": 2, "batch_size": 64, "lr": 1e-3, "seed": s, "device": "cpu", "progress": False} | kw)) for s in SEEDS]


def _both(data, model, method, cfgs, mode, hp=lambda k: {}, ckpts=None, classes=10):
    "The runs alone (fit) and stacked (fit_stack in `mode`)."
    alone = [fit(get_model(model, classes, seed=c.seed), d.train, d.val, d.test, get_method(method, **hp(k)), c)
             for k, (d, c) in enumerate(zip(data, cfgs))]
    stacked = fit_stack([get_model(model, classes, seed=c.seed) for c in cfgs], [d.train for d in data], [d.val for d in data],
                        [d.test for d in data], methods=[get_method(method, **hp(k)) for k in range(len(cfgs))], cfgs=cfgs,
                        ckpts=ckpts, mode=mode)
    return alone, stacked


def _assert_same(alone, stacked, tol=0.0):
    for a, s in zip(alone, stacked, strict=True):
        assert (a.best_epoch, a.epochs_run, a.status, a.selection) == (s.best_epoch, s.epochs_run, s.status, s.selection)
        for ha, hs in zip(a.history, s.history, strict=True):
            for k in ha.keys() - {"seconds"}:
                assert abs(ha[k] - hs[k]) <= tol, (k, ha[k], hs[k])
        for k, v in a.best_state.items():
            assert torch.allclose(v.float(), s.best_state[k].float(), atol=tol, rtol=0), (k, (v.float() - s.best_state[k].float()).abs().max())


def test_dropout_is_each_members_own_in_loop_mode(data):
    "The L_DMI Fashion-MNIST CNN has dropout 0.5: each member draws its masks from its own RNG state, as alone."
    _assert_same(*_both(data, "dmi_fmnist_cnn", "CE", _cfgs(), "loop"))


def _binary(d):
    "MNIST digits < 5 vs >= 5: L_DMI's determinant is well away from 0 for 2 classes (with 10, |det U| ~ 1e-20 < the scripts' eps)."
    return dataclasses.replace(d, y=(d.y >= 5).long(), classes=["0-4", "5-9"])


@pytest.fixture(scope="module")
def binary():
    full, test = load_dataset("mnist5k"), load_dataset("mnist5k", "test")
    return [noisy_splits(_binary(full), "symmetric", 0.3, n_train=250, val=128, seed=s, test=_binary(test)) for s in SEEDS]


@pytest.fixture(scope="module")
def ce_states(binary):
    return [fit(get_model("lenet", 2, seed=c.seed), d.train, d.val, None, "CE", c).best_state for d, c in zip(binary, _cfgs(epochs=2))]


def test_dmi_from_ce_states_loop_mode_exact(binary, ce_states):
    "L_DMI: each member's own batch determinant, started from its own CE state, the optimizer reset each epoch, its own selection."
    alone, stacked = _both(binary, "lenet", "DMI", _cfgs(), "loop", hp=lambda k: {"ce_state": ce_states[k], "include_start": False}, classes=2)
    _assert_same(alone, stacked)
    moved = max((v - ce_states[0][k]).abs().max().item() for k, v in alone[0].best_state.items())
    assert moved > 1e-3, f"L_DMI did not train (weights moved by {moved}): the check would be empty"


class SkipOdd(Method):
    "CE, except that the run with seed 1 has no loss (no gradient, no step) on odd steps, as L_DMI on a batch it skips."
    name = "CE"
    def loss(self, tr, logits, y, idx, x):
        if tr.cfg.seed == 1 and tr.step % 2 == 1: return torch.zeros((), requires_grad=True)
        return super().loss(tr, logits, y, idx, x)


def test_a_member_without_gradient_takes_no_step_in_vmap_mode(data):
    """In a vmap stack a member whose loss ignores its outputs still gets a zero gradient through the stacked output (the other
    members use it); the stack must drop it, else SGD's momentum moves that member's weights on steps it skipped."""
    cfgs = _cfgs(optimizer="sgd", lr=0.05, epochs=1)
    alone = [fit(get_model("lenet", 10, seed=c.seed), d.train, d.val, d.test, SkipOdd(), c) for d, c in zip(data, cfgs)]
    stacked = fit_stack([get_model("lenet", 10, seed=c.seed) for c in cfgs], [d.train for d in data], [d.val for d in data],
                        [d.test for d in data], methods=[SkipOdd() for _ in cfgs], cfgs=cfgs, mode="vmap")
    _assert_same(alone, stacked, tol=1e-4)


def test_batchnorm_statistics_per_member_in_vmap_mode(data):
    "LIMIT's MLP has BatchNorm after every layer: each member's running statistics, hence its eval-mode accuracy, as alone."
    cfgs = _cfgs(optimizer="sgd", lr=0.05, epochs=2)
    alone, stacked = _both(data, "limit_mlp", "CE", cfgs, "vmap")
    _assert_same(alone, stacked, tol=1e-4)
    assert any("running_mean" in k for k in alone[0].best_state)


def test_a_stacked_members_checkpoint_finishes_alone(data, tmp_path):
    "Checkpoints are fit's: a stack killed after epoch 1 can be finished run by run with `fit`, and equals the runs never stopped."
    cfgs = _cfgs(epochs=3)

    class Stop(Exception): pass

    def killer():
        m = get_method("CE")
        m.start_epoch = lambda tr, epoch: (_ for _ in ()).throw(Stop()) if epoch == 1 else None
        return m
    ckpts = [tmp_path / f"{k}.pt" for k in range(3)]
    with pytest.raises(Stop):
        fit_stack([get_model("lenet", 10, seed=c.seed) for c in cfgs], [d.train for d in data], [d.val for d in data],
                  [d.test for d in data], methods=[killer() for _ in cfgs], cfgs=cfgs, ckpts=ckpts)
    finished = [fit(get_model("lenet", 10, seed=c.seed), d.train, d.val, d.test, "CE", c, ckpt=ck) for d, c, ck in zip(data, cfgs, ckpts)]
    never = [fit(get_model("lenet", 10, seed=c.seed), d.train, d.val, d.test, "CE", c) for d, c in zip(data, cfgs)]
    _assert_same(never, finished)


def test_stacked_sweep_with_two_workers_matches_unstacked(tmp_path):
    "Two worker processes, stacks of 2: every run recorded once, with the numbers of the unstacked sweep (loop mode: exact)."
    P = Protocol("stacktest", paper="CDR+AUX", module="noisyrepro.train", dataset="mnist5k", model="lenet", methods=("CE",),
                 settings=(("symmetric", 0.2), ("symmetric", 0.5)), seeds=(1, 2), n_train=(200,),
                 train=dict(epochs=2, batch_size=64, lr=1e-3, progress=False), splits=dict(val=0.1),
                 presets={"quick": {}}).at("quick")
    assert [len(u) for u in stack_units(expand(P), 2)] == [2, 2]
    a = sweep(P, tmp_path / "a", progress=False)
    b = sweep(P, tmp_path / "b", progress=False, workers=2, stack=2)
    assert b.trained == 4 and sorted(r["run_key"] for r in read_rows(tmp_path / "b" / "results.csv")) == sorted(a.rows.run_key)
    cols = ["val_acc", "test_acc", "last_test_acc", "best_epoch"]
    assert b.rows.set_index("run_key").loc[a.rows.run_key, cols].values.tolist() == a.rows[cols].values.tolist()


def test_ema_models_are_evaluated_stacked_in_vmap_mode(data):
    "SLN-MO evaluates each member's EMA of the weights; in vmap mode they are stacked read-only for val and test (and raw_test_acc)."
    import noisyrepro.sln  # noqa: F401  (registers SLN-MO)
    cfgs = _cfgs(ema=0.9, epochs=1)
    alone, stacked = _both(data, "lenet", "SLN-MO", cfgs, "vmap", hp=lambda k: {"sigma": 0.5})
    for a, s in zip(alone, stacked):
        for k in ("train_loss", "val_acc", "test_acc", "raw_test_acc"):
            assert abs(a.history[0][k] - s.history[0][k]) <= 1e-4, (k, a.history[0][k], s.history[0][k])
