"""Contract tests for noisyrepro.models (source: nbs/03_models.ipynb)."""
import copy
import functools
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from noisyrepro.models import (MODELS, count_params, get_model, LimitMnistCNN, LimitMLP, LeNet, DmiFashionCNN,
                               CifarResNet, WideResNet, ResNet50, WordCNN, VGG16)

# name: (kwargs, num_classes, input shape or None for token ids, hand-derived parameter count)
SPECS = {
    'limit_mnist_cnn': ({}, 10, (2, 1, 28, 28), 218_122),
    'limit_mlp': ({}, 10, (2, 1, 28, 28), 1_199_114),
    'lenet': ({}, 10, (2, 1, 28, 28), 61_706),
    'dmi_fmnist_cnn': ({}, 2, (2, 1, 28, 28), 14_274),
    'resnet34_cifar': ({}, 10, (2, 3, 16, 16), 21_282_122),    # small inputs keep the suite fast; the pools
    'wrn28_2': ({}, 10, (2, 3, 16, 16), 1_469_642),            # are adaptive (32x32 shapes are checked in
    'resnet50': ({}, 14, (2, 3, 16, 16), 23_536_718),          # the notebook)
    'wordcnn': ({'vocab_size': 1_000}, 2, None, 128 * 1_000 + 154_502),
    'vgg16': ({}, 2, (2, 3, 64, 64), 14_739_522),              # L_DMI Dogs vs. Cats (150x150 in the notebook)
}


@functools.lru_cache(maxsize=None)
def _built(name):
    kw, C, _, _ = SPECS[name]
    return get_model(name, C, seed=0, **kw).eval()


def _input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1_000, (2, 9), generator=g) if shape is None else torch.randn(*shape, generator=g)


def test_registry_names():
    assert set(MODELS) == set(SPECS)


@pytest.mark.parametrize('name', list(SPECS))
def test_param_count_shape_and_feature_split(name):
    kw, C, shape, n = SPECS[name]
    m = _built(name)
    assert count_params(m) == n
    x = _input(shape)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, C) and out.dtype == torch.float32
        torch.testing.assert_close(m.head(m.features(x)), out)
    assert isinstance(m.head, nn.Linear) and m.head.out_features == C


@pytest.mark.parametrize('name', list(SPECS))
def test_channels_last_and_bf16_autocast(name):
    kw, C, shape, _ = SPECS[name]
    m = copy.deepcopy(_built(name))
    x = _input(shape, seed=1)
    with torch.no_grad():
        ref = m(x)
        if shape is not None:
            m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf = m(x)
    assert bf.dtype == torch.bfloat16
    rel = ((bf.float() - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel <= 0.05


def test_get_model_errors():
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'; valid models: .*wrn28_2"):
        get_model('resnet18', 10)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        get_model('lenet', 0)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        get_model('lenet', 2.0)
    with pytest.raises(ValueError, match="vocab_size"):
        get_model('wordcnn', 2)
    with pytest.raises(TypeError):
        get_model('lenet', 10, bogus_kw=1)


def test_seed_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = (get_model('limit_mnist_cnn', 10, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.weight, c.head.weight)


def test_limit_cnn_layers_and_q_net():
    m = LimitMnistCNN(10).eval()
    shapes, h = [], torch.zeros(1, 1, 28, 28)
    for block in m.convs:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(32, 14, 14), (32, 7, 7), (64, 3, 3), (256, 1, 1)]
    assert m.features(torch.zeros(3, 1, 28, 28)).shape == (3, 128)
    q = LimitMnistCNN(10, q_net=True)
    assert count_params(q) == 218_122 + 256
    assert [type(l) for l in q.fc] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert [type(l) for l in m.fc] == [nn.Linear, nn.ReLU]
    assert LimitMnistCNN(10, head_bias=False).head.bias is None


def test_limit_mlp_dropout_variant():
    assert sum(isinstance(l, nn.Dropout) for l in LimitMLP(10, dropout=0.5).body) == 4
    assert not any(isinstance(l, nn.Dropout) for l in LimitMLP(10).body)
    assert LimitMLP(10)(torch.zeros(3, 784)).shape == (3, 10)      # flat input works too


def test_lenet_and_dmi_cnn_structure():
    assert not any(isinstance(l, nn.modules.batchnorm._BatchNorm) for l in LeNet(10).modules())
    assert count_params(DmiFashionCNN(10)) == 18_378
    m = DmiFashionCNN(2).train()
    x = _input((4, 1, 28, 28))
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))          # dropout active in train mode
        m.eval()
        assert torch.equal(m(x), m(x))


def test_resnet34_cifar_blocks_and_c100():
    m = CifarResNet(100)
    assert [len(s) for s in m.stages] == [3, 4, 6, 3]
    assert count_params(m) == 21_282_122 + 512 * 90 + 90
    assert not any(isinstance(l, nn.MaxPool2d) for l in m.modules())


def test_wrn_details():
    m = WideResNet(10)
    assert [len(s) for s in m.stages] == [4, 4, 4]
    assert m.bn.momentum == 0.9 and WideResNet(10, final_bn_momentum=0.1).bn.momentum == 0.1
    assert all(c.bias is not None for c in m.modules() if isinstance(c, nn.Conv2d))
    assert count_params(WideResNet(100)) == 1_469_642 + 128 * 90 + 90
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(10, depth=27)
    with torch.no_grad():
        assert m.eval().features(torch.zeros(2, 3, 32, 32)).shape == (2, 128)


def test_wordcnn_contracts():
    m = WordCNN(2, vocab_size=50).eval()
    assert torch.equal(m.embedding.weight[0], torch.zeros(128))
    with torch.no_grad():
        out = m(torch.randint(1, 50, (3, 5)))          # L = 5 is the minimum
        assert out.shape == (3, 2)
        assert not torch.allclose(torch.logsumexp(out, 1), torch.zeros(3))   # logits, not log-softmax
    with pytest.raises(ValueError, match="largest kernel size 5"):
        m(torch.randint(1, 50, (3, 4)))
    with pytest.raises(ValueError, match="vocab_size"):
        WordCNN(2)


def test_resnet50_matches_torchvision_and_pretrained_paths(monkeypatch):
    m, ref = copy.deepcopy(_built('resnet50')), tvm.resnet50(weights=None, num_classes=14)
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    x = _input((2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref.eval()(x))

    def offline(*a, **k):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(RuntimeError, match="could not fetch.*checkpoints/resnet50-"):
        get_model('resnet50', 14, pretrained=True)

    imnet = dict(ref.state_dict(), **{'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', lambda *a, **k: imnet)
    mp = get_model('resnet50', 14, pretrained=True)
    assert mp.fc.out_features == 14
    assert torch.equal(mp.conv1.weight, imnet['conv1.weight'])


def test_count_params_excludes_buffers_and_frozen():
    assert count_params(nn.BatchNorm1d(7)) == 14
    lin = nn.Linear(3, 4)
    lin.weight.requires_grad_(False)
    assert count_params(lin) == 16 and count_params(lin, trainable_only=True) == 4


def test_vgg16_layout_matches_the_l_dmi_script():
    m = get_model('vgg16', 2, seed=0).eval()
    convs = [l for l in m.convs if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(l, nn.MaxPool2d) for l in m.convs) == 5 and sum(isinstance(l, nn.BatchNorm2d) for l in m.convs) == 13
    assert m.head.in_features == 8192 and isinstance(m, VGG16)
    with torch.no_grad():
        fmap = m.convs(torch.randn(1, 3, 150, 150, generator=torch.Generator().manual_seed(0)))
        assert fmap.shape == (1, 512, 4, 4) and torch.equal(m.pool(fmap), fmap)     # 150 -> 4x4: the pool is the identity
