"""rdcore: rule distillation for LLMs (teacher with the rule in context, student without).

Importing :mod:`rdcore` switches every Hugging Face library to offline mode: rdcore never
downloads anything at run time. Models come from presets (see :mod:`rdcore.models`) or local
directories.
"""

import os as _os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ[_var] = "1"
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"


class RdcoreError(Exception):
    """Base class of the errors rdcore raises on bad input (always with a message for a human)."""


class DataError(RdcoreError, ValueError):
    """Bad data: names the file, the row and the field."""


class ModelError(RdcoreError, ValueError):
    """A model name that is neither a preset nor a usable local checkpoint, or a broken install."""


class ConfigError(RdcoreError, ValueError):
    """An invalid training/evaluation option."""
