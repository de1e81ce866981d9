"""Checkpoint layouts and the pipeline-stage split on the real stories260K model: chained stages
== the full model, stage files hold only their own tensors, sizes add up, Meta shards and the HF
layout load back to the same logits, conversion, atomic split writing.
Run: python3 -m pytest -q tests/test_checkpoint.py
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import split_model
from launch import REPO
from llama.formats import convert
from llama.formats.checkpoint import (load_model, open_source, read_split, stage_tensor_names,
                              write_split)
from llama.errors import BadInput
from llama.formats.hf import HFSource, save_hf_safetensors
from llama.formats.layouts import Llama2cSource, MetaSource, save_meta
from llama.formats.tensor_files import read_safetensor, read_safetensors_header

STAGE_COUNTS = (1, 2, 3, 5)


def quiet(*_):
    pass


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def bin_path(assets):
    return assets / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def full_model(bin_path):
    return load_model(bin_path)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def expected_logits(full_model, tokens):
    with torch.no_grad():
        return full_model(tokens)


@pytest.fixture(scope="module")
def all_tensors(bin_path):
    source = open_source(bin_path)
    return source.args, {name: source.load(name) for name in source.names()}


@pytest.fixture(scope="module")
def splits(bin_path, tmp_path_factory):
    """stories260K split into 1, 2, 3 and 5 stages, via split_model.py's main."""
    root = tmp_path_factory.mktemp("splits")
    for n_stages in STAGE_COUNTS:
        split_model.main(str(bin_path), n_stages, out_dir=str(root / f"pp{n_stages}"))
    return {n: root / f"pp{n}" for n in STAGE_COUNTS}


def max_diff(model, tokens, expected):
    with torch.no_grad():
        return (model(tokens) - expected).abs().max().item()


# ---- split ----

@pytest.mark.parametrize("n_stages", STAGE_COUNTS)
def test_chained_stages_equal_the_full_model(splits, n_stages, tokens, expected_logits):
    h = tokens
    layers_seen = []
    with torch.no_grad():
        for stage in range(n_stages):
            model = load_model(splits[n_stages], stage=stage, n_stages=n_stages)
            assert model.has_embeddings == (stage == 0)
            assert model.has_head == (stage == n_stages - 1)
            layers_seen += [int(i) for i in model.layers]
            h = model(h)
    assert layers_seen == list(range(5))
    assert h.dtype == torch.float32
    assert (h - expected_logits).abs().max().item() <= 1e-5
    # One process can also load every stage of the split at once.
    assert max_diff(load_model(splits[n_stages]), tokens, expected_logits) <= 1e-5


@pytest.mark.parametrize("n_stages", STAGE_COUNTS)
def test_stage_files_hold_only_their_own_tensors(splits, full_model, n_stages):
    args, manifest = read_split(splits[n_stages])
    assert manifest["n_stages"] == n_stages and len(manifest["stages"]) == n_stages
    for index, entry in enumerate(manifest["stages"]):
        path = splits[n_stages] / entry["file"]
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        names = stage_tensor_names(args, tuple(entry["layers"]), entry["embeddings"], entry["head"])
        assert sorted(tensors) == sorted(names)
        # Strict reload: exactly the stage model's keys, nothing missing, nothing extra.
        model = load_model(splits[n_stages], stage=index, n_stages=n_stages)
        assert sorted(model.state_dict()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(tensor, full_model.state_dict()[name])
        # The file holds these tensors' bytes and not a bigger tensor they were views of.
        size = os.path.getsize(path)
        assert size == entry["bytes"]
        assert tensor_bytes(tensors) <= size <= 1.03 * tensor_bytes(tensors)


@pytest.mark.parametrize("n_stages", STAGE_COUNTS)
def test_split_tensor_bytes_add_up_to_the_model(splits, full_model, bin_path, n_stages):
    _, manifest = read_split(splits[n_stages])
    stored = sum(tensor_bytes(torch.load(splits[n_stages] / e["file"], weights_only=True))
                 for e in manifest["stages"])
    assert stored == tensor_bytes(full_model.state_dict())
    # Against the llama2.c file: less its header and its stored rotary tables (recomputed, not
    # kept), plus the tied classifier, which the last stage stores once more as output.weight.
    args = full_model.args
    header, rotary_tables = 7 * 4, 2 * args.max_seq_len * (args.head_dim // 2) * 4
    classifier = args.vocab_size * args.dim * 4
    assert stored == os.path.getsize(bin_path) - header - rotary_tables + classifier
    total_file_bytes = sum(e["bytes"] for e in manifest["stages"])
    assert stored <= total_file_bytes <= 1.03 * stored


def test_split_of_an_untied_meta_checkpoint_adds_up_to_its_size(all_tensors, tmp_path):
    args, tensors = all_tensors
    save_meta(tensors, args, tmp_path / "meta")
    source_bytes = os.path.getsize(tmp_path / "meta" / "consolidated.00.pth")
    manifest = write_split(open_source(tmp_path / "meta"), tmp_path / "meta_pp3", 3, log=quiet)
    split_bytes = sum(os.path.getsize(tmp_path / "meta_pp3" / e["file"])
                      for e in manifest["stages"])
    assert split_bytes == pytest.approx(source_bytes, rel=0.01)
    assert manifest["source"]["format"] == "meta"


def test_split_manifest_records_layers_sizes_and_digests(splits):
    manifest = json.loads((splits[3] / "split.json").read_text())
    assert manifest["format"] == 1 and manifest["n_layers"] == 5 and manifest["dtype"] == "float32"
    assert [s["layers"] for s in manifest["stages"]] == [[0, 2], [2, 4], [4, 5]]
    assert [(s["embeddings"], s["head"]) for s in manifest["stages"]] == \
        [(True, False), (False, False), (False, True)]
    assert all(len(s["sha256"]) == 64 for s in manifest["stages"])
    assert (splits[3] / "tokenizer.model").is_file()  # found beside the .bin and copied


def test_split_to_float16_halves_the_bytes(bin_path, tmp_path, splits):
    manifest = write_split(open_source(bin_path), tmp_path / "fp16", 2, dtype="float16", log=quiet)
    assert manifest["dtype"] == "float16"
    tensors = torch.load(tmp_path / "fp16" / "stage.01.pth", weights_only=True)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    fp32 = read_split(splits[2])[1]
    fp16_bytes = sum(s["bytes"] for s in manifest["stages"])
    assert fp16_bytes < 0.55 * sum(s["bytes"] for s in fp32["stages"])


def test_split_is_written_atomically(bin_path, tmp_path):
    out_dir = tmp_path / "pp2"
    source = open_source(bin_path)
    write_split(source, out_dir, 2, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pp2"]  # no temporary folder left
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    with pytest.raises(BadInput, match="already exists.*--overwrite"):
        write_split(source, out_dir, 3, log=quiet)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before

    # A failure half way through leaves the previous split untouched and no temporary folder.
    real_load = source.load

    def failing_load(name):
        if name.startswith("layers.4."):
            raise BadInput("simulated read failure")
        return real_load(name)

    source.load = failing_load
    with pytest.raises(BadInput, match="simulated"):
        write_split(source, out_dir, 3, overwrite=True, log=quiet)
    with pytest.raises(BadInput, match="simulated"):
        write_split(source, tmp_path / "new", 3, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pp2"]
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before

    source.load = real_load
    manifest = write_split(source, out_dir, 3, overwrite=True, log=quiet)
    assert manifest["n_stages"] == 3 and read_split(out_dir)[1]["n_stages"] == 3
    assert not (out_dir / "stage.03.pth").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pp2"]


def folder_contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def user_ckpts(bin_path, assets, tmp_path):
    """A user's ckpts/ folder: a model beside its tokenizer, a prompt and a note of their own."""
    ckpts = tmp_path / "ckpts"
    (ckpts / "stories260K").mkdir(parents=True)
    (ckpts / "stories260K" / "stories260K.bin").write_bytes(bin_path.read_bytes())
    (ckpts / "stories260K" / "tokenizer.model").write_bytes(
        (assets / "stories260K" / "tok512.model").read_bytes())
    (ckpts / "prompts" / "alpaca").mkdir(parents=True)
    (ckpts / "prompts" / "alpaca" / "prompt.pt").write_bytes(b"a prompt of the user's")
    (ckpts / "notes.txt").write_text("mine")
    return ckpts


def test_overwrite_never_replaces_a_folder_that_holds_or_lies_in_the_source(user_ckpts):
    model = user_ckpts / "stories260K"
    (model / "old").mkdir()
    before = folder_contents(user_ckpts)
    for out_dir, relation in [(user_ckpts, "holds"), (model, "holds"),
                              (model / "old", "lies inside")]:
        message = rf"--out_dir {out_dir} {relation} \S+, which this command reads"
        with pytest.raises(BadInput, match=message):
            split_model.main(str(model), 2, out_dir=str(out_dir), overwrite=True)
        with pytest.raises(BadInput, match=message.replace("out_dir", "dst")):
            convert.main(str(model), str(out_dir), overwrite=True)
    assert folder_contents(user_ckpts) == before
    assert sorted(p.name for p in user_ckpts.parent.iterdir()) == ["ckpts"]  # no temp folder


def test_new_dst_inside_the_source_is_refused_before_it_exists(user_ckpts, tmp_path):
    """It used to be accepted (the check ran only on a folder that existed): the converted model
    was written into the checkpoint being read."""
    model = user_ckpts / "stories260K"
    (tmp_path / "link").symlink_to(model)
    before = folder_contents(user_ckpts)
    for dst in (model / "converted", tmp_path / "link" / "converted"):
        with pytest.raises(BadInput, match=rf"--dst {dst} lies inside \S+stories260K, which this "
                                           r"command reads"):
            convert.main(str(model), str(dst))
        with pytest.raises(BadInput, match=r"--out_dir \S+converted lies inside"):
            split_model.main(str(model), 2, out_dir=str(dst))
    assert folder_contents(user_ckpts) == before


def test_overwrite_never_replaces_a_folder_of_other_files(user_ckpts, splits, tmp_path):
    before = folder_contents(user_ckpts)
    model = user_ckpts / "stories260K"
    for overwrite in (False, True):
        with pytest.raises(BadInput, match=r"prompts already exists and is not a split folder "
                                           r"that split_model.py wrote \(it has no split\.json\), "
                                           r"so it is never replaced: choose another --out_dir$"):
            split_model.main(str(model), 2, out_dir=str(user_ckpts / "prompts"),
                             overwrite=overwrite)
    with pytest.raises(BadInput, match=r"--dst \S+notes\.txt is a file, not a folder"):
        convert.main(str(model), str(user_ckpts / "notes.txt"), overwrite=True)
    # A Meta folder the user made (no converted.json) is not convert's to replace.
    meta = tmp_path / "meta"
    convert.main(str(model), str(meta))
    (meta / "converted.json").unlink()
    with pytest.raises(BadInput, match=r"meta already exists and is not a folder that "
                                       r"llama.formats.convert wrote \(it has no converted\.json\)"):
        convert.main(str(model), str(meta), overwrite=True)
    # A split with a file of the user's in it: replacing it would lose that file.
    split = tmp_path / "pp2"
    write_split(open_source(model / "stories260K.bin"), split, 2, log=quiet)
    (split / "prompts").mkdir()
    for overwrite in (False, True):
        with pytest.raises(BadInput, match=r"pp2 holds prompts, which is not part of a split "
                                           r"folder that split_model.py wrote, so the folder is "
                                           r"never replaced: move it out or choose another"):
            split_model.main(str(model), 3, out_dir=str(split), overwrite=overwrite)
    assert folder_contents(user_ckpts) == before
    assert read_split(split)[1]["n_stages"] == 2


def test_overwrite_replaces_a_previous_split_and_conversion(user_ckpts, capsys):
    model = user_ckpts / "stories260K"
    split_model.main(str(model), 2, out_dir=str(user_ckpts / "pp"))
    with pytest.raises(BadInput, match=r"pp already exists \(a split folder that split_model.py "
                                       r"wrote\): pass --overwrite to replace it"):
        split_model.main(str(model), 3, out_dir=str(user_ckpts / "pp"))
    split_model.main(str(model), 3, out_dir=str(user_ckpts / "pp"), overwrite=True)
    assert read_split(user_ckpts / "pp")[1]["n_stages"] == 3
    # progress: a line per stage written, with the time so far
    lines = capsys.readouterr().out.splitlines()
    assert sum(bool(re.fullmatch(r"stage \d: layers .* MiB \(\d+\.\d s\)", line))
               for line in lines) == 2 + 3
    convert.main(str(model), str(user_ckpts / "meta"), n_shards=2)
    convert.main(str(model), str(user_ckpts / "meta"), overwrite=True)
    marker = json.loads((user_ckpts / "meta" / "converted.json").read_text())
    assert marker["written_by"] == "llama.formats.convert" and marker["source"] == str(model.resolve())
    assert sorted(p.name for p in (user_ckpts / "meta").glob("*.pth")) == ["consolidated.00.pth"]


# ---- other layouts ----

def test_meta_shards_cut_along_meta_dims_and_load_merged(all_tensors, tmp_path, tokens,
                                                          expected_logits):
    args, tensors = all_tensors
    folder = tmp_path / "meta2"
    save_meta(tensors, args, folder, n_shards=2)
    shards = [torch.load(folder / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]
    expected_shapes = {"tok_embeddings.weight": (512, 32), "output.weight": (256, 64),
                       "layers.0.attention.wq.weight": (32, 64),
                       "layers.0.attention.wk.weight": (16, 64),
                       "layers.0.attention.wv.weight": (16, 64),
                       "layers.0.attention.wo.weight": (64, 32),
                       "layers.0.feed_forward.w1.weight": (86, 64),
                       "layers.0.feed_forward.w2.weight": (64, 86),
                       "layers.0.feed_forward.w3.weight": (86, 64),
                       "layers.0.attention_norm.weight": (64,), "norm.weight": (64,)}
    for name, shape in expected_shapes.items():
        assert tuple(shards[0][name].shape) == shape and tuple(shards[1][name].shape) == shape
    # Row-parallel layers are cut along their input columns: shard 1 holds the second half.
    assert torch.equal(shards[1]["layers.0.attention.wo.weight"],
                       tensors["layers.0.attention.wo.weight"][:, 32:])
    assert torch.equal(shards[1]["layers.0.attention.wq.weight"],
                       tensors["layers.0.attention.wq.weight"][32:])
    source = open_source(folder)
    assert isinstance(source, MetaSource) and source.description["shards"] == 2
    assert max_diff(load_model(folder), tokens, expected_logits) <= 1e-5
    # Also stage by stage straight from the shards (layers balanced on the fly).
    h = tokens
    with torch.no_grad():
        for stage in range(2):
            h = load_model(folder, stage=stage, n_stages=2)(h)
    assert (h - expected_logits).abs().max().item() <= 1e-5


def test_hf_layout_round_trips_with_permuted_q_k(all_tensors, tmp_path, tokens, expected_logits):
    args, tensors = all_tensors
    folder = tmp_path / "hf"
    save_hf_safetensors(tensors, args, folder)
    source = open_source(folder)
    assert isinstance(source, HFSource)
    assert max_diff(load_model(folder), tokens, expected_logits) <= 1e-5

    # The file really holds HF's rotate-half order: within each head, rows evens then odds.
    data_start, header = read_safetensors_header(folder / "model.safetensors")
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for hf_name, meta_name, heads in [("model.layers.0.self_attn.q_proj.weight",
                                       "layers.0.attention.wq.weight", 8),
                                      ("model.layers.2.self_attn.k_proj.weight",
                                       "layers.2.attention.wk.weight", 4)]:
        stored = read_safetensor(folder / "model.safetensors", data_start, header[hf_name])
        ours = tensors[meta_name]
        assert not torch.equal(stored, ours)
        assert torch.equal(stored, ours.view(heads, 8, 64)[:, order].reshape(-1, 64))
        assert torch.equal(source.load(meta_name), ours)
    # v is not permuted.
    stored_v = read_safetensor(folder / "model.safetensors", data_start,
                               header["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(stored_v, tensors["layers.0.attention.wv.weight"])


def test_llama2c_source_refuses_a_truncated_file(bin_path, tmp_path):
    truncated = tmp_path / "model.bin"
    truncated.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(BadInput, match="model.bin has 1056536 bytes"):
        Llama2cSource(truncated)


# ---- conversion to the Meta layout ----

def test_convert_llama2c_to_meta_round_trip(bin_path, tmp_path, tokens, expected_logits):
    dst = tmp_path / "meta"
    convert.main(str(bin_path), str(dst), n_shards=2)
    assert sorted(p.name for p in dst.iterdir()) == \
        ["consolidated.00.pth", "consolidated.01.pth", "converted.json", "params.json",
         "tokenizer.model"]
    assert max_diff(load_model(dst), tokens, expected_logits) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]  # no temporary folder left
    with pytest.raises(BadInput, match="meta already exists.*--overwrite"):
        convert.main(str(bin_path), str(dst))
    # --overwrite with one shard replaces the two old shards, leaving none behind.
    convert.main(str(bin_path), str(dst), overwrite=True)
    assert sorted(p.name for p in dst.glob("*.pth")) == ["consolidated.00.pth"]
    assert max_diff(load_model(dst), tokens, expected_logits) <= 1e-5


def test_convert_from_split_and_hf_and_to_float16(splits, all_tensors, tmp_path, tokens,
                                                   expected_logits):
    convert.main(str(splits[3]), str(tmp_path / "from_split"))
    assert max_diff(load_model(tmp_path / "from_split"), tokens, expected_logits) <= 1e-5
    assert (tmp_path / "from_split" / "tokenizer.model").is_file()

    args, tensors = all_tensors
    save_hf_safetensors(tensors, args, tmp_path / "hf")
    (tmp_path / "empty").mkdir()  # an empty destination folder is fine
    convert.main(str(tmp_path / "hf"), str(tmp_path / "empty"), dtype="float16")
    shard = torch.load(tmp_path / "empty" / "consolidated.00.pth", weights_only=True)
    assert all(t.dtype == torch.float16 for t in shard.values())
    assert max_diff(load_model(tmp_path / "empty"), tokens, expected_logits) <= 0.05


def test_convert_refuses_bad_arguments(bin_path, tmp_path):
    with pytest.raises(BadInput, match="--n_shards 3 does not divide"):
        convert.main(str(bin_path), str(tmp_path / "x"), n_shards=3)
    with pytest.raises(BadInput, match="--dtype 'int8'"):
        convert.main(str(bin_path), str(tmp_path / "x"), dtype="int8")
    with pytest.raises(BadInput, match="does not exist"):
        convert.main(str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- a convert killed midway (issue 18, item 8) ----

KILLED_AT_MOVE_IN = """
import os, signal, sys
from pathlib import Path
real_replace = os.replace

def replace(src, dst):  # SIGKILL at the moment the new folder would take the old one's name
    if Path(src).is_dir() and Path(dst).name == "conv":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

os.replace = replace
from llama.formats import convert
convert.main(sys.argv[1], sys.argv[2], n_shards=int(sys.argv[3]), overwrite=True)
"""


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_convert_killed_while_replacing_keeps_the_old_folder_and_leaves_no_temp(bin_path,
                                                                              tmp_path):
    conv = tmp_path / "conv"
    convert.main(str(bin_path), str(conv))
    before = folder_contents(conv)
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_MOVE_IN, str(bin_path), str(conv),
                             "2"], cwd=REPO, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.startswith(".conv.tmp-") for p in tmp_path.iterdir())
    # Folders of a live process (this one's parent) and names not ours are never touched.
    alive = tmp_path / f".conv.tmp-{os.getppid()}"
    foreign = [tmp_path / ".conv.tmp-x1", tmp_path / f".other.tmp-{dead_pid()}"]
    for folder in (alive, *foreign):
        folder.mkdir()
    # The next convert puts the old folder back, then refuses to replace it without --overwrite,
    # and deletes the dead run's model-sized temporary folder.
    with pytest.raises(BadInput, match=r"conv already exists .*pass --overwrite"):
        convert.main(str(bin_path), str(conv))
    assert folder_contents(conv) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["conv", alive.name, *(f.name for f in foreign)])
    convert.main(str(bin_path), str(conv), n_shards=2, overwrite=True)
    assert (conv / "consolidated.01.pth").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["conv", alive.name, *(f.name for f in foreign)])


def test_stale_temp_folder_of_a_dead_split_is_removed(bin_path, tmp_path):
    stale = tmp_path / f".pp2.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "stage.00.pth").write_bytes(b"half")
    write_split(open_source(bin_path), tmp_path / "pp2", 2, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pp2"]


def test_split_and_convert_into_a_read_only_folder_say_so_in_one_line(bin_path, tmp_path,
                                                                      monkeypatch):
    """root writes into a read-only folder anyway, so the kernel's refusal is simulated."""
    real_mkdir = type(tmp_path).mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if path.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(type(tmp_path), "mkdir", read_only_mkdir)
    with pytest.raises(BadInput, match=r"--out_dir \S+ro/pp2 cannot be written: its folder "
                                       r"\S+ro does not take new files \(Permission denied\); "
                                       r"pick a writable place for --out_dir"):
        split_model.main(str(bin_path), 2, out_dir=str(tmp_path / "ro" / "pp2"))
    with pytest.raises(BadInput, match=r"--dst \S+ro/conv cannot be written: its folder \S+ro "
                                       r"does not take new files \(Permission denied\)"):
        convert.main(str(bin_path), str(tmp_path / "ro" / "conv"))
    assert list((tmp_path / "ro").iterdir()) == []
