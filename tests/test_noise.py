"""Contracts of noisyrepro.noise: label-noise generators, their matrices, errors, warnings and provenance."""
import hashlib, math, warnings

import numpy as np
import pytest
import torch

from noisyrepro.noise import (ASYMMETRIC_DATASETS, KINDS, NoisyLabels, asymmetric_flips, asymmetric_transition,
                              average_softmax, check_transition, corrupt_labels, empirical_transition, idn_candidates,
                              idn_flip, informative_threshold, instance_flip_probs, intended_transition, is_informative,
                              open_set_replace, pairflip_transition, symmetric_transition, uniform_transition)

F64 = torch.float64
Y10 = torch.arange(10).repeat_interleave(3000)  # 30k labels, 3000 per class


def _warnings(f):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        f()
    return [str(x.message) for x in w if issubclass(x.category, UserWarning)]


def _images(n, seed=1):
    return torch.randint(0, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _all_kind_calls():
    imgs = _images(len(Y10))
    T = torch.full((10, 10), 0.02, dtype=F64).fill_diagonal_(0.82)
    return {
        "symmetric": dict(rate=0.4), "uniform": dict(rate=0.4), "pairflip": dict(rate=0.3),
        "asymmetric": dict(rate=0.4, dataset="mnist"), "transition": dict(rate=None, T=T),
        "instance": dict(rate=0.3, images=imgs),
    }


# ---------------------------------------------------------------- matrices

def test_symmetric_uniform_pairflip_matrices():
    T = symmetric_transition(10, 0.4)
    assert torch.allclose(T.diagonal(), torch.full((10,), 0.6, dtype=F64))
    assert torch.allclose(T[0, 1:], torch.full((9,), 0.4 / 9, dtype=F64))
    U = uniform_transition(10, 0.4)
    assert math.isclose(U[0, 0].item(), 1 - 0.4 * 9 / 10) and math.isclose(U[0, 3].item(), 0.04)
    P = pairflip_transition(5, 0.3)
    assert P[4, 0].item() == pytest.approx(0.3) and P[4, 4].item() == pytest.approx(0.7) and P[4, 1] == 0
    for M in (T, U, P):
        assert torch.allclose(M.sum(1), torch.ones(len(M), dtype=F64))


def test_asymmetric_maps():
    assert asymmetric_flips("mnist") == {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
    assert asymmetric_flips("mnist", seven_to_one=False) == {2: 7, 3: 8, 5: 6, 6: 5}
    assert asymmetric_flips("cifar10") == {9: 1, 2: 0, 4: 7, 3: 5}
    assert asymmetric_flips("cifar10", dog_to_cat=True)[5] == 3
    assert asymmetric_flips("fashion_mnist") == {0: 6, 2: 4, 5: 7, 7: 5}
    assert asymmetric_flips("mr") == {1: 0} and asymmetric_flips("dogs_vs_cats") == {0: 1}
    assert all(asymmetric_flips("cifar100")[y] == (y + 1) % 100 for y in range(100))
    b5 = asymmetric_flips("cifar100", block=5)
    assert b5[4] == 0 and b5[9] == 5 and b5[97] == 98 and b5[99] == 95
    T = asymmetric_transition("cifar10", 0.3)
    assert T[3, 5].item() == pytest.approx(0.3) and T[5, 5] == 1 and T[0, 0] == 1


def test_fashion_bags_cases():
    r = 0.4
    assert torch.allclose(asymmetric_transition("fashion_bags", r, case=1), torch.tensor([[1 - r / 2, r / 2], [r / 2, 1 - r / 2]], dtype=F64))
    assert torch.allclose(asymmetric_transition("fashion_bags", r, case=2), torch.tensor([[1 - r, r], [0, 1]], dtype=F64))
    assert torch.allclose(asymmetric_transition("fashion_bags", r, case=3), torch.tensor([[1, 0], [r, 1 - r]], dtype=F64))
    with pytest.raises(ValueError, match="valid cases: 1, 2, 3"):
        asymmetric_transition("fashion_bags", r, case=4)


def test_empirical_transition_identity_row_for_absent_class():
    T = empirical_transition(torch.tensor([0, 0, 2]), torch.tensor([1, 0, 2]), 3)
    assert torch.equal(T, torch.tensor([[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]], dtype=F64))


def test_check_transition_errors():
    with pytest.raises(ValueError, match=r"row 1 of T sums to 0\.9"):
        check_transition([[1, 0], [0.5, 0.4]])
    with pytest.raises(ValueError, match=r"T\[0,1\] = -0\.1 is negative"):
        check_transition([[1.1, -0.1], [0, 1]])
    with pytest.raises(ValueError, match="expected a square 3×3"):
        check_transition(torch.eye(2), num_classes=3)
    with pytest.raises(ValueError, match="non-finite"):
        check_transition([[float("nan"), 1], [0, 1]])


def test_informative_and_thresholds():
    assert informative_threshold(lambda p: symmetric_transition(10, p)) == pytest.approx(0.9, abs=1e-8)
    assert informative_threshold(lambda p: pairflip_transition(10, p)) == pytest.approx(0.5, abs=1e-8)
    T_sing = torch.stack([torch.tensor([.4, .25, .1, .25], dtype=F64).roll(i) for i in range(4)])
    assert not is_informative(T_sing)  # dominant but singular
    assert is_informative(symmetric_transition(10, 0.89))


# ---------------------------------------------------------------- corrupt_labels contracts

@pytest.mark.parametrize("kind", ["symmetric", "uniform", "pairflip", "asymmetric", "transition", "instance"])
def test_fields_consistent_and_seeded(kind):
    kw = dict(_all_kind_calls()[kind]); rate = kw.pop("rate")
    torch.manual_seed(1); np.random.seed(1)
    a = corrupt_labels(Y10, kind, rate, seed=3, **kw)
    torch.manual_seed(2); np.random.seed(2); torch.rand(7); np.random.rand(5)
    b = corrupt_labels(Y10.numpy(), kind, rate, seed=3, **kw)
    c = corrupt_labels(Y10, kind, rate, seed=4, **kw)
    assert torch.equal(a.labels, b.labels) and a.sha256 == b.sha256
    assert not torch.equal(a.labels, c.labels)
    assert a.labels.dtype == torch.int64 and torch.equal(a.clean, Y10)
    assert torch.equal(a.is_noisy, a.labels != a.clean)
    assert a.rate == pytest.approx(a.is_noisy.float().mean().item())
    assert torch.allclose(a.transition.sum(1), torch.ones(10, dtype=F64))
    assert torch.allclose(a.transition, empirical_transition(a.clean, a.labels, 10))
    assert a.kind == kind and a.seed == 3 and a.nominal == rate
    assert (a.intended is None) == (kind == "instance")


@pytest.mark.parametrize("kind,rate,kw", [("symmetric", 0.4, {}), ("uniform", 0.5, {}), ("pairflip", 0.3, {}),
                                          ("asymmetric", 0.4, dict(dataset="cifar10", dog_to_cat=True)),
                                          ("asymmetric", 0.3, dict(dataset="cifar100", block=5))])
def test_empirical_matches_intended_within_5_se(kind, rate, kw):
    C = 100 if kw.get("dataset") == "cifar100" else 10
    y = torch.arange(C).repeat_interleave(60_000 // C)
    nl = corrupt_labels(y, kind, rate, seed=0, **kw)
    n_i = torch.bincount(y, minlength=C).double()[:, None]
    se = (nl.intended * (1 - nl.intended) / n_i).sqrt()
    dev = (nl.transition - nl.intended).abs()
    assert bool((dev[se == 0] == 0).all())
    assert (dev[se > 0] / se[se > 0]).max() <= 5


def test_exact_counts():
    nl = corrupt_labels(Y10, "asymmetric", 0.37, dataset="mnist", exact=True)
    N = (nl.transition * 3000).round().long()
    assert N[2, 7] == round(0.37 * 3000) and N[7, 1] == round(0.37 * 3000) and N[0, 0] == 3000
    assert nl.options["exact"] is True
    s = corrupt_labels(Y10, "symmetric", 0.45, exact=True)
    Ns = (s.transition * 3000).round().long()
    assert bool((Ns[~torch.eye(10, dtype=torch.bool)] == round(0.45 / 9 * 3000)).all())


def test_num_classes_defaults():
    assert corrupt_labels([0, 1, 2, 2], "symmetric", 0.5).num_classes == 3
    assert corrupt_labels([0, 1, 1], "asymmetric", 0.3, dataset="mr").num_classes == 2
    assert corrupt_labels([0, 1], "transition", None, T=torch.eye(4)).num_classes == 4
    nl = corrupt_labels([0, 1, 1], "symmetric", 0.2, num_classes=5)
    assert nl.num_classes == 5 and torch.equal(nl.transition[4], torch.eye(5, dtype=F64)[4])


def test_binary_datasets_flip_direction():
    y = torch.tensor([0, 1] * 5000)
    mr = corrupt_labels(y, "asymmetric", 0.3, dataset="mr")
    assert bool((mr.labels[y == 0] == 0).all()) and 0.25 < mr.transition[1, 0] < 0.35
    dc = corrupt_labels(y, "asymmetric", 0.3, dataset="dogs_vs_cats")
    assert bool((dc.labels[y == 1] == 1).all()) and 0.25 < dc.transition[0, 1] < 0.35


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call,msg", [
    (lambda: corrupt_labels(Y10, "gaussian", 0.2), "unknown kind 'gaussian'; valid kinds: symmetric, uniform, pairflip"),
    (lambda: corrupt_labels(Y10, "asymmetric", 0.2, dataset="svhn"), "unknown dataset 'svhn'"),
    (lambda: corrupt_labels(Y10, "asymmetric", 0.2, dataset="svhn"), "valid datasets: mnist"),
    (lambda: corrupt_labels(Y10, "symmetric", 1.01), "rate 1.01 is outside [0, 1]"),
    (lambda: corrupt_labels(Y10, "symmetric", -0.2), "rate -0.2 is outside [0, 1]"),
    (lambda: corrupt_labels(Y10, "asymmetric", 0.2), "needs the keyword dataset="),
    (lambda: corrupt_labels(Y10, "transition", None), "needs the keyword T="),
    (lambda: corrupt_labels(Y10, "instance", 0.2), "needs the keyword images="),
    (lambda: corrupt_labels(Y10, "idn", 0.2), "needs the keyword softmax="),
    (lambda: corrupt_labels(Y10, "symmetric", 0.2, num_classes=5), "label 9 out of range for num_classes=5"),
    (lambda: corrupt_labels([-1, 0], "symmetric", 0.2, num_classes=2), "label -1 out of range"),
    (lambda: corrupt_labels(Y10, "asymmetric", 0.2, dataset="mr"), "out of range for num_classes=2"),
    (lambda: corrupt_labels(Y10, "asymmetric", 0.2, dataset="mnist", num_classes=12), "has 10 classes"),
    (lambda: corrupt_labels(Y10, "symmetric", 0.2, dataset="mnist"), "unexpected keyword(s) dataset"),
    (lambda: corrupt_labels(Y10, "asymmetric", 0.2, dataset="mnist", dog_to_cat=True), "dog_to_cat do not apply"),
    (lambda: corrupt_labels(Y10, "transition", 0.2, T=torch.eye(10)), "pass rate=None"),
    (lambda: corrupt_labels(Y10, "transition", None, T=torch.eye(10) * 0.5), "row 0 of T sums to 0.5"),
    (lambda: corrupt_labels(Y10, "transition", None, T=torch.eye(3)), "label 9 out of range for num_classes=3"),
    (lambda: corrupt_labels(Y10, "instance", 0.2, images=_images(5)), "images has 5 examples"),
    (lambda: corrupt_labels(Y10, "idn", 0.2, softmax=torch.ones(3, 10) / 10), "softmax has shape (3, 10)"),
    (lambda: corrupt_labels([[0, 1]], "symmetric", 0.2), "1-D"),
])
def test_errors_name_value_and_choices(call, msg):
    with pytest.raises(ValueError) as e:
        call()
    assert msg in str(e.value)


def test_kinds_listed():
    assert set(KINDS) == {"symmetric", "uniform", "pairflip", "asymmetric", "transition", "instance", "idn"}
    assert ASYMMETRIC_DATASETS == {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
                                   "fashion_bags": 2, "mr": 2, "dogs_vs_cats": 2}


# ---------------------------------------------------------------- warnings

def test_uninformative_warnings():
    y = torch.arange(10).repeat(20)
    assert _warnings(lambda: corrupt_labels(y, "symmetric", 0.89)) == []  # LIMIT's p = 0.89: 0.11 > 0.0989
    m = _warnings(lambda: corrupt_labels(y, "symmetric", 0.9))
    assert len(m) == 1 and "rate 0.9" in m[0] and "rate < 0.9" in m[0]
    m = _warnings(lambda: corrupt_labels(y, "pairflip", 0.5))
    assert len(m) == 1 and "rate < 0.5" in m[0]
    assert _warnings(lambda: corrupt_labels(y, "pairflip", 0.49)) == []
    assert _warnings(lambda: corrupt_labels(y, "uniform", 0.99)) == []
    assert len(_warnings(lambda: corrupt_labels([0, 1], "asymmetric", 0.6, dataset="fashion_bags", case=2))) == 1
    T_sing = torch.stack([torch.tensor([.4, .25, .1, .25], dtype=F64).roll(i) for i in range(4)])
    m = _warnings(lambda: corrupt_labels([0, 1, 2, 3], "transition", None, T=T_sing))
    assert len(m) == 1 and "singular" in m[0]


# ---------------------------------------------------------------- instance and idn

def test_instance_noise():
    imgs, y = _images(20_000, seed=2), torch.arange(20_000) % 5
    nl = corrupt_labels(y, "instance", 0.3, seed=1, images=imgs)
    assert abs(nl.rate - 0.3) < 0.02 and nl.intended is None
    P = instance_flip_probs(imgs, y, 0.3, 5, torch.Generator().manual_seed(1))
    assert torch.allclose(P.sum(1), torch.ones(len(y), dtype=F64))
    wrong = P.clone(); wrong[torch.arange(len(y)), y] = -1
    assert (nl.labels[nl.is_noisy] == wrong.argmax(1)[nl.is_noisy]).float().mean() > 0.99  # raw pixels: one-hot softmax


def test_idn_exact_count_and_candidates():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (1001,), generator=g)
    s = torch.rand(1001, 4, generator=g).softmax(1)
    for rate in (0.1, 0.29, 0.4):
        nl = corrupt_labels(y, "idn", rate, softmax=s)
        assert int(nl.is_noisy.sum()) == math.floor(rate * 1001 + 1e-9)
        cand, score = idn_candidates(s, y)
        assert torch.equal(nl.labels[nl.is_noisy], cand[nl.is_noisy])
        assert score[nl.is_noisy].min() >= score[~nl.is_noisy].max()  # the highest scores flip
    assert torch.equal(idn_flip(y, s, 0.0), y)


def test_average_softmax():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(average_softmax([a, b]), torch.tensor([[0.5, 0.5]], dtype=F64))
    with pytest.raises(ValueError, match="not a softmax"):
        average_softmax([torch.tensor([[3.0, -1.0]])])
    with pytest.raises(ValueError, match="empty"):
        average_softmax([])


# ---------------------------------------------------------------- open set, provenance

def test_open_set_replace():
    x = torch.zeros(100, 3, 2, 2, dtype=torch.uint8)
    o = torch.arange(1, 61, dtype=torch.uint8)[:, None, None, None].expand(60, 3, 2, 2).clone()
    new, mask, src = open_set_replace(x, o, 0.4, seed=0)
    assert int(mask.sum()) == 40 and len(set(src[mask].tolist())) == 40 and bool((src[~mask] == -1).all())
    assert torch.equal(new[mask], o[src[mask]]) and torch.equal(new[~mask], x[~mask])
    assert torch.equal(open_set_replace(x, o, 0.4, seed=0)[2], src)
    assert not torch.equal(open_set_replace(x, o, 0.4, seed=1)[2], src)
    with pytest.raises(ValueError, match="needs 70 replacement images but other_images has 60"):
        open_set_replace(x, o, 0.7)
    with pytest.raises(ValueError, match="must match images"):
        open_set_replace(x, o.float(), 0.1)
    with pytest.raises(ValueError, match="outside"):
        open_set_replace(x, o, 1.5)


def test_save_load_and_sha256(tmp_path):
    nl = corrupt_labels(torch.arange(100).repeat(3), "asymmetric", 0.3, dataset="cifar100", block=5, seed=9)
    assert nl.sha256 == hashlib.sha256(nl.labels.numpy().astype("<i8").tobytes()).hexdigest()
    nl.save(tmp_path / "n.pt")
    back = NoisyLabels.load(tmp_path / "n.pt")
    assert isinstance(back, NoisyLabels) and back.sha256 == nl.sha256
    assert torch.equal(back.intended, nl.intended) and torch.equal(back.transition, nl.transition)
    assert back.options == {"dataset": "cifar100", "block": 5, "exact": False} and back.seed == 9 and back.nominal == 0.3
    assert "asymmetric" in repr(back)


def test_intended_transition_dispatch():
    assert torch.allclose(intended_transition("symmetric", 0.2, 4), symmetric_transition(4, 0.2))
    assert intended_transition("instance", 0.2, 4) is None
    with pytest.raises(ValueError, match="unknown kind"):
        intended_transition("foo", 0.2, 4)
