"""The trainer for real: `deepspeed rdcore/train.py` on CPU ranks (gloo), ZeRO-3 (every tensor
partitioned: stage3_param_persistence_threshold 0), the tiny model, fp32."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    assert_same_curve,
    deepspeed_launcher,
    free_port,
    metrics,
    run_ranks,
    user_env,
)

pytestmark = pytest.mark.slow

BASE = ["--model", "tiny", "--task", "math", "--shots", "8", "--max_steps", "4",
        "--lr", "3e-3", "--beta", "10", "--seed", "3", "--tensorboard", "off"]
FULL = ["--method", "rule_distill_base", "--finetune", "full"]


def command(out: Path, ranks: int, *flags: str, script: str = "rdcore/train.py") -> list[str]:
    extra = [*BASE, "--output_dir", str(out), *flags] if script == "rdcore/train.py" else list(flags)
    return [*deepspeed_launcher(), "--num_accelerators", str(ranks), "--master_port",
            str(free_port()), script, *extra]


def env() -> dict[str, str]:
    return user_env()


def launch(out: Path, ranks: int, *flags: str, check: bool = True, script: str = "rdcore/train.py",
           launcher: bool = False) -> subprocess.CompletedProcess:
    """The run as ``deepspeed --num_accelerators <ranks>`` starts it: through the ``deepspeed``
    command itself with ``launcher``, else with the ranks spawned directly (``run_ranks``)."""
    cmd = command(out, ranks, *flags, script=script)
    if launcher:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=600)
    else:
        proc = run_ranks(script, cmd[cmd.index(script) + 1:], ranks, env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    launch(out, 2, *FULL, "--save_every", "1", launcher=True)  # the deepspeed command itself
    return out


def test_two_rank_zero3_distillation(reference):
    cfg = json.loads((reference / "config.json").read_text())
    assert cfg["method"] == "rule_distill_base" and cfg["max_steps"] == 4 and cfg["beta"] == 10
    run = json.loads((reference / "run_main.json").read_text())
    shard = run["rank0"]
    assert run["world_size"] == 2
    # really sharded: rank 0 holds about half of every parameter
    assert 0.45 < shard["local_param_elements"] / shard["total_param_elements"] < 0.55
    rows = metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) >= {"step", "loss", "kl", "hidden_mse", "lr", "tokens", "step_time_s"}
               for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (reference / "checkpoints" / "main" / "latest_complete").read_text().strip() == "step4"

    from transformers import AutoModelForCausalLM

    from rdcore.models import load_model

    trained, info = AutoModelForCausalLM.from_pretrained(reference / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    start, _ = load_model("tiny", seed=3)
    for (name, a), (_, b) in zip(trained.named_parameters(), start.named_parameters()):
        rel = ((a - b).norm() / b.norm()).item()
        assert 0 < rel < 0.5, (name, rel)  # trained from the start, not a fresh random init


def test_activation_checkpointing_same_curve(reference, tmp_path):
    """--activation_checkpointing under ZeRO-3 on 2 ranks (the recompute gathers the layer's
    shards again): full fine-tuning gives the reference run's curve; LoRA with dropout (replayed
    in the recompute), the rule-prefix and teacher-target caches and the interleaved passes gives
    the curve of the same run without it."""
    full = tmp_path / "full"
    proc = launch(full, 2, *FULL, "--activation_checkpointing", "on", "--save_model", "off")
    assert "activation checkpointing: 2 decoder layers recomputed" in proc.stdout + proc.stderr
    assert_same_curve(metrics(full), metrics(reference), rel=1e-5)
    flags = ("--method", "rule_distill_base", "--finetune", "lora", "--epochs", "2",
             "--max_steps", "0", "--save_model", "off", "--ds_config", str(trace_config(tmp_path)))
    on, off = tmp_path / "lora_on", tmp_path / "lora_off"
    p_on = launch(on, 2, *flags, "--activation_checkpointing", "on")
    p_off = launch(off, 2, *flags)
    assert invalidations(p_on) == invalidations(p_off)  # the recompute keeps the prefetch trace
    assert len(metrics(on)) == 8 and metrics(on)[-1]["rank0_teacher_cached"] == 4
    assert_same_curve(metrics(on), metrics(off), rel=1e-5)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_sigkill_then_resume_gives_the_same_curve(tmp_path, finetune):
    """SIGKILL a run right after its first complete checkpoint, resume it: the loss curve equals
    the uninterrupted run's (LoRA: its dropout draws random numbers, so the per-rank random state
    is part of the checkpoint)."""
    flags = ["--task", "bob", "--method", "rule_distill_base", "--finetune", finetune,
             "--save_every", "1", "--save_model", "off"]
    reference = tmp_path / "reference"
    launch(reference, 2, *flags)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out, 2, *flags), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = out / "checkpoints" / "main"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (ckpt / "step1" / "COMPLETE").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [int(p.name[4:]) for p in ckpt.glob("step*") if (p / "COMPLETE").exists()]
    assert done and max(done) < 4, done  # killed mid-run
    assert not (ckpt / "DONE").exists()
    launch(out, 2, *flags, "--resume", "on")
    assert_same_curve(metrics(out), metrics(reference), rel=1e-5)
    if finetune == "lora":
        from safetensors.torch import load_file

        from rdcore.models import load_model

        adapter = load_file(str(ckpt / "step4" / "adapter.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)
        # the frozen base model is not in the checkpoint (it used to be: one copy per checkpoint)
        model_bytes = sum(p.numel() * 4 for p in load_model("tiny")[0].parameters())
        states = sum(f.stat().st_size for f in (ckpt / "step4").glob("*model_states.pt"))
        assert states < 0.1 * model_bytes, (states, model_bytes)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_loss_does_not_depend_on_how_the_batch_is_split(tmp_path, finetune):
    """2 ranks x 1 micro-batch vs 1 process x 2 accumulated micro-batches: the same global batches
    (responses of different lengths), so with global-token normalisation the same curve."""
    two, one = tmp_path / "two", tmp_path / "one"
    # lr 1e-4 (the paper's): Adam turns fp32 summation-order noise in near-zero gradient entries
    # into updates of size ~lr, so a large lr would drift by more than 1e-5 for reasons unrelated
    # to the normalisation under test.
    # LoRA dropout off: with it, 2 ranks and 1 process draw different dropout masks (each rank has
    # its own random stream), which is a real difference, not a normalisation one.
    flags = ("--task", "bob", "--method", "rule_distill_base", "--finetune", finetune,
             "--alpha", "0.5", "--max_steps", "5", "--save_model", "off", "--lr", "1e-4",
             "--lora_dropout", "0")
    launch(two, 2, *flags, "--grad_accum", "1")
    launch(one, 1, *flags, "--grad_accum", "2")
    assert len({r["tokens"] for r in metrics(two)}) > 1  # uneven token counts are exercised
    assert_same_curve(metrics(two), metrics(one), rel=1e-5, keys=("loss", "ce"))
    # KL and hidden MSE are tiny differences of nearly equal teacher/student quantities: after an
    # update, fp32 summation-order noise moves them relatively more than the total loss.
    assert_same_curve(metrics(two), metrics(one), rel=2e-3, keys=("kl", "hidden_mse"))


def test_enhanced_lora_two_stages_and_merged_model(tmp_path):
    # default method: enhanced, LoRA; a checkpoint every step, only the newest one kept
    launch(tmp_path, 2, "--max_steps", "3", "--lr", "1e-2", "--save_every", "1",
           "--keep_checkpoints", "1")
    s1, s2 = metrics(tmp_path, "stage1"), metrics(tmp_path, "distill")
    assert len(s1) == 3 and "ce" in s1[0] and len(s2) == 3 and "kl" in s2[0]
    for stage in ("stage1", "distill"):
        assert sorted(p.name for p in (tmp_path / "checkpoints" / stage).glob("step*")) == ["step3"]
    from safetensors.torch import load_file

    teacher = load_file(str(tmp_path / "teacher_adapter.safetensors"))
    assert teacher and all("lora_" in k for k in teacher)
    assert any(v.abs().max() > 0 for k, v in teacher.items() if "lora_B" in k)  # stage 1 trained
    run = json.loads((tmp_path / "run_distill.json").read_text())
    assert run["trainable_param_elements"] < run["rank0"]["total_param_elements"] / 10
    from transformers import AutoModelForCausalLM

    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"]
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (tmp_path / "final" / "adapter").is_dir()
    # LoRA consolidation of the last stage's checkpoint (base + student adapter) = the final model
    from rdcore.consolidate import consolidate

    used = consolidate(tmp_path, tmp_path / "consolidated")
    assert used.parent.name == "distill"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "consolidated")
    for (name, a), (_, b) in zip(got.named_parameters(), merged.named_parameters()):
        assert torch.equal(a, b), name


def test_teacher_pass_keeps_the_prefetch_trace(tmp_path):
    """With log_trace_cache_warnings on, the naive pattern (teacher as a second top-level call)
    invalidates DeepSpeed's trace every step; rdcore's single forward never does."""
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["log_trace_cache_warnings"] = True
    cfg_path = tmp_path / "ds.json"
    cfg_path.write_text(json.dumps(ds))
    ours = launch(tmp_path, 2, "ours", str(cfg_path), "4", script="tests/scripts/trace_probe.py")
    naive = launch(tmp_path, 2, "naive", str(cfg_path), "4", script="tests/scripts/trace_probe.py")
    count = lambda p: (p.stdout + p.stderr).count("Invalidate trace cache")  # noqa: E731
    assert "probe step 4 done" in ours.stdout and "probe step 4 done" in naive.stdout
    assert count(naive) > 0
    assert count(ours) == 0
    # the real trainer keeps the trace too: full fine-tuning in test_prefix_cache_full_mode_same_curve,
    # LoRA in test_lora_prefix_and_teacher_caches_same_curve_and_trace


def truncated_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of a finished run as if it had been stopped right after checkpoint ``step``."""
    shutil.copytree(run, dest)
    ckpt = dest / "checkpoints" / "main"
    (ckpt / "DONE").unlink()
    for later in ckpt.glob("step*"):
        if int(later.name[4:].split(".")[0]) > step:
            shutil.rmtree(later)
    (ckpt / "latest_complete").write_text(f"step{step}\n")
    (ckpt / "latest").write_text(f"step{step}\n")
    return dest


def zero_adam_moments(universal: Path) -> int:
    n = 0
    for f in universal.glob("zero/*/exp_avg*.pt"):
        t = torch.load(f, weights_only=False)
        torch.save(torch.zeros_like(t), f)
        n += 1
    return n


def test_instruction_tuning_and_a_resume_on_fewer_ranks(reference, tmp_path):
    launch(tmp_path, 1, "--method", "inst_tune_rule", "--max_steps", "2", "--save_model", "off")
    rows = metrics(tmp_path)
    assert len(rows) == 2 and "ce" in rows[0] and "kl" not in rows[0]
    assert not (tmp_path / "final").exists()
    # A 2-rank checkpoint resumes on 1 rank, but only with the same global batch ...
    # (lr 1e-4: at larger rates Adam turns the summation-order noise of 1 process on 2 threads vs
    # 2 ranks on 1 thread each into differences beyond 1e-5; see the batch-split test.)
    flags = ("--task", "bob", *FULL, "--lr", "1e-4", "--save_every", "1", "--save_model", "off")
    two = tmp_path / "two"
    launch(two, 2, *flags)
    resized = truncated_copy(two, tmp_path / "resized", 2)
    proc = launch(resized, 1, *flags, "--resume", "on", check=False)
    assert proc.returncode != 0
    assert "global batch of 2 (2 ranks)" in proc.stderr and "--grad_accum 2" in proc.stderr
    # ... and then through DeepSpeed's universal checkpoint the weights, the Adam moments and the
    # schedule all carry over: the curve is the uninterrupted 2-rank run's.
    launch(resized, 1, *flags, "--resume", "on", "--grad_accum", "2")
    ckpt = resized / "checkpoints" / "main"
    assert (ckpt / "step2.universal" / "COMPLETE").is_file() and (ckpt / "DONE").is_file()
    assert (ckpt / "world_size").read_text().strip() == "1"
    assert_same_curve(metrics(resized), metrics(two), rel=1e-5, keys=("loss", "lr"))
    # The control: the same resume with the Adam moments zeroed gives another curve, so the
    # equality above needs the optimizer state, not just the weights.
    control = truncated_copy(resized, tmp_path / "control", 2)
    assert zero_adam_moments(control / "checkpoints" / "main" / "step2.universal") > 0
    launch(control, 1, *flags, "--resume", "on", "--grad_accum", "2")
    last, ref_last = metrics(control)[-1]["loss"], metrics(two)[-1]["loss"]
    assert abs(last - ref_last) > 1e-3 * ref_last, (last, ref_last)
    # The other way out, for a new run: the checkpoint becomes a model folder a 1-rank run starts
    # from (weights carried over: equal to the run's final model).
    folder = tmp_path / "consolidated"
    done = subprocess.run([sys.executable, "-m", "rdcore.consolidate", str(reference), str(folder)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(folder)
    final = AutoModelForCausalLM.from_pretrained(reference / "final")
    for (name, a), (_, b) in zip(got.named_parameters(), final.named_parameters()):
        assert torch.equal(a, b), name
    launch(tmp_path / "continued", 1, *FULL, "--model", str(folder), "--max_steps", "1",
           "--save_model", "off")
    again = subprocess.run([sys.executable, "-m", "rdcore.consolidate", str(reference), str(folder)],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr


def test_lora_resume_on_more_ranks(tmp_path):
    """A 1-rank LoRA checkpoint (2 accumulated micro-batches) resumes on 2 ranks (1 each): the
    curve equals the uninterrupted run's (dropout off: each rank has its own random stream)."""
    flags = ("--task", "bob", "--method", "rule_distill_base", "--finetune", "lora",
             "--lora_dropout", "0", "--lr", "1e-2", "--save_every", "1", "--save_model", "off")
    one = tmp_path / "one"
    launch(one, 1, *flags, "--grad_accum", "2")
    grown = truncated_copy(one, tmp_path / "grown", 2)
    launch(grown, 2, *flags, "--grad_accum", "1", "--resume", "on")
    assert (grown / "checkpoints" / "main" / "world_size").read_text().strip() == "2"
    assert_same_curve(metrics(grown), metrics(one), rel=1e-5, keys=("loss", "lr"))


def test_lora_resume_refuses_a_changed_base_model(tmp_path, tiny):
    """Checkpoints leave the frozen base out, so a resume rebuilds it from --model: if those files
    changed since, the run stops with a clear error instead of training on other weights."""
    from safetensors.torch import load_file, save_file

    model, tok = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    flags = ("--model", str(folder), "--method", "inst_tune_no_rule", "--finetune", "lora",
             "--max_steps", "2", "--save_every", "1", "--save_model", "off")
    run = tmp_path / "run"
    launch(run, 1, *flags)
    stopped = truncated_copy(run, tmp_path / "stopped", 1)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    proc = launch(stopped, 1, *flags, "--resume", "on", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "frozen weights" in proc.stderr and "differ" in proc.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = launch(tmp_path, 1, *FULL, "--lr", "1e30", "--save_every", "1", check=False)
    assert proc.returncode == 2
    assert "non-finite loss at step 2" in proc.stderr
    assert "checkpoints/main/step1" in proc.stderr
    assert (tmp_path / "checkpoints" / "main" / "step1" / "COMPLETE").is_file()
    assert not (tmp_path / "final").exists()


def test_bad_flags_fail_fast(tmp_path):
    proc = subprocess.run([sys.executable, "rdcore/train.py", "--method", "magic",
                           "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("rdcore: error: method must be one of")
    assert "Traceback" not in proc.stderr


def test_real_model_on_two_ranks_with_a_cold_cache(tmp_path, monkeypatch):
    """Both ranks start with no converted SmolLM2: one converts, the other waits (a race once
    published a folder without weights); then the embedded default (Enhanced, LoRA) runs a step of
    each stage on the real model."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RDCORE_CACHE_DIR", str(cache))
    launch(tmp_path / "run", 2, "--model", "smollm2-135m", "--max_steps", "1", "--save_model", "off")
    folders = [p for p in cache.iterdir() if p.name.startswith("smollm2")]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    row = metrics(tmp_path / "run", "distill")[0]
    assert row["kl"] >= 0 and row["tokens"] > 0
    assert torch.isfinite(torch.tensor(row["loss"]))


def test_no_shared_memory_op(tmp_path):
    """DeepSpeed's CPU shared-memory communication op is neither built nor mapped: it serves only
    inference all-reduces, costs a C++ build on a machine's first run and leaves ~69 MB per rank
    in /dev/shm (``engine._skip_cpu_shm_comm``)."""
    before = set(Path("/dev/shm").glob("deepspeed_*"))
    proc = launch(tmp_path, 2, *FULL, "--max_steps", "1", "--save_model", "off")
    assert "shm_comm" not in proc.stdout + proc.stderr
    assert set(Path("/dev/shm").glob("deepspeed_*")) == before


# --------------------------------------------------------------------------------------------------
# Teacher caches (issue 7): the same curves with and without them, and the trace kept
# --------------------------------------------------------------------------------------------------
def trace_config(tmp_path: Path) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["log_trace_cache_warnings"] = True
    path = tmp_path / "ds_trace.json"
    path.write_text(json.dumps(ds))
    return path


def invalidations(proc: subprocess.CompletedProcess) -> int:
    return (proc.stdout + proc.stderr).count("Invalidate trace cache")


def test_prefix_cache_full_mode_same_curve(tmp_path):
    """Full fine-tuning (the teacher is the live model: the prefix is recomputed every step), 5
    steps: the curves with the cache on and off are the same. The losses are small differences of
    nearly equal teacher/student states, so fp32 noise of the teacher (~1e-6 relative, see
    tests/test_prefix_cache.py) shows at ~1e-4 in them."""
    on, off = tmp_path / "on", tmp_path / "off"
    # lr 1e-4 (the paper's): Adam turns fp32 noise in near-zero gradient entries into updates of
    # size ~lr, which a large lr would amplify beyond the effect under test (as in the split test)
    flags = (*FULL, "--epochs", "2", "--max_steps", "5", "--save_model", "off", "--lr", "1e-4",
             "--ds_config", str(trace_config(tmp_path)))
    proc = launch(on, 2, *flags, "--prefix_cache", "on")
    launch(off, 2, *flags, "--prefix_cache", "off")
    assert len(metrics(on)) == 5
    # the cache is rebuilt every step in one packed call with the rest: the ZeRO-3 prefetch trace
    # is never invalidated (see test_teacher_pass_keeps_the_prefetch_trace)
    assert invalidations(proc) == 0
    assert_same_curve(metrics(on), metrics(off), rel=2e-3, keys=("loss", "kl", "hidden_mse"))
    assert metrics(on)[-1]["rank0_prefix_builds"] == 5  # once per optimizer step, never per sample
    assert metrics(off)[-1]["rank0_prefix_builds"] == 0


def test_lora_prefix_and_teacher_caches_same_curve_and_trace(tmp_path):
    """LoRA (frozen teacher), 3 epochs of 8 examples on 2 ranks: prefix cache on/off and teacher-
    target cache on/off give the same curve; the prefix is computed once per run; from epoch 2 the
    teacher pass is skipped; the ZeRO-3 prefetch trace is re-recorded once after the step that
    built the prefix and once when the teacher pass drops out, never otherwise."""
    ds = trace_config(tmp_path)
    flags = ("--method", "rule_distill_base", "--finetune", "lora", "--epochs", "3",
             "--lora_dropout", "0", "--save_model", "off", "--ds_config", str(ds), "--max_steps", "0")
    runs = {}
    for prefix, targets in (("on", "on"), ("on", "off"), ("off", "off")):
        out = tmp_path / f"p{prefix}_t{targets}"
        proc = launch(out, 2, *flags, "--prefix_cache", prefix, "--teacher_cache", targets)
        runs[prefix, targets] = (metrics(out), invalidations(proc))
    both, prefix_only, none = runs["on", "on"], runs["on", "off"], runs["off", "off"]
    assert len(none[0]) == 12
    assert_same_curve(both[0], prefix_only[0], rel=1e-5, keys=("loss", "kl", "hidden_mse"))
    assert_same_curve(prefix_only[0], none[0], rel=2e-3, keys=("loss", "kl", "hidden_mse"))
    last = both[0][-1]
    assert last["rank0_prefix_builds"] == 1
    assert last["rank0_teacher_passes"] == 4 and last["rank0_teacher_cached"] == 8
    assert prefix_only[0][-1]["rank0_teacher_passes"] == 12
    assert none[1] == 0 and prefix_only[1] == 1 and both[1] == 2


def test_interleaved_passes_same_curve_less_allgather(tmp_path):
    """Full fine-tuning on 2 ranks with DeepSpeed's comms logger and a one-layer reuse distance:
    the layer-interleaved forward gives the sequential passes' loss curve, and its all-gather
    volume per step stays at the student-only level while the sequential teacher pass adds to it."""
    from rdcore.distill import causal_lm
    from rdcore.models import load_model

    model, _ = load_model("tiny", seed=3)
    layer = sum(p.numel() for p in causal_lm(model).model.layers[0].parameters())
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"].update(stage3_max_reuse_distance=layer, stage3_prefetch_bucket_size=layer,
                                   stage3_max_live_parameters=2 * layer)
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(ds))
    flags = (*FULL, "--ds_config", str(cfg), "--save_model", "off")
    gathered = {}
    curves = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        launch(out, 2, *flags, "--interleave", mode)
        rows = metrics(out)
        curves[mode] = rows
        gathered[mode] = [r["rank0_comm_all_gather_into_tensor_bytes"] for r in rows]
        # the step count survives the per-op traffic bookkeeping (the final checkpoint is step4)
        assert (out / "checkpoints" / "main" / "DONE").read_text().strip() == "4"
        assert (out / "checkpoints" / "main" / "step4" / "COMPLETE").is_file()
    assert_same_curve(curves["on"], curves["off"], rel=1e-5, keys=("loss", "kl", "hidden_mse"))
    # after step 1 (which records the prefetch trace) every step gathers less when interleaved
    assert all(a < b for a, b in zip(gathered["on"][1:], gathered["off"][1:])), gathered


# --------------------------------------------------------------------------------------------------
# select_best: the paper's model selection by validation CE
# --------------------------------------------------------------------------------------------------
BEST = ("--seed", "1234", "--max_steps", "0", "--select_best", "on")


def plain_validation_ce(model_dir: Path, val_file: Path | None = None) -> float:
    """The mean token CE of a saved model on the math 8-shot validation file of seed 1234 (or
    ``val_file``), without the rule, by Hugging Face's own loss (one right-padded batch) —
    independent of the trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rdcore.data import Encoder, collate, load_rule_file, load_task
    from rdcore.models import ADAPTER_MANIFEST, load_model

    if (model_dir / ADAPTER_MANIFEST).is_file():  # --save_model adapter: rdcore merges it
        model, tok = load_model(str(model_dir))
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = load_rule_file(val_file) if val_file else load_task("math", "valid", 8, 1234)
    data = Encoder(tok, "alpaca", 1024).encode(examples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate([data[i] for i in range(len(data))], pad)
    with torch.no_grad():
        return float(model(input_ids=batch.student_input_ids,
                           attention_mask=batch.student_attention_mask,
                           position_ids=batch.student_position_ids,
                           labels=batch.student_labels).loss)


def validation_rows(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "val_loss" in r]


def yes_no_files(folder: Path) -> tuple[Path, Path]:
    """8 training rows answered "yes" and the same inputs answered "no" for validation: training
    makes "no" ever less likely, so the first epoch is the best by construction (not by a tuned
    learning rate)."""
    rows = [{"rule": "Answer yes.", "input": f"Is {i} a number?", "output": " ".join(["yes"] * 8)}
            for i in range(8)]
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps({**r, "output": " ".join(["no"] * 8)}) + "\n" for r in rows))
    return train, val


def test_select_best_exports_the_best_epoch_and_leaves_training_alone(tmp_path):
    """LoRA from a saved model folder, 4 epochs of 4 steps: validation after each epoch, the
    exported model is the lowest-CE epoch (not the last: the validation answers are the opposite
    of the training ones), validation (eval mode, no random numbers) changes no training step, and
    LoRA dropout is active in training."""
    from rdcore.models import load_model

    folder = tmp_path / "tiny"
    model, tok = load_model("tiny", seed=1234)  # the weights --model tiny --seed 1234 has
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    train, val = yes_no_files(tmp_path)
    flags = ("--model", str(folder), "--method", "inst_tune_no_rule", "--finetune", "lora",
             "--data", str(train), "--val_data", str(val), "--epochs", "4", "--lr", "3e-2", *BEST)
    best = tmp_path / "best"
    launch(best, 2, *flags)
    rows = validation_rows(best)
    assert [(r["step"], r["epoch"]) for r in rows] == [(4, 1), (8, 2), (12, 3), (16, 4)]
    vals = [r["val_loss"] for r in rows]
    chosen = min(range(4), key=vals.__getitem__) + 1
    assert chosen < 4, vals  # the setting makes the last epoch not the best: selection matters
    assert rows[-1]["best_epoch"] == chosen and rows[-1]["best_val_loss"] == min(vals)
    assert sorted(p.name for p in (best / "best" / "main").iterdir()) == [f"epoch{chosen}.pt"]
    assert plain_validation_ce(best / "final", val) == pytest.approx(min(vals), rel=1e-5)
    # the same run without validation: every training step identical; its final/ holds only the
    # adapter (--save_model adapter), which loads merged into the base as the last epoch's model
    plain = tmp_path / "plain"
    launch(plain, 2, *flags[:-2], "--select_best", "off", "--save_model", "adapter")
    assert not validation_rows(plain)
    assert_same_curve(metrics(best), metrics(plain), rel=1e-6, keys=("loss", "lr"))
    assert not list((plain / "final").glob("*.safetensors"))  # no copy of the model
    assert plain_validation_ce(plain / "final", val) == pytest.approx(vals[-1], rel=1e-5)
    # and LoRA dropout is on in training: without it the curve differs from the second step on
    # (the adapter's output is 0 at the first)
    nodrop = tmp_path / "nodrop"
    launch(nodrop, 2, *flags[:-2], "--select_best", "off", "--lora_dropout", "0",
           "--max_steps", "2", "--save_model", "off")
    first, second = metrics(nodrop)
    assert first["loss"] == pytest.approx(metrics(plain)[0]["loss"], rel=1e-6)
    assert abs(second["loss"] - metrics(plain)[1]["loss"]) > 1e-4 * second["loss"]


def test_select_best_survives_a_resume(tmp_path):
    """Full fine-tuning at a rate where epoch 1 is the best of 3: a run stopped in epoch 2 and
    resumed still exports epoch 1 (the best is carried in the checkpoint), and the consolidated
    model equals that epoch's."""
    flags = (*FULL, "--epochs", "3", "--lr", "3e-2", *BEST)
    launch(tmp_path, 2, *flags, "--stop_at_step", "6")
    assert [r["epoch"] for r in validation_rows(tmp_path)] == [1]
    launch(tmp_path, 2, *flags, "--resume", "on")
    rows = validation_rows(tmp_path)
    vals = [r["val_loss"] for r in rows]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and vals[0] < min(vals[1:]), vals
    assert [r["best_epoch"] for r in rows] == [1, 1, 1]
    assert [p.name for p in (tmp_path / "best" / "main").iterdir()] == ["epoch1.pt"]
    assert plain_validation_ce(tmp_path / "final") == pytest.approx(vals[0], rel=1e-5)


def test_bf16_end_to_end_within_bf16_noise_of_fp32(reference, tmp_path):
    """--precision bf16 on 2 ranks (ZeRO-3, full fine-tuning): the curve follows the fp32 run's
    within bf16 rounding (8 mantissa bits: 2⁻⁸ ≈ 0.4 % per operation, a few of them per term),
    relative to the curve's size; and it is not the fp32 curve (the flag took effect)."""
    launch(tmp_path, 2, *FULL, "--precision", "bf16")
    bf16, fp32 = metrics(tmp_path), metrics(reference)
    assert_same_curve(bf16, fp32, rel=0.02, keys=("loss", "kl", "hidden_mse"))
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, fp32))
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "final").glob("*.safetensors"))), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Multi-node without a cluster: two launchers on one machine, over the loopback address
# --------------------------------------------------------------------------------------------------
MULTI = ("--max_steps", "0", "--lr", "1e-4", "--save_every", "1", "--save_model", "off",
         "--precision", "bf16")


def two_nodes(out: Path, tmp: Path, *flags: str) -> None:
    """2 "nodes" × 2 ranks: what a user types on each of two machines (node_rank 0 and 1), with
    the hostfile naming both and the first machine's address (here 127.0.0.1) as master."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port = str(free_port())
    procs = [subprocess.Popen(
        [*deepspeed_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
         "--master_addr", "127.0.0.1", "--master_port", port, "rdcore/train.py", *BASE,
         "--output_dir", str(out), *flags], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def test_two_nodes_equal_one_node_and_resume_on_fewer_ranks(tmp_path):
    """The multi-node config (bf16, "auto" ZeRO-3 sizes) on 2 × 2 ranks gives the 1 × 4-rank curve;
    hpZ (a secondary partition within each node) does too; a checkpoint the 2 × 2 run wrote
    resumes on 1 × 2 ranks (universal checkpoint, grad_accum 2) with the uninterrupted curve.
    (ZeRO++'s quantized weights and gradients need CUDA: not run here.)"""
    flags = (*FULL, "--ds_config", "ds_configs/zero3_multinode_bf16.json", *MULTI)
    one = tmp_path / "one_node"
    launch(one, 4, *flags)
    two = tmp_path / "two_nodes"
    two_nodes(two, tmp_path, *flags)
    assert len(metrics(one)) == 2
    assert_same_curve(metrics(two), metrics(one), rel=1e-6, keys=("loss", "kl", "hidden_mse", "lr"))
    hpz_config = tmp_path / "hpz.json"
    ds = json.loads((ROOT / "ds_configs" / "zero3_multinode_zeropp.json").read_text())
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        ds["zero_optimization"].pop(key)
    hpz_config.write_text(json.dumps(ds))
    hpz = tmp_path / "hpz"
    two_nodes(hpz, tmp_path, *FULL, "--ds_config", str(hpz_config), *MULTI)
    assert_same_curve(metrics(hpz), metrics(one), rel=1e-6, keys=("loss", "kl", "hidden_mse"))
    resumed = truncated_copy(two, tmp_path / "resumed", 1)
    launch(resumed, 2, *flags, "--resume", "on", "--grad_accum", "2")
    assert (resumed / "checkpoints" / "main" / "step1.universal" / "COMPLETE").is_file()
    assert_same_curve(metrics(resumed), metrics(two), rel=1e-5, keys=("loss", "lr"))


def test_a_rule_book_run_ends_with_its_before_after_table(tmp_path):
    """The rule book's rules (here two at once, one student) need teacher-written responses; the
    run prints the held-out before / teacher / after table (the demo's ending) and keeps its
    evaluations."""
    proc = launch(tmp_path, 2, "--task", "rulebook", "--rule", "french,closing", "--responses",
                  "teacher", "--response_tokens", "6", "--report", "3", "--max_steps", "2")
    assert "held-out inputs" in proc.stdout, proc.stdout[-3000:]
    table = proc.stdout.split("held-out inputs")[1]
    for name in ("before", "teacher", "after"):
        assert f"| {name} |" in table
        assert (tmp_path / "report" / name / "eval.json").is_file()
    responses = (tmp_path / "responses_distill_train.jsonl").read_text().splitlines()
    assert len(responses) == 1 + 16  # 8 inputs of each rule, written by the stage-1 teacher
    assert (tmp_path / "responses_stage1_train.jsonl").is_file()
    # run again (a second `make demo`): the finished run's table is printed from its evaluations
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "report").glob("*/eval.json")}
    assert len(stamps) == 3
    again = launch(tmp_path, 2, "--task", "rulebook", "--rule", "french,closing", "--responses",
                   "teacher", "--response_tokens", "6", "--report", "3", "--max_steps", "2",
                   "--resume", "on")
    rows = [x for x in table.splitlines() if x.startswith("|")]
    assert [x for x in again.stdout.split("held-out inputs")[1].splitlines()
            if x.startswith("|")] == rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_run_ranks_kills_the_others_when_one_fails_and_at_the_deadline(tmp_path):
    """``helpers.run_ranks`` as the launcher behaves: the first failing rank's code comes back and
    the rank still waiting is killed; ranks still running at the deadline are killed and the run
    raises ``TimeoutExpired`` (through the rank server, or fresh interpreters with
    ``RDCORE_TEST_FRESH_RANKS=1``)."""
    script = tmp_path / "ranks.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1' and 'fail' in sys.argv:\n"
                      "    print('rank 1 fails', file=sys.stderr)\n"
                      "    sys.exit(3)\n"
                      "time.sleep(120)\n")
    t0 = time.monotonic()
    proc = run_ranks(str(script), ["fail"], 2, env(), timeout=100)
    assert proc.returncode == 3 and "rank 1 fails" in proc.stderr
    assert time.monotonic() - t0 < 60  # rank 0 (sleeping 120 s) was killed, not waited for
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_ranks(str(script), [], 2, env(), timeout=2)
    assert time.monotonic() - t0 < 60


def test_the_runs_above_were_forked_by_the_rank_server():
    """After everything the tests above did to this process's environment, a standard run still
    goes to the rank server (``helpers.run_ranks``): a variable set on the way would otherwise
    send every later run to fresh interpreters, ~8 s slower each, in silence."""
    from helpers import NOT_COMPARED, rank_server

    if os.environ.get("RDCORE_TEST_FRESH_RANKS") == "1":
        pytest.skip("RDCORE_TEST_FRESH_RANKS=1: fresh interpreters asked for")
    assert rank_server({k: v for k, v in env().items() if k not in NOT_COMPARED}) is not None
