"""Contracts of noisyrepro.cdr_aux: CDR's mask and update rules, AUX's per-example slack, RDI, their equivalence, the registry."""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from noisyrepro.data import LabeledData
from noisyrepro.train import Trainer, TrainConfig, fit, get_method
from noisyrepro.cdr_aux import (AUX, CDR, CDRAUX, CDRRDI, FIG1, FIG2, RDI, RULES, SCORECARD, SGD, TABLE1, aux_min_norm, cdr_mask_gradients,
                                cdr_parameters, criticality, critical_masks, drop_momentum, kernel_ridge_predict, kernel_ridge_weights,
                                matched_rdi_lamb, noise_options, num_critical, per_example_loss, rdi_penalty, report_config, report_train,
                                table1_hparams)
from noisyrepro.experiment import NOISE, expand, paired_gap
from noisyrepro.data import normalize, subsample
from noisyrepro.models import get_model
from noisyrepro.splits import noisy_splits


def _mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p in net.parameters(): p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / 2)
    return net


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LabeledData(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.arange(n) % 3, list("abc"), "tiny", "train")


def _trainer(method, n=12, batch=None, lr=0.1, wd=0.01, momentum=0.9, optimizer="sgd"):
    d = _data(n)
    cfg = TrainConfig(epochs=1, batch_size=batch or n, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=wd,
                      normalize=None, device="cpu", progress=False)
    return Trainer(_mlp(), d, d, None, method, cfg)


def test_criticality_and_eligible_tensors():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    assert [p.ndim for p in cdr_parameters(net)] == [4, 2]
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]])); w.grad = torch.tensor([[3.0, 1.0], [-4.0, 0.0]])
    assert torch.equal(criticality([w]), torch.tensor([3.0, 2.0, 2.0, 0.0]))


def test_masks_are_the_global_top_k():
    net = _mlp(); g = torch.Generator().manual_seed(1)
    for i, p in enumerate(net.parameters()): p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * (20 if i >= 2 else 1)
    ps = cdr_parameters(net); m = sum(p.numel() for p in ps)
    for tau in (0.0, 0.2, 0.4, 0.7):
        masks = critical_masks(ps, tau); k = num_critical(m, tau)
        top = set(torch.argsort(criticality(ps), descending=True)[:k].tolist())
        assert set(torch.cat([x.flatten() for x in masks]).nonzero().squeeze(1).tolist()) == top
    f = [x.float().mean().item() for x in critical_masks(ps, 0.5)]
    assert f[1] > f[0] + 0.2  # one threshold for all layers, not 1 - tau per layer


def test_num_critical_and_tau_errors():
    assert num_critical(100, 0.7) == 30 and num_critical(7, 0.0) == 7
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(ValueError, match="valid: a noise rate 0 <= tau < 1"): num_critical(10, bad)
    with pytest.raises(ValueError, match="CDR needs tau="): CDR()
    with pytest.raises(ValueError, match="valid rules: code, paper"): CDR(tau=0.1, rule="torch")


def test_mask_gradients_scales_and_zeroes():
    net = _mlp(); g = torch.Generator().manual_seed(2)
    for p in net.parameters(): p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    ps = cdr_parameters(net); g0 = [p.grad.clone() for p in ps]
    masks = cdr_mask_gradients(ps, 0.3)
    for p, g_, m in zip(ps, g0, masks):
        torch.testing.assert_close(p.grad, torch.where(m, 0.7 * g_, torch.zeros_like(g_)))


def _deviation_of_noncritical(rule, steps=4, lr=0.1, wd=0.01):
    tr = _trainer(CDR(tau=0.4, rule=rule), lr=lr, wd=wd); devs = []
    for _ in range(steps):
        before = [p.detach().clone() for p in tr.method.params]
        tr.train_epoch()
        devs.append(max((p.detach() - w + lr * wd * w)[~m].abs().max().item() for p, w, m in zip(tr.method.params, before, tr.method.masks)))
    return devs


def test_paper_rule_moves_noncritical_weights_by_decay_only():
    assert max(_deviation_of_noncritical("paper")) < 1e-12
    code = _deviation_of_noncritical("code")
    assert code[0] < 1e-12 and max(code[1:]) > 1e-5  # momentum moves them from the second step on


def test_drop_momentum_without_state_is_a_no_op():
    net = _mlp(); opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    drop_momentum(opt, cdr_parameters(net), [torch.zeros_like(p, dtype=torch.bool) for p in cdr_parameters(net)])


def test_paper_rule_needs_sgd():
    with pytest.raises(ValueError, match="rule='paper' needs optimizer='sgd'"): _trainer(CDR(tau=0.2, rule="paper"), optimizer="adam")
    _trainer(CDR(tau=0.2, rule="code"), optimizer="adam")  # the code rule works with any optimizer


def test_aux_updates_only_the_batch_rows():
    tr = _trainer(AUX(lamb=2.0, aux_lr=0.3), batch=4)
    x, y = tr.batch(torch.arange(12)); idx = torch.tensor([1, 5, 6, 10])
    tr.optimizer.zero_grad(); logits = tr.method.forward(tr, x[idx])
    tr.method.loss(tr, logits.float(), y[idx], idx, x[idx]).backward()
    tr.method.after_step(tr)
    b = tr.method.b
    s = torch.softmax(logits.detach().float(), 1)
    torch.testing.assert_close(b[idx], -0.3 * 2.0 * (s - F.one_hot(y[idx], 3).float()))  # −η_b λ (softmax − e_y)
    others = torch.ones(12, dtype=torch.bool); others[idx] = False
    assert torch.equal(b[others], torch.zeros(8, 3))


def test_aux_default_lr_follows_the_optimizer_and_logs():
    tr = _trainer(AUX(lamb=1.0), batch=12, lr=0.05); tr.train_epoch()
    assert len(tr.method.log) == 1 and 0 <= tr.method.log[0]["train_acc_aux"] <= 1
    sd = tr.method.state_dict(); m2 = AUX(lamb=1.0); t2 = _trainer(m2); m2.load_state_dict(sd)
    assert torch.equal(m2.b, tr.method.b) and m2.log == tr.method.log


def test_losses_penalty_and_errors():
    out, y = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    torch.testing.assert_close(per_example_loss(out, y, "mse"), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="valid losses: ce, mse"): per_example_loss(out, y, "hinge")
    with pytest.raises(ValueError, match="valid losses: ce, mse"): AUX(loss="hinge")
    with pytest.raises(ValueError, match="valid: lamb >= 0"): RDI(lamb=-1.0)
    assert rdi_penalty([torch.full((3,), 2.0)], [torch.zeros(3)], 2.0, 4).item() == pytest.approx(4 / 8 * 12)


def test_rdi_state_round_trip():
    tr = _trainer(RDI(lamb=3.0)); init = [p.clone() for p in tr.method.init]
    tr.train_epoch(); sd = tr.method.state_dict()
    m2 = RDI(lamb=3.0); _trainer(m2); m2.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(m2.init, init))


def test_closed_forms_agree():
    g = torch.Generator().manual_seed(0)
    Phi, r = torch.randn(8, 20, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    dW, b = aux_min_norm(Phi, r, 2.0)
    torch.testing.assert_close(dW, kernel_ridge_weights(Phi, r, 2.0))
    torch.testing.assert_close(Phi @ dW + 2.0 * b, r)
    torch.testing.assert_close(Phi @ dW, kernel_ridge_predict(Phi @ Phi.T, Phi @ Phi.T, r, 2.0))


def test_aux_and_rdi_reach_the_same_linear_predictor():
    g = torch.Generator().manual_seed(3); n, D, C = 20, 60, 3
    X, Y = torch.randn(n, D, generator=g) / math.sqrt(D), torch.arange(n) % C
    Xn = torch.randn(10, D, generator=g) / math.sqrt(D)
    K = (X @ X.T).double(); r = F.one_hot(Y, C).double()
    eta = n / torch.linalg.eigvalsh(K + torch.eye(n, dtype=torch.float64)).max().item()
    cfg = TrainConfig(epochs=150, batch_size=n, lr=eta, optimizer="sgd", momentum=0.0, weight_decay=0.0, normalize=None, device="cpu", progress=False)
    want = kernel_ridge_predict((Xn @ X.T).double(), K, r, 1.0)
    d = LabeledData(X, Y, list("abc"), "lin", "train")
    for meth in (AUX(1.0, aux_lr=eta / n, loss="mse"), RDI(1.0, loss="mse")):
        mdl = nn.Linear(D, C, bias=False)
        with torch.no_grad(): mdl.weight.zero_()
        fit(mdl, d, d, None, meth, cfg)
        torch.testing.assert_close(mdl(Xn).detach().double(), want, atol=1e-5, rtol=1e-4)


def test_registry_and_composition():
    names = ["SGD", "CDR", "AUX", "CDR+AUX", "RDI", "CDR+RDI"]
    hp = {"CDR": {"tau": 0.2}, "CDR+AUX": {"tau": 0.2}, "CDR+RDI": {"tau": 0.2}}
    ms = [get_method(n, **hp.get(n, {})) for n in names]
    assert [type(m) for m in ms] == [SGD, CDR, AUX, CDRAUX, RDI, CDRRDI] and [m.name for m in ms] == names
    tr = _trainer(get_method("CDR+AUX", tau=0.4, lamb=1.0)); tr.train_epoch()
    assert len(tr.method.params) == 2 and tr.method.b.shape == (12, 3) and tr.method.masks is not None
    assert get_method("CDR+RDI", tau=0.4, lamb=2.0).hparams() == {"tau": 0.4, "rule": "code", "lamb": 2.0, "loss": "ce"}
    tr = _trainer(get_method("CDR+RDI", tau=0.4, lamb=2.0)); tr.train_epoch()
    assert [p.ndim for p in tr.method.params] == [2, 2] and len(tr.method.rdi_params) == 4  # mask on weights, penalty on all


def test_protocol_helpers():
    cfg = report_config(epochs=5, seed=3)
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.milestones, cfg.optimizer) == (32, 0.01, 0.9, 1e-3, (9, 19), "sgd")
    assert TrainConfig(**report_train(5)).batch_size == 32 and report_train(7)["epochs"] == 7 and report_train(5)["progress"] is False
    assert matched_rdi_lamb(1.0, cfg) == pytest.approx(math.sqrt(3.2))
    assert noise_options("asymmetric") == {"seven_to_one": False} and noise_options("instance") == {}
    assert table1_hparams(["CDR"], tau=0.3, rule="paper") == {"CDR": {"tau": 0.3, "rule": "paper"}}
    assert table1_hparams(["AUX"], aux_lr=0.1) == {"AUX": {"lamb": 10.0, "aux_lr": 0.1}}
    assert table1_hparams()["CDR+AUX"] == {"tau": NOISE, "rule": "code", "lamb": 10.0, "aux_lr": None}
    assert table1_hparams(["SGD", "RDI"], lamb=1.0)["RDI"] == {"lamb": round(math.sqrt(3.2), 4)}


def test_protocols_quick_preset_is_the_quick_configuration():
    t = TABLE1.at("quick")
    assert t.dataset == "mnist" and t.settings == (("pairflip", 0.4), ("pairflip", 0.7)) and t.seeds == (1, 2, 3)
    assert t.methods == ("SGD", "CDR", "AUX", "CDR+AUX") and t.train == report_train(5) and t.baseline == "SGD"
    runs = {p.name: expand(p.at("quick")) for p in (TABLE1, FIG1, FIG2, RULES)}
    assert {k: len(v) for k, v in runs.items()} == {"cdr_table1": 24, "cdr_fig1": 1, "cdr_fig2": 9, "cdr_rules": 6}
    table = {r.key: r for r in runs["cdr_table1"]}
    shared = [r for r in runs["cdr_fig2"] + runs["cdr_rules"] if r.key in table]          # the table's CDR+AUX (λ = 10) and CDR (code rule) runs
    assert sorted((r.method, r.seed) for r in shared) == sorted([("CDR+AUX", s) for s in (1, 2, 3)] + [("CDR", s) for s in (1, 2, 3)])
    cdr = next(r for r in runs["cdr_table1"] if r.method == "CDR" and r.noise == 0.7)
    assert cdr.hparams == {"tau": 0.7, "rule": "code"} and cdr.splits == {"val": 0.1, "noise_first": True}
    assert sorted({r.hparams["lamb"] for r in runs["cdr_fig2"]}) == [3.0, 10.0, 30.0]
    assert runs["cdr_fig1"][0].noise_type == "symmetric" and runs["cdr_fig1"][0].seed == 1


def test_protocols_paper_preset_and_checks():
    p = TABLE1.at("paper")
    assert len(p.settings) == 12 and p.train["epochs"] == 100 and len(expand(p)) == 12 * 3 * 4
    asym = expand(TABLE1.at("paper", settings=[("asymmetric", 0.4)], seeds=1))
    assert all(r.splits["seven_to_one"] is False for r in asym)
    assert expand(FIG2.at("paper"))[0].noise_type == "instance" and len(expand(FIG2.at("paper"))) == 3 * 3 * 5
    with pytest.raises(ValueError, match="settings given for method 'CDR'"): TABLE1.at("quick", methods=("SGD", "RDI"))
    with pytest.raises(ValueError, match="has no keyword 'lamb'"): TABLE1.at("quick", hparams={"CDR": {"tau": 0.2, "lamb": 1.0}})


def test_scorecard_covers_the_report():
    items = " | ".join(e.item for e in SCORECARD)
    for what in ("Table 1", "Fig. 1", "Fig. 2", "RDI"): assert what in items
    assert all(e.paper == "CDR+AUX" and e.notebook == "08_cdr_aux" and e.protocol is not None and e.cannot is None for e in SCORECARD)
    assert {e.protocol.scale for e in SCORECARD} == {"quick", "paper"}


def test_aux_history_records_the_training_accuracy_of_f_plus_b():
    d = _data(12)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.1, optimizer="sgd", normalize=None, device="cpu", progress=False)
    res = fit(_mlp(), d, d, None, AUX(lamb=2.0), cfg)
    assert [("train_acc_aux" in h) for h in res.history] == [True] * 3
    assert all(0 <= h["train_acc_aux"] <= 1 for h in res.history)


# --- CDR and AUX on one real MNIST batch: LeNet, the report's training configuration (fp32 SGD, lr 0.01, momentum 0.9, wd 1e-3)

@pytest.fixture(scope="module")
def mnist_batch():
    "32 images of mnist5k with pairflip-40% labels (the offline MNIST subset, always available)."
    return subsample(noisy_splits("mnist5k", "pairflip", 0.4, val=0.1, seed=1, noise_first=True).train, 32, seed=0)


def _trace(method, data, steps=2, seed=1):
    "Per step (one batch = one step per epoch): weights before/after, raw loss gradients (hook, before masking), momentum buffers, CDR masks."
    tr = Trainer(get_model("lenet", 10, seed=seed), data, data, None, method, report_config(epochs=steps, seed=seed, device="cpu", progress=False))
    ps, grads, out = list(tr.model.parameters()), {}, []
    hooks = [p.register_hook(lambda g, i=i: grads.__setitem__(i, g.detach().clone())) for i, p in enumerate(ps)]
    for _ in range(steps):
        bufs = [tr.optimizer.state.get(p, {}).get("momentum_buffer") for p in ps]
        st = {"before": [p.detach().clone() for p in ps], "buf": [torch.zeros_like(p) if b is None else b.clone() for p, b in zip(ps, bufs)]}
        tr.train_epoch()
        ranked = {id(p): m.clone() for p, m in zip(getattr(tr.method, "params", []), getattr(tr.method, "masks", None) or [])}
        st |= {"after": [p.detach().clone() for p in ps], "grad": [grads[i] for i in range(len(ps))], "mask": [ranked.get(id(p)) for p in ps]}
        if isinstance(tr.method, AUX): st["b"] = tr.method.b.clone()
        out.append(st)
    for h in hooks: h.remove()
    return out


def _update_error(st, tau=0.0, rule="code", masks=None):
    "Max |Δw − (−η(μ·k·buf + s·g + λw))|: s = (1−τ)·mask on ranked weights, k = mask under the paper rule, else 1."
    c, err = report_config(), {"critical": 0.0, "non-critical": 0.0, "unranked": 0.0}
    for w0, w1, g, buf, m in zip(st["before"], st["after"], st["grad"], st["buf"], masks or st["mask"]):
        w0, w1, g, buf = (t.double() for t in (w0, w1, g, buf))
        s, k = (1.0, 1.0) if m is None else (m * (1 - tau), m.double() if rule == "paper" else 1.0)
        e = (w1 - w0 + c.lr * (c.momentum * k * buf + s * g + c.weight_decay * w0)).abs()
        if m is None: err["unranked"] = max(err["unranked"], e.max().item())
        else:
            for t, sel in (("critical", m), ("non-critical", ~m)):
                if sel.any(): err[t] = max(err[t], e[sel].max().item())
    return err


@pytest.mark.parametrize("rule", ["code", "paper"])
def test_cdr_step_on_real_batch_is_the_sgd_step_masked(mnist_batch, rule):
    tau, sgd = 0.4, _trace(get_method("SGD"), mnist_batch)
    cdr = _trace(get_method("CDR", tau=tau, rule=rule), mnist_batch)
    assert all(torch.equal(a, b) for a, b in zip(cdr[0]["grad"], sgd[0]["grad"]))       # step 1: SGD's gradient ...
    for st in cdr:
        ranked = [(g, w, m) for g, w, m in zip(st["grad"], st["before"], st["mask"]) if m is not None]
        scores = torch.cat([(g * w).abs().flatten() for g, w, _ in ranked]); k = num_critical(scores.numel(), tau)
        thr = scores.sort(descending=True).values[k - 1]
        assert all(torch.equal(m, (g * w).abs() >= thr) for g, w, m in ranked)             # ... masked by the global top-k of |g·w|
        assert sum(int(m.sum()) for _, _, m in ranked) == k
        assert max(_update_error(st, tau, rule).values()) < 1e-7                          # Δw = −η(μ k buf + s g + λw), every entry
    neg = _update_error(sgd[0], tau, rule, masks=cdr[0]["mask"])                          # SGD judged as CDR: what an unmasked CDR does
    assert neg["critical"] > 1e-5 and neg["non-critical"] > 1e-5
    step2_as_paper = _update_error(cdr[1], tau, "paper")["non-critical"]
    assert (step2_as_paper < 1e-7) if rule == "paper" else (step2_as_paper > 1e-6)         # code rule: momentum also moves W_n


def test_exact_reductions_to_sgd_and_cdr(mnist_batch):
    final = lambda tr: tr[-1]["after"]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(final(a), final(b)))
    sgd, cdr = _trace(get_method("SGD"), mnist_batch), _trace(get_method("CDR", tau=0.4), mnist_batch)
    assert same(_trace(get_method("CDR", tau=0.0), mnist_batch), sgd)                    # τ = 0: every weight critical, factor 1
    assert same(_trace(get_method("AUX", lamb=0.0), mnist_batch), sgd)                   # λ = 0: b never reaches the loss
    assert same(_trace(get_method("CDR+AUX", tau=0.4, lamb=0.0), mnist_batch), cdr)      # λ = 0: CDR+AUX is CDR
    assert not same(cdr, sgd) and not same(_trace(get_method("AUX", lamb=10.0), mnist_batch), sgd)
    assert not any(torch.equal(a, b) for a, b in zip(final(sgd), sgd[0]["before"]))


def test_aux_on_real_batch_b_and_gradient(mnist_batch):
    lamb, lr = 10.0, report_config().lr
    aux = _trace(get_method("AUX", lamb=lamb), mnist_batch)
    net, x = get_model("lenet", 10, seed=1), normalize(mnist_batch.x, "mnist")
    with torch.no_grad():
        for p, w in zip(net.parameters(), aux[0]["before"]): p.copy_(w)
        torch.testing.assert_close(aux[0]["b"], -lr * lamb * (net(x).softmax(1) - F.one_hot(mnist_batch.y, 10)), atol=1e-6, rtol=1e-5)
        for p, w in zip(net.parameters(), aux[1]["before"]): p.copy_(w)
    def grads(offset):
        net.zero_grad(); F.cross_entropy(net(x) + offset, mnist_batch.y).backward(); return [p.grad.clone() for p in net.parameters()]
    with_b, without = grads(lamb * aux[0]["b"]), grads(torch.zeros(()))
    assert max((a - b).abs().max().item() for a, b in zip(aux[1]["grad"], with_b)) < 1e-6      # the network trains on f + λb
    assert max((a - b).abs().max().item() for a, b in zip(aux[1]["grad"], without)) > 1e-4


def test_paired_gap():
    g = paired_gap({1: 80.0, 2: 82.0, 3: 81.0}, {1: 70.0, 2: 71.0, 3: 72.5})
    assert g["gap"] == pytest.approx(29.5 / 3) and g["n"] == 3 and g["verdict"] == "above noise"
    assert g["se"] == pytest.approx(math.sqrt(sum((d - 29.5 / 3) ** 2 for d in (10, 11, 8.5)) / 2 / 3))
    assert paired_gap([80, 70, 90], [79, 71, 88])["verdict"] == "within noise"
    assert paired_gap([60, 80, 70], [59, 79, 69])["verdict"] == "above noise"      # a constant gap under large shared seed noise
    assert paired_gap([80, 70, 90], [79, 71, 88], z=0.5)["verdict"] == "above noise"
    one = paired_gap({1: 80.0}, {1: 70.0})
    assert one["verdict"] == "one seed: no noise estimate" and math.isnan(one["se"])
    assert paired_gap({1: 80.0, 2: 81.0}, {2: 70.0, 3: 1.0})["n"] == 1
    with pytest.raises(ValueError, match="no common seeds"): paired_gap({1: 80.0}, {2: 70.0})
    with pytest.raises(ValueError, match="equal-length lists"): paired_gap([1.0, 2.0], [1.0])
