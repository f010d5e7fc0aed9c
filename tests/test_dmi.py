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
from noisyrepro.models import get_model
from noisyrepro.results import load_results
from noisyrepro.experiment import expand, sweep, write_scorecard
from noisyrepro.train import Trainer, TrainConfig, fit, get_method, predict_logits
from noisyrepro.losses import dmi_loss
from noisyrepro.dmi import (DMI, DMI_METHODS, DMI_PROTOCOLS, SCORECARD, CEDMI, LCCN, channel_joint, classifier_joint, dmi, dmi_grad_U,
                            dmi_lr_grid, dmi_matrix, dmi_model, dmi_overrides, dmi_search_candidates, dmi_search_pick, dmi_search_protocols,
                            dmi_splits, dmi_train_config, h0_accuracy, hadamard_bound, l_dmi, lccn_transition, load_ce_state, random_joint,
                            random_transition, shannon_mi)
from test_data import make_synthetic_cifar, _write_jpg

G = lambda s=0: torch.Generator().manual_seed(s)


# ---------------------------------------------------------------- theory helpers
def test_dmi_properties_and_relative_invariance():
    Q, T = random_joint(3, G(0), n=200), random_transition(3, G(1), n=200)
    assert (dmi(Q) > 0).all()
    torch.testing.assert_close(dmi(Q.transpose(-2, -1)), dmi(Q))
    indep = Q.sum(-1)[:, :, None] * Q.sum(-2)[:, None, :]
    assert dmi(indep).max() < 1e-16 and shannon_mi(indep).abs().max() < 1e-14
    torch.testing.assert_close(dmi(channel_joint(Q, T)), dmi(Q) * torch.linalg.det(T).abs())      # Lemma 3.5 (an identity: guards the helpers)
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
def _authors_dmi_loss(output, target, num_classes, normalize=False):
    """The scripts' DMI_loss transcribed line by line (CIFAR-10/DMI.py; fashion/main.py adds the / N); float32, independent of dmi_loss."""
    outputs = F.softmax(output, dim=1)
    y_onehot = torch.zeros(target.size(0), num_classes).scatter_(1, target.reshape(target.size(0), 1), 1)
    mat = y_onehot.transpose(0, 1) @ outputs                      # U = Yᵀ S: rows = noisy label, columns = prediction
    if normalize: mat = mat / target.size(0)
    return -1.0 * torch.log(torch.abs(torch.det(mat.float())) + 0.001)


def test_dmi_loss_values_and_invariance():
    y = torch.tensor([0, 0, 1, 2, 2, 2]); perfect = 50. * F.one_hot(y, 3).float()
    assert math.isclose(dmi_loss(perfect, y).item(), -math.log(6 + 1e-3), rel_tol=1e-5)
    assert math.isclose(dmi_loss(perfect[:, [1, 2, 0]], y).item(), dmi_loss(perfect, y).item(), rel_tol=1e-6)
    assert math.isclose(dmi_loss(torch.zeros(6, 3), y).item(), -math.log(1e-3), rel_tol=1e-6)
    with pytest.raises(ValueError, match="valid: B×C logits and B labels"): dmi_loss(torch.zeros(6, 3), y[:4])


@pytest.mark.parametrize("C,B", [(2, 128), (3, 64), (10, 256)])
@pytest.mark.parametrize("normalize", [False, True])
def test_dmi_loss_matches_the_authors_code_in_value_and_gradient(C, B, normalize):
    """Ours (float64 inside) against the float32 transcription; det(Uᵀ) = det(U), so the transpose does not matter."""
    g = G(40 + C)
    for _ in range(3):
        z = (2 * torch.randn(B, C, generator=g)).requires_grad_(); y = torch.randint(0, C, (B,), generator=g)
        ours, theirs = dmi_loss(z, y, normalize=normalize, eps=1e-3), _authors_dmi_loss(z, y, C, normalize)
        g_ours, g_theirs = torch.autograd.grad(ours, z)[0], torch.autograd.grad(theirs, z)[0]
        assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
        assert (g_ours - g_theirs).abs().max() <= 1e-4 * g_theirs.abs().max()


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
    assert repr(DMI(ce.best_state, normalize=True)) == "DMI(normalize=True, eps=0.001, select=loss, init=ce)"   # the fmnist DMI: frozen
    assert repr(CEDMI()) == "CE-DMI()" and CEDMI().hparams() == {}
    with pytest.raises(ValueError, match="valid: None"): DMI(val_first=0)
    with pytest.raises(ValueError, match="valid: the best_state of a trained CE model"): get_method("LCCN-DMI")
    with pytest.raises(ValueError, match="valid: 'softmax_ce'"): LCCN(ce.best_state, select="loss")
    with pytest.raises(ValueError, match="valid: 'mean'"): LCCN(ce.best_state, reduction="none")
    with pytest.raises(ValueError, match="valid: alpha > 0"): LCCN(ce.best_state, alpha=0)
    with pytest.raises(ValueError, match="valid: batch_size <= len"): _fit(LCCN(ce.best_state), batch_size=128)


def test_start_skip_and_optimizer_reset(ce):
    tr = Trainer(get_model("dmi_fmnist_cnn", 2, seed=9), TR, VA, TE, DMI(ce.best_state), TrainConfig(**CFG))
    assert all(torch.equal(tr.model.state_dict()[k], v) for k, v in ce.best_state.items())
    def step(n):
        before = copy.deepcopy(tr.model.state_dict()); tr.model.train(); x, y = tr.batch(torch.arange(n))
        tr.optimizer.zero_grad(set_to_none=True); tr.method.loss(tr, tr.method.forward(tr, x), y, None, x).backward(); tr.optimizer.step()
        return any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert not step(20) and step(32)                                           # incomplete batch skipped, full batch trains
    assert len(tr.optimizer.state) > 0; tr.method.start_epoch(tr, 1); assert len(tr.optimizer.state) == 0


class _Trajectory(DMI):
    """DMI with its own selection off: the history logs every epoch's own model."""
    own_selection = False


def test_selection_reports_the_selected_epoch(ce):
    r_loss = _fit(DMI(ce.best_state, normalize=True), epochs=3)
    r_acc = _fit(DMI(ce.best_state, normalize=True, select="acc"), epochs=3)
    r_traj = _fit(_Trajectory(ce.best_state, normalize=True), epochs=3)
    acc_at = {0: ce.test_acc} | {h["epoch"]: h["test_acc"] for h in r_traj.history}
    for r in (r_loss, r_acc):
        assert [h["train_loss"] for h in r.history] == [h["train_loss"] for h in r_traj.history]
        sel = r.best_method_state["selection"]; scores = dict(sel["scores"])
        assert list(scores) == [0, 1, 2, 3]                                    # the CE model is a candidate under both rules
        assert sel["epoch"] == max(scores, key=lambda e: (scores[e], -e))
        assert r.test_acc == acc_at[sel["epoch"]]
        assert all(torch.equal(r.best_state[k], v) for k, v in sel["state"].items())
    np.testing.assert_allclose([s for _, s in r_acc.best_method_state["selection"]["scores"][1:]], [h["val_acc"] for h in r_traj.history], atol=1e-6)


def test_start_is_a_candidate_under_both_rules_unless_excluded(ce):
    for select in ("loss", "acc"):                                             # lr 1e-30 moves no weight: every epoch ties with the CE model
        r0 = _fit(DMI(ce.best_state, select=select), epochs=2, lr=1e-30)
        assert r0.best_method_state["selection"]["epoch"] == 0 and r0.test_acc == ce.test_acc
        assert [e for e, _ in r0.best_method_state["selection"]["scores"]] == [0, 1, 2]
    rc = _fit(DMI(ce.best_state, select="acc", include_start=False), epochs=2, lr=1e-30)   # Clothing1M: the CE model is not scored
    assert [e for e, _ in rc.best_method_state["selection"]["scores"]] == [1, 2] and rc.best_method_state["selection"]["epoch"] == 1
    m = get_model("dmi_fmnist_cnn", 2); m.load_state_dict(ce.best_state)
    rf = _fit(DMI(ce.best_state, select="acc", val_first=20), epochs=1)
    acc20 = (predict_logits(m, VA.subset(range(20)), TrainConfig(**CFG)).argmax(1) == VA.y[:20]).float().mean().item()
    assert math.isclose(rf.best_method_state["selection"]["scores"][0][1], acc20, abs_tol=1e-7)
    assert "the first 20 validation examples" in rf.selection and DMI(select="acc", val_first=256).hparams()["val_first"] == 256


def test_ce_dmi_breaks_ties_towards_the_later_epoch():
    assert _fit("CE-DMI", epochs=3, lr=1e-30).best_method_state["selection"]["epoch"] == 3
    assert _fit("CE", epochs=3, lr=1e-30).best_epoch == 1


def test_fw_and_gce_start_from_ce_and_score_it(ce):
    for name in ("FW-DMI", "GCE-DMI"):
        r = _fit(get_method(name, ce_state=ce.best_state), epochs=1)
        assert r.best_method_state["selection"]["scores"][0][0] == 0
    tr = Trainer(get_model("dmi_fmnist_cnn", 2, seed=9), TR, VA, TE, get_method("FW-DMI", ce_state=ce.best_state), TrainConfig(**CFG))
    torch.testing.assert_close(tr.method.T.sum(1), torch.ones(2))


# ---------------------------------------------------------------- LCCN
def _three_class(n=60, seed=3):
    g = G(seed); y = torch.randint(0, 3, (n,), generator=g)
    return LabeledData(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), y, ["a", "b", "c"], "synthetic", "train")


def _lccn_trainer(data, **kw):
    st = get_model("dmi_fmnist_cnn", 3, seed=1).state_dict()
    return Trainer(get_model("dmi_fmnist_cnn", 3, seed=0), data, data, None, LCCN(st, **kw), TrainConfig(**(CFG | {"batch_size": 30})))


def test_lccn_gibbs_step_samples_the_exact_conditional_and_keeps_counts():
    d = _three_class(); tr = _lccn_trainer(d, warmup=10**9); m = tr.method
    C0, z0 = m.C.clone(), m.z.clone()
    torch.testing.assert_close(C0.sum(0), torch.bincount(d.y, minlength=3).double())   # soft counts: one unit per example
    idx = torch.arange(0, 60, 2); y = d.y[idx]; a = 1.5 * torch.randn(30, 3, generator=G(8))
    R, freq = 3000, torch.zeros(30, 3, dtype=torch.float64)
    for _ in range(R):
        m.loss(tr, a, y, idx, None); freq[torch.arange(30), m.z[idx]] += 1
    freq /= R
    s = a.double().softmax(1)
    joint = torch.tensor([[s[i, c].item() * m.T_warm[c, y[i]].item() for c in range(3)] for i in range(30)], dtype=torch.float64)
    exact = joint / joint.sum(1, keepdim=True)                                # Bayes on Pr[z, ỹ | x] = s_z T[z, ỹ]
    assert ((freq - exact).abs() <= 5 * (exact * (1 - exact) / R).sqrt() + 1e-12).all()
    hard = lambda z: torch.zeros(3, 3, dtype=torch.float64).index_put_((z, d.y), torch.ones(60, dtype=torch.float64), accumulate=True)
    torch.testing.assert_close(m.C, C0 - hard(z0) + hard(m.z))
    torch.testing.assert_close(m.C.sum(0), torch.bincount(d.y, minlength=3).double())   # column sums = noisy-label counts
    assert m.steps == R
    assert m.loss(tr, a[:10], y[:10], idx[:10], None).item() == 0 and m.steps == R        # incomplete batch: skipped, not a step


@pytest.mark.filterwarnings("ignore:LCCN-DMI")
def test_lccn_transition_schedule():
    """From an untrained model the hard moves drive some counts below 0 here; T stays a positive row-stochastic matrix."""
    d = _three_class(); tr = _lccn_trainer(d, warmup=4, every=3); m = tr.method
    idx = torch.arange(0, 60, 2); y = d.y[idx]; a = torch.randn(30, 3, generator=G(9))
    used, snaps = [], []
    for _ in range(10):
        snaps.append(m.C.clone()); used.append(m.transition().clone()); m.loss(tr, a, y, idx, None)
    for k, T in enumerate(used):
        torch.testing.assert_close(T, m.T_warm if k < 4 else lccn_transition(snaps[3 * (k // 3)]))
        assert (T > 0).all()
    assert not torch.allclose(used[9], m.T_warm)
    torch.testing.assert_close(lccn_transition(torch.tensor([[-3.0, 5.0], [2.0, 2.0]])), torch.tensor([[1 / 7, 6 / 7], [0.5, 0.5]]))   # negative counts as 0
    m._warned = False; m.C[0, 0] = -5.0; m.steps = 12                       # a refresh step past the warm-up, with a negative count
    with pytest.warns(UserWarning, match="count below 0"): assert (m.transition() > 0).all()


def test_lccn_end_to_end_and_resume(ce, tmp_path):
    r = _fit(LCCN(ce.best_state, warmup=2, every=2), epochs=3)
    st = r.best_method_state
    assert [e for e, _ in st["selection"]["scores"]] == [0, 1, 2, 3] and st["steps"] == 3 * (96 // 32)
    torch.testing.assert_close(st["C"].sum(0), torch.bincount(TR.y, minlength=2).double())
    assert "−CE of the softmax outputs" in r.selection and len(st["z"]) == len(TR)

    class Killed(LCCN):
        def start_epoch(self, tr, epoch):
            if epoch == 1 and not getattr(self, "resumed", False): raise KeyboardInterrupt
            super().start_epoch(tr, epoch)
    ck = tmp_path / "lccn.pt"; cfg = TrainConfig(**(CFG | {"epochs": 3}))
    with pytest.raises(KeyboardInterrupt): fit(get_model("dmi_fmnist_cnn", 2, seed=0), TR, VA, TE, Killed(ce.best_state, warmup=2, every=2), cfg, ckpt=ck)
    k = Killed(ce.best_state, warmup=2, every=2); k.resumed = True
    res = fit(get_model("dmi_fmnist_cnn", 2, seed=0), TR, VA, TE, k, cfg, ckpt=ck)
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in r.history]
    for key in ("z", "C", "T", "steps"): assert torch.equal(torch.as_tensor(res.best_method_state[key]), torch.as_tensor(st[key]))
    mr = _fit(LCCN(ce.best_state, select="acc", reduction="sum", warmup=1000, every=100), epochs=1)   # MR's variant
    m = get_model("dmi_fmnist_cnn", 2); m.load_state_dict(ce.best_state)
    start_acc = (predict_logits(m, VA, TrainConfig(**CFG)).argmax(1) == VA.y).float().mean().item()
    assert mr.best_method_state["selection"]["scores"][0] == (0, pytest.approx(start_acc, abs=1e-7))
    assert repr(LCCN(ce.best_state, select="acc", reduction="sum", warmup=1000, every=100)) == \
        "LCCN-DMI(alpha=1.0, warmup=1000, every=100, select=acc, init=ce, reduction=sum)"


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
    assert type(dmi_model("cifar10", sp)).__name__ == "CifarResNet"
    monkeypatch.setenv("NOISYREPRO_DATA", str(tmp_path))                             # the protocol's split function reads the root here
    base = DMI_PROTOCOLS["cifar10"]
    P = base.at("paper", seeds=(0,), settings=(("asymmetric", 0.8),), model_kw={"num_blocks": (1, 1, 1, 1)},   # a ResNet-10 keeps the test fast
                train_by_method={m: c | {"epochs": 1, "batch_size": 10, "milestones": ()} for m, c in base.train_by_method.items()})
    out = tmp_path / "out"
    res = sweep(P, out, device="cpu", progress=False)
    df = res.rows
    assert list(df.method) == ["CE-DMI", "FW-DMI", "GCE-DMI", "LCCN-DMI", "DMI"] and res.trained == 5
    ce_key = expand(P)[0].key
    assert all(r.needs == ("ce_state", ce_key) for r in expand(P)[1:])                  # every method starts from the CE model
    assert "starting weights (epoch 0) a candidate" in df.set_index("method").loc["DMI", "selection"]     # CIFAR-10/DMI.py scores the CE model
    assert sweep(P, out, device="cpu", progress=False).trained == 0                     # recorded: nothing trains again


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
    assert DMI_PROTOCOLS["clothing1m"].hparams["DMI"]["select"] == "acc" and dmi_train_config("clothing1m", "DMI").milestones == (5,)


def test_protocol_lccn_and_frozen_fmnist():
    assert DMI_METHODS == ["CE-DMI", "FW-DMI", "GCE-DMI", "LCCN-DMI", "DMI"] and DMI_PROTOCOLS["fmnist_case2"].methods == ("CE-DMI", "DMI")
    assert "LCCN-DMI" not in DMI_PROTOCOLS["dogs_vs_cats"].methods + DMI_PROTOCOLS["clothing1m"].methods
    for P in DMI_PROTOCOLS.values():
        for s in P.presets: P.at(s)                                                    # every preset passes the layer's checks
        assert P.methods[0] == "CE-DMI" and P.needs == {m: ("ce_state", "CE-DMI") for m in P.methods[1:]}
        assert P.train["amp"] is False                                                 # fp32, as the authors ran
    assert {k: P.hparams.get("DMI") for k, P in DMI_PROTOCOLS.items()} == {
        **{f"fmnist_case{c}": {"normalize": True} for c in (1, 2, 3)}, "mr": {"normalize": False}, "cifar10": {"normalize": False, "select": "acc"},
        "dogs_vs_cats": {"normalize": False}, "clothing1m": {"normalize": False, "select": "acc", "include_start": False}}
    assert dmi_train_config("fmnist", "DMI", 2, "cuda") == TrainConfig(epochs=20, batch_size=128, lr=1e-4, normalize="mnist", seed=2, device="cuda", amp=False)
    assert dmi_train_config("fmnist", "CE-DMI") == TrainConfig(epochs=20, batch_size=128, lr=1e-4, normalize="mnist", seed=0, device="auto", amp=False)
    lc = dmi_train_config("cifar10", "LCCN-DMI")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lc.lr); sch = torch.optim.lr_scheduler.MultiStepLR(opt, list(lc.milestones), lc.gamma)
    lrs = []
    for _ in range(lc.epochs): lrs.append(opt.param_groups[0]["lr"]); opt.step(); sch.step()
    np.testing.assert_allclose([lrs[0], lrs[39], lrs[40], lrs[80], lrs[119]], [0.5, 0.5, 0.1, 0.1, 0.1])   # 0.01 at 80 is unreachable in LCCN.py
    assert "LCCN-DMI" not in DMI_PROTOCOLS["cifar10"].hparams
    assert DMI_PROTOCOLS["mr"].hparams["LCCN-DMI"] == {"warmup": 1000, "every": 100, "select": "acc", "reduction": "sum"}
    mr = dmi_train_config("mr", "LCCN-DMI"); assert (mr.optimizer, mr.lr, mr.weight_decay, mr.epochs) == ("sgd", 1e-4, 1e-4, 50)
    d = dmi_train_config("cifar10", "DMI"); assert (d.epochs, d.lr, d.schedule, d.milestones) == (100, 1e-6, None, ())


def test_quick_presets_are_the_quick_scale():
    """The quick presets keep the sizes, epochs, seeds, learning rates, methods and settings the claims were calibrated on."""
    for c in (1, 2, 3):
        q = DMI_PROTOCOLS[f"fmnist_case{c}"].at("quick")
        assert (q.settings, q.seeds, q.n_train, q.splits) == ((("none", 0.0), ("asymmetric", 0.7)), (0, 1), (3000,), {"case": c, "n_val": 500, "n_test": 1000})
        assert {m: (t["epochs"], t["lr"], t["eval_batch_size"]) for m, t in q.train_by_method.items()} == {"CE-DMI": (4, 1e-3, 256), "DMI": (6, 1e-3, 256)}
    q = DMI_PROTOCOLS["mr"].at("quick")
    assert (q.methods, q.settings, q.seeds, q.n_train, q.splits) == (("CE-DMI", "DMI"), (("asymmetric", 0.0), ("asymmetric", 0.7)), (0,), (3000,), {"n_val": 500})
    assert {m: (t["epochs"], t["lr"]) for m, t in q.train_by_method.items()} == {"CE-DMI": (3, 1e-3), "DMI": (4, 1e-3)}
    keys = lambda c, r: {x.key for x in expand(DMI_PROTOCOLS[f"fmnist_case{c}"].at("quick")) if x.noise == r}
    assert keys(2, 0.0) == keys(3, 0.0) == keys(1, 0.0) and not keys(2, 0.7) & keys(3, 0.7)   # r = 0 runs once for the three cases


def test_papermill_overrides():
    ov = dmi_overrides(DMI_PROTOCOLS["mr"], "quick", methods=["DMI", "LCCN-DMI"], noise=0.4, seeds=3, n_train=500, epochs=2)
    P = DMI_PROTOCOLS["mr"].at("quick", **ov)
    assert (P.methods, P.settings, P.seeds, P.n_train) == (("CE-DMI", "DMI", "LCCN-DMI"), (("asymmetric", 0.4),), (0, 1, 2), (500,))
    assert P.train_by_method["LCCN-DMI"] == DMI_PROTOCOLS["mr"].train_by_method["LCCN-DMI"] | {"epochs": 2, "lr": 1e-3, "eval_batch_size": 256}
    assert P.hparams["LCCN-DMI"]["reduction"] == "sum" and set(P.needs) == {"DMI", "LCCN-DMI"}
    assert DMI_PROTOCOLS["mr"].at("paper", **dmi_overrides(DMI_PROTOCOLS["mr"], "paper", epochs=7)).train_by_method["FW-DMI"]["epochs"] == 7
    f = DMI_PROTOCOLS["fmnist_case1"]
    assert f.at("paper", **dmi_overrides(f, "paper", noise=[0.0, 0.3])).settings == (("none", 0.0), ("asymmetric", 0.3))
    assert dmi_overrides(f, "paper", noise="all")["settings"] == f.settings and dmi_overrides(f, "quick") == {}
    with pytest.raises(ValueError, match="valid: CE-DMI, DMI"): dmi_overrides(f, "quick", methods="GCE-DMI")
    with pytest.raises(ValueError, match="its noise is real"): dmi_overrides(DMI_PROTOCOLS["clothing1m"], "paper", noise=[0.2])


def test_dmi_search_and_h0_on_a_tiny_sweep(tmp_path):
    base = DMI_PROTOCOLS["fmnist_case3"]
    P = base.at("quick", seeds=(0,), settings=(("asymmetric", 0.7),), n_train=(256,), splits={"case": 3, "n_val": 128, "n_test": 128},
                train_by_method={m: c | {"epochs": 1} for m, c in base.at("quick").train_by_method.items()})
    variants = dmi_search_protocols(P)
    assert [len(expand(v)) for v in variants] == [4, 4] and expand(variants[0])[0].key == expand(variants[1])[0].key
    sw = [sweep(v, tmp_path, device="cpu", keep_result=("DMI",), progress=False) for v in variants]
    assert sum(s.trained for s in sw) == 7                                             # one CE-DMI, six DMI configurations
    cand = dmi_search_candidates(sw, tmp_path, "cpu")
    assert len(cand) == 6 and set(cand.table) == {"dmi_fig2_case3"} and cand.search_score.notna().all()
    assert sorted(zip(cand.lr, cand.batch_size)) == sorted(itertools.product(dmi_lr_grid["lr"], dmi_lr_grid["batch_size"]))
    again = dmi_search_candidates([s.__class__(s.rows, {}, s.runs, 0, 0.0) for s in sw], tmp_path, "cpu")   # read back from dmi_search.json
    assert again.search_score.tolist() == cand.search_score.tolist()
    assert len(dmi_search_pick(cand, by=("table", "noise_type", "noise", "seed"))) == 1
    h0 = h0_accuracy(P)
    assert h0[["noise_type", "noise", "seed"]].values.tolist() == [["asymmetric", 0.7, 0]] and abs(h0.h0.iloc[0] - 10) < 5   # always "bags"


def test_scorecard_covers_every_figure_and_table(tmp_path):
    items = [e.item for e in SCORECARD]
    assert [i.split(",")[0].split(" (")[0] for i in items] == ["Fig. 1", "Fig. 2", "Fig. 2", "Fig. 2", "Fig. 3", "Fig. 3", "Fig. 3", "Table 1"]
    cannot = {e.item for e in SCORECARD if e.cannot}
    assert cannot == {items[0], "Fig. 3, CIFAR-10", "Fig. 3, Dogs vs. Cats", "Table 1, Clothing1M"}
    text = write_scorecard(SCORECARD, root=tmp_path)
    assert text.count("| DMI |") == 8 and "not run yet" in text and "cannot run here: CIFAR-10" in text


def test_dmi_search_pick_on_fake_rows():
    grid = list(itertools.product(dmi_lr_grid["lr"], dmi_lr_grid["batch_size"]))
    scores = {("case2", 0): [-3, -1, -2, -1, -5, -4], ("case2", 1): [-9, -8, -7, -6, -5, -4], ("case3", 0): [0] * 6}
    cand = pd.DataFrame([{"experiment": "fmnist", "noise_type": nt, "noise": 0.7, "seed": s, "lr": lr, "batch_size": bs, "search_score": v}
                         for (nt, s), vs in scores.items() for (lr, bs), v in zip(grid, vs)])
    pick = dmi_search_pick(cand)
    assert [(p.noise_type, p.seed, p.lr, p.batch_size) for p in pick.itertuples()] == [("case2", 0, 1e-4, 256), ("case2", 1, 1e-6, 256), ("case3", 0, 1e-4, 128)]
    assert len(dmi_search_pick(cand.assign(noise=float("nan")))) == 3
    with pytest.raises(ValueError, match="valid: rows with"): dmi_search_pick(cand.drop(columns="seed"))
    with pytest.raises(ValueError, match="valid: a finite score"): dmi_search_pick(cand.assign(search_score=float("nan")))
