"""Contracts of noisyrepro.limit's method part (LIMIT, SoftReg, DMI-LIMIT, mislabeled-example ranking)."""
import copy, math
import pytest
import torch
import torch.nn.functional as F
from noisyrepro.data import LabeledData
from noisyrepro.models import get_model, LimitMLP
from noisyrepro.train import Trainer, TrainConfig, fit, get_method
from noisyrepro.limit import (LIMIT, SoftReg, DMILimit, replace_grad, limit_mu, ce_grad, limit_grad_sample, limit_q_loss,
                              q_network, dmi_limit_loss, soft_reg_penalties, limit_scores, roc_auc, rank_mislabeled)


def _trainer(method, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = LabeledData(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g),
                    [str(c) for c in range(10)], "tiny", "train")
    return Trainer(get_model("limit_mnist_cnn", 10, seed=seed), d, d, None, method,
                   TrainConfig(batch_size=n, normalize="limit_mnist", device="cpu", seed=seed, progress=False))


def _grads(tr, y=None):
    x, y0 = tr.batch(torch.arange(len(tr.train)))
    tr.optimizer.zero_grad(set_to_none=True)
    tr.method.loss(tr, tr.method.forward(tr, x), y0 if y is None else y, None, x).backward()
    return [p.grad.clone() for p in tr.model.parameters()], [p.grad.clone() for p in tr.method.q.parameters()], x, y0


def test_replace_grad():
    a = torch.randn(2, 3, requires_grad=True); g = torch.randn(2, 3)
    (replace_grad(a, g) ** 2).sum().backward()
    assert torch.equal(a.grad, g)
    with pytest.raises(ValueError, match="valid: the same shape"): replace_grad(a, g[:1])


def test_mu_minus_g_and_q_losses():
    a, qa, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    mu, g = limit_mu(a, qa), ce_grad(a, y)
    torch.testing.assert_close(mu - g, F.one_hot(y, 4).float() - qa.softmax(1))
    torch.testing.assert_close(limit_q_loss(mu, g, "laplace"), 2 * (1 - qa.softmax(1)[torch.arange(6), y]).mean())
    with pytest.raises(ValueError, match="valid dists"): limit_q_loss(mu, g, "l2")


def test_classifier_gradient_is_J_mu_and_label_free():
    tr = _trainer(LIMIT("gaussian", beta=1.0))
    f2, q2 = copy.deepcopy(tr.model), copy.deepcopy(tr.method.q)
    gw, gq, x, y = _grads(tr)
    a2 = f2(x); (a2 * (a2.softmax(1) - q2(x).softmax(1)).detach()).sum().backward()
    for p, g in zip(f2.parameters(), gw): torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    gw2, gq2, _, _ = _grads(tr, (y + 1) % 10)
    assert all(torch.equal(a, b) for a, b in zip(gw, gw2))
    assert max((a - b).abs().max() for a, b in zip(gq, gq2)) > 1e-3


@pytest.mark.parametrize("dist,mad", [("gaussian", math.sqrt(2 / math.pi)), ("laplace", 1 / math.sqrt(2))])
def test_sample_moments(dist, mad):
    mu = torch.tensor([0.3, -0.3]); d = limit_grad_sample(mu.expand(50_000, 2), 0.1, dist, torch.Generator().manual_seed(0)) - mu
    assert d.mean(0).abs().max() < 0.003 and (d.std(0) - 0.1).abs().max() < 0.003 and (d.abs().mean() - 0.1 * mad).abs() < 0.002


def test_method_registry_errors_and_state():
    assert repr(get_method("LIMIT_L+S", sigma_q=0.3)) == "LIMIT_L+S(dist=laplace, sample=True, beta=0.0, sigma_q=0.3)"
    assert {type(get_method(n)) for n in ("LIMIT_G+S", "LIMIT_G-S", "LIMIT_L+S", "LIMIT_L-S", "LIMIT")} == {LIMIT}
    with pytest.raises(ValueError, match="valid dists"): LIMIT(dist="cauchy")
    with pytest.raises(ValueError, match="valid sigma_q"): LIMIT(sample=True, sigma_q=-1)
    with pytest.raises(ValueError, match="valid beta"): LIMIT(beta=-0.1)
    m = LIMIT("laplace", sample=True); _trainer(m); m2 = LIMIT("laplace", sample=True); _trainer(m2, seed=1)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.gen.get_state(), m.gen.get_state())
    assert all(torch.equal(v, m2.q.state_dict()[k]) for k, v in m.q.state_dict().items())


def test_q_network_and_init():
    q = q_network(get_model("limit_mnist_cnn", 10)); assert isinstance(q.fc[1], torch.nn.BatchNorm1d)
    with pytest.raises(ValueError, match="init_state does not fit"): _trainer(LIMIT(init_state=get_model("limit_mnist_cnn", 10).state_dict()))
    ce = LimitMLP(10, width=16, depth=1); m = LIMIT(init_state=ce.state_dict())
    d = LabeledData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4), [str(c) for c in range(10)], "t", "train")
    Trainer(LimitMLP(10, width=16, depth=1), d, d, None, m, TrainConfig(device="cpu", normalize="limit_mnist"))
    assert torch.equal(m.q.head.weight, ce.head.weight)


def test_softreg_and_dmi():
    z, a, qa, y = torch.rand(3, 5), torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 3])
    info, pred = soft_reg_penalties(z, a, qa, y)
    torch.testing.assert_close(info, ((z ** 2).sum(1) * ((F.one_hot(y, 4) - qa.softmax(1)) ** 2).sum(1)).mean())
    with pytest.raises(ValueError, match="valid: lamb >= 0"): SoftReg(lamb=-1)
    yd = torch.tensor([0, 0, 1, 2]); perfect = 50. * F.one_hot(yd, 3).float()
    assert abs(dmi_limit_loss(perfect, yd).item() + math.log(2 + 0.001)) < 1e-5
    with pytest.raises(ValueError, match="needs ce_state"): DMILimit()
    assert type(get_method("DMI-LIMIT", ce_state={})) is DMILimit


def test_roc_auc_and_ranking():
    assert roc_auc(torch.tensor([1., 2., 2., 3.]), torch.tensor([0, 0, 1, 1])) == 0.875
    assert roc_auc(torch.tensor([3., 2., 1.]), torch.tensor([1, 0, 0])) == 1.0
    with pytest.raises(ValueError, match="at least one of each"): roc_auc(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="equal lengths"): roc_auc(torch.ones(3), torch.tensor([0, 1]))
    tr = _trainer(LIMIT())
    sc = limit_scores(tr.model, tr.method.q, tr.train, tr.cfg)
    assert set(sc) == {"distance", "pred_grad_norm"} and sc["distance"].shape == (8,) and (sc["distance"] <= math.sqrt(2)).all()
    r = rank_mislabeled(tr.method, tr.train)
    assert torch.equal(sc["distance"][r], sc["distance"].sort(descending=True).values)
    with pytest.raises(ValueError, match="valid: a trained LIMIT/SoftReg method"): rank_mislabeled(LIMIT(), tr.train)


# ---- theory (Thm 2.1, Prop 3.1) ----------------------------------------------------------------------------------------
from noisyrepro.limit import (fano_lower_bound, gaussian_mi_bound, gaussian_channel_mi, laplace_mi_bound, select_by_validation, bootstrap_std,
                              PAPER_GRIDS, LIMIT_METHODS, LIMIT_TABLE4, LIMIT_TABLE5, LIMIT_TABLE6, LIMIT_TABLE7, LIMIT_FIG_A0, LIMIT_FIG_A3,
                              SCORECARD, method_fields)
from noisyrepro.experiment import expand, hparam_grid
import pandas as pd


def test_gaussian_bound_is_attained_by_isotropic_gaussian_input():
    d, s, L2 = 4, 1.0, 16.0
    assert math.isclose(gaussian_mi_bound(L2, d, s), d / 2 * math.log(1 + L2 / (d * s ** 2)), rel_tol=1e-12)
    assert laplace_mi_bound(L2, d, s) > gaussian_mi_bound(L2, d, s)       # the corrected Laplace bound is looser


def test_fano_bound_rejects_information_beyond_the_label_entropy():
    with pytest.raises(ValueError): fano_lower_bound(10.0, 5, 4, 1.0)


# ---- the experiment protocol -------------------------------------------------------------------------------------------
def test_protocol_grids_match_appendix_b():
    assert len(LIMIT_METHODS) == 11
    assert hparam_grid(PAPER_GRIDS["LIMIT_L-S"]) == [{"beta": b} for b in [0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]]
    assert len(hparam_grid(PAPER_GRIDS["SoftReg"])) == 20 and len(hparam_grid(PAPER_GRIDS["LIMIT_G+S"])) == 32


def test_quick_presets_are_the_former_quick_defaults():
    "quick: mnist5k, n = 1000, CE and the four LIMIT variants with beta = 10 (sigma_q = 0.1 where they sample), seeds 42, 43, 40 epochs, patience 15."
    for T, p in ((LIMIT_TABLE4, 0.5), (LIMIT_TABLE5, 0.8)):
        q = T.at("quick")
        assert (q.dataset, q.n_train, q.seeds, q.settings) == ("mnist5k", (1000,), (42, 43), (("symmetric", p),))
        assert q.methods == ("CE", "LIMIT_G-S", "LIMIT_L-S", "LIMIT_G+S", "LIMIT_L+S") and q.grids == {}
        assert q.train == {"batch_size": 256, "lr": 1e-3, "normalize": "limit_mnist", "epochs": 40, "patience": 15}
        assert q.hparams == {"LIMIT_G-S": {"beta": 10.0}, "LIMIT_L-S": {"beta": 10.0}, "LIMIT_G+S": {"beta": 10.0, "sigma_q": 0.1},
                             "LIMIT_L+S": {"beta": 10.0, "sigma_q": 0.1}}
        assert len(expand(q)) == 10


def test_paper_presets_follow_appendix_b():
    p = LIMIT_TABLE4.at("paper")
    assert p.methods == tuple(LIMIT_METHODS) and p.n_train == (1000, 10000, None) and p.seeds == (42, 43, 44, 45, 46)
    assert p.train["epochs"] == 400 and p.train["patience"] == 100 and p.grids["SoftReg"] == PAPER_GRIDS["SoftReg"]
    assert p.seeds_by_method == {"LIMIT_G+S": 3, "LIMIT_L+S": 3, "SoftReg": 3}
    assert p.needs == {"FW": ("ce_state", "CE"), "DMI-LIMIT": ("ce_state", "CE")}
    runs = expand(p)
    ce = {r.key for r in runs if r.method == "CE"}
    assert all(r.needs[1] in ce for r in runs if r.method in ("FW", "DMI-LIMIT"))
    assert {r.seed for r in runs if r.method == "SoftReg"} == {42, 43, 44}
    assert {r.train["lr"] for r in runs if r.method == "DMI-LIMIT"} == {1e-3, 1e-4, 1e-5, 1e-6}
    for T, kind in ((LIMIT_TABLE6, "symmetric"), (LIMIT_TABLE7, "asymmetric")):
        c = T.at("paper")
        assert c.dataset == "cifar10" and c.model == "resnet34_cifar" and {k for k, _ in c.settings} == {kind} and c.requires is None
        assert c.needs["LIMIT_G-S+init"] == ("init_state", "CE") and c.train_by_method["LIMIT_L-S+init"] == {"patience": 200}
        assert c.paper_names["LIMIT_L-S+init"] == "LIMIT_L+init" and c.paper_names["DMI-LIMIT"] == "DMI"


def test_method_fields_follow_the_methods_and_overrides():
    f = method_fields(["CE", "LIMIT_L+S"], "quick", beta=3.0, sigma_q=0.3)
    assert f["hparams"] == {"LIMIT_L+S": {"beta": 3.0, "sigma_q": 0.3}} and f["grids"] == {} and f["needs"] == {}
    f = method_fields(["FW", "LIMIT_G-S"], "paper", beta=1.0)
    assert f["grids"] == {"LIMIT_G-S": {"beta": [1.0]}} and f["needs"] == {"FW": ("ce_state", "CE")}
    LIMIT_TABLE4.at("quick", methods=["CE", "FW", "DMI-LIMIT"], **method_fields(["CE", "FW", "DMI-LIMIT"], "quick"))   # passes the checks
    with pytest.raises(ValueError, match="not in methods"): LIMIT_TABLE4.at("quick", methods=["CE"])


def test_figures_and_scorecard():
    assert [len(expand(F.at("quick"))) for F in (LIMIT_FIG_A0, LIMIT_FIG_A3)] == [2, 1]
    assert len(expand(LIMIT_FIG_A0.at("paper"))) == 16 and LIMIT_FIG_A3.at("quick").train["epochs"] == 15
    items = " ".join(e.item for e in SCORECARD)
    for it in ("Table 3", "Table 4", "Table 5", "Table 6", "Table 7", "Fig. A0", "Figs. A1-A2", "Fig. A3", "Fig. A4"): assert it in items, it
    assert all(e.cannot for e in SCORECARD if "CIFAR" in e.item or "Clothing1M" in e.item)
    assert all(e.protocol is not None for e in SCORECARD if e.cannot is None)


def test_selection_uses_mean_validation_not_test():
    df = pd.DataFrame({"dataset": "d", "noise_type": "s", "noise": 0.5, "n_train": 10, "method": "M", "hparams": ["a", "a", "b", "b"],
                       "seed": [0, 1, 0, 1], "val_acc": [0.9, 0.1, 0.6, 0.6], "test_acc": [0.99, 0.99, 0.1, 0.1]})
    assert set(select_by_validation(df).hparams) == {"b"}                  # mean val 0.6 > 0.5, although a tests better


def test_bootstrap_std_is_seeded_and_scales_like_a_binomial():
    c = torch.rand(4000, generator=torch.Generator().manual_seed(1)) < 0.8
    assert bootstrap_std(c, seed=3) == bootstrap_std(c, seed=3)
    assert abs(bootstrap_std(c) - (0.8 * 0.2 / 4000) ** 0.5) < 1e-3


def test_plus_init_has_its_own_name_and_needs_a_state():
    with pytest.raises(ValueError, match="init_state"): get_method("LIMIT_G-S+init")
    tr = _trainer(get_method("LIMIT_G-S", beta=1.0))
    m = get_method("LIMIT_L-S+init", init_state=copy.deepcopy(tr.method.q.state_dict()))
    assert m.name == "LIMIT_L-S+init" and m.hparams()["init"] is True


def test_restore_rebuilds_q_from_a_recorded_run():
    "Figs A1-A3 draw from recorded runs: a fresh LIMIT method rebuilds q from the saved state (no trainer), equal to the trained q."
    from noisyrepro.limit import limit_scores
    from noisyrepro.splits import noisy_splits
    sp = noisy_splits("mnist5k", "symmetric", 0.5, n_train=200, val=0.2, seed=42)
    cfg = TrainConfig(epochs=1, batch_size=256, normalize="limit_mnist", device="cpu", progress=False)
    m = get_method("LIMIT_L-S", beta=10.0)
    r = fit(get_model("limit_mnist_cnn", 10, seed=42), sp.train, sp.val, sp.test, m, cfg)
    fresh = get_method("LIMIT_L-S", beta=10.0)
    assert not hasattr(fresh, "q")
    clf = get_model("limit_mnist_cnn", 10); clf.load_state_dict(r.best_state)
    fresh.restore(clf, r.best_method_state)
    for a, b in zip(fresh.q.state_dict().values(), r.best_method_state["q"].values()): assert torch.equal(a, b.cpu())
    assert limit_scores(clf, fresh.q, sp.train, cfg)["distance"].shape == (200,)
