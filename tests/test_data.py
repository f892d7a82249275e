import json

import pytest
import torch

from rdcore import DataError
from rdcore.data import (
    SEEDS,
    TASKS,
    Encoder,
    RuleExample,
    collate,
    load_paper_pair,
    load_rule_file,
    load_task,
    task_files,
)


# ---- the packaged paper data ----------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_packaged_split_loads(task):
    spec = TASKS[task]
    for k in spec.shots:
        rows = load_task(task, "train", k)
        assert len(rows) == k
        assert all(r.rule and r.output for r in rows)
        for seed in SEEDS:
            assert load_task(task, "valid", k, seed)
    for stem in spec.tests:
        split = stem.format("").replace("__", "_").rstrip("_")
        assert load_task(task, split)


def test_paper_pairing_splits_rule_and_context():
    jb = load_task("jailbreak", "train", 8)
    full, no = task_files("jailbreak", "train", 8)
    raw_full, raw_no = json.loads(full.read_text()), json.loads(no.read_text())
    for ex, f, n in zip(jb, raw_full, raw_no):
        assert ex.context == n["instruction"] != ""
        assert ex.teacher_instruction == f["instruction"]
        assert ex.student_instruction == n["instruction"]
        assert ex.rule.startswith("In the following context") and not ex.rule.endswith("\n")
    math = load_task("math", "train", 4)
    assert all(ex.context == "" and "@@@" in ex.rule for ex in math)


def test_eval_only_files_need_require_output_false():
    rows = load_task("bob", "test")  # test files may have empty outputs
    assert len(rows) == 200 and sum(not r.output for r in rows) > 0
    full, no = task_files("bob", "test")
    with pytest.raises(DataError, match=r"test_full\.json: row \d+: field 'output' is empty"):
        load_paper_pair(full, no, require_output=True)


def test_unknown_task_and_split():
    with pytest.raises(DataError, match="unknown task"):
        task_files("chess")
    with pytest.raises(DataError, match="no 7-shot split"):
        task_files("math", "train", 7)
    with pytest.raises(DataError, match="no split 'test_xx'"):
        task_files("math", "test_xx")


# ---- bad input: clear errors naming file, row, field ----------------------------------------------
def write(path, rows):
    path.write_text(json.dumps(rows))
    return path


ROW = {"instruction": "RULE.\n\nctx", "input": "q", "output": "a"}
NO_ROW = {"instruction": "ctx", "input": "q", "output": "a"}


def test_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x",')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 1"):
        load_paper_pair(bad, write(tmp_path / "no.json", [NO_ROW]))
    jl = tmp_path / "rules.jsonl"
    jl.write_text('{"rule": "r", "input": "i", "output": "o"}\n{oops\n')
    with pytest.raises(DataError, match=r"rules\.jsonl: line 2: malformed JSON"):
        load_rule_file(jl)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("output"), r"row 1: missing field 'output'"),
    (lambda r: r.update(input=7), r"row 1: field 'input' must be a string, got int"),
    (lambda r: r.update(output="  "), r"row 1: field 'output' is empty"),
])
def test_bad_field(tmp_path, mutate, message):
    bad = dict(ROW)
    mutate(bad)
    full = write(tmp_path / "train_full.json", [ROW, bad])
    no = write(tmp_path / "train_no.json", [NO_ROW, NO_ROW])
    with pytest.raises(DataError, match=r"train_full\.json: " + message):
        load_paper_pair(full, no)


def test_not_a_list_and_not_an_object(tmp_path):
    with pytest.raises(DataError, match="expected a JSON list"):
        load_paper_pair(write(tmp_path / "a.json", {"x": 1}), write(tmp_path / "b.json", []))
    with pytest.raises(DataError, match=r"row 0: expected an object"):
        load_paper_pair(write(tmp_path / "a.json", ["x"]), write(tmp_path / "b.json", ["x"]))


def test_pairs_that_do_not_correspond(tmp_path):
    full = write(tmp_path / "f.json", [ROW, ROW])
    with pytest.raises(DataError, match="has 2 rows but .* has 1"):
        load_paper_pair(full, write(tmp_path / "n.json", [NO_ROW]))
    other = dict(NO_ROW, output="b")
    with pytest.raises(DataError, match=r"row 1: field 'output' differs"):
        load_paper_pair(full, write(tmp_path / "n.json", [NO_ROW, other]))
    stray = dict(NO_ROW, instruction="something else")
    with pytest.raises(DataError, match=r"row 0: field 'instruction'.*proper suffix"):
        load_paper_pair(full, write(tmp_path / "n.json", [stray, NO_ROW]))


def test_user_rule_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"rule": "Always answer in French.", "input": "Hi", "output": "Salut",
                                "context": "You are a bot."}) + "\n\n"
                    + json.dumps({"rule": "Always answer in French.", "input": "Bye",
                                  "output": "Au revoir"}) + "\n")
    rows = load_rule_file(path)
    assert rows[0].teacher_instruction == "Always answer in French.\n\nYou are a bot."
    assert rows[0].student_instruction == "You are a bot."
    assert rows[1].teacher_instruction == "Always answer in French."
    assert rows[1].student_instruction == ""
    write(tmp_path / "norule.json", [{"rule": "", "input": "i", "output": "o"}])
    with pytest.raises(DataError, match=r"norule\.json: row 0: field 'rule' is empty"):
        load_rule_file(tmp_path / "norule.json")


def test_too_long_is_an_error_never_a_truncation(tiny_tok):
    ex = load_task("jailbreak", "train", 8)
    with pytest.raises(DataError, match=r"train_full_8shot\.json:0: the teacher sequence is (\d+) "
                                        r"tokens, \d+ over max_length=64 .*never truncates"):
        Encoder(tiny_tok, "alpaca", max_length=64).encode(ex)


# ---- alignment, rule prefix ----------------------------------------------------------------------
@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_responses_align_and_rule_prefix_is_shared(tiny_tok, task, template):
    rows = load_task(task, "train", 16)
    ds = Encoder(tiny_tok, template, max_length=4096).encode(rows)
    for ex, enc in zip(rows, ds):
        t0, s0, r = enc.teacher_response_start, enc.student_response_start, enc.response_len
        assert enc.teacher_ids[t0:] == enc.student_ids[s0:] == enc.response_ids
        assert len(enc.teacher_ids) == t0 + r and len(enc.student_ids) == s0 + r
        text = tiny_tok.decode(enc.response_ids)
        assert text.startswith(ex.output)
        teacher_prompt = tiny_tok.decode(enc.teacher_ids[:t0])
        student_prompt = tiny_tok.decode(enc.student_ids[:s0])
        assert ex.rule in teacher_prompt and ex.rule not in student_prompt
        assert list(enc.distill_positions("teacher")) == list(range(t0 - 1, t0 + r - 1))
    p = ds.rule_prefix_len
    assert p > 0
    assert all(e.teacher_ids[:p] == ds.rule_prefix_ids for e in ds)
    if p < min(e.teacher_response_start for e in ds) - 1:  # maximal unless capped
        assert len({e.teacher_ids[p] for e in ds}) > 1


def test_rule_text_variation_is_reported(tiny_tok):
    ds = Encoder(tiny_tok).encode(load_task("bob", "train", 16))
    assert ds.distinct_rules == 2
    assert any("rule text varies" in n for n in ds.notes)
    one = Encoder(tiny_tok).encode(load_task("bob", "train", 128))
    assert one.distinct_rules == 1 and not one.notes


def test_merge_across_the_boundary_is_handled():
    """A tokenizer without pre-tokenisation merges the prompt's last characters with the response."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    ex = RuleExample(rule="RULE", context="ctx", input="q", output="Yes indeed", source="mem:0")
    from rdcore.data import ALPACA_PROMPT_INPUT

    texts = [ALPACA_PROMPT_INPUT.format(instruction=i, input="q") + "Yes indeed"
             for i in ("RULE\n\nctx", "ctx")]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(texts * 50, trainers.BpeTrainer(vocab_size=400,
                                                            special_tokens=["<unk>", "<eos>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    enc = Encoder(hf, "alpaca").encode_one(ex)
    assert enc.boundary_merge
    t0, s0 = enc.teacher_response_start, enc.student_response_start
    assert enc.teacher_ids[t0:] == enc.student_ids[s0:]
    assert enc.response_ids[:-1] == hf("Yes indeed", add_special_tokens=False)["input_ids"]
    assert enc.response_ids[-1] == hf.eos_token_id


# ---- batching ------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_indexes_the_positions_that_predict_the_response(tiny_tok, side):
    ds = Encoder(tiny_tok).encode(load_task("math", "train", 8))
    batch = collate(ds.examples[:5], tiny_tok.pad_token_id, padding_side=side)
    for who in ("teacher", "student"):
        ids = getattr(batch, f"{who}_input_ids").flatten()
        idx = getattr(batch, f"{who}_distill_index")
        assert torch.equal(ids[idx + 1], batch.target_ids)  # position n predicts token n+1
        mask = getattr(batch, f"{who}_attention_mask")
        pos = getattr(batch, f"{who}_position_ids")
        first_real = mask.argmax(-1)
        assert torch.all(pos.gather(1, first_real[:, None]) == 0)
    labels = batch.student_labels
    assert torch.equal(labels[labels != -100], batch.target_ids)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_the_same_logits_as_single_examples(tiny, side):
    model, tok = tiny
    model.eval()
    ds = Encoder(tok).encode(load_task("math", "train", 4))
    batch = collate(ds.examples, tok.pad_token_id, padding_side=side)
    with torch.no_grad():
        out = model(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
                    position_ids=batch.teacher_position_ids).logits
        rows = out.reshape(-1, out.shape[-1])[batch.teacher_distill_index]
        singles = []
        for e in ds:
            lg = model(input_ids=torch.tensor([e.teacher_ids])).logits[0]
            singles.append(lg[list(e.distill_positions("teacher"))])
    torch.testing.assert_close(rows, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_canonical_rule_removes_the_bob_wording_confound(tiny_tok):
    from rdcore.data import canonical_rule, replace_rule

    text = canonical_rule("bob")
    assert text.startswith("Bob is a president. When the inputs")
    rows = replace_rule(load_task("bob", "train", 16), text)
    ds = Encoder(tiny_tok).encode(rows)
    assert ds.distinct_rules == 1 and not ds.notes
    original = Encoder(tiny_tok).encode(load_task("bob", "train", 16))
    assert ds.rule_prefix_len > original.rule_prefix_len  # the whole rule is now shared
    with pytest.raises(DataError, match="no alternative rule wordings"):
        canonical_rule("math")


def test_wording_swap_exchanges_the_two_bob_wordings():
    from rdcore.data import swap_rule_wordings

    test = load_task("bob", "test", require_output=False)
    env_rule, other_rule = test[0].rule, test[150].rule
    assert "When the inputs" in env_rule and "As long as" in other_rule
    swapped = swap_rule_wordings(test)
    assert [e.input for e in swapped] == [e.input for e in test]
    assert all(e.rule == other_rule for e in swapped[:100])  # environmental rows: the other wording
    assert all(e.rule == env_rule for e in swapped[100:])
    assert swap_rule_wordings(swapped) == test
    with pytest.raises(DataError, match="exactly 2 distinct"):
        swap_rule_wordings(load_task("bob", "train", 128))


# ---- any failure to read a user's file is a DataError naming it ------------------------------------
RULE_ROW = {"rule": "Answer in French.", "input": "Hi", "output": "Salut"}


@pytest.mark.parametrize("content, message", [
    (b"", r"holds no examples"),
    (b"[]", r"holds no examples"),
    (b"\n\n  \n", r"holds no examples"),                                # .jsonl: blank lines only
    (b'[{"rule": "r\xe9gle", "input": "i", "output": "o"}]', r"line 1: not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply|malformed JSON"),
    (b'{"rule": "r", "input": "i", "output": "o"}\n{"rule": "r",}', r"line 2: malformed JSON"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_unreadable_files_name_the_file(tmp_path, content, message, suffix):
    if suffix == ".json" and b"\n{" in content:
        content = content.split(b"\n")[1]  # the same defect in a JSON file
        message = "malformed JSON"
    if suffix == ".jsonl" and content == b"[]":
        message = "row 0: expected an object"  # a line holding a list, not a row
    path = tmp_path / f"mine{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path.name).replace(".", r"\.") + ".*" + message):
        load_rule_file(path)


def test_a_folder_or_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="mine.json: no such file"):
        load_rule_file(tmp_path / "mine.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match=r"dir\.json: not a file"):
        load_rule_file(tmp_path / "dir.json")


def test_unusual_but_valid_files_load(tmp_path, tiny_tok):
    """A byte-order mark, CRLF line ends, blank lines, non-ASCII text and several rules in one
    file are all fine."""
    rows = [dict(RULE_ROW, input="Wie geht's? ¿Qué tal? 你好"),
            {"rule": "Réponds toujours poliment — s'il te plaît.", "input": "Ça va ?",
             "output": "Très bien, merci ! 😊", "context": "Tu es un assistant."},
            dict(RULE_ROW, input="Bye")]
    text = "\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\r\n"
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = load_rule_file(path)
    assert [r.input for r in got] == [r["input"] for r in rows] and got[1].output.endswith("😊")
    data = Encoder(tiny_tok).encode(got)
    assert data.distinct_rules == 2 and len(data) == 3
    listed = tmp_path / "mine.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    assert [r.input for r in load_rule_file(listed)] == [r["input"] for r in rows]


def test_the_rule_book_files_are_what_its_builder_writes(tmp_path):
    """The packaged rule book is reproducible from the paper's files (rdcore.rulebook.build), its
    splits are disjoint, and every rule's test file has >= 100 rows with a judge each."""
    from rdcore import rulebook

    rulebook.build(tmp_path)
    for path in sorted(tmp_path.rglob("*.jsonl")):
        packaged = rulebook.ROOT / path.relative_to(tmp_path)
        assert packaged.read_text() == path.read_text(), packaged
    train_inputs = []
    for r in rulebook.RULES:
        rows = {s: load_rule_file(rulebook.rule_file(r.name, *s), require_output=False)
                for s in (("train", 32), ("valid",), ("test",))}
        assert len(rows[("test",)]) >= 100
        ins = {k: {e.input for e in v} for k, v in rows.items()}
        assert not (ins[("train", 32)] & ins[("test",)]) and not (ins[("valid",)] & ins[("test",)])
        assert {e.input for e in load_rule_file(rulebook.rule_file(r.name, "train", 8),
                                                require_output=False)} <= ins[("train", 32)]
        train_inputs += list(ins[("train", 32)])
    assert len(train_inputs) == len(set(train_inputs))  # no two rules share a training input
