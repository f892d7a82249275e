"""The README's "Distill your own rule" walkthrough, run as written — on the tiny model, one epoch,
short answers — so that its commands cannot rot."""

import re
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT, deepspeed_launcher, free_port, user_env

pytestmark = pytest.mark.slow


def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough:start -->")[1].split("<!-- walkthrough:end -->")[0]
    return [line for line in block.splitlines()
            if line.strip() and not line.startswith(("#", "```"))]


def test_the_readme_walkthrough_runs(tmp_path):
    commands = walkthrough()
    assert len(commands) == 5
    outputs = []
    for line in commands:
        line = line.replace("smollm2-135m", "tiny").replace("--epochs 3", "--epochs 1")
        line = line.replace("runs/french", str(tmp_path / "french"))
        args = shlex.split(line)
        if args[0] == "python":
            args[0] = sys.executable
            if "--compare" not in args:
                args += ["--max_new_tokens", "6"]
        elif args[0] == "deepspeed":
            args = [*deepspeed_launcher(), "--master_port", str(free_port()), *args[1:],
                    "--response_tokens", "8", "--tensorboard", "off"]
        proc = subprocess.run(args, cwd=ROOT, env=user_env(), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    run = tmp_path / "french" / "run"
    responses = (run / "responses_main_train.jsonl").read_text().splitlines()
    assert len(responses) == 1 + 16  # the header and every training input
    table = outputs[-1]
    assert re.search(r"\| before \| tiny \| student \| \d\.\d\d \|", table), table
    assert re.search(r"\| after \| .*run \| student \|", table) and "| teacher |" in table
    assert (tmp_path / "french" / "after" / "generations.jsonl").is_file()
