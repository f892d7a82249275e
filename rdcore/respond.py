"""Teacher-written responses (``--responses teacher``): the teacher — the model with the rule in its
context — writes the response to every training input once, and training runs on those tokens
(context distillation: Askell et al. 2021; Snell, Klein and Zhong 2022). A user with rules and
inputs but no reference answers can then distil at all, and every method trains on the same text.

Generation is batched (similar prompt lengths together), greedy or seeded sampling, and reads the
rule prefix's KV cache: the prefix shared by every teacher prompt runs once, each batch copies its
cache and generates from ``[prefix | left padding | suffix]`` (the attention mask hides the
padding; positions follow the mask). A model with sliding-window layers shorter than the prompts
generates without the prefix cache (the padding between prefix and suffix would take window slots).

Responses are stored with the run (``responses_<stage>_<split>.jsonl``: a header naming what they
depend on, then one row per example) and resumed rather than regenerated: each rank writes its own
part as batches finish, and a restarted run continues from what the parts hold.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rdcore import DataError
from rdcore.data import Encoder, RuleExample, rule_prefix_len
from rdcore.distill import eval_mode
from rdcore.files import atomic_write_text

log = logging.getLogger("rdcore.train")
STOP = {"alpaca": ("\n### ", "\n\n### ")}
"""Where a response ends in a template, for models that do not stop at EOS (base models continue
with the template's next section)."""


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn: greedy (``temperature`` 0) or sampled with ``seed``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0


def _sliding_window(model: Any) -> int | None:
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window and types is not None and "sliding_attention" not in types:
        return None
    return window or None


def prefix_cacheable(model: Any, longest: int) -> bool:
    """Whether a shared prefix's KV cache gives the plain generation's result (no sliding window
    shorter than the longest sequence)."""
    window = _sliding_window(model)
    return window is None or window >= longest


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], P: int,
                   sampling: Sampling, prefix_cache: Any | None) -> list[str]:
    """Continuations of one batch of prompts sharing their first ``P`` tokens (``prefix_cache``:
    the KV cache of those tokens, or None to run them)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.get_output_embeddings().weight.device
    B = len(prompts)
    S = max(len(p) - P for p in prompts)
    ids = torch.full((B, P + S), pad, dtype=torch.long)
    mask = torch.zeros((B, P + S), dtype=torch.long)
    for b, p in enumerate(prompts):
        if prefix_cache is not None:  # [prefix | pads | suffix]: the prefix at the same positions
            ids[b, :P], mask[b, :P] = torch.tensor(p[:P]), 1
            ids[b, P + S - (len(p) - P):] = torch.tensor(p[P:])
            mask[b, P + S - (len(p) - P):] = 1
        else:  # plain left padding
            ids[b, P + S - len(p):], mask[b, P + S - len(p):] = torch.tensor(p), 1
    kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                                  eos_token_id=tokenizer.eos_token_id)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(B)
        kwargs["past_key_values"] = cache
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    return [tokenizer.decode(out[b, P + S:], skip_special_tokens=True) for b in range(B)]


def clean(text: str, template: str) -> str:
    """The response without the template's next section and surrounding whitespace."""
    for stop in STOP.get(template, ()):
        text = text.split(stop, 1)[0]
    return text.strip()


def write_responses(model: Any, tokenizer: Any, examples: Sequence[RuleExample], encoder: Encoder,
                    sampling: Sampling, *, batch_size: int = 8, part: Path | None = None,
                    use_prefix_cache: bool = True) -> dict[int, str]:
    """The teacher's response to each example (index → text), generated with the rule in context.
    ``part``: a JSONL file of ``{"index", "response"}`` rows already written (resumed: those
    examples are not generated again) and appended to as batches finish."""
    done: dict[int, str] = {}
    if part is not None and part.is_file():
        for line in part.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[int(row["index"])] = row["response"]
    prompts = encoder.encode_prompts(examples, "teacher")
    todo = sorted((i for i in range(len(examples)) if i not in done), key=lambda i: len(prompts[i]))
    if not todo:
        return done
    P = rule_prefix_len([prompts[i] for i in todo], [len(prompts[i]) for i in todo])
    longest = max(len(prompts[i]) for i in todo) + sampling.max_new_tokens
    # eval mode (no dropout; no activation checkpointing, which would drop the K/V cache; each
    # module's own flag restored) and the caller's random state kept (CPU and the model's GPU),
    # from the rule prefix's pass on
    device = model.get_output_embeddings().weight.device
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cache = None
        if use_prefix_cache and P > 0 and prefix_cacheable(model, longest):
            with torch.no_grad():
                cache = model(input_ids=torch.tensor([prompts[todo[0]][:P]], device=device),
                              use_cache=True).past_key_values
        else:
            P = 0
        for b0 in range(0, len(todo), batch_size):
            idx = todo[b0: b0 + batch_size]
            if sampling.temperature > 0:  # each batch's draws depend only on the seed and batch
                torch.manual_seed(sampling.seed * 1_000_003 + idx[0])
            texts = generate_batch(model, tokenizer, [prompts[i] for i in idx], P, sampling, cache)
            rows = [(i, clean(t, encoder.template)) for i, t in zip(idx, texts)]
            done.update(rows)
            if part is not None:
                with part.open("a") as fh:
                    fh.writelines(json.dumps({"index": i, "response": r}) + "\n" for i, r in rows)
            log.info("teacher responses: %d/%d", len(done), len(examples))
    return done


def fingerprint(examples: Sequence[RuleExample], encoder: Encoder, sampling: Sampling,
                model_id: str) -> str:
    """What a set of responses depends on: the examples' prompts, the template, the sampling and
    the teacher (its name and weights fingerprint)."""
    h = hashlib.sha256()
    h.update(json.dumps([encoder.template, encoder.max_length, sampling.__dict__, model_id]).encode())
    for ex in examples:
        h.update(json.dumps([ex.rule, ex.context, ex.input]).encode())
    return h.hexdigest()[:20]


def with_responses(examples: Sequence[RuleExample], responses: dict[int, str], where: str
                   ) -> list[RuleExample]:
    """The examples with the teacher's responses as outputs; an empty response drops its example
    (logged: the response tokenises to nothing trainable), all empty is an error."""
    out = [replace(ex, output=responses[i]) for i, ex in enumerate(examples) if responses[i]]
    empty = len(examples) - len(out)
    if empty:
        log.warning("%s: the teacher wrote an empty response for %d of %d examples; they are "
                    "left out", where, empty, len(examples))
    if not out:
        raise DataError(f"{where}: the teacher wrote an empty response for every example")
    return out


def load_or_write(path: Path, key: str, model: Any, tokenizer: Any, examples: Sequence[RuleExample],
                  encoder: Encoder, sampling: Sampling, rank: int, world: int, barrier: Any,
                  gather: Any, batch_size: int = 8) -> dict[int, str]:
    """The responses of ``path`` if it holds those of ``key``; else every rank writes its share
    (examples ``rank::world``) to ``<path>.rank<r>.part`` (resumable), the shares are gathered,
    and rank 0 writes ``path``. Call on every rank."""
    if path.is_file():
        lines = path.read_text().splitlines()
        header = json.loads(lines[0])
        if header.get("key") == key:
            rows = [json.loads(x) for x in lines[1:] if x.strip()]
            return {int(r["index"]): r["response"] for r in rows}
        log.info("%s was written for other examples or settings: writing them anew", path)
    mine = list(range(rank, len(examples), world))
    part = path.with_name(f"{path.name}.rank{rank}.{key}.part")
    got = write_responses(model, tokenizer, [examples[i] for i in mine], encoder, sampling,
                          batch_size=batch_size, part=part)
    local = {mine[j]: text for j, text in got.items()}
    merged: dict[int, str] = {}
    for share in gather(local):
        merged.update(share)
    if rank == 0:
        body = "".join(json.dumps({"index": i, "response": merged[i],
                                   "input": examples[i].input}) + "\n" for i in sorted(merged))
        atomic_write_text(path, json.dumps({"key": key, "n": len(merged)}) + "\n" + body)
    barrier()
    part.unlink(missing_ok=True)
    return merged
