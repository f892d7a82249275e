"""rdcore: rule distillation for LLMs (teacher with the rule in context, student without).

Importing :mod:`rdcore` puts the Hugging Face libraries in offline mode *unless you chose
otherwise*: ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are set to 1
only where they are unset (a value you set, even 0, is kept). rdcore itself never downloads
anything: models come from presets (see :mod:`rdcore.models`) or local directories.
"""

import os as _os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ.setdefault(_var, "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"


def _source_kernels() -> None:
    """In a source checkout (Python started in the repository root, ahead of an installed copy)
    this package has no ``kernels/`` subfolder: the installed layout's ``rdcore.kernels`` is the
    repository's top-level ``kernels/`` (setuptools ``package_dir``). Map the name there too."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (source / "_common.py").is_file():
        return  # an installed copy, or no kernels beside it

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "rdcore.kernels" or sys.modules.get("rdcore") is None or Path(
                    sys.modules["rdcore"].__file__).resolve().parent != here:
                return None
            return importlib.util.spec_from_file_location(
                name, source / "__init__.py", submodule_search_locations=[str(source)])

    if not any(type(f).__name__ == "_Finder" and f.__module__ == __name__ for f in sys.meta_path):
        sys.meta_path.append(_Finder())


_source_kernels()


class RdcoreError(Exception):
    """Base class of the errors rdcore raises on bad input (always with a message for a human)."""


class DataError(RdcoreError, ValueError):
    """Bad data: names the file, the row and the field."""


class ModelError(RdcoreError, ValueError):
    """A model name that is neither a preset nor a usable local checkpoint, or a broken install."""


class ConfigError(RdcoreError, ValueError):
    """An invalid training/evaluation option."""


class TrainingError(RdcoreError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
