"""DeepSpeed glue: the only module of rdcore that imports ``deepspeed``.

* :func:`init_distributed` — gloo on CPU, NCCL on CUDA (the local rank's device set first, before
  any collective); :func:`shutdown` ends it cleanly.
* :func:`build_engine` — fills a DeepSpeed JSON config from :class:`~rdcore.config.TrainConfig`
  (batch sizes, AdamW settings, the optimizer implementation: :func:`optimizer_defaults`) and
  initialises ZeRO; :func:`device_of` is the device its inputs must be on.
* checkpoint primitives (resumable DeepSpeed checkpoints; a consolidated state dict at the end); the
  trainer's use of them is :mod:`rdcore.checkpoints`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist

from rdcore import ConfigError
from rdcore.config import TrainConfig
from rdcore.files import atomic_write_text, replace_dir
from rdcore.models import same_fingerprint, weights_fingerprint


def local_rank() -> int:
    """This process's rank on its machine (set by the launcher; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this machine: ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (the DeepSpeed
    launcher); 1 without a launcher."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")


def init_distributed() -> tuple[int, int]:
    """Initialise the process group (idempotent); returns ``(rank, world_size)``.

    On CUDA the local rank's device is made current *before* the process group starts: NCCL
    binds each rank's communicator to the current device, so without it every rank of a machine
    would use GPU 0 for its first collective (a barrier, a broadcast) and hang or fail."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % max(torch.cuda.device_count(), 1))
    elif "OMP_NUM_THREADS" not in os.environ:
        # Several CPU ranks on one machine: split the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    if not dist.is_initialized():
        if not torch.cuda.is_available():
            _skip_cpu_shm_comm()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown(wait_for_peers: bool = True) -> None:
    """End the process group before the interpreter exits.

    Without it, gloo's worker threads are torn down during interpreter finalisation, which now and
    then aborts a rank that had finished ("terminate called without an active exception", exit
    -6). ``wait_for_peers`` (a successful finish) meets the other ranks at a barrier first; on an
    error path a rank must not wait for peers that may never arrive, so it leaves at once."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        torch.distributed.destroy_process_group()


def _skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU backend from building and mapping its shared-memory communication op.

    That op serves only ``inference_all_reduce`` (tensor-parallel inference), which rdcore never
    calls: every collective of training goes through gloo either way. Left enabled, it costs a C++
    build on the first run of a machine (about 65 s on 2 cores, measured; a compiler required)
    and ~69 MB of /dev/shm per rank that DeepSpeed never removes. DeepSpeed skips the op when it
    is marked incompatible in its probe table, which is what is done here."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


TRAINER_OWNED = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "train_batch_size": "micro_batch_size × grad_accum × world size",
    "optimizer.params.lr": "lr",
    "optimizer.params.weight_decay": "weight_decay",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
}


def _get(d: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _put(d: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        d = d.setdefault(key, {})
    d[last] = value


MODEL_DERIVED = {
    # ZeRO-3 sizes from the model's shape (H = hidden size), for "auto" values in a config file
    "zero_optimization.reduce_bucket_size": lambda H, layer, local: H * H,
    "zero_optimization.stage3_prefetch_bucket_size": lambda H, layer, local: int(0.9 * H * H),
    "zero_optimization.stage3_param_persistence_threshold": lambda H, layer, local: 10 * H,
    # one decoder layer: its parameters stay gathered between its teacher and student calls (the
    # layer-interleaved passes) and are released before the next layer's
    "zero_optimization.stage3_max_reuse_distance": lambda H, layer, local: layer,
    "zero_optimization.stage3_max_live_parameters": lambda H, layer, local: 3 * layer,
    # ZeRO++ hpZ: a secondary parameter partition within each node
    "zero_optimization.zero_hpz_partition_size": lambda H, layer, local: local,
}
"""Config keys that may be ``"auto"``: filled from (hidden size, elements of one decoder layer,
ranks per node)."""


def ds_config_for(cfg: TrainConfig, world_size: int, hidden_size: int = 0, layer_numel: int = 0
                  ) -> dict[str, Any]:
    """Load ``cfg.ds_config`` and fill in the values the trainer owns (batch sizes, lr, weight
    decay, precision). A file value that disagrees with the flags is an error, not overridden.
    ``"auto"`` values of :data:`MODEL_DERIVED` keys are derived from the model's shape."""
    with open(cfg.ds_config) as fh:
        try:
            ds = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{cfg.ds_config}: malformed JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{cfg.ds_config}: expected a JSON object")
    owned = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch(world_size),
        "optimizer.params.lr": cfg.lr,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "bf16.enabled": cfg.precision == "bf16",
        "fp16.enabled": False,
    }
    for key, value in owned.items():
        have = _get(ds, key)
        if have is not None and have != "auto" and have != value:
            raise ConfigError(f"{cfg.ds_config}: {key} = {have!r} conflicts with the trainer's "
                              f"{value!r} (set by --{TRAINER_OWNED[key].split(' ')[0]}); remove it "
                              "from the DeepSpeed config or change the flag")
        _put(ds, key, value)
    local = local_world_size()
    for key, rule in MODEL_DERIVED.items():
        if _get(ds, key) == "auto":
            if not hidden_size or not layer_numel:
                raise ConfigError(f"{cfg.ds_config}: {key} is \"auto\" but the model's shape is "
                                  "unknown here")
            _put(ds, key, rule(hidden_size, layer_numel, local))
    ds.setdefault("optimizer", {}).setdefault("type", "AdamW")
    params = ds["optimizer"].setdefault("params", {})
    for key, value in optimizer_defaults(ds, torch.cuda.is_available()).items():
        params.setdefault(key, value)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def optimizer_defaults(ds: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The optimizer implementation, chosen so that nothing is compiled at run time.

    DeepSpeed's own AdamW implementations are C++/CUDA extensions built on first use — FusedAdam
    on GPU (needs nvcc and ninja; minutes) and DeepSpeedCPUAdam for ZeRO-Offload (needs a C++
    compiler) — so rdcore asks for PyTorch's AdamW (``torch_adam``) instead: ``fused=True`` (one
    CUDA kernel over all tensors) on GPU, PyTorch's default loop on CPU — also for an optimizer
    offloaded to the CPU by ZeRO-Offload, where PyTorch's AdamW steps the CPU partitions (slower
    than DeepSpeedCPUAdam's AVX kernels on large models). Set ``"torch_adam": false`` in the
    DeepSpeed config's ``optimizer.params`` to get DeepSpeed's optimizers (and their build) back;
    any value given there wins over these defaults."""
    offload = _get(ds, "zero_optimization.offload_optimizer.device") in ("cpu", "nvme")
    out: dict[str, Any] = {"torch_adam": True}
    if cuda and not offload:
        out["fused"] = True
    return out


def device_of(engine: Any) -> torch.device:
    """The device an engine's inputs must be on (``engine.device``; CPU without CUDA)."""
    device = getattr(engine, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def build_engine(module: torch.nn.Module, cfg: TrainConfig, world_size: int,
                 lr_lambda: Any, hidden_size: int = 0, layer_numel: int = 0) -> Any:
    """``deepspeed.initialize`` with a LambdaLR schedule (stepped by DeepSpeed per optimizer step)."""
    ds = ds_config_for(cfg, world_size, hidden_size, layer_numel)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=params, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    return engine


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (for logging only: this is a host sync)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available():  # NCCL reduces device tensors (on this rank's current device)
        t = t.cuda()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), on every rank; ``[obj]`` without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def all_gather_rows(ids: list[int], rows: list[int], states_LNH: torch.Tensor
                    ) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Every rank's ``(example ids, rows per example, [L, N, H] states)``, on every rank (for the
    teacher-target cache; N may differ between ranks). Call on every rank."""
    world = dist.get_world_size()
    device = states_LNH.device if torch.cuda.is_available() else torch.device("cpu")
    meta = torch.tensor([len(ids), states_LNH.shape[1]], dtype=torch.long, device=device)
    metas = [torch.zeros_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    max_b = max(int(m[0]) for m in metas)
    max_n = max(int(m[1]) for m in metas)
    L, N, H = states_LNH.shape
    head = torch.full((2, max_b), -1, dtype=torch.long, device=device)
    head[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    head[1, : len(rows)] = torch.tensor(rows, dtype=torch.long)
    body = torch.zeros((L, max_n, H), dtype=states_LNH.dtype, device=device)
    body[:, :N] = states_LNH.to(device)
    heads = [torch.empty_like(head) for _ in range(world)]
    bodies = [torch.empty_like(body) for _ in range(world)]
    dist.all_gather(heads, head)
    dist.all_gather(bodies, body)
    out = []
    for m, h, b in zip(metas, heads, bodies):
        nb, nn = int(m[0]), int(m[1])
        out.append((h[0, :nb].tolist(), h[1, :nb].tolist(), b[:, :nn]))
    return out


def comm_bytes() -> dict[str, int]:
    """Bytes so far per collective on this rank (all_gather_into_tensor, reduce_scatter_tensor…),
    from DeepSpeed's communication logger: empty unless the DeepSpeed config enables
    ``comms_logger`` (with ``prof_all``). DeepSpeed sizes a collective by its ``tensor`` argument:
    for an all-gather that is this rank's shard (the gathered volume is world × that), for a
    reduce-scatter the full input."""
    from deepspeed.comm.comm import comms_logger

    if not comms_logger.enabled:
        return {}
    return {op: sum(size * rec[0] for size, rec in sizes.items())
            for op, sizes in comms_logger.comms_dict.items()}


def peak_memory_mib() -> float:
    """This process's peak memory: CUDA ``max_memory_allocated``, or on CPU the peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any],
                    adapter: Callable[[], dict[str, torch.Tensor] | None] | None = None,
                    keep: int = 0) -> None:
    """A resumable DeepSpeed checkpoint (model shards, optimizer, scheduler, client state), each
    rank's random state, and (LoRA) the adapter as safetensors.

    Complete only once every rank has written its shards: then rank 0 drops ``COMPLETE`` in the tag
    folder and points ``latest_complete`` at it, so a crash mid-write never leaves a checkpoint
    that looks complete (DeepSpeed's own ``latest`` may point at a partial one).

    Frozen parameters (with LoRA: the base model, and the stage-1 teacher adapter) are not saved:
    they never change, a resumed run rebuilds them from the same source before loading, and
    ``state["frozen_fingerprint"]`` lets it check that the source is unchanged
    (:func:`frozen_fingerprint`). A LoRA checkpoint of SmolLM2-135M is then 29 MiB, not 543 MiB."""
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state,
                           exclude_frozen_parameters=True)
    _save_rng(ckpt_dir / tag / f"rng_rank{dist.get_rank()}.safetensors")
    if adapter is not None:  # called on every rank (it gathers); rank 0 gets the tensors
        tensors = adapter()
        if dist.get_rank() == 0:
            from safetensors.torch import save_file

            save_file(tensors, str(ckpt_dir / tag / "adapter.safetensors"))
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_text(ckpt_dir / "world_size", f"{dist.get_world_size()}\n")
        atomic_write_text(ckpt_dir / tag / "COMPLETE", json.dumps(state) + "\n")
        atomic_write_text(ckpt_dir / "latest_complete", tag + "\n")
        if keep:
            prune_checkpoints(ckpt_dir, keep)
    dist.barrier()


def frozen_fingerprint(model: torch.nn.Module) -> list[float]:
    """:func:`rdcore.models.weights_fingerprint` of the frozen parameters of ``model`` (not yet
    wrapped by DeepSpeed). Checkpoints omit frozen parameters; this is how a resume notices a
    changed source."""
    return weights_fingerprint((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def check_fingerprint(saved: list[float] | None, now: list[float], where: str) -> None:
    """Raise if the frozen weights differ from those the checkpoint ``where`` was trained on
    (``saved`` is None for checkpoints written before fingerprints were recorded)."""
    if saved is not None and not same_fingerprint(saved, now):
        raise ConfigError(
            f"{where}: the frozen weights (the base model and, in stage 2, the teacher adapter) "
            f"differ from those this checkpoint was trained with (fingerprint {saved} then, {now} "
            f"now), and checkpoints do not store frozen weights. Resume with the same --model "
            f"files, or start a new run")


def _tag_step(name: str) -> int | None:
    """N for a checkpoint folder ``stepN``; None for anything else (``stepN.universal``, files)."""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def _complete_steps(ckpt_dir: Path) -> list[int]:
    """The steps of the complete checkpoints in ``ckpt_dir``, ascending."""
    return sorted(s for p in ckpt_dir.glob("step*")
                  if (s := _tag_step(p.name)) is not None and (p / "COMPLETE").is_file())


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints, with their ``.universal`` copies
    and any incomplete checkpoint older than the newest complete one; returns the deleted names.
    Called only after a newer checkpoint is complete, so the newest complete one always stays."""
    import shutil

    complete = _complete_steps(ckpt_dir)
    if len(complete) <= keep:
        return []
    kept = set(complete[-keep:])
    gone = []
    for p in sorted(ckpt_dir.iterdir()):
        s = _tag_step(p.name.split(".")[0])  # stepN, stepN.universal, stepN.universal.tmp
        if p.is_dir() and s is not None and s not in kept and s < complete[-1]:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def latest_complete(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint tag in ``ckpt_dir`` (``None`` if there is none; converted
    ``<tag>.universal`` copies are not checkpoints of their own)."""
    pointer = ckpt_dir / "latest_complete"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / "COMPLETE").is_file():
            return tag
    steps = _complete_steps(ckpt_dir)
    return f"step{steps[-1]}" if steps else None


def checkpoint_info(ckpt_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint's tag and the state its ``COMPLETE`` marker holds (``step``,
    ``world_size``, ``global_batch``); ``None`` if ``ckpt_dir`` holds no complete checkpoint."""
    tag = latest_complete(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        return None
    marker = ckpt_dir / tag / "COMPLETE"
    try:
        state = json.loads(marker.read_text() or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{marker} is not valid JSON ({err}): the checkpoint marker is damaged; "
                          f"delete {ckpt_dir / tag} to resume from an older checkpoint") from None
    if "world_size" not in state:  # written before the marker carried it
        ws_file = ckpt_dir / "world_size"
        state["world_size"] = int(ws_file.read_text()) if ws_file.is_file() else None
    return tag, state


def load_checkpoint(engine: Any, ckpt_dir: Path, frozen: list[float] | None = None
                    ) -> dict[str, Any] | None:
    """Load the newest complete checkpoint in ``ckpt_dir``; ``None`` if there is none.

    A checkpoint written by a different number of ranks is first converted (once, by rank 0, next
    to the original as ``<tag>.universal``) to DeepSpeed's universal format — one file per parameter
    for the fp32 weights and both Adam moments — and loaded from there, so weights, optimizer state,
    learning-rate schedule and step count all carry over. Each rank's random stream cannot carry
    over across world sizes; the new ranks keep the seeding the run did before loading. The caller
    checks that the global batch is unchanged (:func:`checkpoint_info`). ``frozen``: this run's
    :func:`frozen_fingerprint`, checked against the checkpoint's before anything is loaded."""
    found = checkpoint_info(ckpt_dir)
    if found is None:
        return None
    tag, state = found
    if frozen is not None:
        check_fingerprint(state.get("frozen_fingerprint"), frozen, f"{ckpt_dir}/{tag}")
    world = dist.get_world_size()
    written_by = state["world_size"] or world
    resized = written_by != world
    load_tag = tag
    if resized:
        load_tag = to_universal(ckpt_dir, tag)
        engine._config.load_universal_checkpoint = True  # read by engine.load_checkpoint only
    try:
        # not strict: the saved module state lacks the frozen weights on purpose (see
        # save_checkpoint); the trained ones come from the ZeRO partitions, which must match
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag,
                                                    load_module_strict=False)
    except Exception as e:  # re-raised with what to do about it
        if not resized:
            raise
        raise ConfigError(
            f"{ckpt_dir}/{tag} (written by {written_by} ranks) could not be loaded on {world} "
            f"ranks through DeepSpeed's universal checkpoint ({type(e).__name__}: {e}). Resume "
            f"with {written_by} ranks, or turn it into a model folder with `python -m "
            f"rdcore.consolidate {ckpt_dir.parent.parent} <out>` and start a new run with "
            f"--model <out> (the optimizer state and the step count are then not carried over)"
        ) from e
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise ConfigError(f"{ckpt_dir}/{load_tag} could not be loaded")
    if not resized:
        _load_rng(ckpt_dir / tag / f"rng_rank{dist.get_rank()}.safetensors")
    return client_state


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Rank 0 converts ``ckpt_dir/tag`` to DeepSpeed's universal format in
    ``ckpt_dir/<tag>.universal`` (unless a complete conversion is there); returns that tag."""
    out_tag = f"{tag}.universal"
    out = ckpt_dir / out_tag
    if dist.get_rank() == 0 and not (out / "COMPLETE").is_file():
        import subprocess
        import sys

        def convert(tmp: Path) -> None:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ConfigError(f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            (tmp / "COMPLETE").write_text((ckpt_dir / tag / "COMPLETE").read_text())

        replace_dir(out, convert)
    dist.barrier()
    return out_tag


def checkpoint_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO checkpoint, gathered from its shards on the CPU (any
    number of ranks wrote it; no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _save_rng(path: Path) -> None:
    """This rank's random-number state (dropout must continue as if never interrupted)."""
    from safetensors.torch import save_file

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    save_file(state, str(path))


def _load_rng(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the checkpoint lacks this rank's random state")
    from safetensors.torch import load_file

    state = load_file(str(path))
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def gathered_params(engine: Any, select: Callable[[str], bool]) -> dict[str, torch.Tensor] | None:
    """Full copies of the parameters whose name passes ``select`` on rank 0 (``None`` elsewhere);
    gathers only those (not the whole model). Call on every rank."""
    named = [(n, p) for n, p in engine.module.named_parameters() if select(n)]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if dist.get_rank() != 0:
            return None
        return {n: p.detach().clone().cpu() for n, p in named}


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on rank 0 (``None`` elsewhere). Call on every rank."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def partition_stats(module: torch.nn.Module) -> dict[str, int]:
    """Parameter elements held by this rank vs in the model (ZeRO-3 shards: local < total)."""
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_numel"):
            total += p.ds_numel
            local += p.ds_tensor.numel()
        else:
            total += p.numel()
            local += p.numel()
    return {"local_param_elements": local, "total_param_elements": total}
