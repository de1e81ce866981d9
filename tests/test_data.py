"""Tests of llama/training/data.py on the real Alpaca records and tokenizers: templates, targets, cache,
record checks, the held-out split and the batch loader. Run: python3 -m pytest -q tests/test_data.py
"""
import json
import shutil

import numpy as np
import pytest
import torch

from llama.training import data
from llama.training.records import ALPACA_PREAMBLE, TEMPLATES, format_prompt, load_records
from llama.training.data import IGNORE_INDEX, MicroBatch, load_dataset, make_micro_batch
from llama.training.batches import BatchLoader, eval_batches, split_dataset
from llama.errors import BadInput
from llama.model.tokenizer import Tokenizer


class Log(list):
    """A log= callable that keeps its lines."""

    def __call__(self, line):
        self.append(line)

    def text(self):
        return "\n".join(self)


@pytest.fixture(scope="module")
def llama_tokenizer(assets):
    return Tokenizer(str(assets / "llama" / "tokenizer.model"))


@pytest.fixture(scope="module")
def small_tokenizer(assets):
    return Tokenizer(str(assets / "stories260K" / "tok512.model"))


@pytest.fixture(scope="module")
def alpaca_records(assets):
    return json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def alpaca_1k(assets, llama_tokenizer, tmp_path_factory):
    """The 1k Alpaca file tokenised with the LLaMA tokenizer (cache in a temporary folder)."""
    return load_dataset(assets / "alpaca" / "alpaca_data_1k.json", llama_tokenizer,
                        cache_dir=tmp_path_factory.mktemp("cache"), log=Log())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def target_ids(batch: MicroBatch, row: int):
    targets = batch.targets[row]
    return targets[targets != IGNORE_INDEX].tolist()


# ---------------------------------------------------------------------------------------------
# templates


def test_alpaca_template_with_input():
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert format_prompt(record, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")


def test_alpaca_template_without_input():
    expected = ("Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request.\n\n### Instruction:\nName a colour.\n\n"
                "### Response:\n")
    assert format_prompt({"instruction": "Name a colour.", "input": "", "output": "Red"},
                         "alpaca") == expected
    assert format_prompt({"instruction": "Name a colour."}, "alpaca") == expected
    assert expected.startswith(ALPACA_PREAMBLE + "\n\n")


def test_plain_and_none_templates():
    with_input = {"instruction": "Translate.", "input": "Bonjour"}
    assert format_prompt(with_input, "plain") == \
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n"
    assert format_prompt({"instruction": "Translate."}, "plain") == \
        "### Instruction:\nTranslate.\n\n### Response:\n"
    assert format_prompt(with_input, "none") == "Translate.\nBonjour"
    assert format_prompt({"instruction": "Translate."}, "none") == "Translate."
    assert set(TEMPLATES) == {"alpaca", "plain", "none", "llama2", "llama3", "chatml"}


def test_chat_format_templates_wrap_one_instruction_as_their_models_expect():
    with_input = {"instruction": "Translate.", "input": "Bonjour"}
    assert format_prompt({"instruction": "Hi"}, "llama2") == "[INST] Hi [/INST]"
    assert format_prompt(with_input, "chatml") == \
        "<|im_start|>user\nTranslate.\n\nBonjour<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt({"instruction": "Hi"}, "llama3") == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_unknown_template_is_refused():
    with pytest.raises(BadInput, match="unknown template 'vicuna'"):
        format_prompt({"instruction": "x"}, "vicuna")


# ---------------------------------------------------------------------------------------------
# targets


def test_response_only_targets_decode_to_output(alpaca_1k, alpaca_records, llama_tokenizer):
    usable = [record for record in alpaca_records if record["output"]]  # one has no output
    batch = eval_batches(alpaca_1k, 16, llama_tokenizer.pad_id)[0]
    for row, record in enumerate(usable[:16]):
        targets = target_ids(batch, row)
        assert targets[-1] == llama_tokenizer.eos_id
        assert llama_tokenizer.decode(targets[:-1]) == record["output"]
        prompt_ids = llama_tokenizer.encode(format_prompt(record, "alpaca"), bos=True, eos=False)
        assert (batch.targets[row, :len(prompt_ids) - 1] == IGNORE_INDEX).all()
        assert batch.tokens[row, :len(prompt_ids)].tolist() == prompt_ids


def test_train_on_prompt_trains_every_token_after_bos(assets, small_tokenizer, tmp_path):
    dataset = load_dataset(assets / "alpaca" / "alpaca_data_1k.json", small_tokenizer,
                           train_on_prompt=True, cache_dir=tmp_path, log=Log())
    for index in range(20):
        ids, first_target = dataset[index]
        assert first_target == 1
        batch = make_micro_batch([dataset[index]], small_tokenizer.pad_id)
        assert batch.n_targets == len(ids) - 1
        assert target_ids(batch, 0) == ids[1:].tolist()


def test_targets_are_the_next_token(alpaca_1k, llama_tokenizer):
    for batch in eval_batches(alpaca_1k, 8, llama_tokenizer.pad_id)[:5]:
        trained = batch.targets[:, :-1] != IGNORE_INDEX
        assert trained.any()
        assert torch.equal(batch.targets[:, :-1][trained], batch.tokens[:, 1:][trained])
        assert (batch.targets[:, -1] == IGNORE_INDEX).all()


def test_padding_value_and_n_targets(small_tokenizer):
    pad_id = 7  # not a real id of these examples, so padding is easy to see
    examples = [(np.array([1, 10, 11, 12, 2], np.int32), 3), (np.array([1, 20, 2], np.int32), 1)]
    batch = make_micro_batch(examples, pad_id)
    assert batch.tokens.dtype == batch.targets.dtype == torch.long
    assert batch.tokens.tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, pad_id, pad_id]]
    assert batch.targets.tolist() == [[-100, -100, 12, 2, -100], [20, 2, -100, -100, -100]]
    assert batch.n_targets == 4


def test_plain_text_records_train_on_every_token(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "stories.jsonl",
                       [{"text": "Once upon a time there was a cat."}, {"text": "The end."}])
    dataset = load_dataset(path, small_tokenizer, cache_dir=tmp_path / "cache", log=Log())
    ids, first_target = dataset[0]
    assert ids.tolist() == small_tokenizer.encode("Once upon a time there was a cat.", True, True)
    assert first_target == 1


@pytest.mark.parametrize("end_target", ["eos", "bos", "none"])
def test_end_of_text_target_is_the_one_asked_for(tmp_path, small_tokenizer, end_target):
    """stories260K ends a story with BOS and never emits EOS: the end target is chosen."""
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat."}])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    end = {"eos": [small_tokenizer.eos_id], "bos": [small_tokenizer.bos_id], "none": []}
    for path, body in ((text, "The cat sat."), (alpaca, "Hi.")):
        dataset = load_dataset(path, small_tokenizer, end_target=end_target, log=Log())
        ids, first_target = dataset[0]
        expected_end = end[end_target]
        assert ids[len(ids) - len(expected_end):].tolist() == expected_end
        body_ids = small_tokenizer.encode(body, bos=False, eos=False)
        assert ids[len(ids) - len(expected_end) - len(body_ids):len(ids) - len(expected_end)] \
            .tolist() == body_ids
    caches = {load_dataset(text, small_tokenizer, end_target=e, log=Log()).cache_path
              for e in ("eos", "bos", "none")}
    assert len(caches) == 3  # the end target is part of the cache key
    with pytest.raises(BadInput, match=r"--eos_target 'eol' must be one of auto, eos, bos, none"):
        load_dataset(text, small_tokenizer, end_target="eol", log=Log())


def test_truncation_is_counted_and_vanished_responses_dropped(tmp_path, small_tokenizer):
    short = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    long_output = {"instruction": "Tell a story.", "input": "", "output": "and then " * 200}
    long_prompt = {"instruction": "Read this. " * 200, "input": "", "output": "Done."}
    path = write_jsonl(tmp_path / "mixed.jsonl", [short, long_output, long_prompt, short])
    log = Log()
    dataset = load_dataset(path, small_tokenizer, template="none", max_len=64, cache_dir=tmp_path,
                           log=log)
    assert len(dataset) == 3
    assert (dataset.n_truncated, dataset.n_dropped, dataset.n_skipped) == (1, 1, 0)
    assert [len(dataset[i][0]) for i in range(3)] == [len(dataset[0][0]), 64, len(dataset[0][0])]
    ids, first_target = dataset[1]
    assert ids[-1] != small_tokenizer.eos_id and first_target < 64  # cut, but a response is left
    assert log[1:] == [
        "note: 1 record longer than max_len 64, truncated to 64 tokens (line 2: "
        f"{dataset.named['truncated'][0][1]} tokens): the tokens past the cut are not trained",
        "note: 1 record dropped: its response starts past max_len 64 (line 3: response from "
        f"token {dataset.named['dropped'][0][2]} of {dataset.named['dropped'][0][1]}); raise "
        "--max_seq_len or use fewer virtual tokens to keep it"]
    assert dataset.named["truncated"][0][1] > 64 and dataset.named["dropped"][0][2] > 64


def test_notes_name_which_records_and_why_from_the_cache_too(tmp_path, small_tokenizer,
                                                             monkeypatch):
    """Each kind of record passed over is one note: how many (singular or plural), the first
    three by their place in the file, and why; a load from the cache says the same."""
    fine = {"instruction": "Say hi.", "output": "Hi."}
    long_output = {"instruction": "Tell a story.", "output": "and then " * 40}
    records = [fine, {"instruction": "No output."}, long_output, {"text": " "}, fine,
               {"instruction": "A number.", "output": 7}, long_output, {"title": "neither"},
               long_output, long_output]
    path = write_json(tmp_path / "d.json", records)
    log = Log()
    first = load_dataset(path, small_tokenizer, template="none", max_len=32,
                         cache_dir=tmp_path / "cache", log=log, max_len_said="--max_seq_len 48 "
                         "minus the 16 virtual tokens")
    n_long = sum(len(small_tokenizer.encode(text, False, False))  # BOS prompt output EOS
                 for text in ("Tell a story.", "and then " * 40)) + 2
    expected = [
        f"{path}: 6 examples, {first.n_tokens} tokens",
        "note: 4 records skipped (record index 1: field 'output' is missing; record index 3: "
        "field 'text' is empty; record index 5: field 'output' is a number, not a string; and "
        "1 more); pass --strict to refuse the file instead",
        "note: 4 records longer than --max_seq_len 48 minus the 16 virtual tokens, truncated to "
        f"32 tokens (record index 2: {n_long} tokens; record index 6: {n_long} tokens; record "
        f"index 8: {n_long} tokens; and 1 more): the tokens past the cut are not trained"]
    assert log == expected
    single = write_jsonl(tmp_path / "one.jsonl", [fine, {"instruction": "x", "output": ""}])
    log = Log()
    load_dataset(single, small_tokenizer, cache_dir="none", log=log)
    assert log[-1] == ("note: 1 record skipped (line 2: field 'output' is empty); pass --strict "
                       "to refuse the file instead")

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer ran although the cache was valid")

    monkeypatch.setattr(small_tokenizer, "encode", refuse)
    log = Log()
    load_dataset(path, small_tokenizer, template="none", max_len=32, cache_dir=tmp_path / "cache",
                 log=log, max_len_said="--max_seq_len 48 minus the 16 virtual tokens")
    assert log == [f"{path}: tokens from cache {first.cache_path}"] + expected


def test_every_example_dropped_is_refused(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl",
                       [{"instruction": "Read this. " * 50, "output": "Done."}])
    with pytest.raises(BadInput, match="longer than max_len 16"):
        load_dataset(path, small_tokenizer, max_len=16, cache_dir=tmp_path, log=Log())


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_is_written_then_reused_without_tokenizing(tmp_path, assets, small_tokenizer,
                                                         monkeypatch):
    """By default the cache lies under the user's cache folder ($XDG_CACHE_HOME), never beside
    the data, and the second load reads it instead of tokenising."""
    monkeypatch.delenv("LLAMA_TOKEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "data").mkdir()
    path = shutil.copy(assets / "alpaca" / "alpaca_data_1k.json", tmp_path / "data" / "alpaca.json")
    first = load_dataset(path, small_tokenizer, log=Log())
    cache_files = list((tmp_path / "xdg" / "llama-pp-prompt" / "tokens").glob("alpaca.*.npz"))
    assert cache_files == [first.cache_path]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["alpaca.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer ran although the cache was valid")

    monkeypatch.setattr(small_tokenizer, "encode", refuse)
    log = Log()
    second = load_dataset(path, small_tokenizer, log=log)
    assert "from cache" in log.text()
    assert np.array_equal(first.token_ids, second.token_ids)
    assert np.array_equal(first.offsets, second.offsets)
    assert np.array_equal(first.first_targets, second.first_targets)
    assert (second.n_skipped, second.n_truncated, second.n_dropped) == \
        (first.n_skipped, first.n_truncated, first.n_dropped)


def test_cache_folder_from_the_environment_or_off(tmp_path, small_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Once upon a time there was a cat."}])
    monkeypatch.setenv("LLAMA_TOKEN_CACHE", str(tmp_path / "elsewhere"))
    assert load_dataset(path, small_tokenizer, log=Log()).cache_path.parent == \
        tmp_path / "elsewhere"
    for off in ("none", "off"):
        monkeypatch.setenv("LLAMA_TOKEN_CACHE", off)
        assert load_dataset(path, small_tokenizer, log=Log()).cache_path is None
        monkeypatch.setenv("LLAMA_TOKEN_CACHE", str(tmp_path / "elsewhere"))
        assert load_dataset(path, small_tokenizer, cache_dir=off, log=Log()).cache_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "elsewhere"]


def test_cache_that_cannot_be_written_is_a_note(tmp_path, small_tokenizer):
    """A folder that cannot be made (here: under a regular file, which stops root too)."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Once upon a time there was a cat."}])
    (tmp_path / "a_file").write_text("")
    log = Log()
    dataset = load_dataset(path, small_tokenizer, cache_dir=tmp_path / "a_file" / "cache", log=log)
    assert len(dataset) == 1 and dataset.cache_path is None
    notes = [line for line in log if "token cache" in line]
    assert len(notes) == 1 and notes[0].startswith("note: could not write the token cache ")
    assert "training goes on without it" in notes[0] and "--cache_dir" in notes[0]


def test_any_change_gives_a_new_cache_file(tmp_path, assets, small_tokenizer, llama_tokenizer):
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:30]
    path = write_json(tmp_path / "d.json", records)
    cache = tmp_path / "cache"

    def cache_file(data_path=path, tokenizer=small_tokenizer, **options):
        return load_dataset(data_path, tokenizer, cache_dir=cache, log=Log(), **options).cache_path

    base = cache_file()
    variants = [cache_file(max_len=256), cache_file(template="plain"),
                cache_file(train_on_prompt=True), cache_file(tokenizer=llama_tokenizer),
                cache_file(data_path=write_json(tmp_path / "d.json", records[:29]))]
    assert len({base, *variants}) == 6
    assert all(p.exists() for p in variants)


def test_corrupt_cache_is_rebuilt(tmp_path, assets, small_tokenizer):
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:30]
    path = write_json(tmp_path / "d.json", records)
    good = load_dataset(path, small_tokenizer, log=Log())
    good.cache_path.write_bytes(b"PK\x03\x04 this is not a zip file")
    log = Log()
    rebuilt = load_dataset(path, small_tokenizer, log=log)
    assert "unreadable" in log.text() and "rebuilding" in log.text()
    assert np.array_equal(good.token_ids, rebuilt.token_ids)
    with np.load(rebuilt.cache_path, allow_pickle=False) as arrays:
        assert np.array_equal(arrays["token_ids"], good.token_ids)


def test_cache_with_inconsistent_arrays_is_rebuilt(tmp_path, assets, small_tokenizer):
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:10]
    path = write_json(tmp_path / "d.json", records)
    good = load_dataset(path, small_tokenizer, log=Log())
    with good.cache_path.open("wb") as file:  # a valid npz whose offsets lack their last entry
        np.savez(file, token_ids=good.token_ids, offsets=good.offsets[:-1],
                 first_targets=good.first_targets, stats=np.zeros(3, np.int64),
                 format=np.array(data.CACHE_FORMAT_VERSION))
    log = Log()
    rebuilt = load_dataset(path, small_tokenizer, log=log)
    assert "rebuilding" in log.text()
    assert np.array_equal(good.offsets, rebuilt.offsets)


# ---------------------------------------------------------------------------------------------
# reading records


def test_json_and_jsonl_give_the_same_records(tmp_path, alpaca_records):
    sample = alpaca_records[:40]
    from_json, _ = load_records(write_json(tmp_path / "a.json", sample), log=Log())
    from_jsonl, _ = load_records(write_jsonl(tmp_path / "a.jsonl", sample), log=Log())
    assert from_json == from_jsonl == [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
        for r in sample]


def test_missing_input_field_means_no_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi.", "output": "Hello."}])
    records, n_skipped = load_records(path, log=Log())
    assert records == [{"instruction": "Hi.", "input": "", "output": "Hello."}]
    assert n_skipped == 0


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output"}\n]')
    with pytest.raises(BadInput, match=r"bad\.json:3:\d+: not valid JSON"):
        load_records(path, log=Log())


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n{"text": "fine"}\n')
    with pytest.raises(BadInput, match=r"bad\.jsonl line 3: not valid JSON"):
        load_records(path, log=Log())


BAD_RECORDS = [
    ["not an object"],
    {"instruction": "No output here."},
    {"instruction": "Numbers.", "output": 42},
    {"instruction": "", "output": "Empty instruction."},
    {"text": "   "},
    {"title": "Neither kind."},
    {"instruction": "Null input.", "input": None, "output": "x"},
]


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = {"instruction": "Say hi.", "output": "Hi."}
    path = write_json(tmp_path / "d.json", [good] + BAD_RECORDS + [{"text": "A story."}])
    log = Log()
    records, n_skipped = load_records(path, log=log)
    assert n_skipped == len(BAD_RECORDS)
    assert len(records) == 2
    assert log == [f"note: {path}: 7 records skipped (record index 1: a list, not an object; "
                   "record index 2: field 'output' is missing; record index 3: field 'output' is "
                   "a number, not a string; and 4 more); pass --strict to refuse the file "
                   "instead"]


def test_real_alpaca_record_without_output_is_skipped(alpaca_1k):
    assert alpaca_1k.n_skipped == 1  # record 284 of the real file has an empty output
    assert len(alpaca_1k) == 999


@pytest.mark.parametrize("position", range(len(BAD_RECORDS)))
def test_strict_refuses_naming_the_record(tmp_path, position):
    good = {"instruction": "Say hi.", "output": "Hi."}
    path = write_json(tmp_path / "d.json", [good, good, BAD_RECORDS[position]])
    with pytest.raises(BadInput, match=r"d\.json, record index 2: "):
        load_records(path, strict=True, log=Log())


def test_strict_names_field_and_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"},
                                              {"instruction": "c", "output": ""}])
    with pytest.raises(BadInput, match=r"d\.jsonl, line 2: field 'output' is empty"):
        load_records(path, strict=True, log=Log())


def test_strict_refuses_even_when_the_cache_exists(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"x": 1}])
    load_dataset(path, small_tokenizer, log=Log())
    with pytest.raises(BadInput, match="line 2"):
        load_dataset(path, small_tokenizer, strict=True, log=Log())


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "Café", "output": "ok"}]'.encode("latin-1"))
    with pytest.raises(BadInput, match=r"latin1\.json is not UTF-8.*re-encode it as UTF-8"):
        load_records(path, log=Log())


@pytest.mark.parametrize("content", ["", "[]", "\n\n", '[{"instruction": "", "output": ""}]'])
def test_empty_dataset_is_refused(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(BadInput, match="no usable records"):
        load_records(path, log=Log())


def test_missing_file_and_json_object_are_refused(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_records(tmp_path / "nowhere.json", log=Log())
    path = tmp_path / "object.json"
    path.write_text('{"data":\n [1, 2]}')
    with pytest.raises(BadInput, match="line 1"):
        load_records(path, log=Log())


# ---------------------------------------------------------------------------------------------
# held-out split


def example_keys(dataset):
    return [tuple(dataset[i][0].tolist()) for i in range(len(dataset))]


def test_split_is_deterministic_and_disjoint(alpaca_1k):
    train, held_out = split_dataset(alpaca_1k, eval_fraction=0.05, seed=3)
    again_train, again_held_out = split_dataset(alpaca_1k, eval_fraction=0.05, seed=3)
    assert example_keys(held_out) == example_keys(again_held_out)
    assert example_keys(train) == example_keys(again_train)
    assert len(held_out) == 49 and len(train) == 950
    assert not set(example_keys(train)) & set(example_keys(held_out))
    assert sorted(example_keys(train) + example_keys(held_out)) == sorted(example_keys(alpaca_1k))
    assert train.n_tokens + held_out.n_tokens == alpaca_1k.n_tokens
    _, other_held_out = split_dataset(alpaca_1k, eval_fraction=0.05, seed=4)
    assert example_keys(other_held_out) != example_keys(held_out)


def test_split_holds_out_at_least_one_and_refuses_empty_train(alpaca_1k):
    two = alpaca_1k.select([0, 1])
    train, held_out = split_dataset(two, eval_fraction=0.01)
    assert (len(train), len(held_out)) == (1, 1)
    train, held_out = split_dataset(two, eval_fraction=0.0)
    assert (len(train), len(held_out)) == (2, 0)
    train, held_out = split_dataset(alpaca_1k.select([0, 1, 2]), eval_fraction=0.9)
    assert (len(train), len(held_out)) == (1, 2)
    with pytest.raises(BadInput, match="leaves none to train on"):
        split_dataset(alpaca_1k.select([]), eval_fraction=0.05)
    with pytest.raises(BadInput, match="eval_fraction"):
        split_dataset(alpaca_1k, eval_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# batch loader


def batch_keys(global_batch):
    return [row.tolist() for micro in global_batch for row in micro.tokens]


def test_loader_shapes(alpaca_1k, llama_tokenizer):
    loader = BatchLoader(alpaca_1k, global_batch_size=12, micro_batch_size=4,
                         pad_id=llama_tokenizer.pad_id)
    micro_batches = loader.next_global_batch()
    assert len(micro_batches) == 3
    for micro in micro_batches:
        assert micro.tokens.shape == micro.targets.shape and micro.tokens.shape[0] == 4
        longest = max(int((micro.targets[b] != IGNORE_INDEX).nonzero().max()) + 2
                      for b in range(4))
        assert micro.tokens.shape[1] == longest  # padded only to its own longest sequence
        assert micro.n_targets == int((micro.targets != IGNORE_INDEX).sum())
    assert loader.steps_per_epoch == 999 // 12


def test_loader_is_deterministic_per_seed(alpaca_1k):
    def first_batches(seed):
        loader = BatchLoader(alpaca_1k, 8, 4, pad_id=0, seed=seed)
        return [batch_keys(loader.next_global_batch()) for _ in range(3)]

    assert first_batches(0) == first_batches(0)
    assert first_batches(0) != first_batches(1)


def test_loader_resumes_exactly(alpaca_1k):
    loader = BatchLoader(alpaca_1k, 8, 2, pad_id=0, seed=5)
    for _ in range(7):
        loader.next_global_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a round trip as plain ints
    expected = [batch_keys(loader.next_global_batch()) for _ in range(3)]
    resumed = BatchLoader(alpaca_1k, 8, 2, pad_id=0, seed=5)
    resumed.load_state_dict(state)
    assert [batch_keys(resumed.next_global_batch()) for _ in range(3)] == expected
    with pytest.raises(BadInput, match="does not fit"):
        resumed.load_state_dict({"epoch": 0, "position": 10_000})


def test_loader_rolls_over_epochs(alpaca_1k):
    ten = alpaca_1k.select(range(10))
    loader = BatchLoader(ten, 4, 2, pad_id=0, seed=0)
    assert loader.steps_per_epoch == 2
    epoch_0 = batch_keys(loader.next_global_batch()) + batch_keys(loader.next_global_batch())
    assert loader.state_dict() == {"epoch": 0, "position": 8}
    epoch_1 = batch_keys(loader.next_global_batch())
    assert loader.state_dict() == {"epoch": 1, "position": 4}
    assert len(set(map(tuple, epoch_0))) == 8  # no example twice within an epoch
    assert epoch_1 != epoch_0[:4]


def test_loader_without_drop_last_serves_the_remainder(alpaca_1k):
    ten = alpaca_1k.select(range(10))
    loader = BatchLoader(ten, 4, 2, pad_id=0, drop_last=False)
    sizes = [[len(m.tokens) for m in loader.next_global_batch()] for _ in range(4)]
    assert sizes == [[2, 2], [2, 2], [2], [2, 2]]
    assert loader.steps_per_epoch == 3


def test_loader_refuses_bad_sizes(alpaca_1k):
    with pytest.raises(BadInput, match="does not divide"):
        BatchLoader(alpaca_1k, global_batch_size=10, micro_batch_size=4, pad_id=0)
    with pytest.raises(BadInput, match="fewer than one global batch"):
        BatchLoader(alpaca_1k.select(range(3)), global_batch_size=4, micro_batch_size=2,
                    pad_id=0)


def test_eval_batches_cover_every_example_in_order(alpaca_1k):
    subset = alpaca_1k.select(range(11))
    batches = eval_batches(subset, 4, pad_id=0)
    assert [len(b.tokens) for b in batches] == [4, 4, 3]
    rows = [row[:len(subset[i][0])].tolist()
            for i, row in enumerate(r for b in batches for r in b.tokens)]
    assert rows == [subset[i][0].tolist() for i in range(11)]
