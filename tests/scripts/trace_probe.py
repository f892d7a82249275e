"""Run under `deepspeed --num_accelerators 2`: a few ZeRO-3 steps with the teacher pass either inside
the one top-level forward (rdcore's RuleDistillModule, "ours") or as a second top-level engine call
per step ("naive"). With log_trace_cache_warnings on, DeepSpeed reports each prefetch-trace
invalidation; the test counts them."""

import sys

import torch
from torch import nn

from rdcore import engine as eng
from rdcore.config import TrainConfig
from rdcore.data import Encoder, collate, load_task
from rdcore.distill import RuleDistillModule
from rdcore.models import load_model


class TwoCallModule(nn.Module):
    """The naive pattern: one top-level call per pass."""

    def __init__(self, inner: RuleDistillModule):
        super().__init__()
        self.inner = inner

    def forward(self, batch, side):
        out = self.inner._decoder(batch, side, hidden=False)
        rows = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        return rows.index_select(0, batch.side(side).distill_index)


def main(mode: str, ds_config: str, steps: int) -> None:
    rank, world = eng.init_distributed()
    cfg = TrainConfig(model="tiny", method="rule_distill_base", finetune="full",
                      ds_config=ds_config, output_dir="unused")
    model, tok = load_model("tiny")
    data = Encoder(tok).encode(load_task("math", "train", 8))
    module = RuleDistillModule(model, cfg.method, "live")
    if mode == "naive":
        module = TwoCallModule(module)
    engine = eng.build_engine(module, cfg, world, lambda s: 1.0)
    for step in range(steps):
        ex = data.examples[(2 * step + rank) % len(data)]
        batch = collate([ex], tok.pad_token_id)
        if mode == "ours":
            loss, _ = engine(batch, 1.0)
        else:
            with torch.no_grad():
                teacher = engine(batch, "teacher")
            student = engine(batch, "student")
            loss = (student - teacher).pow(2).mean()
        engine.backward(loss)
        engine.step()
        print(f"probe step {step + 1} done", flush=True)
    eng.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], int(args[2]))
