"""Judges: does an answer follow the rule? One function per behaviour, all offline.

A judge is called as ``judge(input, answer, row)`` — ``row`` is the test row (a dict: its
``expect`` field says what it wants, see each judge) — and returns a bool (a rate is the mean)
or a float in [0, 1]. Built-in judges, by name:

=================  ===========================================================================
``exact``          the answer equals ``expect`` (stripped; ``case`` in the row: case-sensitive)
``contains``       the answer contains ``expect`` (case-insensitive)
``not_contains``   the answer does not contain ``expect`` (case-insensitive)
``starts_with``    the answer begins with ``expect`` (case-insensitive, leading spaces ignored)
``ends_with``      the answer ends with ``expect`` (case-insensitive; trailing spaces, quotes and
                   final punctuation ignored on both)
``regex``          the regular expression ``expect`` matches somewhere in the answer
``sentiment``      VADER's compound score (its lexicon ships in ``vadersentiment``) is ≥ 0.05 for
                   ``expect = "positive"``, ≤ −0.05 for ``"negative"``, in between for ``"neutral"``
``language``       the language identified by py3langid (its model ships in the wheel) is
                   ``expect`` (an ISO 639-1 code: ``fr``, ``de`` …)
``uppercase``      every letter of the answer is a capital (and it has letters)
``max_words``      the answer has at most ``expect`` words (an integer)
=================  ===========================================================================

Your own judge: ``--judge my_module:my_function`` (``my_module`` importable from the current
folder or ``sys.path``), the same signature. A row may name its own judge in a ``judge`` field, so
one file can mix behaviours — e.g. a conditional rule ("French when asked about food, otherwise
English"): the food rows say ``"judge": "language", "expect": "fr"``, the others ``"expect": "en"``.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rdcore import ConfigError

Judge = Callable[[str, str, dict[str, Any]], "bool | float"]
VADER_THRESHOLD = 0.05


def _expect(row: dict[str, Any], judge: str) -> Any:
    if row.get("expect") in (None, ""):
        raise ConfigError(f"judge {judge!r} needs an 'expect' field in the row (or --expect)")
    return row["expect"]


def exact(input: str, answer: str, row: dict[str, Any]) -> bool:
    want = str(_expect(row, "exact")).strip()
    got = answer.strip()
    return got == want if row.get("case") else got.casefold() == want.casefold()


def contains(input: str, answer: str, row: dict[str, Any]) -> bool:
    return str(_expect(row, "contains")).casefold() in answer.casefold()


def not_contains(input: str, answer: str, row: dict[str, Any]) -> bool:
    return str(_expect(row, "not_contains")).casefold() not in answer.casefold()


def starts_with(input: str, answer: str, row: dict[str, Any]) -> bool:
    return answer.lstrip().casefold().startswith(str(_expect(row, "starts_with")).casefold())


def ends_with(input: str, answer: str, row: dict[str, Any]) -> bool:
    closing = " \t\n\"')]}»”’.!?…"
    tail = answer.rstrip(closing).casefold()
    return tail.endswith(str(_expect(row, "ends_with")).rstrip(closing).casefold())


def regex(input: str, answer: str, row: dict[str, Any]) -> bool:
    pattern = str(_expect(row, "regex"))
    try:
        return re.search(pattern, answer) is not None
    except re.error as err:
        raise ConfigError(f"judge 'regex': {pattern!r} is not a regular expression ({err})") from None


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment score in [−1, 1]."""
    return _vader().polarity_scores(text)["compound"]


def sentiment(input: str, answer: str, row: dict[str, Any]) -> bool:
    want = str(_expect(row, "sentiment")).lower()
    score = vader_compound(answer)
    if want == "positive":
        return score >= VADER_THRESHOLD
    if want == "negative":
        return score <= -VADER_THRESHOLD
    if want == "neutral":
        return -VADER_THRESHOLD < score < VADER_THRESHOLD
    raise ConfigError(f"judge 'sentiment': expect must be positive, negative or neutral, got "
                      f"{want!r}")


@functools.cache
def _language_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> str:
    """The ISO 639-1 code py3langid gives ``text`` ("" for a text without letters)."""
    if not any(ch.isalpha() for ch in text):
        return ""
    return _language_identifier().classify(text)[0]


def language(input: str, answer: str, row: dict[str, Any]) -> bool:
    return identify_language(answer) == str(_expect(row, "language")).lower()


def uppercase(input: str, answer: str, row: dict[str, Any]) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def max_words(input: str, answer: str, row: dict[str, Any]) -> bool:
    try:
        limit = int(_expect(row, "max_words"))
    except ValueError:
        raise ConfigError(f"judge 'max_words': expect must be an integer, got "
                          f"{row.get('expect')!r}") from None
    return 0 < len(answer.split()) <= limit


BUILTIN: dict[str, Judge] = {f.__name__: f for f in (
    exact, contains, not_contains, starts_with, ends_with, regex, sentiment, language, uppercase,
    max_words)}


def resolve(name: str) -> Judge:
    """A built-in judge by name, or ``module:function`` from the current folder or sys.path."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(f"unknown judge {name!r}: choose one of {', '.join(sorted(BUILTIN))} "
                          "or give your own as module:function")
    module_name, func_name = name.split(":", 1)
    if str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of the user's module, named
        raise ConfigError(f"judge {name!r}: cannot import {module_name!r} "
                          f"({type(err).__name__}: {err})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"judge {name!r}: {module_name} has no function {func_name!r}")
    return fn


def score(judge_name: str, judge: Judge, input: str, answer: str, row: dict[str, Any],
          where: str) -> float:
    """The judge's verdict as a number in [0, 1]; anything it raises, or a bad return value, is
    a :class:`ConfigError` naming ``where`` (file and row) and the judge."""
    try:
        value = judge(input, answer, row)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except Exception as err:  # the user's judge failed: name it and the row
        raise ConfigError(f"{where}: judge {judge_name!r} raised {type(err).__name__}: {err}"
                          ) from None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return float(value)
    raise ConfigError(f"{where}: judge {judge_name!r} returned {value!r}; it must return a bool or "
                      "a number in [0, 1]")
