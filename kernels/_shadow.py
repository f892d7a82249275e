"""What this folder does when it is reached under the wrong name.

The repository's top-level ``kernels/`` folder is the package ``rdcore.kernels`` (setuptools
``package_dir``). Python started from the checkout's root (``python -c``, ``python -m``) puts that
root on ``sys.path``, where the folder would pose as a package named ``kernels`` and hide PyPI's
``kernels`` (Hugging Face's hub kernels, which transformers imports). Reached as ``kernels``, it
therefore steps aside: it loads the real ``kernels`` from the rest of ``sys.path`` in its own place,
or, if there is none, stays an empty module (transformers then finds no usable ``kernels``, as
without this folder).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, init_file: str) -> bool:
    """Replace ``sys.modules[name]`` by the package of that name found outside this repository;
    False if there is none."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, paths)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True
