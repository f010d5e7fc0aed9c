"""TrainConfig(compile=True) compiles the model that training calls (it used to compile a copy nobody called)."""
import torch

from noisyrepro.models import get_model
from noisyrepro.splits import noisy_splits
from noisyrepro.train import TrainConfig, fit


def test_compile_true_trains_the_compiled_model_with_the_same_numbers():
    "Dynamo must have compiled a graph during fit; the losses match eager within float tolerance and state_dict keys are unchanged."
    import torch._dynamo
    d = noisy_splits("mnist5k", "symmetric", 0.4, n_train=256, val=128, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=64, seed=0, device="cpu", progress=False)
    eager = fit(get_model("lenet", 10, seed=0), d.train, d.val, d.test, "CE", cfg)
    torch._dynamo.reset(); torch._dynamo.utils.counters.clear()
    compiled = fit(get_model("lenet", 10, seed=0), d.train, d.val, d.test, "CE", TrainConfig(**{**cfg.__dict__, "compile": True}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, dict(torch._dynamo.utils.counters["stats"])
    assert list(compiled.best_state) == list(eager.best_state)
    for a, b in zip(eager.history, compiled.history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and abs(a["val_acc"] - b["val_acc"]) < 1e-2, (a, b)
