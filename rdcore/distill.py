"""One module, two roles: the teacher and student passes of a shared-weight model.

:class:`RuleDistillModule` wraps a Hugging Face causal LM. Its ``forward`` runs, inside *one*
top-level call (so DeepSpeed's ZeRO-3 hooks and prefetch trace see a single forward per step):

1. the teacher pass (rule in context) under ``no_grad`` and in eval mode, when distilling;
2. the student pass (no rule) with gradients;
3. the loss, on the distilled rows only: hidden states are gathered at the positions that predict
   response tokens and only those rows go through the lm_head.

Both passes call the inner decoder (``model.model``) and ``model.lm_head`` as modules, so ZeRO-3
gathers their parameters through its module hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rdcore.losses import ce_rows, hidden_mse_rows, kl_rows


def _rows(h_BTH: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    return h_BTH.reshape(-1, h_BTH.shape[-1]).index_select(0, index_N)


class RuleDistillModule(nn.Module):
    """Teacher/student passes and the loss for one micro-batch.

    ``method``: ``inst_tune_no_rule`` / ``inst_tune_rule`` (CE on the student / teacher sequence) or
    ``rule_distill_base`` (KL·T² + β·hidden MSE + α·CE, teacher = same weights with the rule).
    """

    def __init__(self, model: nn.Module, method: str, temperature: float = 1.0, beta: float = 10.0,
                 alpha: float = 0.0):
        super().__init__()
        self.model = model
        self.method = method
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha

    def _decoder(self, batch: dict[str, torch.Tensor], side: str, hidden: bool) -> Any:
        return self.model.model(input_ids=batch[f"{side}_input_ids"],
                                attention_mask=batch[f"{side}_attention_mask"],
                                position_ids=batch[f"{side}_position_ids"],
                                output_hidden_states=hidden, use_cache=False)

    def forward(self, batch: dict[str, torch.Tensor], row_weight_N: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, stats)``: ``loss = scale · Σ_n w_n · ℓ_n`` and the weighted sums of each
        term (detached). ``scale`` carries the global-batch normalisation (see train.py)."""
        stats: dict[str, torch.Tensor] = {}
        if not self.method.startswith("rule_distill"):
            side = "teacher" if self.method == "inst_tune_rule" else "student"
            out = self._decoder(batch, side, hidden=False)
            logits_NV = self.model.lm_head(_rows(out.last_hidden_state, batch[f"{side}_distill_index"]))
            ce = (ce_rows(logits_NV, batch["target_ids"]) * row_weight_N).sum()
            stats["ce"] = ce.detach()
            return ce * scale, stats

        was_training = self.model.training
        self.model.eval()  # teacher: no dropout
        with torch.no_grad():
            t_out = self._decoder(batch, "teacher", hidden=True)
            t_idx = batch["teacher_distill_index"]
            t_states = [_rows(h, t_idx) for h in t_out.hidden_states[:-1]]
            t_logits_NV = self.model.lm_head(_rows(t_out.last_hidden_state, t_idx))
            del t_out
        self.model.train(was_training)

        s_out = self._decoder(batch, "student", hidden=True)
        s_idx = batch["student_distill_index"]
        # hidden_states = (embeddings, layer 1 … layer L-1 outputs, final-norm output): the paper
        # matches all but the last.
        s_states = [_rows(h, s_idx) for h in s_out.hidden_states[:-1]]
        s_logits_NV = self.model.lm_head(_rows(s_out.last_hidden_state, s_idx))

        kl = (kl_rows(s_logits_NV, t_logits_NV, self.temperature) * row_weight_N).sum()
        mse = (hidden_mse_rows(s_states, t_states) * row_weight_N).sum()
        loss = kl + self.beta * mse
        stats["kl"], stats["hidden_mse"] = kl.detach(), mse.detach()
        if self.alpha > 0:
            ce = (ce_rows(s_logits_NV, batch["target_ids"]) * row_weight_N).sum()
            loss = loss + self.alpha * ce
            stats["ce"] = ce.detach()
        return loss * scale, stats
