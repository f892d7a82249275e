"""Projected step time, tokens/s per GPU and MFU of rule distillation under ZeRO-3 on H100/A100
clusters, from a compute model plus the communication volume measured by ``bench/comm_volume.py``.
A model, not a measurement: every assumption is a named constant or flag below.

    python bench/project.py                       # 8B and 70B, 8–256 GPUs, H100 and A100
    python bench/project.py --efficiency 0.5 --student_tokens 8192

Per GPU and optimizer step (full fine-tuning, micro-batch of ``student_tokens`` student positions and
``teacher_tokens`` teacher positions actually computed — the suffixes only, with the rule-prefix
cache):

* compute: FLOPs as in ``bench/scaling.py`` (6·N·T_s + 2·N·T_t + attention + the fused KL head) at
  ``efficiency`` × the GPU's dense bf16 peak (ASSUMED: large-GEMM efficiency of a tuned stack;
  torchtitan's Llama-3.1-8B runs reach 33–39 % MFU end to end);
* communication: ZeRO-3 all-gathers parameters ``ag_multiple`` × the model size per step and
  reduce-scatters gradients once (MEASURED on CPU ranks by bench/comm_volume.py: 2.21× for
  SmolLM2-135M with rdcore's interleaved passes, 3.21× for a separate teacher pass; 2× is ZeRO-3's
  floor for untied weights, used for 8B/70B), in bf16; a ring collective moves (n−1)/n of the data
  through every GPU's slowest link: NVLink inside one node, the per-GPU InfiniBand share across
  nodes (ASSUMED bandwidths below, at ``link_efficiency`` of nominal);
* step time = max(compute, communication) with ``overlap_comm`` (ASSUMED perfect overlap) and
  compute + communication without it; the table shows both. With overlap and communication shorter
  than compute, the MFU is the assumed efficiency by construction: what the projection tells is
  whether the communication fits under the compute, and the no-overlap bound;
* model state: 16 bytes per parameter (bf16 weights and gradients, fp32 master weights and Adam
  moments) sharded over all GPUs; a configuration whose state exceeds 80 % of GPU memory is marked
  (activations not counted).
"""

from __future__ import annotations

import argparse

MODELS = {  # non-embedding parameters, total parameters, layers, hidden, vocabulary
    "8B": (6.98e9, 8.03e9, 32, 4096, 128256),
    "70B": (68.5e9, 70.6e9, 80, 8192, 128256),
}
GPUS = {  # dense bf16 peak FLOP/s, NVLink GB/s per GPU per direction, IB GB/s per GPU, GPUs/node, GiB
    "H100": (989e12, 450.0, 50.0, 8, 80),  # NVLink 4 (900 GB/s bidir.); 8× 400 Gb/s NDR per node
    "A100": (312e12, 300.0, 25.0, 8, 80),  # NVLink 3 (600 GB/s bidir.); 8× 200 Gb/s HDR per node
}
STATE_BYTES_PER_PARAM = 16  # bf16 weights + bf16 grads + fp32 master, Adam m and v (ZeRO-3 shards all)
PUBLISHED = [
    ("Llama-3.1-8B, 8×H100, torchtitan FSDP (pre-training)", "5,762 tokens/s/GPU, MFU 33–39 %"),
    ("Granite-7B, 4×A100, ZeRO-3 (fine-tuning)", "3,094 tokens/s/GPU, MFU 0.40"),
]


def project(model: str, gpu: str, n_gpus: int, args: argparse.Namespace) -> dict[str, float]:
    N, total, L, H, V = MODELS[model]
    peak, nvlink, ib, per_node, mem_gib = GPUS[gpu]
    Ts, Tt, R, S = args.student_tokens, args.teacher_tokens, args.distilled_rows, args.seq_len
    flops = (6 * N * Ts + 3 * 2 * L * H * Ts * S
             + 2 * N * Tt + 2 * L * H * Tt * S
             + 8 * R * V * H)
    compute_s = flops / (peak * args.efficiency)
    model_bytes = total * 2  # bf16
    volume = (args.ag_multiple + 1.0) * model_bytes * (n_gpus - 1) / n_gpus
    link = (nvlink if n_gpus <= per_node else ib) * 1e9 * args.link_efficiency
    comm_s = volume / link
    overlapped = max(compute_s, comm_s)
    serial = compute_s + comm_s
    return {"flops": flops, "compute_s": compute_s, "comm_s": comm_s, "step_overlap_s": overlapped,
            "step_serial_s": serial, "tok_s_gpu": Ts / overlapped,
            "mfu_overlap": flops / overlapped / peak, "mfu_serial": flops / serial / peak,
            "state_gib": STATE_BYTES_PER_PARAM * total / n_gpus / 2**30,
            "fits": STATE_BYTES_PER_PARAM * total / n_gpus / 2**30 < 0.8 * mem_gib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student_tokens", type=int, default=16384, help="per GPU per step")
    ap.add_argument("--teacher_tokens", type=int, default=16384,
                    help="teacher positions computed per GPU per step (suffixes, prefix cached)")
    ap.add_argument("--distilled_rows", type=int, default=4096, help="response tokens per GPU per step")
    ap.add_argument("--seq_len", type=int, default=2048, help="per-row length for attention FLOPs")
    ap.add_argument("--efficiency", type=float, default=0.6, help="ASSUMED fraction of peak in compute")
    ap.add_argument("--link_efficiency", type=float, default=0.8, help="ASSUMED fraction of nominal")
    ap.add_argument("--ag_multiple", type=float, default=2.0,
                    help="all-gathers per step in model sizes (measured 2.21 tied / 2 floor untied)")
    ap.add_argument("--gpus", default="8,16,32,64,128,256")
    args = ap.parse_args()
    print(__doc__.split("\n\n")[0])
    print(f"assumptions: compute at {args.efficiency:.0%} of peak, links at {args.link_efficiency:.0%} "
          f"of nominal, all-gather {args.ag_multiple}× + reduce-scatter 1× the model per step, "
          f"{args.student_tokens} student + {args.teacher_tokens} teacher tokens per GPU per step\n")
    print(f"{'model':5} {'gpu':5} {'GPUs':>5} {'compute s':>9} {'comm s':>8} {'step s':>7} "
          f"{'tok/s/GPU':>10} {'MFU overlap':>11} {'MFU serial':>10} {'state GiB/GPU':>13}")
    for model in MODELS:
        for gpu in GPUS:
            for n in [int(g) for g in args.gpus.split(",")]:
                p = project(model, gpu, n, args)
                print(f"{model:5} {gpu:5} {n:5d} {p['compute_s']:9.2f} {p['comm_s']:8.2f} "
                      f"{p['step_overlap_s']:7.2f} {p['tok_s_gpu']:10.0f} {p['mfu_overlap']:11.1%} "
                      f"{p['mfu_serial']:10.1%} {p['state_gib']:8.0f}"
                      f"{'' if p['fits'] else ' (does not fit: > 80 % of memory)':s}")
    print("\npublished, for comparison:")
    for what, figure in PUBLISHED:
        print(f"  {what}: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
