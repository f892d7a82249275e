"""Your own rule's evaluation: the judges (rdcore.judges), ``python -m rdcore.evaluate --data`` with
a judge per row or for the file, your own judge function, the binomial interval, and clear errors
naming the file, row and field."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from rdcore import ConfigError, DataError
from rdcore.evaluate import EvalConfig, evaluate, main
from rdcore.judges import BUILTIN, identify_language, resolve, score
from rdcore.stats import wilson_interval


@pytest.mark.parametrize("name, expect, yes, no", [
    ("exact", "Paris", " paris ", "Paris, France"),
    ("contains", "ahoy", "Well, AHOY there!", "Hello there!"),
    ("not_contains", "mg", "Ask your doctor.", "Take 200 mg twice a day."),
    ("starts_with", "Ahoy!", "  ahoy! Matey", "Hello. Ahoy!"),
    ("ends_with", "Have a nice day.", "Sure thing. Have a nice day!", "Have a nice day. Bye"),
    ("regex", r"\b\d{4}\b", "It was 1969.", "It was long ago."),
    ("sentiment", "positive", "I love this, it is wonderful!", "This is awful and I hate it."),
    ("sentiment", "negative", "This is awful and I hate it.", "I love this, it is wonderful!"),
    ("language", "fr", "Je pense que la réponse est simple et que tout va bien.",
     "I think the answer is simple and that everything is fine."),
    ("uppercase", "", "THE SKY IS BLUE!", "The sky is blue!"),
    ("max_words", "3", "Blue, mostly.", "The sky is blue today."),
])
def test_builtin_judges(name, expect, yes, no):
    row = {"expect": expect}
    assert score(name, BUILTIN[name], "q", yes, row, "here") == 1.0
    assert score(name, BUILTIN[name], "q", no, row, "here") == 0.0


def test_language_identifier_is_offline_and_handles_non_text():
    assert identify_language("Das ist ein ganz normaler deutscher Satz über das Wetter.") == "de"
    assert identify_language("1234 :-) !!!") == ""


def test_wilson_interval():
    assert wilson_interval(0, 5)[0] == 0 and wilson_interval(0, 5)[1] > 0.4  # never [0, 0]
    assert wilson_interval(0, 24)[0] == 0.0 and wilson_interval(24, 24)[1] == 1.0  # not 1e-17 off
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # nan


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_file_mixing_judges_and_your_own_judge(tiny, tmp_path, monkeypatch):
    """A conditional rule in one file: each row names its judge and what it expects; a user's
    judge from a module in the current folder is called with (input, answer, row)."""
    (tmp_path / "myjudges.py").write_text(
        "def short(input, answer, row):\n"
        "    assert isinstance(row, dict) and 'input' in row\n"
        "    return len(answer) <= int(row['limit'])\n")
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "test.jsonl", [
        {"rule": "Answer briefly.", "input": "2 @@@ 3 = ?", "judge": "myjudges:short",
         "limit": 1000},
        {"rule": "Answer briefly.", "input": "7 @@@ 1 = ?", "judge": "not_contains",
         "expect": "zzzz-never"},
        {"rule": "Answer briefly.", "input": "4 @@@ 4 = ?"},  # the file's judge (--judge)
    ])
    model, tok = tiny
    cfg = EvalConfig(model="tiny", data=str(data), judge="contains", expect="zzzz-never",
                     max_new_tokens=3, output_dir=str(tmp_path / "out"), side="teacher")
    result = evaluate(cfg, model, tok)
    m = result["metrics"]
    assert m["n"] == 3 and m["rate"] == pytest.approx(2 / 3)
    assert set(m["by_judge"]) == {"myjudges:short", "not_contains", "contains"}
    assert 0 <= m["ci95"][0] <= m["rate"] <= m["ci95"][1] <= 1
    rows = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0] and rows[2]["expect"] == "zzzz-never"


def test_errors_name_the_file_row_and_field(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    (tmp_path / "badjudge.py").write_text("def boom(input, answer, row):\n    raise KeyError('x')\n"
                                          "def maybe(input, answer, row):\n    return 'yes'\n")
    monkeypatch.chdir(tmp_path)
    rows = [{"rule": "r", "input": "1 @@@ 2 = ?", "judge": "badjudge:boom"}]
    cfg = lambda path, **kw: EvalConfig(model="tiny", data=str(path), max_new_tokens=2,  # noqa: E731
                                        output_dir=str(tmp_path / "o"), **kw)
    with pytest.raises(ConfigError, match=r"a\.jsonl: row 0: judge 'badjudge:boom' raised KeyError"):
        evaluate(cfg(write(tmp_path / "a.jsonl", rows)), model, tok)
    rows[0]["judge"] = "badjudge:maybe"
    with pytest.raises(ConfigError, match=r"row 0: judge 'badjudge:maybe' returned 'yes'"):
        evaluate(cfg(write(tmp_path / "b.jsonl", rows)), model, tok)
    rows[0]["judge"] = "no_such_judge"
    with pytest.raises(ConfigError, match=r"c\.jsonl: row 0: field 'judge': unknown judge"):
        evaluate(cfg(write(tmp_path / "c.jsonl", rows)), model, tok)
    del rows[0]["judge"]
    with pytest.raises(DataError, match=r"d\.jsonl: row 0: no judge"):
        evaluate(cfg(write(tmp_path / "d.jsonl", rows)), model, tok)
    with pytest.raises(ConfigError, match="judge 'contains' needs an 'expect' field"):
        evaluate(cfg(write(tmp_path / "e.jsonl", rows), judge="contains"), model, tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        evaluate(cfg(tmp_path / "empty.jsonl", judge="uppercase"), model, tok)
    with pytest.raises(DataError, match=r"f\.jsonl: row 0: missing or empty field 'rule'"):
        evaluate(cfg(write(tmp_path / "f.jsonl", [{"input": "x"}]), judge="uppercase",
                     side="teacher"), model, tok)
    with pytest.raises(ConfigError, match="unknown judge 'nope'"):
        resolve("nope")
    with pytest.raises(ConfigError, match="cannot import 'no_module_here'"):
        resolve("no_module_here:f")


def test_cli_gives_one_line_not_a_traceback(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "rdcore.evaluate", "--model", "tiny", "--data",
                           str(tmp_path / "empty.json"), "--judge", "exact"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("rdcore: error: ") and "holds no examples" in proc.stderr
    assert main(["--model", "tiny", "--data", str(tmp_path / "x.json"), "--judge", "nope"]) == 2


def test_every_flag_has_a_help_line():
    import argparse

    from rdcore.cli import parser_for
    from rdcore.config import TrainConfig

    for cls, config_file in ((TrainConfig, True), (EvalConfig, False)):
        parser = parser_for(cls, prog="p", description="d", config_file=config_file)
        flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help",
                                                                                    "local_rank")]
        assert len(flags) > 10
        for action in flags:
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 20, \
                (cls.__name__, action.dest)
        assert len({a.container.title for a in flags if hasattr(a, "container")}) >= 3  # groups
    out = subprocess.run([sys.executable, "-m", "rdcore.evaluate", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120).stdout
    assert "--judge" in out and "what to evaluate:" in out
