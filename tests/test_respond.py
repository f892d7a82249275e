"""Teacher-written responses (rdcore.respond): the rule-prefix KV cache gives the plain batched
generation's tokens, sampling is reproducible, a part file resumes, and sliding-window models fall
back to the plain generation."""

import json

import torch
from families import build

from rdcore.data import Encoder, load_task
from rdcore.respond import Sampling, clean, prefix_cacheable, write_responses


def test_the_prefix_cache_gives_the_plain_generation(tiny):
    model, tok = tiny
    examples = load_task("math", "train", 8)[:6]
    enc = Encoder(tok)
    greedy = Sampling(max_new_tokens=6)
    cached = write_responses(model, tok, examples, enc, greedy, batch_size=4)
    plain = write_responses(model, tok, examples, enc, greedy, batch_size=4, use_prefix_cache=False)
    one = write_responses(model, tok, examples, enc, greedy, batch_size=1, use_prefix_cache=False)
    assert cached == plain == one and len(cached) == 6
    sampled = Sampling(max_new_tokens=6, temperature=1.0, seed=5)
    a = write_responses(model, tok, examples, enc, sampled, batch_size=4)
    torch.manual_seed(123)  # the caller's random state neither matters nor changes
    state = torch.random.get_rng_state()
    b = write_responses(model, tok, examples, enc, sampled, batch_size=4)
    assert a == b and a != cached and torch.equal(state, torch.random.get_rng_state())


def test_the_rule_prefix_pass_runs_in_eval_mode_with_the_callers_random_state():
    """A LoRA teacher with dropout, in training mode, activation checkpointing on (as the trainer
    leaves it): the prefix K/V is computed without dropout — the cached generation is the plain
    one — and neither the random state nor the training mode changes."""
    from rdcore.distill import add_lora, checkpoint_activations, lora_config
    from rdcore.models import load_model

    model, tok = load_model("tiny", seed=1)
    model = add_lora(model, lora_config(4, 8, 0.5))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_" in name:  # adapters large enough that dropout would change the tokens
            p.data = torch.randn(p.shape, generator=g) * 0.5
    model.train()
    assert checkpoint_activations(model) == 2
    assert prefix_cacheable(model, 512)  # the cached path is the one under test
    examples = load_task("math", "train", 8)[:6]
    enc = Encoder(tok)
    greedy = Sampling(max_new_tokens=6)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    cached = write_responses(model, tok, examples, enc, greedy, batch_size=4)
    assert torch.equal(state, torch.random.get_rng_state()) and model.training
    plain = write_responses(model, tok, examples, enc, greedy, batch_size=4, use_prefix_cache=False)
    assert cached == plain and len(cached) == 6


def test_a_part_file_resumes(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    examples = load_task("math", "train", 8)[:5]
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps({"index": 1, "response": "kept"}) + "\n")
    import rdcore.respond as respond

    seen = []
    real = respond.generate_batch

    def spy(model, tokenizer, prompts, *a):
        seen.append(len(prompts))
        return real(model, tokenizer, prompts, *a)

    monkeypatch.setattr(respond, "generate_batch", spy)
    got = write_responses(model, tok, examples, Encoder(tok), Sampling(max_new_tokens=3),
                          batch_size=8, part=part)
    assert got[1] == "kept" and sum(seen) == 4 and len(got) == 5
    assert len(part.read_text().splitlines()) == 5


def test_sliding_windows_shorter_than_the_prompts_generate_without_the_prefix_cache():
    mistral, _ = build("mistral")  # window 24
    llama, _ = build("llama")
    assert not prefix_cacheable(mistral, 200) and prefix_cacheable(mistral, 20)
    assert prefix_cacheable(llama, 10**6)
    gemma3, _ = build("gemma3")
    assert not prefix_cacheable(gemma3, 200)


def test_clean_stops_at_the_next_template_section():
    assert clean(" Paris.\n\n### Instruction:\nWhat else?", "alpaca") == "Paris."
    assert clean("  Bonjour !  ", "chat") == "Bonjour !"
