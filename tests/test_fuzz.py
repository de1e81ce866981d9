"""Fuzz and bad input: every loader, fed randomly damaged files (bit flips, truncation, random
bytes, appended junk, wrong values; seeded, a bounded number of cases each, a time bound per
case), either loads or stops with the project's own BadInput, never a raw error from inside
torch, numpy or sentencepiece, never a hang. Where the format itself detects a kind of damage
(a sha256 recorded beside the file, a size its structure implies), that damage must be refused,
not loaded: stage files and tuning.pt are refused for every flipped bit and every cut we try.
Then the bad inputs of docs/bad_inputs.md that no other test file covers, one by one, with the
message the user sees.
Run: python3 -m pytest -q tests/test_fuzz.py
"""
import contextlib
import faulthandler
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece
import torch

import ft_main
import split_model
from launch import REPO
from llama.formats.checkpoint import load_model, open_source, sha256_of, write_split
from llama.training.data import load_dataset, make_micro_batch
from llama.errors import BadInput
from llama.formats.hf import interleaved_to_rotate_half, meta_to_hf_name, save_hf_safetensors
from llama.formats.layouts import save_meta
from llama.model.transformer import ModelArgs
from llama.tuning.peft import export_peft
from llama.tuning.files import load_soft_prompt, save_tuning
from llama.model.tokenizer import Tokenizer
from llama.training.resume import read_training_state

CASES = 48  # per loader
CASE_LIMIT_S = 10  # a case that takes longer is a failure: loaders must not loop on bad input


def quiet(*_):
    pass


# ---- the fuzzing machinery ----

class CaseTooSlow(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """SIGALRM ends a case stuck in Python code; faulthandler ends the whole run (with every
    thread's stack) if one is stuck in C code where no signal handler can run."""
    def too_slow(signum, frame):
        raise CaseTooSlow(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 6, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


DAMAGE = ("bit flip", "bit flips", "random bytes", "truncated", "junk appended")
# Any cut of these formats is refused: a zip's directory sits at its end, a legacy torch file's
# pickle names its storages' sizes, llama2.c's header and safetensors' offsets imply the size.
CUT = ("truncated",)


def damaged(data: bytes, rng: random.Random, focus: int = None):
    """(label, damaged bytes): flipped bits, bytes overwritten, cut short, or junk appended;
    `focus` keeps the changes within the first `focus` bytes (a header)."""
    span = min(len(data), focus or len(data))
    kind = rng.choice(DAMAGE)
    out = bytearray(data)
    if kind == "bit flip":
        at = rng.randrange(span)
        out[at] ^= 1 << rng.randrange(8)
    elif kind == "bit flips":
        for _ in range(rng.randint(2, 16)):
            at = rng.randrange(span)
            out[at] ^= 1 << rng.randrange(8)
    elif kind == "random bytes":
        at, length = rng.randrange(span), rng.randint(1, 64)
        out[at:at + length] = rng.randbytes(length)
    elif kind == "truncated":
        out = out[:rng.randrange(span)]
    else:
        out += rng.randbytes(rng.randint(1, 256))
    return kind, bytes(out)


def fuzz(name, original: bytes, load, cases=CASES, focus=None, check=None, detects=()):
    """Feed `cases` damaged copies of `original` to load(bytes); collect what is neither a
    success nor a BadInput, and what loads although its kind of damage is one the format
    `detects`. Returns (loaded, refused) counts."""
    rng = random.Random(f"fuzz {name}")
    failures, loaded, refused = [], 0, 0
    for case in range(cases):
        kind, data = damaged(original, rng, focus)
        started = time.monotonic()
        try:
            with time_limit(CASE_LIMIT_S):
                result = load(data)
                if check is not None:
                    check(result)
            loaded += 1
            if kind in detects and data != original:  # two flips of one bit undo each other
                failures.append(f"case {case} ({kind}): loaded; the format detects this damage")
        except BadInput as error:
            refused += 1
            assert str(error) and "\n" not in str(error), f"{name}: a message of several lines"
        except Exception as error:  # the very thing this test exists to find
            failures.append(f"case {case} ({kind}): {type(error).__name__}: {error}"[:300])
        assert time.monotonic() - started < CASE_LIMIT_S
    assert not failures, f"{name}: {len(failures)} of {cases} cases failed:\n" + "\n".join(failures)
    return loaded, refused


# ---- material ----

@pytest.fixture(scope="module")
def tensors(source):
    return {name: source.load(name) for name in source.names()}


@pytest.fixture(scope="module")
def args(source):
    return source.args


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer(str(assets / "stories260K" / "tok512.model"))


@pytest.fixture(scope="module")
def pristine_split(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "pp2"
    write_split(source, out, 2, log=quiet)
    return out


@pytest.fixture
def split(pristine_split, tmp_path):
    return shutil.copytree(pristine_split, tmp_path / "pp2")


def set_manifest_sha256(split_dir, index):
    manifest = json.loads((split_dir / "split.json").read_text())
    manifest["stages"][index]["sha256"] = sha256_of(split_dir / f"stage.{index:02d}.pth")
    (split_dir / "split.json").write_text(json.dumps(manifest))


# ---- stage files and split.json ----

def test_fuzz_stage_file_as_recorded_in_split_json(split):
    """Any change to a stage file is caught by split.json's sha256 before torch reads it."""
    path = split / "stage.01.pth"
    original = path.read_bytes()

    def load(data):
        path.write_bytes(data)
        return load_model(split, stage=1, n_stages=2)
    loaded, refused = fuzz("stage file, sha256 kept", original, load, cases=16, detects=DAMAGE)
    assert loaded == 0 and refused == 16


def sweep(original: bytes, places: int):
    """(label, damaged bytes) for one flipped bit at each of `places` evenly spaced bytes (the
    first and the last among them), and for a cut at each of `places` evenly spaced lengths."""
    for at in sorted({round(i * (len(original) - 1) / (places - 1)) for i in range(places)}):
        flipped = bytearray(original)
        flipped[at] ^= 1 << (at % 8)
        yield f"bit {at % 8} of byte {at} flipped", bytes(flipped)
    for length in sorted({round(i * (len(original) - 1) / (places - 1)) for i in range(places)}):
        yield f"cut to {length} bytes", original[:length]


def loaded_despite_damage(original: bytes, load, places: int):
    """The sweep's cases that load(bytes) accepted; each must raise BadInput instead."""
    accepted = []
    for label, data in sweep(original, places):
        with contextlib.suppress(BadInput), time_limit(CASE_LIMIT_S):
            load(data)
            accepted.append(label)
    return accepted


def test_every_flipped_bit_and_cut_of_a_stage_file_is_refused(split):
    path = split / "stage.01.pth"
    original = path.read_bytes()

    def load(data):
        path.write_bytes(data)
        return load_model(split, stage=1, n_stages=2)
    assert loaded_despite_damage(original, load, places=100) == []


def test_every_flipped_bit_and_cut_of_tuning_pt_is_refused(prompt_dir, args):
    path = prompt_dir / "tuning.pt"
    original = path.read_bytes()

    def load(data):
        path.write_bytes(data)
        return load_soft_prompt(prompt_dir, args)
    assert loaded_despite_damage(original, load, places=200) == []


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_fuzz_stage_file_whose_damage_is_recorded(split, zip_format):
    """The damaged file's own sha256 in split.json: torch's reader itself meets the damage."""
    path = split / "stage.00.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=zip_format)
    original = path.read_bytes()

    def load(data):
        path.write_bytes(data)
        set_manifest_sha256(split, 0)
        return load_model(split, stage=0, n_stages=2)
    loaded, refused = fuzz(f"stage file ({'zip' if zip_format else 'legacy'})", original, load,
                           detects=CUT)
    assert refused > 0


def test_fuzz_split_json(split):
    path = split / "split.json"
    original = path.read_bytes()

    def load(data):
        path.write_bytes(data)
        return load_model(split, stage=0, n_stages=2)
    fuzz("split.json", original, load)


# ---- whole checkpoints: llama2.c, Meta, Hugging Face ----

def test_fuzz_llama2c_bin(model_bin, tmp_path):
    original = model_bin.read_bytes()
    path = tmp_path / "model.bin"

    def load(data):
        path.write_bytes(data)
        return load_model(path)
    fuzz("llama2.c header", original, load, focus=28, detects=CUT + ("junk appended",))
    fuzz("llama2.c file", original, load, cases=16, detects=CUT + ("junk appended",))


@pytest.fixture
def meta_dir(tensors, args, tmp_path):
    save_meta(tensors, args, tmp_path / "meta")
    return tmp_path / "meta"


def test_fuzz_meta_shard_and_params_json(meta_dir):
    shard, params = meta_dir / "consolidated.00.pth", meta_dir / "params.json"
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    original_shard, original_params = shard.read_bytes(), params.read_bytes()

    def load_shard(data):
        shard.write_bytes(data)
        return load_model(meta_dir)
    fuzz("Meta shard", original_shard, load_shard, detects=CUT)
    shard.write_bytes(original_shard)

    def load_params(data):
        params.write_bytes(data)
        return load_model(meta_dir)
    fuzz("params.json", original_params, load_params)


HUGE_INTEGER = "HUGE"  # stands for an integer of 5000 digits, beyond what json.dumps writes
WRONG_VALUES = [None, True, "64", [64], {"value": 64}, -1, 0, 1.5, 2 ** 31, 10 ** 30, 1e308,
                float("nan"), float("inf"), -0.0, 3, 7, HUGE_INTEGER]


def test_fuzz_params_json_values(meta_dir):
    """Each field of params.json given each wrong value or removed: loaded or refused by name."""
    path = meta_dir / "params.json"
    params = json.loads(path.read_text())
    failures = []
    for key in params:
        for value in WRONG_VALUES + ["(removed)"]:
            changed = {k: v for k, v in params.items() if k != key or value != "(removed)"}
            if value != "(removed)":
                changed[key] = value
            text = json.dumps(changed)  # Python's json writes NaN and Infinity
            path.write_text(text.replace(f'"{HUGE_INTEGER}"', "9" * 5000))
            try:
                with time_limit(CASE_LIMIT_S):
                    load_model(meta_dir)
            except BadInput:
                continue
            except Exception as error:
                failures.append(f"{key}={str(value)[:20]}: {type(error).__name__}: {error}"[:200])
    assert not failures, "\n".join(failures)


def test_fuzz_hf_safetensors_and_config(tensors, args, tmp_path):
    folder = tmp_path / "hf"
    save_hf_safetensors(tensors, args, folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    original, original_config = weights.read_bytes(), config.read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]

    def load(data):
        weights.write_bytes(data)
        return load_model(folder)
    fuzz("safetensors header", original, load, focus=header_end, detects=CUT)
    fuzz("safetensors file", original, load, cases=16, detects=CUT)
    weights.write_bytes(original)

    def load_config(data):
        config.write_bytes(data)
        return load_model(folder)
    fuzz("config.json", original_config, load_config)


def hf_state_dict(tensors, args):
    """The weights under Hugging Face's names, q/k rows permuted as HF stores them."""
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_rotate_half(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_rotate_half(tensor, args.n_kv_heads)
        state[meta_to_hf_name(name)] = tensor.clone()
    return state


def test_fuzz_hf_pytorch_model_bin(tensors, args, tmp_path):
    folder = tmp_path / "hf"
    save_hf_safetensors(tensors, args, folder)
    (folder / "model.safetensors").unlink()
    weights = folder / "pytorch_model.bin"
    torch.save(hf_state_dict(tensors, args), weights)
    load_model(folder)  # the undamaged file loads

    def load(data):
        weights.write_bytes(data)
        return load_model(folder)
    fuzz("pytorch_model.bin", weights.read_bytes(), load, cases=32, detects=CUT)


# ---- prompt checkpoints ----

@pytest.fixture
def prompt_dir(args, tmp_path):
    weight = torch.randn(4, args.dim) * 0.02
    save_tuning(tmp_path / "prompt", "prompt", {"prompt": weight}, args, {"template": "plain"})
    export_peft(tmp_path / "prompt" / "peft", "prompt", {"prompt": weight}, args, {"init": "random"})
    return tmp_path / "prompt"


def test_fuzz_tuning_pt_and_tuning_json(prompt_dir, args):
    pt, info = prompt_dir / "tuning.pt", prompt_dir / "tuning.json"
    original_pt, original_info = pt.read_bytes(), info.read_bytes()

    def load_as_saved(data):  # tuning.json still records the sha256 of the original
        pt.write_bytes(data)
        return load_soft_prompt(prompt_dir, args)
    loaded, refused = fuzz("tuning.pt, sha256 kept", original_pt, load_as_saved, cases=16,
                           detects=DAMAGE)
    assert loaded == 0

    def load_recorded(data):  # tuning.json records the damaged file: torch's reader meets it
        pt.write_bytes(data)
        info.write_text(json.dumps({**json.loads(original_info), "tuning_sha256": sha256_of(pt)}))
        return load_soft_prompt(prompt_dir, args)
    fuzz("tuning.pt", original_pt, load_recorded, detects=CUT)
    pt.write_bytes(original_pt)

    def load_info(data):
        info.write_bytes(data)
        return load_soft_prompt(prompt_dir, args)
    fuzz("tuning.json", original_info, load_info)


def test_fuzz_peft_adapter(prompt_dir, args):
    peft = prompt_dir / "peft"
    for name in ("adapter_model.bin", "adapter_config.json", "llama_prompt.json"):
        path = peft / name
        original = path.read_bytes()

        def load(data):
            path.write_bytes(data)
            return load_soft_prompt(peft, args)
        fuzz(name, original, load, cases=32, detects=CUT if name.endswith(".bin") else ())
        path.write_bytes(original)
    # the safetensors layout of the same adapter
    weight = torch.load(peft / "adapter_model.bin", weights_only=True)["prompt_embeddings"]
    (peft / "adapter_model.bin").unlink()
    header = json.dumps({"prompt_embeddings": {"dtype": "F32", "shape": list(weight.shape),
                                               "data_offsets": [0, weight.numel() * 4]}}).encode()
    original = struct.pack("<Q", len(header)) + header + weight.numpy().tobytes()
    path = peft / "adapter_model.safetensors"

    def load_safetensors(data):
        path.write_bytes(data)
        return load_soft_prompt(peft, args)
    fuzz("adapter_model.safetensors", original, load_safetensors, focus=8 + len(header),
         detects=CUT)


def test_fuzz_training_checkpoint(model_bin, assets, tmp_path):
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:24]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    ft_main.main(ckpt_dir=str(model_bin), data=str(tmp_path / "data.json"), out=str(out),
                 template="plain", n_virtual_tokens=4, max_seq_len=96, global_batch_size=4,
                 micro_batch_size=2, steps=1, eval_fraction=0, device="cpu", dtype="float32")
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    identity, digest = json.loads(state["identity"]), state["params_digest"]

    def load(data):
        path.write_bytes(data)
        return read_training_state(path, identity, digest)
    fuzz("checkpoint.pt", path.read_bytes(), load, detects=CUT)


# ---- tokenizer.model ----

def test_fuzz_tokenizer_model(assets, tmp_path):
    path = tmp_path / "tokenizer.model"

    def load(data):
        path.write_bytes(data)
        tokenizer = Tokenizer(str(path))
        tokenizer.check_matches(512)
        return tokenizer

    def usable(tokenizer):
        ids = tokenizer.encode("Once upon a time, Tom saw a big dog. 123 ünïcode", True, True)
        assert all(0 <= i < tokenizer.n_words for i in ids)
        tokenizer.decode(ids)
    fuzz("tokenizer.model", (assets / "stories260K" / "tok512.model").read_bytes(), load,
         check=usable)


# ---- data records ----

def test_fuzz_data_files(assets, tokenizer, tmp_path):
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:12]
    as_json = json.dumps(records, indent=1).encode()
    as_jsonl = "".join(json.dumps(r) + "\n" for r in records).encode()

    def usable(dataset):
        assert len(dataset) > 0
        make_micro_batch([dataset[i] for i in range(min(len(dataset), 4))], tokenizer.pad_id)
        assert int(dataset.token_ids.max()) < tokenizer.n_words

    for suffix, original in ((".json", as_json), (".jsonl", as_jsonl)):
        path = tmp_path / f"data{suffix}"

        def load(data):
            path.write_bytes(data)
            return load_dataset(path, tokenizer, "alpaca", 128, cache_dir=tmp_path / "cache",
                                log=quiet)
        fuzz(f"data{suffix}", original, load, check=usable)


ODD_VALUES = [None, 0, -1, 1.5, True, [], ["a"], {}, {"a": "b"}, "", " ", "\n\t", "\x00",
              "é" * 50, "\ud800" * 3, "🦙" * 100, "x" * 20_000, "<s></s>", "\\u0000"]


def test_fuzz_record_fields(tokenizer, tmp_path):
    """Records whose fields hold odd values and types, in JSON and JSONL: each file loads (odd
    records skipped and counted) or is refused, strict or not."""
    rng = random.Random("fuzz records")
    failures = []
    for case in range(CASES):
        records = []
        for _ in range(rng.randint(1, 6)):
            record = {"instruction": "Say hi.", "input": "", "output": "Hi."}
            for field in rng.sample(["instruction", "input", "output", "text", "extra"],
                                    rng.randint(1, 3)):
                record[field] = rng.choice(ODD_VALUES)
            records.append(record if rng.random() > 0.1 else rng.choice(ODD_VALUES))
        jsonl = case % 2 == 1
        path = tmp_path / f"records{case}.{'jsonl' if jsonl else 'json'}"
        text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        for strict in (False, True):
            try:
                with time_limit(CASE_LIMIT_S):
                    load_dataset(path, tokenizer, "alpaca", 64, strict=strict,
                                 cache_dir=tmp_path / "cache", log=quiet)
            except BadInput:
                pass
            except Exception as error:
                failures.append(f"case {case} strict={strict}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures[:10])


# ---- bad input, one by one (the rows of docs/bad_inputs.md that other files do not cover) ----

@pytest.fixture(scope="module")
def records(assets):
    return json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:24]


@pytest.fixture(scope="module")
def data_file(records, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca_24.json"
    path.write_text(json.dumps(records))
    return path


def run_args(ckpt, data, out, **overrides):
    args = dict(ckpt_dir=str(ckpt), data=str(data), out=str(out), template="plain",
                n_virtual_tokens=4, max_seq_len=96, global_batch_size=4, micro_batch_size=2,
                steps=2, eval_fraction=0, device="cpu", dtype="float32", log_every=100)
    args.update(overrides)
    return args


def edit_json(path, change):
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def test_split_json_of_another_model(split, model_bin, args, tmp_path):
    """A split.json copied from another model's split (here: one layer fewer)."""
    other = ModelArgs(**{**args.__dict__, "n_layers": 4})
    smaller = tmp_path / "smaller"
    source = open_source(model_bin)
    save_meta({n: source.load(n) for n in source.names() if not n.startswith("layers.4.")},
              other, smaller)
    split_model.main(str(smaller), 2, out_dir=str(tmp_path / "smaller_pp2"))
    shutil.copyfile(tmp_path / "smaller_pp2" / "split.json", split / "split.json")
    with pytest.raises(BadInput, match=r"pp2/split\.json was written for another model than "
                                       r"\S*pp2/params\.json: split the model again"):
        load_model(split, stage=0, n_stages=2)


def test_params_json_of_a_split_edited(split):
    edit_json(split / "params.json", lambda p: p.update(n_heads=4))
    with pytest.raises(BadInput, match=r"split\.json was written for another model than "):
        load_model(split, stage=0, n_stages=2)
    (split / "split.json").write_text('{"format": 1, "stages": [')
    with pytest.raises(BadInput, match=r"split\.json is not valid JSON \(Expecting value: line 1 "
                                       r"column 26 \(char 25\)\); restore it from the checkpoint"):
        load_model(split, stage=0, n_stages=2)


@pytest.mark.parametrize("change, message", [
    ({"dim": "64"}, r"params\.json: dim='64' must be an integer"),
    ({"n_heads": None}, r"params\.json lacks 'n_heads': use the params\.json that came with"),
    ({"n_layers": 2 ** 31}, r"params\.json: n_layers=2147483648 is beyond any LLaMA \(at most "
                            r"4096 here\): the file is damaged or not this model's"),
    ({"n_layers": -5}, r"params\.json: n_layers=-5 must be positive"),
    ({"n_heads": 7}, r"params\.json: dim=64 is not n_heads=7 heads of an even width"),
    ({"n_kv_heads": 3}, r"params\.json: n_heads=8 is not a multiple of n_kv_heads=3"),
    ({"norm_eps": float("nan")}, r"params\.json: norm_eps=nan must be a finite number"),
    ({"rope_theta": [1e4]}, r"params\.json: rope_theta=\[10000\.0\] must be a finite number"),
], ids=["string", "null", "huge", "negative", "odd-heads", "kv-heads", "nan", "list"])
def test_params_json_with_wrong_types_or_values(meta_dir, change, message):
    edit_json(meta_dir / "params.json", lambda p: p.update(change))
    with time_limit(CASE_LIMIT_S), pytest.raises(BadInput, match=message):
        load_model(meta_dir)


def test_params_json_missing_a_key_or_not_an_object(meta_dir):
    edit_json(meta_dir / "params.json", lambda p: p.pop("dim"))
    with pytest.raises(BadInput, match=r"params\.json lacks 'dim'"):
        load_model(meta_dir)
    (meta_dir / "params.json").write_text("[64, 5, 8]")
    with pytest.raises(BadInput, match=r"params\.json must hold a JSON object of model parameters"):
        load_model(meta_dir)


def test_llama2c_header_that_is_impossible_or_huge(model_bin, tmp_path):
    data = bytearray(model_bin.read_bytes())
    path = tmp_path / "model.bin"
    struct.pack_into("<i", data, 8, 1 << 30)  # n_layers: a billion
    path.write_bytes(data)
    with time_limit(CASE_LIMIT_S), pytest.raises(
            BadInput, match=r"model\.bin has 1056540 bytes but its header implies \d+: the file is "
                            r"truncated or not a llama2\.c v0 export"):
        load_model(path)
    struct.pack_into("<i", data, 8, 0)
    path.write_bytes(data)
    with pytest.raises(BadInput, match=r"model\.bin has an impossible llama2\.c header "
                                       r"\(64, 172, 0, 8, 4, 512, 512\)"):
        load_model(path)


def test_safetensors_header_entry_that_cannot_be_a_tensor(tensors, args, tmp_path):
    folder = tmp_path / "hf"
    save_hf_safetensors(tensors, args, folder)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    for change, message in [
            (lambda e: e.pop("data_offsets"), r"corrupt safetensors header: the entry of "
                                              r"'model\.norm\.weight' is \{'dtype': 'F32', "),
            (lambda e: e.update(shape=[65]), r"corrupt safetensors header: 'model\.norm\.weight' "
                                             r"of shape \[65\] \(F32\) cannot fill bytes"),
            (lambda e: e.update(dtype="F8_E4M3"), r"tensor 'model\.norm\.weight' has dtype "
                                                  r"F8_E4M3, which is not supported")]:
        entry = dict(header["model.norm.weight"])
        change(entry)
        text = json.dumps({**header, "model.norm.weight": entry}).encode()
        text += b" " * (length - len(text)) if len(text) <= length else b""
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
        with pytest.raises(BadInput, match=message):
            load_model(folder)


def test_truncated_or_damaged_prompt_checkpoints(prompt_dir, args):
    pt = prompt_dir / "tuning.pt"
    pt.write_bytes(pt.read_bytes()[:300])
    with pytest.raises(BadInput, match=r"tuning\.json describes another tuning\.pt than the one "
                                       r"beside it \(a save was interrupted, or the files were "
                                       r"mixed up\)"):
        load_soft_prompt(prompt_dir, args)
    edit_json(prompt_dir / "tuning.json", lambda info: info.pop("tuning_sha256"))  # no sha256
    with pytest.raises(BadInput, match=r"tuning\.pt is corrupt or truncated \(PytorchStreamReader "
                                       r"failed reading zip archive"):
        load_soft_prompt(prompt_dir, args)
    adapter = prompt_dir / "peft" / "adapter_model.bin"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    with pytest.raises(BadInput, match=r"adapter_model\.bin is corrupt or truncated"):
        load_soft_prompt(prompt_dir / "peft", args)
    edit_json(prompt_dir / "peft" / "adapter_config.json", lambda c: c.update(peft_type="IA3"))
    with pytest.raises(BadInput, match=r"adapter_config\.json is a PEFT 'IA3' adapter; this "
                                       r"project reads PROMPT_TUNING"):
        load_soft_prompt(prompt_dir / "peft", args)


@pytest.mark.parametrize("weight, message", [
    (torch.zeros(600, 64), r"prompt\.pt has 600 virtual tokens; the model allows 1\.\.511"),
    (torch.full((4, 64), float("nan")), r"prompt\.pt contains NaN or inf values: use an earlier "
                                        r"checkpoint"),
    (torch.zeros(4, 64, dtype=torch.long), r"prompt\.pt: 'prompt' is not a float tensor"),
], ids=["too-long", "nan", "integers"])
def test_prompt_that_cannot_be_used(args, tmp_path, weight, message):
    """In the prompt.pt + prompt.json layout of earlier versions, which still loads."""
    folder = tmp_path / "prompt"
    folder.mkdir()
    torch.save(weight, folder / "prompt.pt")
    (folder / "prompt.json").write_text(json.dumps({"n_virtual_tokens": weight.shape[0]}))
    with pytest.raises(BadInput, match=message):
        load_soft_prompt(folder, args)


def test_damaged_training_checkpoint_for_resume(model_bin, data_file, tmp_path):
    out = tmp_path / "run"
    ft_main.main(**run_args(model_bin, data_file, out))
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BadInput, match=r"checkpoint\.pt is corrupt or truncated"):
        ft_main.main(**run_args(model_bin, data_file, out), resume=True)
    torch.save({k: v for k, v in state.items() if k != "optimizer"}, path)
    with pytest.raises(BadInput, match=r"--resume \S*checkpoint\.pt is damaged \('optimizer' is "
                                       r"missing or not what ft_main\.py writes\)"):
        ft_main.main(**run_args(model_bin, data_file, out), resume=True)
    torch.save({**state, "params_digest": "0" * 16}, path)
    with pytest.raises(BadInput, match=r"--resume \S*checkpoint\.pt was trained on another model: "
                                       r"use its --ckpt_dir"):
        ft_main.main(**run_args(model_bin, data_file, out), resume=True)


@pytest.mark.parametrize("content", [b'{"model": {"type": "BPE"}}', b"", b"\x00" * 64, "BIN"],
                         ids=["json", "empty", "zeros", "llama2c-tokenizer"])
def test_tokenizer_model_that_is_not_sentencepiece(assets, tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes((assets / "stories260K" / "tok512.bin").read_bytes() if content == "BIN"
                     else content)
    with pytest.raises(BadInput, match=r"tokenizer \S*tokenizer\.model is not a sentencepiece "
                                       r"model \(.*\); pass the tokenizer\.model that came with "
                                       r"the checkpoint"):
        Tokenizer(str(path))
    with pytest.raises(BadInput, match=r"tokenizer \S*nowhere\.model does not exist"):
        Tokenizer(str(tmp_path / "nowhere.model"))


def test_data_in_utf16_nested_or_with_a_lone_surrogate(records, tokenizer, tmp_path):
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps(records).encode("utf-16"))
    with pytest.raises(BadInput, match=r"utf16\.json is not UTF-8 \(bad byte at offset 0\): "
                                       r"re-encode it as UTF-8"):
        load_dataset(utf16, tokenizer, log=quiet)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BadInput, match=r"nested\.json nests lists or objects too deeply"):
        load_dataset(nested, tokenizer, log=quiet)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"instruction": "Say \\ud800 hi.", "output": "Hi."}\n'
                         '{"instruction": "Say hi.", "output": "Hi."}\n')
    with pytest.raises(BadInput, match=r"surrogate\.jsonl, line 1: field 'instruction' holds a "
                                       r"lone surrogate"):
        load_dataset(surrogate, tokenizer, strict=True, log=quiet)
    assert len(load_dataset(surrogate, tokenizer, cache_dir=tmp_path, log=quiet)) == 1


def test_huge_record_is_truncated_and_counted(records, tokenizer, tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = {"instruction": "Tell a long story.", "output": "Once upon a time. " * 100_000}
    path.write_text("".join(json.dumps(r) + "\n" for r in [huge] + records[:3]))
    started = time.monotonic()
    dataset = load_dataset(path, tokenizer, "plain", 128, cache_dir=tmp_path, log=quiet)
    assert time.monotonic() - started < 30
    assert len(dataset[0][0]) == 128 and dataset.n_truncated >= 1  # 1.8 MB of text, cut to fit


@pytest.mark.parametrize("overrides, message", [
    ({"timeout_s": 0}, r"--timeout_s=0 must be a positive number of seconds"),
    ({"timeout_s": -5}, r"--timeout_s=-5 must be a positive number of seconds"),
    ({"max_seq_len": 1}, r"--max_seq_len=1 must be an integer of at least 2"),
    ({"lr": 0}, r"--lr=0 must be a positive number"),
    ({"lr": float("nan")}, r"--lr=nan must be a positive number"),
    ({"steps": 0}, r"--steps=0 must be a positive integer"),
    ({"global_batch_size": -4}, r"--global_batch_size=-4 must be a positive integer"),
    ({"eval_fraction": 1}, r"--eval_fraction=1 must be in \[0, 1\)"),
    ({"schedule": "zigzag"}, r"--schedule 'zigzag' must be one of gpipe, 1f1b"),
    ({"dtype": "int8"}, r"--dtype 'int8' must be one of auto, float32, float16, bfloat16"),
    ({"device": "tpu:0"}, r"--device 'tpu:0' is not a device name"),
    ({"init": "zeros"}, r"--init 'zeros' must be one of text, vocab, random"),
    ({"global_batch_size": 64, "micro_batch_size": 2},
     r"the dataset has \d+ examples, fewer than one global batch of 64"),
], ids=lambda value: str(value) if isinstance(value, dict) else "")
def test_command_line_values_out_of_range(model_bin, data_file, tmp_path, overrides, message):
    with pytest.raises(BadInput, match=message):
        ft_main.main(**run_args(model_bin, data_file, tmp_path / "out", **overrides))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("n_stages", ["two", 2.5, True])
def test_n_stages_that_is_not_an_integer(model_bin, tmp_path, n_stages):
    with pytest.raises(BadInput, match=rf"n_stages={n_stages!r} must be an integer from 1 to the "
                                       r"model's n_layers=5"):
        split_model.main(str(model_bin), n_stages, out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_scripts_show_one_error_line_for_these_inputs(model_bin, meta_dir, data_file, tmp_path):
    """What the user sees at the command line: exit 2 and a single 'error: ...' line."""
    not_a_tokenizer = tmp_path / "tokenizer.json"
    not_a_tokenizer.write_text('{"model": {"type": "BPE"}}')
    edit_json(meta_dir / "params.json", lambda p: p.update(dim="64"))
    cases = [
        (["example.py", "--ckpt_dir", str(model_bin), "--tokenizer_path", str(not_a_tokenizer)],
         # a .json tokenizer is read as Hugging Face's: refused without the optional library,
         # and as no tokenizer.json with it
         r"^error: tokenizer \S*tokenizer\.json is (a Hugging Face tokenizer\.json, which needs "
         r"the optional tokenizers library|not a Hugging Face tokenizer\.json \()"),
        (["split_model.py", "--ckpt_dir", str(meta_dir), "--n_stages", "2"],
         r"^error: \S*params\.json: dim='64' must be an integer$"),
        (["ft_main.py", *[f"--{k}={v}" for k, v in run_args(model_bin, data_file, tmp_path / "out",
                                                            timeout_s=0).items()]],
         r"^error: --timeout_s=0 must be a positive number of seconds$"),
    ]
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv, _ in cases]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (argv, message), proc, (out, err) in zip(cases, procs, outputs):
        assert proc.returncode == 2, f"{argv[0]}: exit {proc.returncode}\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not (tmp_path / "out").exists() and not (meta_dir.parent / "meta_pp2").exists()


def test_tokenizer_whose_text_is_not_utf8_or_without_bos_eos(assets, tmp_path):
    damaged_model = bytearray((assets / "stories260K" / "tok512.model").read_bytes())
    damaged_model[49] ^= 0x80  # a piece's text no longer decodes as UTF-8
    path = tmp_path / "damaged.model"
    path.write_bytes(damaged_model)
    with pytest.raises(BadInput, match=r"damaged\.model is not a sentencepiece model \('utf-8' "
                                       r"codec can't decode"):
        Tokenizer(str(path))
    trained = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["Once upon a time there was a little dog named Tom."] * 20),
        model_writer=trained, vocab_size=24, model_type="char", bos_id=-1, eos_id=-1,
        minloglevel=2)
    path = tmp_path / "no_bos.model"
    path.write_bytes(trained.getvalue())
    with pytest.raises(BadInput, match=r"no_bos\.model has no BOS or EOS piece \(ids -1, -1\), "
                                       r"which LLaMA needs"):
        Tokenizer(str(path))


def test_out_folder_that_cannot_be_created(model_bin, data_file, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(BadInput, match=r"--out \S*a_file/run cannot be created \(Not a "
                                       r"directory\): pick a writable folder"):
        ft_main.main(**run_args(model_bin, data_file, tmp_path / "a_file" / "run"))


def test_every_test_named_in_docs_bad_inputs_exists():
    """docs/bad_inputs.md backs each row with a test: the names must not go stale."""
    table = (Path(REPO) / "docs" / "bad_inputs.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)\*?`", table))
    defined = set(re.findall(r"^def (test_[a-z0-9_]+)", "".join(
        p.read_text() for p in (Path(REPO) / "tests").glob("test_*.py")), re.MULTILINE))
    prefixes = set(re.findall(r"`(test_[a-z0-9_]+)\*`", table))
    assert len(named) > 50
    assert not {n for n in named - defined
                if not any(d.startswith(n) for d in defined if n in prefixes)}
