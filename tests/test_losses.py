"""Contracts of noisyrepro.losses: values, reductions, gradients and error messages."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisyrepro.losses import (LOSSES, ce_loss, coteaching_forget_rate, coteaching_select, estimate_transition,
                               forward_loss, gce_loss, get_loss, label_smoothing_loss, logit_grad_noise, mae_loss,
                               phuber_ce_loss, truncated_gce_loss)

C = 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(32, C, generator=g), torch.randint(0, C, (32,), generator=g)


def _sy(logits, y):
    return logits.softmax(1)[torch.arange(len(y)), y]


PER_EXAMPLE = {  # name -> (loss with hyper-parameters bound, closed form in s_y or None)
    "CE": (ce_loss, lambda s: -s.log()),
    "MAE": (mae_loss, lambda s: 2 * (1 - s)),
    "GCE": (lambda a, y, **k: gce_loss(a, y, q=0.7, **k), lambda s: (1 - s**0.7) / 0.7),
    "TruncGCE": (lambda a, y, **k: truncated_gce_loss(a, y, q=0.7, k=0.5, **k),
                 lambda s: torch.where(s <= 0.5, torch.full_like(s, (1 - 0.5**0.7) / 0.7), (1 - s**0.7) / 0.7)),
    "PHuber-CE": (lambda a, y, **k: phuber_ce_loss(a, y, tau=4., **k),
                  lambda s: torch.where(s <= 0.25, -4 * s + math.log(4) + 1, -s.log())),
    "FW": (lambda a, y, **k: forward_loss(a, y, torch.eye(C), **k), lambda s: -s.log()),
    "LS": (lambda a, y, **k: label_smoothing_loss(a, y, eps=0., **k), lambda s: -s.log()),
}


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_closed_forms_and_reductions(batch, name):
    a, y = batch
    fn, closed = PER_EXAMPLE[name]
    per = fn(a, y, reduction="none")
    assert per.shape == (32,)
    torch.testing.assert_close(per, closed(_sy(a, y)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn(a, y), per.mean())
    torch.testing.assert_close(fn(a, y, reduction="sum"), per.sum())
    with pytest.raises(ValueError, match="unknown reduction 'avg'; valid reductions: mean, sum, none"):
        fn(a, y, reduction="avg")


def test_ce_matches_torch(batch):
    a, y = batch
    torch.testing.assert_close(ce_loss(a, y), F.cross_entropy(a, y))


def test_shape_errors(batch):
    a, y = batch
    with pytest.raises(ValueError, match="logits must be B×C"):
        ce_loss(a[0], y[:1])
    with pytest.raises(ValueError, match=r"y must have shape \(32,\)"):
        gce_loss(a, y[:3])


def test_gce_limits(batch):
    a, y = batch
    lce = ce_loss(a, y, reduction="none")
    torch.testing.assert_close(gce_loss(a, y, q=1e-4, reduction="none"), lce, atol=5e-3, rtol=0)
    torch.testing.assert_close(gce_loss(a, y, q=1.0, reduction="none"), mae_loss(a, y, reduction="none") / 2)
    for q in (0., 1.5):
        with pytest.raises(ValueError, match="valid q: 0 < q <= 1"):
            gce_loss(a, y, q=q)
    with pytest.raises(ValueError, match="valid k: 0 < k < 1"):
        truncated_gce_loss(a, y, k=0.)


def test_truncated_gce_no_grad_below_k(batch):
    a, y = batch
    a = a.clone().requires_grad_()
    truncated_gce_loss(a, y, k=0.5).backward()
    low = _sy(a.detach(), y) <= 0.5
    assert 0 < low.sum() < len(y)
    assert a.grad[low].abs().max() == 0 and a.grad[~low].abs().max() > 0


def test_forward_loss(batch):
    a, y = batch
    T = torch.full((C, C), 0.1) + 0.5 * torch.eye(C)  # rows: 0.6 on the diagonal, 0.1 elsewhere
    s = a.softmax(1)
    torch.testing.assert_close(forward_loss(a, y, T, reduction="none"), -(s @ T)[torch.arange(32), y].log())
    # LIMIT's clip: a vanishing s_y gives -log(1e-10) instead of inf
    torch.testing.assert_close(forward_loss(torch.tensor([[-200., 0.]]), torch.tensor([0]), torch.eye(2)),
                               torch.tensor(-math.log(1e-10)))
    with pytest.raises(ValueError, match="T must be 5×5"):
        forward_loss(a, y, torch.eye(3))
    with pytest.raises(ValueError, match="not row-stochastic"):
        forward_loss(a, y, T * 1.1)
    with pytest.raises(ValueError, match="not row-stochastic"):
        forward_loss(a, y, torch.eye(C) * 2 - torch.full((C, C), 1 / C))  # rows sum to 1 but negative entries


def _anchor_probs(T, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = T.shape[0]
    clean = -torch.rand(n, k, generator=g).log(); clean = clean / clean.sum(1, keepdim=True)
    n_a = n // 10
    for i in range(k):
        d = 0.01 * torch.rand(n_a, 1, generator=g)
        clean[i * n_a:(i + 1) * n_a] = (1 - d) * F.one_hot(torch.tensor(i), k) + d * clean[i * n_a:(i + 1) * n_a]
    return clean.double() @ T


def test_estimate_transition_recovers_T():
    T = torch.tensor([[.7, .2, .1], [.15, .8, .05], [.25, .0, .75]], dtype=torch.float64)
    probs = _anchor_probs(T)
    That = estimate_transition(probs)
    assert That.shape == (3, 3) and That.dtype == torch.float64
    torch.testing.assert_close(That, T, atol=1e-2, rtol=0)
    torch.testing.assert_close(estimate_transition(probs, percentile=None), T, atol=1e-3, rtol=0)
    # memorised one-hot outliers (1%): the 97th-percentile filter removes them, the unfiltered estimate collapses
    probs_o = torch.cat([probs, F.one_hot(torch.arange(20) % 3, 3).double()])
    torch.testing.assert_close(estimate_transition(probs_o), T, atol=1e-2, rtol=0)
    assert (estimate_transition(probs_o, percentile=None).diagonal() > 0.99).all()


def test_estimate_transition_matches_numpy_reference():
    g = torch.Generator().manual_seed(3)
    probs = torch.randn(500, 4, generator=g).mul(2).softmax(1).double()
    p = probs.numpy().copy()
    T = np.zeros((4, 4))
    for i in range(4):  # LIMIT/Patrini procedure, without the in-place side effect across classes
        col = p[:, i].copy()
        col[col >= np.percentile(col, 97, method="higher")] = 0.0
        T[i] = p[np.argmax(col)]
    T /= T.sum(1, keepdims=True)
    np.testing.assert_allclose(estimate_transition(probs).numpy(), T, atol=1e-12)


def test_estimate_transition_errors():
    with pytest.raises(ValueError, match="valid: None or 0 < percentile <= 100"):
        estimate_transition(torch.full((10, 2), 0.5), percentile=150)
    with pytest.raises(ValueError, match="probs must be a non-negative N×C matrix"):
        estimate_transition(torch.full((10,), 0.5))


def test_label_smoothing_matches_torch(batch):
    a, y = batch
    for eps in (0.2, 0.5, 0.8):
        torch.testing.assert_close(label_smoothing_loss(a, y, eps), F.cross_entropy(a, y, label_smoothing=eps))
    with pytest.raises(ValueError, match="valid eps: 0 <= eps <= 1"):
        label_smoothing_loss(a, y, -0.1)


def test_phuber_gradient_is_clipped():
    tau = 5.
    # two classes, logits (z, 0): s_y = sigmoid(z); d loss/d s_y = d loss/dz / (s(1-s))
    z = torch.linspace(-8, 8, 401, dtype=torch.float64).requires_grad_()
    logits = torch.stack([z, torch.zeros_like(z)], 1)
    phuber_ce_loss(logits, torch.zeros(401, dtype=torch.long), tau, reduction="sum").backward()
    s = torch.sigmoid(z.detach())
    dl_ds = z.grad / (s * (1 - s))
    torch.testing.assert_close(dl_ds, -torch.minimum(torch.full_like(s, tau), 1 / s), atol=1e-6, rtol=1e-6)
    assert dl_ds.abs().max() <= tau + 1e-6
    with pytest.raises(ValueError, match="valid tau: tau > 1"):
        phuber_ce_loss(logits, torch.zeros(401, dtype=torch.long), tau=0.5)


def test_coteaching_forget_rate():
    ref = np.ones(20) * 0.45
    ref[:10] = np.linspace(0, 0.45, 10)
    np.testing.assert_allclose([coteaching_forget_rate(e, 0.45) for e in range(20)], ref, atol=1e-12)
    np.testing.assert_allclose([coteaching_forget_rate(e, 0.2, num_gradual=5) for e in range(6)],
                               [0, .05, .1, .15, .2, .2], atol=1e-12)
    with pytest.raises(ValueError, match="valid: 0 <= forget_rate <= 1"):
        coteaching_forget_rate(0, -0.1)
    with pytest.raises(ValueError, match="valid: non-negative integers"):
        coteaching_forget_rate(-1, 0.2)


def test_coteaching_select():
    l1 = torch.tensor([0.9, 0.1, 0.5, 0.3, 2.0])
    l2 = torch.tensor([0.1, 3.0, 0.2, 0.4, 0.3])
    i1, i2 = coteaching_select(l1, l2, 0.4)  # keep int(0.6 * 5) = 3
    assert i1.tolist() == [1, 3, 2] and i2.tolist() == [0, 2, 4]
    assert len(coteaching_select(l1, l2, 0.0)[0]) == 5
    assert len(coteaching_select(torch.arange(10.), torch.arange(10.), 0.25)[0]) == 7  # floor(0.75 * 10)
    with pytest.raises(ValueError, match="valid: 0 <= forget_rate < 1"):
        coteaching_select(l1, l2, 1.0)
    with pytest.raises(ValueError, match="equal length"):
        coteaching_select(l1, l2[:4], 0.2)


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_logit_grad_noise(batch, dist):
    a, y = batch
    assert torch.equal(logit_grad_noise(a, 0.1, dist), a)

    def grad(sigma, gen=None):
        z = a.clone().requires_grad_()
        ce_loss(logit_grad_noise(z, sigma, dist, gen), y).backward()
        return z.grad

    clean = (a.softmax(1) - F.one_hot(y, C)) / len(y)
    torch.testing.assert_close(grad(0.), clean)
    gen = torch.Generator().manual_seed(0)
    diff = torch.stack([grad(0.05, gen) - clean for _ in range(300)])  # 48,000 draws
    assert abs(diff.std().item() / 0.05 - 1) < 0.05
    assert abs(diff.mean().item()) < 0.05 * 0.05
    torch.testing.assert_close(grad(0.05, torch.Generator().manual_seed(7)), grad(0.05, torch.Generator().manual_seed(7)))
    assert not torch.equal(grad(0.05, torch.Generator().manual_seed(7)), grad(0.05, torch.Generator().manual_seed(8)))


def test_logit_grad_noise_errors(batch):
    a, _ = batch
    with pytest.raises(ValueError, match="unknown dist 'uniform'; valid dists: gaussian, laplace"):
        logit_grad_noise(a, 0.1, "uniform")
    with pytest.raises(ValueError, match="valid sigma: sigma >= 0"):
        logit_grad_noise(a, -0.1)


def test_registry(batch):
    a, y = batch
    assert {"CE", "MAE", "GCE", "LS", "PHuber-CE", "FW", "TruncGCE"} <= set(LOSSES)
    torch.testing.assert_close(get_loss("PHuber-CE", tau=2.)(a, y), phuber_ce_loss(a, y, tau=2.))
    torch.testing.assert_close(get_loss("LS", eps=0.3)(a, y, reduction="sum"), label_smoothing_loss(a, y, 0.3, "sum"))
    with pytest.raises(ValueError, match="unknown loss 'SLN'; valid losses: CE, MAE, GCE"):
        get_loss("SLN")
    with pytest.raises(ValueError, match="valid keywords: tau, reduction"):
        get_loss("PHuber-CE", q=0.7)
