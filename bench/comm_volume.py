"""ZeRO-3 communication per training step: student only, naive teacher + student, and rdcore's
layer-interleaved passes, measured with DeepSpeed's communication logger on CPU (gloo) ranks.

    python bench/comm_volume.py                      # tiny model, 2 and 4 ranks, full fine-tuning
    python bench/comm_volume.py --model smollm2-135m --ranks 2

Modes (all through ``deepspeed rdcore/train.py``; teacher-target cache off, so every step runs the
teacher when there is one):

* ``student``: ``inst_tune_no_rule`` — one student forward + backward (ZeRO-3's usual traffic:
  all-gather in forward and in backward, reduce-scatter of the gradients);
* ``naive``: ``rule_distill_base --interleave off`` — a whole teacher pass, then a whole student pass;
* ``ours``: ``rule_distill_base --interleave on`` — each decoder layer runs its teacher and student
  calls back to back, so the layer's gathered parameters serve both.

``stage3_max_reuse_distance`` is set to one decoder layer's parameters (ZeRO-3 keeps a gathered
parameter only if it is used again within that many elements); with DeepSpeed's default (1e9) a model
under 1e9 parameters would never be released between the passes, hiding the difference (and keeping
the whole model resident, which defeats ZeRO-3 at scale). ``stage3_prefetch_bucket_size`` and
``stage3_max_live_parameters`` are set to the same size, so at most about two layers are resident.

Reported per mode: bytes all-gathered and reduce-scattered per step (median over the steps after
the first, which records DeepSpeed's prefetch trace), as multiples of the model size (all
parameters in their dtype), and the teacher's extra all-gather over student-only. All-gather
volume is the gathered tensors' size (DeepSpeed's logger records rank 0's shard of each gather:
× world size); reduce-scatter volume is the size of the reduced inputs. Rows go to
``bench/results/comm_volume.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "comm_volume.jsonl"
MODES = {
    "student": ["--method", "inst_tune_no_rule"],
    "naive": ["--method", "rule_distill_base", "--interleave", "off"],
    "ours": ["--method", "rule_distill_base", "--interleave", "on"],
}


def model_sizes(model: str) -> tuple[int, int, int]:
    """(total parameter bytes, elements of one decoder layer, total elements)."""
    from rdcore.distill import causal_lm
    from rdcore.models import load_model

    m, _ = load_model(model)
    layer = sum(p.numel() for p in causal_lm(m).model.layers[0].parameters())
    total = sum(p.numel() for p in m.parameters())
    return sum(p.numel() * p.element_size() for p in m.parameters()), layer, total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, ranks: int, args: argparse.Namespace, ds_path: Path, out: Path) -> list[dict]:
    exe = Path(sys.executable).parent / "deepspeed"
    cmd = [str(exe) if exe.exists() else "deepspeed", "--num_accelerators", str(ranks),
           "--master_port", str(free_port()), "rdcore/train.py", "--model", args.model,
           "--task", args.task, "--shots", "8", "--finetune", args.finetune,
           "--max_steps", str(args.steps), "--ds_config", str(ds_path), "--teacher_cache", "off",
           "--tensorboard", "off", "--save_model", "off", "--output_dir", str(out),
           "--overwrite", "on", *MODES[mode]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def per_step(rows: list[dict], op: str) -> float:
    """Median bytes of ``op`` per step after the first (0 if the op never ran)."""
    vals = [sum(v for k, v in r.items() if k.startswith(f"rank0_comm_{op}") and k.endswith("_bytes"))
            for r in rows[1:]]
    return statistics.median(vals) if vals else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--task", default="math")
    ap.add_argument("--finetune", default="full", choices=["full", "lora"])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no_save", action="store_true")
    args = ap.parse_args()
    model_bytes, layer_numel, total_numel = model_sizes(args.model)
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    zo = ds["zero_optimization"]
    zo["stage3_max_reuse_distance"] = layer_numel
    zo["stage3_prefetch_bucket_size"] = layer_numel
    zo["stage3_max_live_parameters"] = 2 * layer_numel
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    from bench.step import git_sha

    sha = git_sha()
    rows = []
    print(f"{args.model}: {total_numel} parameters ({model_bytes / 2**20:.1f} MiB), one layer "
          f"{layer_numel}; {args.finetune} fine-tuning, git {sha}")
    print(f"{'ranks':>5} {'mode':8} {'all-gather/step':>16} {'× model':>8} {'reduce-scatter/step':>20} "
          f"{'× model':>8} {'teacher extra AG':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        ds_path = Path(tmp) / "ds.json"
        ds_path.write_text(json.dumps(ds))
        for ranks in [int(r) for r in args.ranks.split(",")]:
            base = None
            for mode in MODES:
                got = run(mode, ranks, args, ds_path, Path(tmp) / f"{mode}{ranks}")
                ag = per_step(got, "all_gather") * ranks  # the logger counts rank 0's shard
                rs = per_step(got, "reduce_scatter")
                if mode == "student":
                    base = ag
                extra = (ag - base) / model_bytes if base is not None else float("nan")
                print(f"{ranks:5d} {mode:8} {ag / 2**20:13.1f} MiB {ag / model_bytes:8.2f} "
                      f"{rs / 2**20:17.1f} MiB {rs / model_bytes:8.2f} {extra:16.0%}", flush=True)
                rows.append({"model": args.model, "finetune": args.finetune, "ranks": ranks,
                             "mode": mode, "allgather_bytes_per_step": ag,
                             "reduce_scatter_bytes_per_step": rs, "model_bytes": model_bytes,
                             "layer_numel": layer_numel, "teacher_extra_allgather_x_model": extra,
                             "steps": args.steps, "git": sha,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": "CPU (gloo)"})
    if not args.no_save:
        with RESULTS.open("a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
