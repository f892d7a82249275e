"""The first GPU run must not crash on a tensor left on the CPU. There is no CUDA here, so the
stand-in accelerator is the ``meta`` device: a device other than the CPU, which a CPU-only torch has.

The real trainer code runs — :func:`rdcore.train.setup_stage` (model, data, the module with every
teacher cache and the interleaving) and :func:`rdcore.train.train_step` /
:func:`rdcore.train.validation_loss` — with only the DeepSpeed engine replaced by
:class:`MetaEngine`, whose device is ``meta``: it fails if the trainer hands it any tensor on
another device. It checks the hand-over only: meta tensors hold no values, and transformers' mask
code reads values (its packed-sequence and causal-skip tests), so the model itself cannot run on
meta; what the module creates on its own device is checked on a real GPU by ``make gpu-check``
(the module's loss and gradients on CUDA against the CPU). Run against the trainer before it moved
its batches, this test failed at the first step ("the trainer handed the engine tensors not on its
device: {'teacher_input_ids': 'cpu', …}").
"""

from pathlib import Path

import pytest
import torch

from rdcore import engine as eng
from rdcore import train
from rdcore.config import TrainConfig

META = torch.device("meta")


class MetaEngine:
    """A DeepSpeed engine's interface on a non-CPU device (``meta``)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.device = META
        self.calls = 0

    def __call__(self, batch, scale, ce_side=None):
        wrong = {name: str(t.device) for name, t in batch.tensors().items() if t.device != META}
        if wrong:
            raise AssertionError(f"the trainer handed the engine tensors not on its device: {wrong}")
        assert isinstance(scale, float) and ce_side in (None, "student", "teacher")
        self.calls += 1
        # what the module returns, as values the trainer can read (meta tensors have none)
        keys = ["ce"] if ce_side or not self.module.distill else ["kl", "hidden_mse"]
        return torch.zeros((), requires_grad=True), {k: torch.zeros(()) for k in keys}

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_lr(self):
        return [0.0]


@pytest.mark.parametrize("method, finetune", [("rule_distill_base", "full"),
                                              ("rule_distill_base", "lora"),
                                              ("inst_tune_rule", "lora")])
def test_the_trainer_hands_the_engine_only_tensors_on_its_device(tmp_path, monkeypatch, method,
                                                                  finetune):
    monkeypatch.setattr(eng, "build_engine", lambda module, *a, **k: MetaEngine(module))
    cfg = TrainConfig(model="tiny", task="math", shots=8, method=method, finetune=finetune,
                      micro_batch_size=2, grad_accum=2, epochs=2, seed=1234, select_best=True,
                      output_dir=str(tmp_path), tensorboard=False)
    run = train.setup_stage(train.Stage("main", cfg), Path(tmp_path), rank=0, world=1)
    assert run.module.prefix is not None or not cfg.distill
    assert run.module.interleave == cfg.distill
    for step in range(run.total):  # epoch 2 takes the frozen teacher from the cache
        row = train.train_step(run, step)
        assert row["step"] == step + 1
    assert train.validation_loss(run) == 0.0  # its batches went to the device too
    assert run.engine.calls == run.total * cfg.grad_accum + len(run.val_data) // 2
