"""rdcore installs its kernels as ``rdcore.kernels``: in a fresh environment that also holds PyPI's
``kernels`` (Hugging Face's hub kernels, which transformers probes for), both import, each as
itself — from a neutral folder and from the checkout's root, where the top-level ``kernels/``
folder would otherwise pose as ``kernels``."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow
HUB_KERNELS = "kernels==0.17.2"

PROBE = """
import importlib.util, json, torch
import kernels, rdcore.kernels as rk
import transformers.utils.import_utils as iu
x = torch.randn(3, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)
loss = rk.fused_linear_kl(x, x.detach() + 0.1, w, impl="torch")
loss.backward()
print(json.dumps({"kernels": kernels.__file__, "rdcore_kernels": rk.__file__,
                  "transformers_sees": iu._is_package_available("kernels", return_version=True),
                  "has_get_kernel": hasattr(kernels, "get_kernel"), "finite": bool(torch.isfinite(loss))}))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A virtualenv with the rdcore wheel and PyPI's kernels (no dependencies: torch and the rest
    come from the test environment's site-packages, listed after the new one's)."""
    tmp = tmp_path_factory.mktemp("pkg")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True, text=True)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    (wheel,) = wheels.glob("rdcore-*.whl")
    done = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps",
                           "--disable-pip-version-check", str(wheel), HUB_KERNELS],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"installing {wheel.name} and {HUB_KERNELS} failed:\n{done.stderr[-3000:]}")
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "zz_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py, site


@pytest.mark.parametrize("cwd", ["neutral", "checkout"])
def test_rdcore_kernels_and_hub_kernels_both_import(env, cwd, tmp_path):
    import json

    py, site = env
    where = tmp_path if cwd == "neutral" else ROOT
    proc = subprocess.run([str(py), "-c", PROBE], cwd=where, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kernels"].startswith(str(site)) and got["has_get_kernel"], got  # PyPI's kernels
    # from the checkout's root Python finds the checkout's rdcore first (as for any project), and
    # its rdcore.kernels is the checkout's kernels/ folder
    home = ROOT / "kernels" if cwd == "checkout" else site / "rdcore" / "kernels"
    assert got["rdcore_kernels"] == str(home / "__init__.py"), got
    assert got["transformers_sees"] == [True, HUB_KERNELS.split("==")[1]] and got["finite"], got


def test_the_wheel_carries_the_data(env):
    """The packaged task files and the rule book install with the wheel (not only in a checkout)."""
    _, site = env
    data = site / "rdcore" / "resources"
    assert (data / "rulebook" / "french" / "test.jsonl").is_file()
    assert len(list((data / "rulebook").glob("*/train_k32.jsonl"))) == 8
    assert (data / "rule_distillation" / "LICENSE").is_file()
    assert list((data / "rule_distillation").glob("*/*.json"))
