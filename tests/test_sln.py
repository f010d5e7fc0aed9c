"""Contracts of noisyrepro.sln: SLN's loss and targets, the covariance formulas of Props 1-3 and their Monte Carlo test,
label correction, the registered methods, App. B's protocol, and SLN's noisy data on CIFAR.

CIFAR-10/100 are not on this machine: the CIFAR code path (open-set noise from CIFAR-100 images, IDN noise from a WRN-28-2's
softmax, App. B's training settings with the EMA model and label correction) runs on small SYNTHETIC files in CIFAR's own format
that these tests write (random pixels, class names `synthetic_class_*`). The numbers mean nothing; the tests check the contracts.
"""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from test_data import make_synthetic_cifar
from noisyrepro.data import LabeledData, data_root

REAL_DATA = data_root()      # the data folder this session was given ($NOISYREPRO_DATA or the default), before fixtures move it
from noisyrepro.models import get_model
from noisyrepro.train import Method, Trainer, TrainConfig, fit, get_method
from noisyrepro.sln import (SLN, OutputNoise, ParamNoise, PAPER_GRIDS, batch_param_noise, bonferroni_k, check_covariance,
                            corrected_targets, idn_softmax, lc_weights, open_set_splits, output_jacobians, output_noise_loss,
                            paper_config, paper_hparams, paper_sigma, per_draw_grads, prop1_matrix, prop2_diag, prop2_matrix,
                            prop3_matrix, sln_noise_parts, sln_splits, sln_targets, soft_ce, softmax_jacobian,
                            SCORECARD, SLN_FIG5, SLN_FIG6, SLN_FIG10, SLN_TABLE1, SLN_TABLE2, keep_last_states, last_epoch_records,
                            last_state, only, sln_protocol_splits, table_hparams)

F64 = torch.float64


def test_soft_ce_and_sln_targets():
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(soft_ce(a, sln_targets(y, 3, 0.0)), F.cross_entropy(a, y))
    t = sln_targets(y, 3, 2.0, torch.Generator().manual_seed(1))
    assert t.shape == (5, 3) and (t < 0).any()                                   # not clipped
    torch.testing.assert_close(t, sln_targets(y, 3, 2.0, torch.Generator().manual_seed(1)))   # seeded
    assert soft_ce(a, t, "none").shape == (5,)
    with pytest.raises(ValueError, match="valid sigma"): sln_targets(y, 3, -0.5)
    with pytest.raises(ValueError, match="valid: the same B×C shape"): soft_ce(a, t[:2])
    with pytest.raises(ValueError, match="valid reductions: mean, sum, none"): soft_ce(a, t, "max")


def test_logit_gradients_of_eq2_and_eq3():
    g = torch.Generator().manual_seed(2)
    f, y, z = torch.randn(4, 5, generator=g, dtype=F64), torch.tensor([0, 1, 2, 3]), torch.randn(4, 5, generator=g, dtype=F64)
    S, e = f.softmax(1), F.one_hot(y, 5).double()
    f1 = f.clone().requires_grad_(); output_noise_loss(f1, y, 0.3 * z, "sum").backward()
    torch.testing.assert_close(f1.grad, S - e + 0.3 * z)                        # Eq. (2): ∇_f ℓ + σ z
    f2 = f.clone().requires_grad_(); soft_ce(f2, e + 0.3 * z, "sum").backward()
    torch.testing.assert_close(f2.grad, S - e - 0.3 * (z - z.sum(1, keepdim=True) * S))   # App. A, Eq. (8)
    with pytest.raises(ValueError, match="valid: the same B×C shape"): output_noise_loss(f, y, z[:1])


def test_prop2_matrix_and_diagonal_extremes():
    S = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    M = prop2_matrix(S)
    torch.testing.assert_close(torch.diagonal(M), 4 * (S - 0.25) ** 2 + 0.75)
    assert abs(M[0, 1].item() - (4 * 0.1 * 0.2 - 0.1 - 0.2)) < 1e-12
    torch.testing.assert_close(M, M.T)
    assert torch.linalg.eigvalsh(M).min() > -1e-12                               # a covariance
    s = torch.linspace(0, 1, 10_001, dtype=F64)
    d = prop2_diag(torch.stack([s] + [(1 - s) / 9] * 9, 1))[:, 0]
    assert abs(s[d.argmin()].item() - 0.1) < 1e-4 and s[d.argmax()].item() == 1.0   # min at 1/c, max at S_i = 1
    torch.testing.assert_close(softmax_jacobian(S), torch.diag(S) - S[:, None] * S[None, :])


def _net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_props_1_and_3_by_monte_carlo_and_their_identity():
    net, x, y = _net(), torch.tensor([0.3, -1.2], dtype=F64), torch.tensor(2)
    f, Jf, S, JS = output_jacobians(net, x)
    assert Jf.shape == JS.shape == (3, 4 * 2 + 4 + 4 * 3 + 3)
    torch.testing.assert_close(prop3_matrix(JS, S), Jf.T @ prop2_matrix(S) @ Jf)
    sh, cf = sln_noise_parts(Jf, S)
    torch.testing.assert_close(sh + cf, torch.diagonal(prop3_matrix(JS, S)))
    g = torch.Generator().manual_seed(3); N, sig = 20_000, 0.5
    z = torch.randn(N, 3, generator=g, dtype=F64)
    clean = per_draw_grads(net, x, lambda o, _: F.cross_entropy(o, y[None], reduction="sum"), z[:1])[0]
    G3 = per_draw_grads(net, x, soft_ce, F.one_hot(y, 3).double() + sig * z)
    G2 = per_draw_grads(net, x, lambda o, d: output_noise_loss(o, y[None], sig * d, "sum"), z)
    assert check_covariance(G3 - clean, sig ** 2 * prop3_matrix(JS, S))["ok"]
    assert check_covariance(G2 - clean, sig ** 2 * prop1_matrix(Jf))["ok"]
    assert not check_covariance(G3 - clean, sig ** 2 * prop1_matrix(Jf))["ok"]   # the test can tell them apart


def test_covariance_check_threshold_and_errors():
    r = check_covariance(torch.randn(5000, 3, generator=torch.Generator().manual_seed(4), dtype=F64), torch.eye(3, dtype=F64))
    assert r["ok"] and r["m"] == 6 and abs(r["k"] - bonferroni_k(6)) < 1e-12
    assert bonferroni_k(100) > bonferroni_k(10)                                    # more entries, wider threshold
    with pytest.raises(ValueError, match="valid: m >= 1 and 0 < alpha < 1"): bonferroni_k(0)
    with pytest.raises(ValueError, match=r"valid: \(3, 3\)"): check_covariance(torch.zeros(10, 3), torch.eye(2))


def test_batch_param_noise_scale():
    n = batch_param_noise(torch.zeros(200_000, dtype=F64), 0.8, 16, torch.Generator().manual_seed(5))
    assert abs(n.std().item() - 0.2) < 0.002
    with pytest.raises(ValueError, match="valid: sigma >= 0 and batch_size >= 1"): batch_param_noise(torch.zeros(3), 0.1, 0)


def test_label_correction():
    w = lc_weights(torch.tensor([1.0, 3.0, 2.0]))
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.5]))
    e, p = torch.eye(3)[[0, 0, 0]], torch.eye(3)[[2, 2, 2]]
    torch.testing.assert_close(corrected_targets(w, e, p)[1], e[1])               # the largest loss keeps its label
    torch.testing.assert_close(corrected_targets(w, e, p, "reversed")[1], p[1])
    with pytest.raises(ValueError, match="valid schemes: paper, reversed"): corrected_targets(w, e, p, "soft")


def _tiny(method, **kw):
    g = torch.Generator().manual_seed(0)
    d = LabeledData(torch.randint(0, 256, (16, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (16,), generator=g),
                    [str(c) for c in range(10)], "tiny", "train")
    return Trainer(get_model("lenet", 10, seed=0), d, d, None, method,
                   TrainConfig(**({"batch_size": 16, "optimizer": "sgd", "normalize": "mnist", "device": "cpu", "progress": False} | kw)))


def test_registered_methods():
    assert repr(get_method("SLN", sigma=0.2)) == "SLN(sigma=0.2)"
    assert get_method("SLN-MO-LC").correction == 250 and get_method("SLN-MO-LC").momentum
    assert get_method("Eq1-noise", sigma=0.1).name == "Eq1-noise" and get_method("Eq2-noise").name == "Eq2-noise"
    with pytest.raises(ValueError, match="pass TrainConfig"): _tiny(get_method("SLN-MO"))
    with pytest.raises(ValueError, match="valid: None or a 0-based epoch"): SLN(correction=-1)
    with pytest.raises(ValueError, match="valid sigma"): OutputNoise(sigma=-1)
    tr = _tiny(get_method("SLN-MO-LC", sigma=0.5, correction=0), ema=0.9)
    tr.method.start_epoch(tr, 0)
    assert tr.method.targets.shape == (16, 10) and torch.allclose(tr.method.targets.sum(1), torch.ones(16))
    assert tr.method.hparams() == {"sigma": 0.5, "correction": 0, "hard": True, "scheme": "paper"}


def test_param_noise_is_added_before_the_step():
    tr = _tiny(ParamNoise(sigma=0.4))
    x, y = tr.batch(torch.arange(16)); idx = torch.arange(16)
    tr.method.loss(tr, tr.model(x), y, idx, x).backward()
    g0 = torch.cat([p.grad.flatten().clone() for p in tr.model.parameters()])
    tr.method.before_step(tr)
    g1 = torch.cat([p.grad.flatten() for p in tr.model.parameters()])
    assert abs((g1 - g0).std().item() - 0.4 / 4) < 0.005                           # σ/√B with B = 16


def test_paper_protocol():
    assert paper_sigma("cifar10", "symmetric") == 1.0 and paper_sigma("cifar10", "open_set") == 0.5
    assert paper_sigma("cifar100", "idn") == 0.1 and paper_sigma("cifar100", "asymmetric") == 0.2
    hp = paper_hparams("cifar10", "asymmetric")
    assert hp["PHuber-CE"] == {"tau": 10.0} and hp["LS"] == {"eps": 0.5} and hp["GCE"]["warmup"] == 50
    assert hp["Co-teaching"] == {"forget_rate": 0.4, "num_gradual": 10}
    assert paper_hparams("cifar100", "symmetric")["GCE"]["warmup"] == 150 and paper_hparams("cifar100", "symmetric")["PHuber-CE"] == {"tau": 30.0}
    cfg = paper_config("cifar10", "SLN-MO-LC", seed=3)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.augment, cfg.ema, cfg.normalize) == \
           (300, 128, 1e-3, "sgd", 0.9, 5e-4, None, "crop_flip", 0.999, "cifar10")
    assert set(PAPER_GRIDS["SLN"]["sigma"]) == {0.1, 0.2, 0.5, 1.0}
    with pytest.raises(ValueError, match="valid datasets: cifar10, cifar100"): paper_config("mnist", "SLN")


@pytest.fixture
def synthetic_cifar(tmp_path, monkeypatch):
    "SYNTHETIC CIFAR-10 (40 train, 8 test images) and CIFAR-100 (20 train) files in torchvision's format, under NOISYREPRO_DATA."
    for cls, n, C in ((torchvision.datasets.CIFAR10, 8, 10), (torchvision.datasets.CIFAR100, 20, 100)):
        lists, meta = make_synthetic_cifar(tmp_path, cls, n_per_batch=n, n_classes=C)
        monkeypatch.setattr(cls, "train_list", lists["train_list"]); monkeypatch.setattr(cls, "test_list", lists["test_list"])
        monkeypatch.setattr(cls, "meta", meta)
    monkeypatch.setenv("NOISYREPRO_DATA", str(tmp_path))
    return tmp_path


def test_open_set_on_synthetic_cifar(synthetic_cifar):
    sp = open_set_splits("cifar10", 0.4, val=8, seed=1)
    from noisyrepro.data import load_dataset
    c10, c100 = load_dataset("cifar10"), load_dataset("cifar100")
    assert len(sp.train) == 32 and len(sp.val) == 8 and len(sp.test) == 8
    same = (sp.train.x == c10.x[sp.train.index]).flatten(1).all(1)
    assert torch.equal(same, ~sp.train_noise.is_noisy) and torch.equal(sp.train.y, c10.y[sp.train.index])
    assert sp.train_noise.is_noisy.sum() + sp.val_noise.is_noisy.sum() == 16          # round(0.4 · 40) images replaced
    rep = sp.train.x[sp.train_noise.is_noisy]
    assert all((c100.x == r).flatten(1).all(1).any() for r in rep)                   # ... by CIFAR-100 images
    with pytest.raises(ValueError, match="valid: rate <="): open_set_splits("cifar10", 0.9, val=8)   # 36 > 20 CIFAR-100 images


def test_idn_and_asymmetric_on_synthetic_cifar(synthetic_cifar):
    cfg = paper_config("cifar10", "CE", epochs=1, device="cpu", progress=False)
    soft = idn_softmax("cifar10", lambda: get_model("wrn28_2", 10, seed=0), cfg, val=8, seed=0)
    assert soft.shape == (40, 10) and torch.allclose(soft.sum(1), torch.ones(40, dtype=F64))
    sp = sln_splits("cifar10", "idn", 0.4, val=8, seed=0, softmax=soft)
    assert int(sp.train_noise.is_noisy.sum()) == math.floor(0.4 * 32)                # exactly ⌊0.4 N⌋ flips
    asym = sln_splits("cifar10", "asymmetric", 0.4, val=8, seed=0)
    assert asym.train_noise.intended[5, 3] == pytest.approx(0.4) and asym.train_noise.intended[3, 5] == pytest.approx(0.4)  # cat ↔ dog
    # App. B's training (WRN-28-2, EMA, label correction) runs in test_notebook_paper_branch_on_synthetic_cifar

def test_notebook_paper_branch_on_synthetic_cifar(synthetic_cifar, tmp_path, monkeypatch):
    "The experiment section of nbs/06_sln.ipynb at paper scale (WRN-28-2, App. B settings, 3 epochs) on the SYNTHETIC files."
    from pathlib import Path
    import pandas as pd
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    nbp = Path(__file__).parents[1] / "nbs" / "06_sln.ipynb"
    nb = read_nb(nbp)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    e = next(j for j, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Experiments"))
    head = [c for c in nb.cells[i + 2:e] if c.cell_type == "code" and c.source.startswith(("#| export\nfrom __future__", "#| hide"))]
    nb.cells = nb.cells[:i + 2] + head + nb.cells[e:]                # parameters and their check, imports, the experiments
    out = tmp_path / "out"
    params = (f'scale = "paper"; dataset = "cifar10"; noise_types = ["open_set"]; methods = ["CE", "SLN-MO-LC"]; epochs = 3; '
              f'val = 8; baselines = False; figures = False; assert_claims = False; out_dir = {str(out)!r}; device = "cpu"')
    for d in ("MNIST", "FashionMNIST"): (synthetic_cifar / d).symlink_to(REAL_DATA / d)   # the notebook's MNIST checks need the real files
    monkeypatch.setenv("NOISYREPRO_DATA", str(synthetic_cifar)); monkeypatch.delenv("IN_TEST", raising=False)
    sh = CaptureShell(path=nbp.parent)
    sh.run_all(nb, exc_stop=True, inject_code=nb.cells[i].source + "\n" + params, inject_idx=i)
    df = pd.read_csv(out / "results.csv")
    assert set(df.method) == {"CE", "SLN-MO-LC"} and (df.dataset == "cifar10").all() and (df.noise_type == "open_set").all()
    lc = df[df.method == "SLN-MO-LC"].iloc[0]
    assert '"correction":2' in lc.hparams and '"sigma":0.5' in lc.hparams             # App. B: σ = 0.5 for open-set; LC at 250/300 · 3
    table = (out / "sln_table1_open_set.md").read_text()                          # report(SLN_TABLE1["open_set"] at scale paper)
    rows = {r.split("|")[1].strip(): r for r in table.splitlines() if r.startswith("| ")}
    assert "/ 77.7" in rows["CE"] and "/ 88.5" in rows["SLN-MO-LC"]                 # 'best-val / last / paper': Table 1's open-set column
    assert "Scale: paper" in table and (out / "provenance.json").exists() and (out / "sweeps" / "sln_table1_open_set.json").exists()


def test_protocols_quick_and_paper_presets():
    "Each table column is a Protocol: the quick preset is the MNIST miniature (the notebook's defaults), the paper preset App. B."
    from noisyrepro.experiment import expand
    q = SLN_TABLE1["symmetric"].at("quick")
    assert (q.dataset, q.model, q.n_train, q.seeds, q.settings, q.splits) == ("mnist", "lenet", (1000,), (0,), (("symmetric", 0.4),), {"val": 250, "n_test": 1000})
    assert (q.train["epochs"], q.train["lr"], q.headline, q.baseline) == (40, 0.02, "last_test_acc", "CE")
    assert q.hparams["SLN-MO-LC"] == {"sigma": 0.5, "correction": 33} and q.train_by_method["SLN-MO-LC"] == {"ema": 0.95}
    assert q.grids["GCE"]["warmup"] == [0, 7, 13, 20, 27, None] and q.grids["LS"] == {"eps": [0.2, 0.5, 0.8]}
    assert {r.method for r in expand(only(q, ("CE", "SLN")))} == {"CE", "SLN"}
    p = SLN_TABLE2["asymmetric"].at("paper")
    assert (p.dataset, p.num_classes, p.model, p.train["epochs"], p.train["augment"], p.grids) == ("cifar100", 100, "wrn28_2", 300, "crop_flip", {})
    assert p.hparams["SLN"] == {"sigma": 0.2} and p.hparams["GCE"]["warmup"] == 150 and p.train_by_method["SLN-MO"] == {"ema": 0.999}
    assert SLN_TABLE1["idn"].at("paper").splits_by_noise["idn"]["idn_train"]["milestones"] == [60, 120]
    assert table_hparams("cifar10", "symmetric", 3, tune=True)[1]["GCE"]["warmup"] == [0, 1, 2, None]   # rescaled, duplicates dropped
    assert SLN_FIG10.at("quick").hparams["SLN-MO-LC"]["scheme"] == "reversed"
    with pytest.raises(ValueError, match="valid"): SLN_TABLE1["symmetric"].at("quick", methods=("CE", "SLN-M0"))


def test_scorecard_covers_every_table_and_figure():
    items = " ".join(e.item for e in SCORECARD)
    for t in ("Table 1", "Table 2", "Table 3", "Table 4"): assert t in items, t
    for f in range(1, 11): assert f"Fig. {f}," in items or f"Fig. {f} " in items or f"Figs. {f} " in items or f"and {f}," in items, f
    cifar = [e for e in SCORECARD if "CIFAR" in e.item and "miniature" not in e.item]
    assert cifar and all(e.cannot for e in cifar)
    assert all(e.protocol.scale == "quick" for e in SCORECARD if e.protocol is not None and not e.cannot)


def test_idn_split_function_caches_the_softmax(tmp_path, monkeypatch):
    "sln_protocol_splits computes IDN's softmax from the split options once and caches it in the data folder."
    monkeypatch.setenv("NOISYREPRO_DATA", str(tmp_path))
    for d in ("MNIST",): (tmp_path / d).symlink_to(REAL_DATA / d)
    opts = dict(val=50, n_test=100, idn_model="lenet", idn_train={"epochs": 1, "batch_size": 64, "lr": 0.01, "optimizer": "sgd", "progress": False})
    sp = sln_protocol_splits("mnist", "idn", 0.4, n_train=100, seed=0, **opts)
    cached = list((tmp_path / "derived" / "sln_idn").glob("*.pt"))
    assert len(cached) == 1 and int(sp.train_noise.is_noisy.sum()) == 40 and len(sp.test) == 100
    sp2 = sln_protocol_splits("mnist", "idn", 0.4, n_train=100, seed=0, **opts)
    assert torch.equal(sp2.train.y, sp.train.y) and list((tmp_path / "derived" / "sln_idn").glob("*.pt")) == cached
    with pytest.raises(ValueError, match="needs the split options idn_model and idn_train"): sln_protocol_splits("mnist", "idn", 0.4, n_train=100, val=50)


def test_last_states_of_an_in_process_sweep(tmp_path):
    "keep_last_states saves the converged weights of the runs a sweep trains; a recorded sweep trains nothing and keeps them."
    from noisyrepro.experiment import sweep
    p = only(SLN_TABLE1["symmetric"].at("quick"), ("CE",)).at(None, n_train=(64,), train={"epochs": 1, "batch_size": 32, "lr": 0.02,
                                                                                         "optimizer": "sgd", "progress": False}, splits={"val": 32, "n_test": 64})
    with keep_last_states(p, tmp_path): s = sweep(p, tmp_path, progress=False)
    rec = last_epoch_records(s.runs[0], tmp_path)
    assert len(rec["pred"]) == 64 and torch.allclose(rec["p_label"], torch.exp(-rec["loss"]), atol=1e-5)
    with keep_last_states(p, tmp_path): assert sweep(p, tmp_path, progress=False).trained == 0
    assert set(last_state(tmp_path, s.runs[0].key)) == set(get_model("lenet", 10).state_dict())
    with pytest.raises(FileNotFoundError, match="keep_last_states"): last_state(tmp_path, "nope")
