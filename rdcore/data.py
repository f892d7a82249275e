"""Rule data layer: read rule data, build aligned teacher/student token sequences.

Vocabulary used throughout
--------------------------
* **rule** — the text the teacher reads and the student does not (e.g. "@@@ means a + b + 1").
* **context** — per-example text that *both* read (e.g. a jailbreak role-play preamble).
* **teacher sequence** — template(rule + context, input) + response.
* **student sequence** — template(context, input) + response.
* **response tokens** — identical token ids at the end of both sequences. ``teacher_response_start``
  and ``student_response_start`` give their first index in each sequence; they have the same length.
* **distilled positions** — the positions whose next-token distribution *predicts* a response token:
  ``start - 1 … start + R - 2`` in each sequence. (The paper's released code masks the *unshifted*
  logits, so it distils the position after the last response token and skips the one predicting the
  first; rdcore distils the right ones.)
* **rule prefix** — the longest token prefix shared by every teacher sequence of a data set (capped so
  that each teacher prompt keeps at least one token after it); its KV cache can be computed once.

Input formats
-------------
* The paper's files (RUCBM/rule-distillation, MIT; a copy ships in ``rdcore/resources``): JSON lists of
  ``{instruction, input, output}``. ``*_full_*`` files hold the rule (+ per-example text) in
  ``instruction``; the matching ``*_no_*`` file holds the same rows without the rule. The pairing is
  row by row: ``full.instruction`` must end with ``no.instruction`` (that suffix is the context, the
  rest the rule), and ``input``/``output`` must be equal.
* A user's own file (JSON list or JSON lines) of ``{rule, input, output}`` rows with optional
  ``context``; the teacher instruction is ``rule + "\\n\\n" + context``.

Every problem with the input raises :class:`rdcore.DataError` naming the file, the row and the field.
Nothing is dropped or truncated silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rdcore import DataError

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources" / "rule_distillation"

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat", "chat_system")


# --------------------------------------------------------------------------------------------------
# Tasks shipped with the package
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """Where the paper's files of one task live and which splits exist."""

    name: str
    folder: str
    shots: tuple[int, ...]
    tests: tuple[str, ...]
    """Test-file stems without the ``_full``/``_no`` part, e.g. ``test_{}_id`` → ``test_full_id``."""


TASKS: dict[str, TaskSpec] = {
    "math": TaskSpec("math", "math_experiments", (4, 8, 16, 32), ("test_{}_id", "test_{}_ood")),
    "jailbreak": TaskSpec("jailbreak", "jailbreak_experiments", (8, 16, 32, 64, 128),
                          ("harmful_test_{}", "helpful_test_{}")),
    "bob": TaskSpec("bob", "bob_sentiment_experiments", (8, 16, 32, 64, 128), ("test_{}",)),
}
TASK_ALIASES = {"arithmetic": "math", "sentiment": "bob"}
"""Other names accepted for the packaged tasks."""


def task_name(task: str) -> str:
    """The canonical name of a packaged task (``arithmetic`` → ``math``, ``sentiment`` → ``bob``)."""
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {sorted(TASKS)} "
                        f"(aliases: {TASK_ALIASES})")
    return name
SEEDS = (1234, 2345, 3456, 4567, 5678)


def task_files(task: str, split: str = "train", shots: int = 8, seed: int = 1234,
               root: Path | None = None) -> tuple[Path, Path]:
    """Return the ``(full, no)`` file pair of a packaged task.

    ``split`` is ``train``, ``valid`` or a test stem of the task (``test_id``, ``test_ood``,
    ``harmful_test``, ``helpful_test``, ``test``).
    """
    task = task_name(task)
    spec = TASKS[task]
    folder = (root or RESOURCES) / spec.folder
    if split in ("train", "valid"):
        if shots not in spec.shots:
            raise DataError(f"task {task!r} has no {shots}-shot split; choose one of {spec.shots}")
        suffix = f"_{shots}shot" + (f"_seed{seed}" if split == "valid" else "")
        if split == "valid" and seed not in SEEDS:
            raise DataError(f"no validation seed {seed}; choose one of {SEEDS}")
        names = (f"{split}_full{suffix}.json", f"{split}_no{suffix}.json")
    else:
        stems = {t.format("").replace("__", "_").rstrip("_"): t for t in spec.tests}
        if split not in stems:
            raise DataError(f"task {task!r} has no split {split!r}; choose one of "
                            f"{['train', 'valid', *sorted(stems)]}")
        names = (stems[split].format("full") + ".json", stems[split].format("no") + ".json")
    return folder / names[0], folder / names[1]


# --------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleExample:
    """One example: what the teacher reads, what the student reads, and the target response."""

    rule: str
    """Text only the teacher reads (placed before the context)."""
    context: str
    """Per-example text both read (may be empty)."""
    input: str
    output: str
    """Reference response; empty only in evaluation-only files."""
    source: str
    """``file:row`` for error messages."""
    joiner: str = "\n\n"
    """Text between the rule and a non-empty context in the teacher instruction."""

    @property
    def teacher_instruction(self) -> str:
        if self.rule and self.context:
            return self.rule + self.joiner + self.context
        return self.rule or self.context

    @property
    def student_instruction(self) -> str:
        return self.context


def _read_rows(path: Path) -> list[Any]:
    """The rows of a ``.json`` list or a ``.jsonl`` file (UTF-8, a byte-order mark allowed, blank
    lines skipped). Any failure to read or parse it is a :class:`DataError` naming the file (and
    the line); a file without rows is one too."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {err.start}: "
                        f"{raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty: it holds no examples")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({err.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {lineno}: JSON nested too deeply") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            hint = " (a .jsonl file? name it so)" if path.suffix != ".json" else ""
            raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} "
                            f"({err.msg}){hint}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: the file holds no examples")
    return rows


def _check_row(path: Path, i: int, row: Any, required: Sequence[str], optional: Sequence[str],
               require_output: bool) -> dict[str, str]:
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields {list(required)}, "
                        f"got {type(row).__name__}")
    out = {}
    for name in (*required, *optional):
        if name not in row:
            if name in optional:
                out[name] = ""
                continue
            raise DataError(f"{where}: missing field {name!r}")
        value = row[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got "
                            f"{type(value).__name__}")
        out[name] = value
    if require_output and not out["output"].strip():
        raise DataError(f"{where}: field 'output' is empty (files without reference outputs, such "
                        "as the jailbreak/sentiment test files, are for evaluation only: load them "
                        "with require_output=False)")
    if not out["input"].strip() and not out.get("instruction", out.get("rule", "")).strip():
        raise DataError(f"{where}: both the instruction/rule and 'input' are empty")
    return out


def load_paper_pair(full_path: str | os.PathLike, no_path: str | os.PathLike, *,
                    require_output: bool = True) -> list[RuleExample]:
    """Pair a paper ``*_full_*`` file (with the rule) with its ``*_no_*`` file, row by row."""
    full_path, no_path = Path(full_path), Path(no_path)
    full_rows, no_rows = _read_rows(full_path), _read_rows(no_path)
    if len(full_rows) != len(no_rows):
        raise DataError(f"{full_path} has {len(full_rows)} rows but {no_path} has {len(no_rows)}: "
                        "the files do not correspond row by row")
    fields = ("instruction", "input", "output")
    examples = []
    for i, (f_raw, n_raw) in enumerate(zip(full_rows, no_rows)):
        f = _check_row(full_path, i, f_raw, fields, (), require_output)
        n = _check_row(no_path, i, n_raw, fields, (), require_output)
        for name in ("input", "output"):
            if f[name] != n[name]:
                raise DataError(f"{full_path} / {no_path}: row {i}: field {name!r} differs between "
                                "the two files: the rows do not correspond")
        teacher, student = f["instruction"], n["instruction"]
        if not teacher.endswith(student) or len(teacher) == len(student):
            raise DataError(f"{full_path} / {no_path}: row {i}: field 'instruction': the rule-free "
                            "instruction must be a proper suffix of the instruction with the rule")
        rule = teacher[: len(teacher) - len(student)]
        joiner = ""
        if student:  # split "rule<joiner>context" at the trailing whitespace of the rule part
            stripped = rule.rstrip()
            joiner, rule = rule[len(stripped):], stripped
        examples.append(RuleExample(rule=rule, context=student, input=f["input"], output=f["output"],
                                    source=f"{full_path}:{i}", joiner=joiner))
    return examples


def load_rule_file(path: str | os.PathLike, *, require_output: bool = True) -> list[RuleExample]:
    """Read a user's file of ``{rule, input, output}`` rows (optional ``context``; ``output``
    optional too without ``require_output``: teacher-written responses fill it).

    JSON list (``.json``) or JSON lines (``.jsonl``). Other fields are ignored.
    """
    path = Path(path)
    examples = []
    for i, raw in enumerate(_read_rows(path)):
        required = ("rule", "input", "output") if require_output else ("rule", "input")
        optional = ("context",) if require_output else ("context", "output")
        r = _check_row(path, i, raw, required, optional, require_output)
        if not r["rule"].strip():
            raise DataError(f"{path}: row {i}: field 'rule' is empty")
        examples.append(RuleExample(rule=r["rule"], context=r["context"], input=r["input"],
                                    output=r["output"], source=f"{path}:{i}"))
    return examples


@dataclass(frozen=True)
class EvalRow:
    """One row of an evaluation file: the example (its rule, context, input; output optional) and
    the row itself (its ``judge`` and ``expect`` fields, and any others a judge may read)."""

    example: RuleExample
    row: dict[str, Any]
    index: int


EVAL_FIELDS = ("rule", "input", "context", "output", "judge", "expect")


def load_eval_file(path: str | os.PathLike, *, need_rule: bool = False) -> list[EvalRow]:
    """Read a user's evaluation file: ``.json`` list or ``.jsonl`` rows with ``input`` and, as
    needed, ``rule`` (the teacher side reads it; ``need_rule``), ``context``, ``output`` (a
    reference, optional), ``judge`` and ``expect`` (what the judge wants of this row; see
    :mod:`rdcore.judges`). Other fields are kept for the judge."""
    path = Path(path)
    out = []
    for i, raw in enumerate(_read_rows(path)):
        where = f"{path}: row {i}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with at least an 'input' field, got "
                            f"{type(raw).__name__}")
        for name in ("rule", "input", "context", "output", "judge"):
            if name in raw and not isinstance(raw[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got "
                                f"{type(raw[name]).__name__}")
        if not str(raw.get("input", "")).strip():
            raise DataError(f"{where}: missing or empty field 'input'")
        if need_rule and not str(raw.get("rule", "")).strip():
            raise DataError(f"{where}: missing or empty field 'rule' (the teacher side reads the "
                            "rule)")
        ex = RuleExample(rule=raw.get("rule", ""), context=raw.get("context", ""),
                         input=raw["input"], output=raw.get("output", ""), source=f"{path}:{i}")
        out.append(EvalRow(ex, dict(raw), i))
    return out


def canonical_rule(task: str) -> str:
    """One rule text for every row of a task whose files word it in several ways.

    The Bob files (8–64 shots, ``test_full``) state the rule in two wordings that track the class
    ("When the inputs…" only on environmental rows, "As long as…" only on the others), so a model can
    read the wording instead of the rule; the 128-shot file uses the first wording only, which is the
    canonical one. The other tasks state one rule (the math rows embed per-row examples by design).
    """
    task = task_name(task)
    if task != "bob":
        raise DataError(f"task {task!r} has no alternative rule wordings; no canonical rule needed")
    return load_task("bob", "train", 128)[0].rule


def replace_rule(examples: Sequence[RuleExample], text: str) -> list[RuleExample]:
    """The same examples with every rule replaced by ``text`` (``"canonical"``: see
    :func:`canonical_rule`, which needs the task: use it directly)."""
    if not text.strip():
        raise DataError("the replacement rule text is empty")
    return [dataclasses.replace(ex, rule=text) for ex in examples]


def swap_rule_wordings(examples: Sequence[RuleExample]) -> list[RuleExample]:
    """The wording-swap test: rows stated in one of exactly two rule wordings get the other one.

    In the released Bob files the wording tracks the class; a model that reads the wording instead
    of the rule loses accuracy when the wordings are swapped, one that reads the rule does not."""
    rules = list(dict.fromkeys(ex.rule for ex in examples))
    if len(rules) != 2:
        raise DataError(f"the wording swap needs exactly 2 distinct rule texts; these rows have "
                        f"{len(rules)}")
    other = {rules[0]: rules[1], rules[1]: rules[0]}
    return [dataclasses.replace(ex, rule=other[ex.rule]) for ex in examples]


def load_task(task: str, split: str = "train", shots: int = 8, seed: int = 1234, *,
              require_output: bool | None = None) -> list[RuleExample]:
    """Load a packaged task split as :class:`RuleExample` rows (outputs required for train/valid)."""
    full, no = task_files(task, split, shots, seed)
    if require_output is None:
        require_output = split in ("train", "valid")
    return load_paper_pair(full, no, require_output=require_output)


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------
@dataclass
class EncodedExample:
    """Token ids of one example's teacher and student sequences, responses aligned."""

    teacher_ids: list[int]
    student_ids: list[int]
    teacher_response_start: int
    student_response_start: int
    response_len: int
    source: str
    boundary_merge: bool = False
    """True when tokenising prompt+response jointly merged tokens across the boundary; the
    sequence then uses prompt tokens followed by separately tokenised response tokens (what the
    model sees at generation time)."""

    @property
    def response_ids(self) -> list[int]:
        s = self.student_response_start
        return self.student_ids[s: s + self.response_len]

    def distill_positions(self, side: str) -> range:
        """Positions (in the ``side`` sequence) whose next-token distribution predicts a response
        token: ``start - 1 … start + R - 2``."""
        start = self.teacher_response_start if side == "teacher" else self.student_response_start
        return range(start - 1, start - 1 + self.response_len)


@dataclass
class EncodedDataset:
    """A tokenised data set plus its shared rule prefix."""

    examples: list[EncodedExample]
    rule_prefix_len: int
    """Number of leading tokens shared by all teacher sequences (0 if none)."""
    distinct_rules: int
    template: str
    max_length: int
    notes: list[str] = field(default_factory=list)
    prefix_groups: list[int] | None = None
    """With several rules, each shared by several rows: each example's rule group (its index
    into :attr:`group_prefix_lens`); None: one prefix for all rows."""
    group_prefix_lens: list[int] = field(default_factory=list)
    """The prefix each rule group shares (its teacher sequences' common part; ≥ the global one)."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> EncodedExample:
        return self.examples[i]

    @property
    def rule_prefix_ids(self) -> list[int]:
        return self.examples[0].teacher_ids[: self.rule_prefix_len] if self.examples else []

    @property
    def prefixes(self) -> list[list[int]]:
        """The rule prefixes to cache: one per rule group, or the one shared by all rows."""
        if self.prefix_groups is None:
            return [self.rule_prefix_ids] if self.rule_prefix_len else []
        first = {g: i for i, g in reversed(list(enumerate(self.prefix_groups)))}
        return [self.examples[first[g]].teacher_ids[:n]
                for g, n in enumerate(self.group_prefix_lens)]

    def prefix_of(self, i: int) -> tuple[int, int]:
        """(prefix group, prefix length) of example ``i``."""
        if self.prefix_groups is None:
            return 0, self.rule_prefix_len
        g = self.prefix_groups[i]
        return g, self.group_prefix_lens[g]


class Encoder:
    """Turns :class:`RuleExample` rows into aligned teacher/student token sequences.

    ``template``: ``"alpaca"`` (the paper's prompt; an EOS token is appended to the response),
    ``"chat"`` (the tokenizer's chat template; the rule and context go into the user message and the
    response ends with the template's end-of-turn text) or ``"chat_system"`` (the same, the rule in
    the system message; the student's prompt has none, or the template's default).
    """

    def __init__(self, tokenizer: Any, template: str = "alpaca", max_length: int = 1024):
        if template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if template != "alpaca" and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"template {template!r} needs a tokenizer with a chat template; this "
                            "one has none (use template='alpaca')")
        if template == "alpaca" and tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token, which the alpaca template appends")
        if max_length < 2:
            raise DataError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length

    # ---- text ----------------------------------------------------------------------------------
    def side_texts(self, ex: RuleExample, side: str) -> tuple[str, str, str]:
        """(system, instruction, input) of ``side``: the rule goes into the instruction (alpaca,
        chat: before the context) or, with ``chat_system``, into the system message."""
        if self.template == "chat_system":
            return (ex.rule if side == "teacher" else ""), ex.context, ex.input
        instruction = ex.teacher_instruction if side == "teacher" else ex.student_instruction
        return "", instruction, ex.input

    def _messages(self, system: str, instruction: str, input: str) -> list[dict[str, str]]:
        user = f"{instruction}\n\n{input}" if instruction and input else (instruction or input)
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": user}]

    def prompt_text(self, instruction: str, input: str, system: str = "") -> str:
        """The prompt (everything before the response) for one side."""
        if self.template == "alpaca":
            if input:
                return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
            return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        return self.tokenizer.apply_chat_template(self._messages(system, instruction, input),
                                                  tokenize=False, add_generation_prompt=True)

    def response_text(self, instruction: str, input: str, output: str, system: str = "") -> str:
        """The response text as the template renders it (chat: includes end-of-turn)."""
        if self.template == "alpaca":
            return output
        prompt = self.prompt_text(instruction, input, system)
        full = self.tokenizer.apply_chat_template(
            [*self._messages(system, instruction, input), {"role": "assistant", "content": output}],
            tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render the assistant turn as a "
                            "continuation of the generation prompt; use template='alpaca'")
        return full[len(prompt):]

    # ---- tokens --------------------------------------------------------------------------------
    def _encode_text(self, text: str, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _side(self, prompt: str, response: str) -> tuple[list[int], list[int] | None]:
        """Prompt ids and the response ids taken from a joint tokenisation (None on a merge)."""
        prompt_ids = self._encode_text(prompt, True)
        joint = self._encode_text(prompt + response, True)
        if joint[: len(prompt_ids)] != prompt_ids:
            return prompt_ids, None
        return prompt_ids, joint[len(prompt_ids):]

    def encode_one(self, ex: RuleExample) -> EncodedExample:
        t_sys, t_instr, _ = self.side_texts(ex, "teacher")
        s_sys, s_instr, _ = self.side_texts(ex, "student")
        t_prompt = self.prompt_text(t_instr, ex.input, t_sys)
        s_prompt = self.prompt_text(s_instr, ex.input, s_sys)
        response = self.response_text(s_instr, ex.input, ex.output, s_sys)
        if self.template != "alpaca":  # the end-of-turn text must not depend on the side
            t_resp = self.response_text(t_instr, ex.input, ex.output, t_sys)
            if t_resp != response:
                raise DataError(f"{ex.source}: the chat template renders the response differently "
                                "with and without the rule")
        t_prompt_ids, t_resp_ids = self._side(t_prompt, response)
        s_prompt_ids, s_resp_ids = self._side(s_prompt, response)
        merge = t_resp_ids is None or s_resp_ids is None or t_resp_ids != s_resp_ids
        if merge:
            # Tokens merged across the prompt/response boundary on at least one side: use the side
            # whose boundary is clean, else the response tokenised on its own. Either way both
            # sequences get the very same response ids after their own prompt ids.
            resp_ids = s_resp_ids if s_resp_ids is not None else t_resp_ids
            if resp_ids is None:
                resp_ids = self._encode_text(response, False)
        else:
            resp_ids = s_resp_ids
        if self.template == "alpaca":
            resp_ids = [*resp_ids, self.tokenizer.eos_token_id]
        if not resp_ids:
            raise DataError(f"{ex.source}: field 'output': the response tokenises to nothing")
        teacher_ids = t_prompt_ids + resp_ids
        student_ids = s_prompt_ids + resp_ids
        enc = EncodedExample(teacher_ids, student_ids, len(t_prompt_ids), len(s_prompt_ids),
                             len(resp_ids), ex.source, merge)
        # The invariant everything downstream relies on.
        t0, s0, r = enc.teacher_response_start, enc.student_response_start, enc.response_len
        assert teacher_ids[t0: t0 + r] == student_ids[s0: s0 + r] == resp_ids
        for side, ids in (("teacher", teacher_ids), ("student", student_ids)):
            if len(ids) > self.max_length:
                raise DataError(
                    f"{ex.source}: the {side} sequence is {len(ids)} tokens, "
                    f"{len(ids) - self.max_length} over max_length={self.max_length} (prompt "
                    f"{len(ids) - r}, response {r}); raise max_length — rdcore never truncates")
        return enc

    def encode_prompts(self, examples: Sequence[RuleExample], side: str) -> list[list[int]]:
        """Prompt token ids only (for generation), ``side`` = ``teacher`` (with the rule) or
        ``student``."""
        if side not in ("teacher", "student"):
            raise DataError(f"side must be 'teacher' or 'student', got {side!r}")
        out = []
        for ex in examples:
            system, instr, _ = self.side_texts(ex, side)
            ids = self._encode_text(self.prompt_text(instr, ex.input, system), True)
            if len(ids) > self.max_length:
                raise DataError(f"{ex.source}: the {side} prompt is {len(ids)} tokens, "
                                f"{len(ids) - self.max_length} over max_length={self.max_length}")
            out.append(ids)
        return out

    def encode(self, examples: Sequence[RuleExample]) -> EncodedDataset:
        if not examples:
            raise DataError("no examples to encode")
        encoded = [self.encode_one(ex) for ex in examples]
        notes = []
        merges = sum(e.boundary_merge for e in encoded)
        if merges:
            notes.append(f"{merges} example(s) merged tokens across the prompt/response boundary; "
                         "their response was tokenised on its own after the prompt")
        rules = list(dict.fromkeys(ex.rule for ex in examples))
        prefix = rule_prefix_len([e.teacher_ids for e in encoded],
                                 [e.teacher_response_start for e in encoded])
        groups, lens = rule_groups(examples, encoded)
        if groups is not None:
            notes.append(f"the rule text varies across rows ({len(rules)} distinct texts, each "
                         f"shared by several rows): one rule prefix per rule ({min(lens)}–"
                         f"{max(lens)} tokens) instead of the {prefix} tokens all rows share")
        elif len(rules) > 1:
            notes.append(f"the rule text varies across rows ({len(rules)} distinct texts); the rule "
                         f"prefix shared by all rows is only their common part: {prefix} tokens")
        for note in notes:
            log.warning(note)
        return EncodedDataset(encoded, prefix, len(rules), self.template, self.max_length, notes,
                              groups, lens)


def rule_groups(examples: Sequence[RuleExample], encoded: Sequence[EncodedExample]
                ) -> tuple[list[int] | None, list[int]]:
    """One prefix per distinct rule text when there are several and each is shared by at least
    two rows (a rule book run on several rules); otherwise ``(None, [])``: the prefix common to
    all rows serves (one rule, or a rule text that varies per row, like the arithmetic files'
    per-row examples)."""
    order = list(dict.fromkeys(ex.rule for ex in examples))
    members: dict[str, list[int]] = {r: [] for r in order}
    for i, ex in enumerate(examples):
        members[ex.rule].append(i)
    if len(order) < 2 or any(len(m) < 2 for m in members.values()):
        return None, []
    lens = [rule_prefix_len([encoded[i].teacher_ids for i in members[r]],
                            [encoded[i].teacher_response_start for i in members[r]])
            for r in order]
    index = {r: g for g, r in enumerate(order)}
    return [index[ex.rule] for ex in examples], lens


def rule_prefix_len(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> int:
    """Longest common token prefix of ``sequences``, capped so every prompt keeps >= 1 token."""
    if not sequences:
        return 0
    cap = min(prompt_lens) - 1
    first = sequences[0]
    n = min(cap, *(len(s) for s in sequences))
    for s in sequences[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------
def _pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                  list[int]]:
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        off = T - len(s) if side == "left" else 0
        ids_BT[b, off: off + len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BT[b, off: off + len(s)] = 1
        offsets.append(off)
    return ids_BT, mask_BT, offsets


@dataclass
class SideInputs:
    """One side's padded sequences: ``input_ids``, ``attention_mask``, ``position_ids`` [B, T] and
    ``distill_index`` [N] (flat indices into B·T of the positions that predict response tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    distill_index: torch.Tensor


@dataclass
class Batch:
    """Everything one forward pass needs, as :func:`collate` builds it (on the CPU; ``.to(device)``
    moves every tensor). B examples, T_t/T_s/S the padded teacher/student/teacher-suffix lengths,
    N the response tokens of the batch (the distilled rows), in example order."""

    teacher_input_ids: torch.Tensor
    """[B, T_t] the teacher sequences (template + rule + context + input + response)."""
    teacher_attention_mask: torch.Tensor
    teacher_position_ids: torch.Tensor
    """[B, T_t], 0 at each row's first real token (so left padding is handled)."""
    teacher_distill_index: torch.Tensor
    """[N] flat indices into B·T_t of the positions that predict the response tokens."""
    student_input_ids: torch.Tensor
    """[B, T_s] the student sequences (without the rule)."""
    student_attention_mask: torch.Tensor
    student_position_ids: torch.Tensor
    student_distill_index: torch.Tensor
    """[N] as ``teacher_distill_index``; row n of one side matches row n of the other."""
    student_labels: torch.Tensor
    """[B, T_s] the response tokens at their own positions, ``ignore_index`` elsewhere."""
    target_ids: torch.Tensor
    """[N] the response tokens the distilled rows predict."""
    example_ids: list[int]
    """Each row's index in its data set (the teacher-target cache's key): bookkeeping on the host,
    never moved to a device (reading it costs no synchronisation)."""
    rows_per_example: list[int]
    """Distilled rows per example (its response length), on the host like ``example_ids``."""
    row_weight: torch.Tensor
    """[N] fp32 weight of each distilled row (its example's: 1, or 0 for a fill-up repeat)."""
    teacher_suffix_input_ids: torch.Tensor | None = None
    """[B, S] the teacher sequences without the shared rule prefix (``prefix_len`` > 0)."""
    teacher_suffix_attention_mask: torch.Tensor | None = None
    teacher_suffix_position_ids: torch.Tensor | None = None
    """[B, S], the prefix length P at the first suffix token."""
    teacher_suffix_distill_index: torch.Tensor | None = None
    """[N] flat indices into B·S, same row order."""
    prefix_index: list[int] | None = None
    """Each row's rule group (which cached prefix its suffix continues; host-side)."""

    def side(self, name: str) -> SideInputs:
        """``teacher``, ``student`` or ``teacher_suffix`` inputs."""
        if name not in ("teacher", "student", "teacher_suffix"):
            raise ValueError(f"no side {name!r}")
        return SideInputs(*(getattr(self, f"{name}_{k}") for k in
                            ("input_ids", "attention_mask", "position_ids", "distill_index")))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        return dataclasses.replace(self, **{
            name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the batch by field name (the host-side lists are not tensors)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}


def collate(batch: Sequence[EncodedExample], pad_id: int, padding_side: str = "right",
            ignore_index: int = -100, prefix_len: int | Sequence[int] = 0,
            example_ids: Sequence[int] | None = None, weights: Sequence[float] | None = None,
            prefix_index: Sequence[int] | None = None) -> Batch:
    """Pad a batch and index the distilled positions (see :class:`Batch`).

    ``example_ids``: each example's index in its data set (default 0 … B−1); ``weights``: each
    example's weight (default 1), repeated over its distilled rows. With ``prefix_len`` P > 0 (the
    shared rule prefix, see :attr:`EncodedDataset.rule_prefix_len`) also the teacher sequences
    without it, for the rule-prefix cache; with one P per row and ``prefix_index`` (each row's rule
    group), every row without its own rule's prefix (:attr:`EncodedDataset.prefixes`).
    """
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise DataError("empty batch")
    ids = list(range(len(batch))) if example_ids is None else list(example_ids)
    ws = [1.0] * len(batch) if weights is None else [float(w) for w in weights]
    if len(ids) != len(batch) or len(ws) != len(batch):
        raise DataError(f"{len(batch)} examples but {len(ids)} ids and {len(ws)} weights")
    out: dict[str, torch.Tensor] = {}
    for side in ("teacher", "student"):
        seqs = [e.teacher_ids if side == "teacher" else e.student_ids for e in batch]
        ids_BT, mask_BT, offsets = _pad(seqs, pad_id, padding_side)
        T = ids_BT.shape[1]
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp_min(0)
        index = [b * T + offsets[b] + p for b, e in enumerate(batch) for p in e.distill_positions(side)]
        out[f"{side}_input_ids"] = ids_BT
        out[f"{side}_attention_mask"] = mask_BT
        out[f"{side}_position_ids"] = pos_BT
        out[f"{side}_distill_index"] = torch.tensor(index, dtype=torch.long)
        if side == "student":
            labels = torch.full_like(ids_BT, ignore_index)
            for b, e in enumerate(batch):
                s = offsets[b] + e.student_response_start
                labels[b, s: s + e.response_len] = ids_BT[b, s: s + e.response_len]
            out["student_labels"] = labels
    out["target_ids"] = torch.tensor([t for e in batch for t in e.response_ids], dtype=torch.long)
    out["example_ids"] = ids
    out["rows_per_example"] = [e.response_len for e in batch]
    out["row_weight"] = torch.cat([torch.full((e.response_len,), w, dtype=torch.float32)
                                   for e, w in zip(batch, ws)])
    lens = [prefix_len] * len(batch) if isinstance(prefix_len, int) else list(prefix_len)
    groups = [0] * len(batch) if prefix_index is None else list(prefix_index)
    if any(n > 0 for n in lens):
        for g in set(groups):
            rows = [b for b in range(len(batch)) if groups[b] == g]
            n = lens[rows[0]]
            head = batch[rows[0]].teacher_ids[:n]
            if any(lens[b] != n or batch[b].teacher_ids[:n] != head
                   or n >= batch[b].teacher_response_start for b in rows):
                raise DataError(f"prefix_len {n} is not a rule prefix shared by every row of its "
                                "group")
        ids_BS, mask_BS, offsets = _pad([e.teacher_ids[n:] for e, n in zip(batch, lens)], pad_id,
                                        padding_side)
        S = ids_BS.shape[1]
        P_B = torch.tensor(lens, dtype=torch.long)[:, None]
        out["teacher_suffix_input_ids"] = ids_BS
        out["teacher_suffix_attention_mask"] = mask_BS
        out["teacher_suffix_position_ids"] = P_B + (mask_BS.cumsum(-1) - 1).clamp_min(0)
        out["teacher_suffix_distill_index"] = torch.tensor(
            [b * S + offsets[b] + p - lens[b] for b, e in enumerate(batch)
             for p in e.distill_positions("teacher")], dtype=torch.long)
        out["prefix_index"] = groups
    return Batch(**out)
