"""Scaling runs: the trainer for a few steps on Llama-shaped models (random init) across world sizes;
tokens/s per device, MFU, peak memory and ZeRO-3 communication per step. Prints a table and appends
rows to ``bench/results/scaling.jsonl``; ``--plot`` draws ``bench/results/scaling_<device>.png``.

    python bench/scaling.py                                   # CPU: llama-5m, llama-40m × 1, 2, 4 ranks
    python bench/scaling.py --shapes llama-1b,llama-8b --ranks 8 --precision bf16   # on GPUs

Every run: ``deepspeed rdcore/train.py`` with Rule-Distill-Base on the arithmetic task (32 shots), the
chosen fine-tuning mode (default full), the layer-interleaved passes and the rule-prefix cache on,
the teacher-target cache off (every step runs the teacher), DeepSpeed's comms logger on. Shapes are
written once as random-init Hugging Face folders (tokenizer: rdcore's tiny BPE, so token ids stay
below 2048 whatever the vocabulary).

FLOP model, per optimizer step and device (rank 0's own token counts; N = non-embedding parameters,
L layers, H hidden, V vocabulary, T_s student positions, T_t teacher positions computed, S the
per-row sequence lengths, R distilled rows):

* student, forward + backward: ``6·N·T_s`` (full; LoRA ``4·N·T_s``: no weight gradients)
  + attention ``3 · 2·L·H·Σ S²`` (QKᵀ and AV, causal half, forward ×3 for backward);
* teacher, forward only: ``2·N·T_t`` + attention ``2·L·H·Σ S_t²`` (suffix rows; the prefix rows
  they read are counted in ``Σ S_t·P`` — folded in by using the full teacher length);
* distillation head (fused kernel, 4 GEMMs per distilled row: teacher and student logits, dX, dW):
  ``8·R·V·H``; the hidden-state MSE is memory-bound and not counted.

MFU = those FLOPs / (median step time × the device's peak): on CUDA the dense bf16 peak of the named
GPU (H100 SXM 989 TFLOP/s, A100 312), on CPU the measured throughput of a 2048³ fp32 matmul with the
same threads (stated in every row), so CPU MFU reads "fraction of what this CPU's GEMM can do".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "scaling.jsonl"
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocabulary
    "llama-5m": (256, 4, 4, 2, 688, 2048),
    "llama-40m": (512, 8, 8, 4, 1376, 8192),
    "llama-135m": (576, 30, 9, 3, 1536, 49152),  # SmolLM2-135M's shape
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B's shape
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),  # Llama-3.1-8B's shape
}
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def shape_dir(shape: str, dtype: str) -> Path:
    """A random-init Llama folder of ``shape`` (written once, under the rdcore cache)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rdcore.files import replace_dir
    from rdcore.models import cache_dir, tiny_tokenizer

    target = cache_dir() / "scaling" / f"{shape}-{dtype}"
    if (target / "DONE").exists():
        return target
    H, L, heads, kv, inter, vocab = SHAPES[shape]
    tok = tiny_tokenizer()
    vocab = max(vocab, len(tok))
    config = LlamaConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if dtype == "bf16" else torch.float32)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "DONE").write_text("ok\n")

    replace_dir(target, build)
    return target


def flops_per_step(row: dict, shape: str, finetune: str, mean_len_s: float, mean_len_t: float
                   ) -> float:
    """The docstring's FLOP model for one step of one device."""
    H, L, heads, kv, inter, vocab = SHAPES[shape]
    head_dim = H // heads
    N = L * (H * heads * head_dim + 2 * H * kv * head_dim + heads * head_dim * H + 3 * H * inter)
    Ts, Tt = row["rank0_student_positions"], row.get("rank0_teacher_positions", 0)
    R = row["tokens"] / max(row.get("world", 1), 1)
    student = (6 if finetune == "full" else 4) * N * Ts + 3 * 2 * L * H * Ts * mean_len_s
    teacher = 2 * N * Tt + 2 * L * H * Tt * mean_len_t
    head = 8 * R * vocab * H
    return student + teacher + head


def cpu_peak_flops() -> float:
    import torch

    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-5m,llama-40m")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--finetune", default="full", choices=["full", "lora"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro_batch_size", type=int, default=2)
    ap.add_argument("--ds_config", default="", help="default: zero3_cpu.json on CPU, "
                    "zero3_multinode_bf16.json on CUDA (with the comms logger added)")
    ap.add_argument("--no_save", action="store_true")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()
    if args.plot:
        return plot()
    import torch

    from bench.step import git_sha
    from rdcore.data import Encoder, load_task
    from rdcore.models import tiny_tokenizer

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    if cuda:
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in device), 0.0) * 1e12
        peak_note = f"{peak / 1e12:.0f} TFLOP/s (dense bf16 spec)"
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        peak = cpu_peak_flops()
        peak_note = f"{peak / 1e9:.0f} GFLOP/s (measured fp32 2048³ matmul, {os.cpu_count()} threads)"
    data = Encoder(tiny_tokenizer()).encode(load_task("math", "train", 32))
    mean_s = statistics.mean(len(e.student_ids) for e in data)
    mean_t = statistics.mean(len(e.teacher_ids) for e in data)
    base_cfg = args.ds_config or str(ROOT / "ds_configs" / (
        "zero3_multinode_bf16.json" if cuda else "zero3_cpu.json"))
    ds = json.loads(Path(base_cfg).read_text())
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    sha = git_sha()
    print(f"{device}; peak {peak_note}; {args.finetune}, {args.precision}; git {sha}")
    print(f"{'shape':11} {'ranks':>5} {'step s':>7} {'tok/s/dev':>10} {'MFU':>6} {'peak MiB':>9} "
          f"{'AG/step MiB':>12} {'RS/step MiB':>12}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds_path = Path(tmp) / "ds.json"
        ds_path.write_text(json.dumps(ds))
        for shape in args.shapes.split(","):
            folder = shape_dir(shape, args.precision)
            for ranks in [int(r) for r in args.ranks.split(",")]:
                out = Path(tmp) / f"{shape}-{ranks}"
                exe = Path(sys.executable).parent / "deepspeed"
                cmd = [str(exe) if exe.exists() else "deepspeed", "--num_accelerators", str(ranks),
                       "--master_port", str(free_port()), "rdcore/train.py", "--model", str(folder),
                       "--task", "math", "--shots", "32", "--method", "rule_distill_base",
                       "--finetune", args.finetune, "--precision", args.precision,
                       "--max_steps", str(args.steps), "--micro_batch_size",
                       str(args.micro_batch_size), "--teacher_cache", "off", "--ds_config",
                       str(ds_path), "--tensorboard", "off", "--save_model", "off",
                       "--output_dir", str(out)]
                env = dict(os.environ)
                if not cuda:
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{shape} x{ranks}: failed\n{proc.stderr[-3000:]}")
                    return 1
                got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                steady = got[1:] or got
                step_s = statistics.median(r["step_time_s"] for r in steady)
                tok_s = statistics.median(r["rank0_student_positions"] for r in steady) / step_s
                for r in steady:
                    r["world"] = ranks
                flops = statistics.median(flops_per_step(r, shape, args.finetune, mean_s, mean_t)
                                          for r in steady)
                mfu = flops / step_s / peak if peak else float("nan")
                ag = statistics.median(sum(v for k, v in r.items() if "all_gather" in k)
                                       for r in steady) * ranks
                rs = statistics.median(sum(v for k, v in r.items() if "reduce_scatter" in k)
                                       for r in steady)
                mem = max(r["rank0_peak_mem_mib"] for r in got)
                print(f"{shape:11} {ranks:5d} {step_s:7.2f} {tok_s:10.1f} {mfu:6.1%} {mem:9.0f} "
                      f"{ag / 2**20:12.1f} {rs / 2**20:12.1f}", flush=True)
                rows.append({"shape": shape, "ranks": ranks, "finetune": args.finetune,
                             "precision": args.precision, "step_s": step_s,
                             "student_tokens_per_s_per_device": tok_s, "flops_per_step": flops,
                             "mfu": mfu, "peak_flops": peak, "peak_note": peak_note,
                             "peak_mem_mib_rank0": mem, "allgather_bytes_per_step": ag,
                             "reduce_scatter_bytes_per_step": rs, "steps": args.steps,
                             "micro_batch_size": args.micro_batch_size, "device": device,
                             "torch": torch.__version__, "git": sha,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if not args.no_save:
        with RESULTS.open("a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
    return 0


def plot() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    for device in sorted({r["device"] for r in rows}):
        latest: dict[tuple, dict] = {}
        for r in rows:
            if r["device"] == device:
                latest[(r["shape"], r["finetune"], r["ranks"])] = r
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for shape, ft in sorted({(s, f) for s, f, _ in latest}):
            pts = sorted((k[2], v) for k, v in latest.items() if k[:2] == (shape, ft))
            axes[0].plot([p for p, _ in pts], [v["student_tokens_per_s_per_device"] for _, v in pts],
                         marker="o", label=f"{shape} {ft}")
            axes[1].plot([p for p, _ in pts], [v["mfu"] for _, v in pts], marker="o")
        axes[0].set_title("student tokens/s per device")
        axes[1].set_title("MFU")
        for ax in axes:
            ax.set_xlabel("ranks")
        axes[0].legend(fontsize=7)
        fig.suptitle(device)
        fig.tight_layout()
        name = "cpu" if device.startswith("CPU") else device.replace(" ", "_")
        fig.savefig(RESULTS.parent / f"scaling_{name}.png", dpi=110)
        print(f"wrote {RESULTS.parent / f'scaling_{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
