"""Loading, validation, the prompt template, sample ids, tokenisation and batching.

The real files under the repo's sibling `shared/data/` check the template byte for byte and the
loader on real text; everything else uses small files written into tmp_path.
"""

import json
import logging
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pocl_ray.data import (
    IGNORE_INDEX,
    RESPONSE_CUE,
    DataError,
    Record,
    bos_prefix,
    build_prompt,
    collate,
    load_records,
    prompt_batch,
    sample_id,
    split_train_eval,
    tokenize_record,
    tokenize_records,
)
from pocl_ray.models import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent"
)

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Summarise the text.\n\n### Input:\nThe cat sat on the mat.\n\n### Response:\n"
)

GOOD_MINI = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "topic": "math"}
GOOD_DOLLY = {
    "instruction": "Summarise the text.",
    "context": "The cat sat on the mat.",
    "response": "A cat sat.",
    "category": "summarization",
}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are objects (dumped), str (written as is) or bytes (written raw)."""
    with path.open("wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


def make_record(instruction: str, input: str, output: str) -> Record:
    prompt = build_prompt(instruction, input)
    return Record(
        sample_id=sample_id(prompt, output),
        instruction=instruction,
        input=input,
        references=(output,),
        prompt=prompt,
        source="mem",
        line=1,
    )


@pytest.fixture(scope="module")
def tok():
    texts = [NO_INPUT, WITH_INPUT, "word ctx answer " * 20, "The quick brown fox. 0123456789"]
    return train_tokenizer(texts, vocab_size=512)


# ---------------------------------------------------------------- template and real data


def test_build_prompt_both_forms():
    assert build_prompt("Name a primary colour.") == NO_INPUT
    assert build_prompt("Name a primary colour.", "") == NO_INPUT
    assert build_prompt("Summarise the text.", "The cat sat on the mat.") == WITH_INPUT


@needs_shared
@pytest.mark.parametrize("name,count", [("dollyeval.jsonl", 500), ("selfinst.jsonl", 242)])
def test_template_reproduces_every_prompt_field(name, count):
    lines = (SHARED_DATA / name).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert len(rows) == count
    mismatched = [
        i
        for i, r in enumerate(rows, 1)
        if build_prompt(r["instruction"], r["input"]) != r["prompt"]
    ]
    assert mismatched == []
    # the loader checks the prompt field too, so a clean load is a second, independent check
    result = load_records(SHARED_DATA / name)
    assert (result.n_read, result.n_accepted, result.rejected) == (count, count, [])
    assert [r.prompt for r in result.records] == [r["prompt"] for r in rows]
    assert all(set(r.extra) == {"topic"} for r in result.records)


@needs_shared
def test_dolly_train_loads_with_zero_rejects():
    result = load_records(SHARED_DATA / "dolly-train.jsonl")
    assert (result.n_read, result.n_accepted, result.rejected) == (1923, 1923, [])
    first = result.records[0]
    assert first.instruction == "What is Ayurveda?" and first.input == ""
    assert first.references[0].startswith("Ayurveda is a natural system")
    assert first.extra == {"category": "general_qa"} and first.line == 1
    assert len({r.sample_id for r in result.records}) == 1923


# ---------------------------------------------------------------- schemas and formats


def test_both_schemas_map_to_one_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_MINI, GOOD_DOLLY])
    mini, dolly = load_records(path).records
    assert (mini.instruction, mini.input, mini.references) == ("Add 2 and 3.", "", ("5",))
    assert mini.extra == {"topic": "math"} and mini.line == 1 and mini.source == str(path)
    assert dolly.prompt == WITH_INPUT and dolly.references == ("A cat sat.",)
    assert dolly.extra == {"category": "summarization"} and dolly.line == 2
    assert dolly.sample_id == sample_id(WITH_INPUT, "A cat sat.")


def test_output_list_gives_several_references(tmp_path):
    row = {"instruction": "Say hi.", "input": "", "output": ["Hi.", "Hello.", "Hey."]}
    (rec,) = load_records(write_jsonl(tmp_path / "sni.jsonl", [row])).records
    assert rec.references == ("Hi.", "Hello.", "Hey.")
    assert rec.sample_id == sample_id(rec.prompt, "Hi.")  # the first one is the target


def test_json_list_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD_MINI, GOOD_DOLLY]), encoding="utf-8")
    result = load_records(path)
    assert [r.line for r in result.records] == [1, 2]
    assert result.records[1].prompt == WITH_INPUT


def test_parquet_file_with_list_output_and_nulls(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "instruction": ["Say hi.", "Add 2 and 3."],
            "input": [None, "numbers"],  # a null input is an absent input
            "output": [["Hi.", "Hello."], ["5"]],
            "level": [1, 2],
        }
    )
    pq.write_table(table, path)
    a, b = load_records(path).records
    assert a.input == "" and a.references == ("Hi.", "Hello.") and a.extra == {"level": 1}
    assert b.prompt == build_prompt("Add 2 and 3.", "numbers") and b.line == 2


def test_directory_reads_data_files_in_sorted_order(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [GOOD_DOLLY])
    (folder / "a.json").write_text(json.dumps([GOOD_MINI]), encoding="utf-8")
    (folder / "notes.txt").write_text("not data", encoding="utf-8")
    result = load_records(folder)
    assert [Path(r.source).name for r in result.records] == ["a.json", "b.jsonl"]
    assert load_records(folder, format="dir").n_read == 2


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()
    return datasets


def test_hf_format_on_local_jsonl(tmp_path, hf_cache):
    # columnar loading gives every row every column (null where absent): nulls are ignored
    mixed = {"instruction": "Say hi.", "output": ["Hi.", "Hello."]}
    path = write_jsonl(tmp_path / "data.jsonl", [mixed, mixed | {"output": ["Yo."]}])
    result = load_records(path, format="hf", split="validation")
    assert [r.references for r in result.records] == [("Hi.", "Hello."), ("Yo.",)]
    assert result.records[0].extra == {} and result.records[1].line == 2


def test_hf_format_on_save_to_disk_folders(tmp_path, hf_cache):
    rows = {"instruction": ["Say hi.", "Add 2 and 3."], "input": ["", ""], "output": ["Hi.", "5"]}
    ds = hf_cache.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    assert [r.references[0] for r in load_records(tmp_path / "one").records] == ["Hi.", "5"]
    hf_cache.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert load_records(tmp_path / "dict", format="hf", split="test").n_accepted == 2
    with pytest.raises(DataError, match=r"no split 'train'.*\['test'\]"):
        load_records(tmp_path / "dict", format="hf")


def test_limit_stops_after_that_many_records_read(tmp_path):
    rows = [GOOD_MINI | {"output": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    result = load_records(path, limit=3)
    assert result.n_read == 3 and [r.references[0] for r in result.records] == ["0", "1", "2"]
    # bad records count towards the limit: it bounds reading, not accepting
    rows[1] = {"instruction": "x"}
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    result = load_records(path, limit=3, on_bad_record="skip")
    assert (result.n_read, result.n_accepted, len(result.rejected)) == (3, 2, 1)


def test_blank_lines_are_not_records_but_keep_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ["", GOOD_MINI, "   ", "\r", GOOD_DOLLY, ""])
    result = load_records(path)
    assert result.n_read == 2 and [r.line for r in result.records] == [2, 5]


def test_windows_line_endings_and_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_MINI).encode() + b"\r\n")
    assert load_records(path).records[0].references == ("5",)


# ---------------------------------------------------------------- sample ids and split


def test_sample_id_is_a_fixed_hash():
    # computed once and pasted: a change here changes every stored scores table
    assert sample_id(NO_INPUT, "Red.") == "3f648feb5c5f89a6"
    assert sample_id(WITH_INPUT, "A cat sat.") == "a407591616bb8702"


def test_sample_id_ignores_whitespace_and_unicode_form_only():
    base = sample_id(NO_INPUT, "Café au lait.")
    crlf = NO_INPUT.replace("\n", "\r\n")
    decomposed = unicodedata.normalize("NFD", "Café au lait.")
    assert sample_id(crlf, "  Café   au\tlait.\n") == base
    assert sample_id("  " + NO_INPUT, decomposed) == base
    assert sample_id(NO_INPUT, "Cafe au lait.") != base
    assert sample_id("ab", "c") != sample_id("a", "bc")  # the separator keeps fields apart


def test_split_is_deterministic_by_id_not_order():
    records = [make_record(f"Question {i}?", "", f"Answer {i}.") for i in range(400)]
    train, held = split_train_eval(records, 0.25, seed=0)
    assert len(train) + len(held) == 400 and 60 < len(held) < 140
    train2, held2 = split_train_eval(records[::-1], 0.25, seed=0)
    assert {r.sample_id for r in held2} == {r.sample_id for r in held}
    _, other = split_train_eval(records, 0.25, seed=1)
    assert {r.sample_id for r in other} != {r.sample_id for r in held}
    assert split_train_eval(records, 0.0) == (records, [])


# ---------------------------------------------------------------- tokenisation


def test_labels_mask_the_prompt_and_eos_ends_the_response(tok):
    rec = make_record("Summarise the text.", "The cat sat on the mat.", "A cat sat.")
    ex = tokenize_record(rec, tok, max_prompt_length=256, max_length=512)
    prompt_ids = tok(rec.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok("A cat sat.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    assert ex.prompt_length == len(prompt_ids) and ex.sample_id == rec.sample_id
    assert not ex.prompt_truncated and not ex.response_truncated


def bos_tokenizer(tok):
    """`tok` made Llama-like: its post-processor puts BOS before every text by default."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    inner = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    bos = tok.eos_token  # the tiny vocabulary has no separate BOS; any special token will do
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=bos, eos_token=bos,
                                   pad_token=tok.pad_token)  # fmt: skip


def test_bos_goes_before_the_prompt_where_the_tokenizer_adds_one(tok):
    rec = make_record("Summarise the text.", "The cat sat.", "A cat sat.")
    assert bos_prefix(tok) == ()  # GPT-2 style: nothing added
    llama_like = bos_tokenizer(tok)
    assert bos_prefix(llama_like) == (llama_like.bos_token_id,)
    plain = tokenize_record(rec, tok, max_prompt_length=256, max_length=512)
    ex = tokenize_record(rec, llama_like, max_prompt_length=256, max_length=512)
    assert ex.input_ids == [llama_like.bos_token_id] + plain.input_ids
    assert ex.prompt_length == plain.prompt_length + 1 and ex.labels[0] == IGNORE_INDEX
    assert ex.sample_id == plain.sample_id
    cut = tokenize_record(make_record("Say it.", "ctx " * 300, "ok"), llama_like,
                          max_prompt_length=60, max_length=100)  # fmt: skip
    assert cut.prompt_length <= 60 and cut.input_ids[0] == llama_like.bos_token_id


def test_long_response_is_cut_to_max_length_without_eos(tok):
    rec = make_record("Say it.", "", "answer " * 200)
    ex = tokenize_record(rec, tok, max_prompt_length=64, max_length=80)
    assert len(ex.input_ids) == len(ex.labels) == 80
    assert ex.response_truncated and ex.input_ids[-1] != tok.eos_token_id


def _prompt_text(tok, ex) -> str:
    return tok.decode(ex.input_ids[: ex.prompt_length], clean_up_tokenization_spaces=False)


def test_long_input_is_cut_first_and_the_response_cue_survives(tok):
    rec = make_record("Summarise the text.", "ctx " * 300, "ok")
    ex = tokenize_record(rec, tok, max_prompt_length=100, max_length=200)
    text = _prompt_text(tok, ex)
    assert ex.prompt_truncated and ex.prompt_length <= 100
    assert text.endswith("\n\n" + RESPONSE_CUE)
    assert "### Instruction:\nSummarise the text.\n\n### Input:\nctx ctx" in text
    assert ex.labels[: ex.prompt_length] == [IGNORE_INDEX] * ex.prompt_length
    assert ex.input_ids[-1] == tok.eos_token_id  # the response is untouched


def test_long_instruction_is_cut_after_the_input_is_gone(tok):
    rec = make_record("word " * 300, "ctx " * 50, "ok")
    ex = tokenize_record(rec, tok, max_prompt_length=60, max_length=100)
    text = _prompt_text(tok, ex)
    assert ex.prompt_length <= 60 and text.endswith("\n\n" + RESPONSE_CUE)
    assert "### Input:" not in text and "### Instruction:\nword word" in text


def test_cut_inside_multibyte_characters_leaves_no_replacement_char(tok):
    rec = make_record("Translate.", "é€😀" * 100, "ok")
    ex = tokenize_record(rec, tok, max_prompt_length=90, max_length=120)
    text = _prompt_text(tok, ex)
    assert ex.prompt_length <= 90 and text.endswith(RESPONSE_CUE) and "\ufffd" not in text


def test_template_longer_than_max_prompt_length_is_an_error(tok):
    with pytest.raises(DataError, match="template alone.*max_prompt_length=16"):
        tokenize_record(make_record("Hi", "", "ok"), tok, max_prompt_length=16, max_length=32)


def test_tokenize_records_counts_truncations(tok, caplog):
    records = [
        make_record("Say it.", "", "ok"),
        make_record("Say it.", "ctx " * 300, "ok"),
        make_record("Say it.", "", "answer " * 300),
    ]
    with caplog.at_level(logging.INFO, logger="pocl_ray.data"):
        result = tokenize_records(records, tok, max_prompt_length=64, max_length=96)
    assert (result.n_prompt_truncated, result.n_response_truncated) == (1, 1)
    assert len(result.examples) == 3 and "1 prompts cut" in caplog.text


# ---------------------------------------------------------------- batching


def test_collate_pads_right_and_masks_padding(tok):
    records = [make_record("Say it.", "", "ok"), make_record("Summarise.", "ctx " * 5, "a b c")]
    examples = tokenize_records(records, tok, max_prompt_length=64, max_length=96).examples
    batch = collate(examples, tok.pad_token_id)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths) :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, min(lengths) :] == tok.pad_token_id).all()
    assert batch["labels"][short, : min(lengths)].tolist() == examples[short].labels
    left = collate(examples, tok.pad_token_id, pad_left=True)
    assert left["input_ids"][short, -min(lengths) :].tolist() == examples[short].input_ids


def test_prompt_batch_pads_left():
    ids, mask = prompt_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ---------------------------------------------------------------- bad input

BAD_CASES = [
    # id, line as written, field, words the reason must contain
    ("malformed_json", '{"instruction": "x", "output": }', "<json>", "not valid JSON"),
    ("not_an_object", '["instruction", "output"]', "<record>", "expected a JSON object"),
    ("no_instruction", {"input": "", "output": "y"}, "instruction", "missing"),
    ("no_response", {"instruction": "x", "context": ""}, "response", "missing"),
    ("no_output", {"instruction": "x", "input": ""}, "output", "missing"),
    (
        "no_schema",
        {"instruction": "x", "answer": "y"},
        "output/response",
        "'output' (MiniLLM schema)",
    ),
    (
        "empty_response",
        {"instruction": "x", "context": "", "response": " \n\t"},
        "response",
        "empty",
    ),
    ("empty_instruction", {"instruction": "  ", "output": "y"}, "instruction", "empty"),
    ("number_instruction", {"instruction": 42, "output": "y"}, "instruction", "has type int (42)"),
    ("dict_context", {"instruction": "x", "context": {}, "response": "y"}, "context", "string"),
    (
        "output_item_number",
        {"instruction": "x", "output": ["a", 3]},
        "output",
        "item 2 has type int",
    ),
    ("output_item_empty", {"instruction": "x", "output": ["a", ""]}, "output", "item 2 is empty"),
    ("output_empty_list", {"instruction": "x", "output": []}, "output", "empty list"),
    ("output_number", {"instruction": "x", "output": 5}, "output", "list of strings"),
    (
        "both_outputs",
        {"instruction": "x", "output": "a", "response": "b"},
        "output/response",
        "both",
    ),
    (
        "prompt_differs",
        {"instruction": "x", "input": "", "output": "y", "prompt": build_prompt("x") + " "},
        "prompt",
        f"at char {len(build_prompt('x'))}",
    ),
    ("lone_surrogate", '{"instruction": "x\\ud800", "output": "y"}', "instruction", "surrogate"),
    ("lone_surrogate_ref", '{"instruction": "x", "output": ["\\udfff"]}', "output", "surrogate"),
    ("bad_utf8", b'{"instruction": "caf\xe9", "output": "y"}', "<encoding>", "not valid UTF-8"),
]


@pytest.mark.parametrize(
    "row,field,words", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_record_raises_naming_file_line_and_field(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_MINI, "", row, GOOD_DOLLY])
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    assert (err.source, err.line, err.field) == (str(path), 3, field)
    message = str(err)
    assert message.startswith(f"{path}:3: ") and words in message
    assert f"'{field}'" in message or field.startswith("<") or "/" in field
    assert "data.on_bad_record=skip" in message


@pytest.mark.parametrize(
    "row,field,words", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_record_is_skipped_and_written_to_rejects(tmp_path, row, field, words, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_MINI, "", row, GOOD_DOLLY])
    rejects = tmp_path / "out" / "rejects.jsonl"
    with caplog.at_level(logging.WARNING, logger="pocl_ray.data"):
        result = load_records(path, on_bad_record="skip", rejects_path=rejects)
    assert (result.n_read, result.n_accepted, len(result.rejected)) == (3, 2, 1)
    assert result.n_accepted + len(result.rejected) == result.n_read
    written = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert written == result.rejected
    (reject,) = written
    assert (reject["source"], reject["line"], reject["field"]) == (str(path), 3, field)
    assert words in reject["reason"] and reject["raw"]
    assert "skipped 1 of 3 records" in caplog.text and str(rejects) in caplog.text


def test_duplicate_sample_id_rejects_the_second_and_names_the_first(tmp_path):
    twin = GOOD_MINI | {"output": " 5 ", "topic": "other"}  # same id after normalisation
    path = write_jsonl(tmp_path / "dup.jsonl", [GOOD_MINI, GOOD_DOLLY, twin])
    with pytest.raises(DataError, match=r"dup.jsonl:3: duplicate sample id .* as .*dup.jsonl:1"):
        load_records(path)
    result = load_records(path, on_bad_record="skip")
    assert [r.line for r in result.records] == [1, 2]
    assert result.rejected[0]["field"] == "sample_id" and result.rejected[0]["line"] == 3


def test_bad_record_in_json_or_parquet_is_located_by_record_number(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD_MINI, {"instruction": "x", "output": ""}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"data.json: record 2: field 'output' is empty"):
        load_records(path)
    pq_path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["y", None]}), pq_path)
    with pytest.raises(DataError, match=r"data.parquet: record 2: no response field"):
        load_records(pq_path)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_missing_or_unreadable_source_is_always_an_error(tmp_path, policy):
    for missing in (tmp_path / "nope.jsonl", tmp_path / "nope.parquet", tmp_path / "nope"):
        with pytest.raises(DataError, match=str(missing)):
            load_records(missing, on_bad_record=policy)
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path, format="jsonl", on_bad_record=policy)  # a folder, not a file
    with pytest.raises(DataError, match="no .*files in this folder"):
        load_records(tmp_path, on_bad_record=policy)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read as parquet"):
        load_records(junk, on_bad_record=policy)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}: no records"):
        load_records(path, on_bad_record="skip")


def test_all_records_rejected_is_an_error_after_writing_rejects(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"instruction": "x"}, "{oops"])
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(DataError, match=r"all_bad.jsonl: all 2 records were rejected"):
        load_records(path, on_bad_record="skip", rejects_path=rejects)
    assert len(rejects.read_text(encoding="utf-8").splitlines()) == 2


def test_bad_json_list_files_name_the_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "x",\n "output": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json:3: not valid JSON"):
        load_records(broken)
    jsonl_named_json = tmp_path / "lines.json"
    write_jsonl(jsonl_named_json, [GOOD_MINI, GOOD_DOLLY])
    with pytest.raises(DataError, match="rename it to .jsonl or set data.format=jsonl"):
        load_records(jsonl_named_json)
    assert load_records(jsonl_named_json, format="jsonl").n_accepted == 2
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps(GOOD_MINI), encoding="utf-8")
    with pytest.raises(DataError, match="top level is a JSON dict; expected a list"):
        load_records(obj)


def test_unknown_extension_asks_for_a_format(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(json.dumps(GOOD_MINI), encoding="utf-8")
    with pytest.raises(DataError, match="set data.format"):
        load_records(path)


def test_rejects_file_keeps_a_lone_surrogate_as_its_escape(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(
        '[{"instruction": "x\\ud800", "output": "y"}, {"instruction": "a", "output": "b"}]',
        encoding="utf-8",
    )
    rejects = tmp_path / "rejects.jsonl"
    result = load_records(path, on_bad_record="skip", rejects_path=rejects)
    assert result.n_accepted == 1
    (reject,) = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert reject["line"] == 1 and json.loads(reject["raw"])["instruction"] == "x\ud800"


def test_data_module_never_imports_ray():
    code = "import sys; sys.modules['ray'] = None; import pocl_ray.data"
    subprocess.run([sys.executable, "-c", code], check=True)
