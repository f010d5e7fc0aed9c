"""Contracts of noisyrepro.dmi (source: nbs/07_dmi.ipynb): DMI theory helpers, the loss, the L_DMI methods, the splits.

CIFAR-10, Dogs vs. Cats and Clothing1M are not on this machine, so their code paths run end to end on small SYNTHETIC
files that these tests write into a temporary folder (random pixels, named synthetic). The numbers mean nothing; the
tests check that every step of the protocol runs and records what it promises.
"""
import copy, itertools, math
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from noisyrepro.data import LabeledData
from noisyrepro.limit import dmi_limit_loss
from noisyrepro.models import get_model
from noisyrepro.results import best_state, load_results, run_experiment
from noisyrepro.train import Trainer, TrainConfig, fit, get_method
from noisyrepro.dmi import (DMI, DMI_PROTOCOL, CEDMI, channel_joint, classifier_joint, dmi, dmi_grad_U, dmi_loss, dmi_matrix,
                            dmi_method_hparams, dmi_model, dmi_splits, dmi_train_config, hadamard_bound, l_dmi, load_ce_state,
                            random_joint, random_transition, shannon_mi)
from test_data import make_synthetic_cifar, _write_jpg

G = lambda s=0: torch.Generator().manual_seed(s)


# ---------------------------------------------------------------- theory helpers
def test_dmi_properties_and_relative_invariance():
    Q, T = random_joint(3, G(0), n=200), random_transition(3, G(1), n=200)
    assert (dmi(Q) > 0).all()
    torch.testing.assert_close(dmi(Q.transpose(-2, -1)), dmi(Q))
    indep = Q.sum(-1)[:, :, None] * Q.sum(-2)[:, None, :]
    assert dmi(indep).max() < 1e-16 and shannon_mi(indep).abs().max() < 1e-14
    torch.testing.assert_close(dmi(channel_joint(Q, T)), dmi(Q) * torch.linalg.det(T).abs())      # Lemma 3.5
    assert (torch.linalg.det(T).abs() <= hadamard_bound(T) + 1e-12).all() and (hadamard_bound(T) <= 1 + 1e-12).all()
    perms = torch.stack([torch.eye(3, dtype=torch.float64)[list(p)] for p in itertools.permutations(range(3))])
    torch.testing.assert_close(torch.linalg.det(perms).abs(), torch.ones(6, dtype=torch.float64))


def test_theorem_41_shift_is_minus_log_det_T():
    K, C = 9, 3
    P = torch.full((K,), 1 / K, dtype=torch.float64)[:, None] * F.one_hot(torch.arange(K) % C, C).double()
    T = random_transition(C, G(2), sharpness=2.0)
    h = random_transition(K, G(3), n=50)[..., :C]; h = h / h.sum(-1, keepdim=True)              # 50 random K×C classifiers
    shift = l_dmi(classifier_joint(h, P, T)) - l_dmi(classifier_joint(h, P))
    alpha = -torch.log(torch.linalg.det(T).abs())
    torch.testing.assert_close(shift, alpha.expand(50))
    assert alpha > 0                                              # the printed proof's +log|det T| has the wrong sign


def test_dmi_matrix_orientation_and_normalisation():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.float64); y = torch.tensor([0, 1, 1])
    U = dmi_matrix(probs, y, normalize=False)
    torch.testing.assert_close(U, torch.tensor([[0.9, 0.8], [0.1, 1.2]], dtype=torch.float64))  # rows: output, cols: label
    torch.testing.assert_close(dmi_matrix(probs, y), U / 3)


# ---------------------------------------------------------------- the loss
def test_dmi_loss_values_invariance_and_limit_equivalence():
    y = torch.tensor([0, 0, 1, 2, 2, 2]); perfect = 50. * F.one_hot(y, 3).float()
    assert math.isclose(dmi_loss(perfect, y).item(), -math.log(6 + 1e-3), rel_tol=1e-5)
    assert math.isclose(dmi_loss(perfect[:, [1, 2, 0]], y).item(), dmi_loss(perfect, y).item(), rel_tol=1e-6)
    assert math.isclose(dmi_loss(torch.zeros(6, 3), y).item(), -math.log(1e-3), rel_tol=1e-6)
    a = torch.randn(6, 3, generator=G(4), requires_grad=True); b = a.detach().clone().requires_grad_()
    dmi_loss(a, y).backward(); dmi_limit_loss(b, y).backward()
    torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="valid: B×C logits and B labels"): dmi_loss(torch.zeros(6, 3), y[:4])


def test_gradient_is_minus_U_inverse_transpose_and_singular_batches_give_zero():
    U = (random_joint(3, G(5)) * 50).requires_grad_()
    (-torch.log(torch.linalg.det(U).abs())).backward()
    torch.testing.assert_close(U.grad, -torch.linalg.inv(U.detach()).T)
    torch.testing.assert_close(dmi_grad_U(U.detach()), -torch.linalg.inv(U.detach()).T)
    for logits, y in [(torch.randn(3, 4, generator=G(6)), torch.arange(3)),          # B < C
                      (torch.randn(8, 3, generator=G(7)), torch.tensor([0, 1] * 4))]:  # a class missing
        z = logits.double().requires_grad_(); l = dmi_loss(z, y)
        assert math.isclose(l.item(), -math.log(1e-3), rel_tol=1e-9)
        assert torch.autograd.grad(l, z)[0].abs().max() == 0


# ---------------------------------------------------------------- the methods
def _data(n, seed):
    g = G(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8); y = torch.randint(0, 2, (n,), generator=g)
    x[y == 0, :, :8] = 255                                                   # a learnable signal
    return LabeledData(x, y, ["a", "b"], "synthetic", "train")

TR, VA, TE = _data(96, 0), _data(64, 1), _data(64, 2)
CFG = dict(epochs=2, batch_size=32, lr=1e-3, normalize="mnist", device="cpu", seed=0, progress=False)
_fit = lambda m, **kw: fit(get_model("dmi_fmnist_cnn", 2, seed=0), TR, VA, TE, m, TrainConfig(**(CFG | kw)))


@pytest.fixture(scope="module")
def ce():
    return _fit("CE-DMI")


def test_registry_and_errors(ce):
    assert repr(get_method("DMI", ce_state=ce.best_state)) == "DMI(normalize=False, eps=0.001, select=loss, init=ce)"
    with pytest.raises(ValueError, match="valid: 'loss'"): DMI(select="first_batch")
    with pytest.raises(ValueError, match="valid: eps >= 0"): DMI(eps=-0.1)
    with pytest.raises(ValueError, match="needs ce_state"): get_method("FW-DMI")
    with pytest.raises(ValueError, match="needs ce_state"): get_method("GCE-DMI")
    with pytest.raises(ValueError, match="valid: batch_size >= num_classes"): _fit(DMI(ce.best_state), batch_size=1)
    with pytest.raises(ValueError, match="valid: batch_size <= len"): _fit(DMI(ce.best_state), batch_size=128)
    with pytest.raises(ValueError, match="valid: patience=None"): _fit(DMI(ce.best_state), patience=1)
    with pytest.raises(ValueError, match="ce_state does not fit"): load_ce_state(get_model("lenet", 2), ce.best_state)
    with pytest.warns(UserWarning, match="random initialisation"): _fit(DMI(), epochs=1)


def test_start_skip_and_optimizer_reset(ce):
    tr = Trainer(get_model("dmi_fmnist_cnn", 2, seed=9), TR, VA, TE, DMI(ce.best_state), TrainConfig(**CFG))
    assert all(torch.equal(tr.model.state_dict()[k], v) for k, v in ce.best_state.items())
    def step(n):
        before = copy.deepcopy(tr.model.state_dict()); tr.model.train(); x, y = tr.batch(torch.arange(n))
        tr.optimizer.zero_grad(set_to_none=True); tr.method.loss(tr, tr.method.forward(tr, x), y, None, x).backward(); tr.optimizer.step()
        return any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert not step(20) and step(32)                                           # incomplete batch skipped, full batch trains
    assert len(tr.optimizer.state) > 0; tr.method.start_epoch(tr, 1); assert len(tr.optimizer.state) == 0


def test_selection_reports_the_selected_epoch(ce):
    r_loss = _fit(DMI(ce.best_state, normalize=True), epochs=3)
    r_acc = _fit(DMI(ce.best_state, normalize=True, select="acc"), epochs=3)
    assert [h["train_loss"] for h in r_loss.history] == [h["train_loss"] for h in r_acc.history]
    sel = r_loss.best_method_state["selection"]; scores = dict(sel["scores"])
    assert sel["epoch"] == max(scores, key=lambda e: (scores[e], -e))
    acc_at = {0: ce.test_acc} | {h["epoch"]: h["test_acc"] for h in r_acc.history}
    assert r_loss.test_acc == acc_at[sel["epoch"]]
    assert all(torch.equal(r_loss.best_state[k], v) for k, v in sel["state"].items())
    r0 = _fit(DMI(ce.best_state), epochs=2, lr=0.0)                            # nothing improves: the CE model is returned
    assert r0.best_method_state["selection"]["epoch"] == 0 and r0.test_acc == ce.test_acc


def test_ce_dmi_breaks_ties_towards_the_later_epoch():
    assert _fit("CE-DMI", epochs=3, lr=0.0).best_method_state["selection"]["epoch"] == 3
    assert _fit("CE", epochs=3, lr=0.0).best_epoch == 1


def test_fw_and_gce_start_from_ce_and_score_it(ce):
    for name in ("FW-DMI", "GCE-DMI"):
        r = _fit(get_method(name, ce_state=ce.best_state), epochs=1)
        assert r.best_method_state["selection"]["scores"][0][0] == 0
    tr = Trainer(get_model("dmi_fmnist_cnn", 2, seed=9), TR, VA, TE, get_method("FW-DMI", ce_state=ce.best_state), TrainConfig(**CFG))
    torch.testing.assert_close(tr.method.T.sum(1), torch.ones(2))


# ---------------------------------------------------------------- splits and the protocol
def test_fashion_and_mr_splits():
    sp = dmi_splits("fmnist", 0.6, seed=1, case=3, n_train=300, n_val=100, n_test=50)
    assert (len(sp.train), len(sp.val), len(sp.test)) == (300, 100, 50)
    assert sp.train.index.max() < 50_000 <= sp.val.index.min()
    assert sp.train_noise.options["case"] == 3 and not sp.train_noise.is_noisy[sp.train_noise.clean == 0].any()   # bags never flip in case 3
    assert torch.equal(dmi_splits("fmnist", 0.6, seed=1, case=3, n_train=300, n_val=100, n_test=50).train.y, sp.train.y)
    mr = dmi_splits("mr", 0.5, seed=0, n_train=200)
    assert len(mr.train) == 200 and len(mr.val) == 1919 and len(mr.test) == 1067
    assert dmi_model("mr", mr).embedding.num_embeddings == len(mr.train.vocab)
    with pytest.raises(ValueError, match="valid experiments"): dmi_splits("svhn", 0.1)
    with pytest.raises(ValueError, match="its noise is real"): dmi_splits("clothing1m", 0.2)


def test_cifar10_protocol_end_to_end_on_synthetic_files(tmp_path, monkeypatch):
    cls = torchvision.datasets.CIFAR10
    lists, meta = make_synthetic_cifar(tmp_path, cls, n_per_batch=10)
    monkeypatch.setattr(cls, "train_list", lists["train_list"]); monkeypatch.setattr(cls, "test_list", lists["test_list"])
    monkeypatch.setattr(cls, "meta", meta)
    sp = dmi_splits("cifar10", 0.8, seed=0, root=tmp_path)
    assert (len(sp.train), len(sp.val), len(sp.test)) == (40, 10, 10)                  # data_batch_5 is the validation set
    assert set(sp.train_noise.clean[sp.train_noise.is_noisy].tolist()) <= {9, 2, 4, 3}   # one-way flips only
    out = tmp_path / "out"; meta_row = {"paper": "DMI", "experiment": "cifar10", "dataset": "cifar10", "noise_type": "asymmetric", "noise": 0.8, "scale": "synthetic"}
    cfg = lambda m: dmi_train_config("cifar10", m, 0, "cpu", epochs=1, batch_size=10, milestones=())
    assert type(dmi_model("cifar10", sp)).__name__ == "CifarResNet"
    small = lambda: dmi_model("cifar10", sp, num_blocks=(1, 1, 1, 1))              # a ResNet-10 keeps the test fast
    ce_row, _ = run_experiment(out, meta_row, small, sp, "CE-DMI", {}, cfg("CE-DMI"), keep_state=True)
    st = best_state(out, ce_row["run_key"])
    for m in ("FW-DMI", "GCE-DMI", "DMI"):
        run_experiment(out, meta_row | {"init_run": ce_row["run_key"]}, small, sp, m, dmi_method_hparams("cifar10", m, st), cfg(m))
    df = load_results(out)
    assert list(df.method) == ["CE-DMI", "FW-DMI", "GCE-DMI", "DMI"] and (df.init_run.iloc[1:] == ce_row["run_key"]).all()


def test_dogs_vs_cats_and_clothing1m_paths_on_synthetic_images(tmp_path):
    rng = np.random.default_rng(0); f = tmp_path / "dogs_vs_cats" / "train"
    for c in ("cat", "dog"):
        for k in list(range(6)) + [10_000, 10_001]: _write_jpg(f / f"{c}.{k}.jpg", rng)
    sp = dmi_splits("dogs_vs_cats", 1.0, seed=0, n_val=4, root=tmp_path, workers=0)
    assert sp.train.x.shape == (8, 3, 150, 150) and sp.val.x.dtype == torch.uint8 and len(sp.test) == 4
    assert (sp.train.y[sp.train_noise.clean == 0] == 1).all()                     # r = 1: every cat labelled dog
    with torch.no_grad(): assert dmi_model("dogs_vs_cats", sp).eval()(sp.train.x[:2].float()).shape == (2, 2)
    c = tmp_path / "clothing1m"; paths = [f"images/{i % 2}/synthetic_{i}.jpg" for i in range(10)]
    for p in paths: _write_jpg(c / p, rng)
    (c / "noisy_label_kv.txt").write_text("".join(f"{p} {i % 14}\n" for i, p in enumerate(paths)))
    (c / "clean_label_kv.txt").write_text("".join(f"{p} {(i + 3) % 14}\n" for i, p in enumerate(paths)))
    (c / "noisy_train_key_list.txt").write_text("\n".join(paths[:6])); (c / "clean_val_key_list.txt").write_text("\n".join(paths[6:8]))
    (c / "clean_test_key_list.txt").write_text("\n".join(paths[8:]))
    cl = dmi_splits("clothing1m", None, seed=0, n_train=4, root=tmp_path, workers=0)
    assert cl.train.x.shape == (4, 3, 224, 224) and cl.val.y.tolist() == [9, 10] and math.isnan(cl.train_noise.rate)
    assert cl.train_noise.kind == "real" and cl.train_noise.labels is cl.train.y or torch.equal(cl.train_noise.labels, cl.train.y)
    assert dmi_method_hparams("clothing1m", "DMI", {})["select"] == "acc" and dmi_train_config("clothing1m", "DMI").milestones == (5,)
