"""Bad input gets one clear line naming the file or value at fault, a non-zero exit, no traceback
and no partial output: missing files, corrupt or tampered stages, wrong stage counts, a wrong
tokenizer, over-long prompts, pickles that run code, strict keys, escaping file names.
Run: python3 -m pytest -q tests/test_cli_errors.py
"""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import example
import example_ft
import ft_main
import split_model
from launch import REPO, launch
from llama.formats import convert
from llama.formats.checkpoint import load_model, open_source, sha256_of, write_split
from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.layouts import save_meta
from payload import RunsCode


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def bin_path(assets):
    return assets / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def all_tensors(bin_path):
    source = open_source(bin_path)
    return source.args, {name: source.load(name) for name in source.names()}


@pytest.fixture(scope="module")
def pristine_split(bin_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "pp2"
    split_model.main(str(bin_path), 2, out_dir=str(out))
    return out


@pytest.fixture
def split(pristine_split, tmp_path):
    """A 2-stage split of stories260K (with tok512 as tokenizer.model) that a test may damage."""
    return shutil.copytree(pristine_split, tmp_path / "pp2")


@pytest.fixture
def meta_dir(all_tensors, tmp_path):
    args, tensors = all_tensors
    save_meta(tensors, args, tmp_path / "meta")
    return tmp_path / "meta"


def edit_manifest(split_dir, change):
    manifest = json.loads((split_dir / "split.json").read_text())
    change(manifest)
    (split_dir / "split.json").write_text(json.dumps(manifest))


def replace_stage_file(split_dir, index, obj):
    """Write obj as stage `index` and record its true sha256, so only its content is at fault."""
    path = split_dir / f"stage.{index:02d}.pth"
    torch.save(obj, path)

    def record(manifest):
        manifest["stages"][index]["sha256"] = sha256_of(path)
        manifest["stages"][index]["bytes"] = path.stat().st_size
    edit_manifest(split_dir, record)


def stage_tensors(split_dir, index):
    return torch.load(split_dir / f"stage.{index:02d}.pth", weights_only=True)


# ---- missing files ----

def test_meta_folder_without_params_json(meta_dir, tmp_path):
    (meta_dir / "params.json").unlink()
    message = r"meta/params\.json is missing: the Meta layout needs it"
    with pytest.raises(BadInput, match=message):
        split_model.main(str(meta_dir), 2, out_dir=str(tmp_path / "out"))
    with pytest.raises(BadInput, match=message):
        load_model(meta_dir)
    with pytest.raises(BadInput, match=message):
        convert.main(str(meta_dir), str(tmp_path / "converted"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]


def test_split_without_params_json(split):
    (split / "params.json").unlink()
    with pytest.raises(BadInput, match=r"pp2/params\.json is missing"):
        load_model(split, stage=0, n_stages=2)


def test_missing_stage_file(split):
    (split / "stage.01.pth").unlink()
    message = r"stage file \S*pp2/stage\.01\.pth is missing: split the model again"
    with pytest.raises(BadInput, match=message):
        load_model(split, stage=1, n_stages=2)
    with pytest.raises(BadInput, match=message):
        example.main(str(split), max_gen_len=2)  # one process loads every stage
    load_model(split, stage=0, n_stages=2)  # the stage that is there still loads


def test_stage_file_whose_sha256_differs_from_split_json(split):
    path = split / "stage.00.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=r"stage\.00\.pth does not match the sha256 in split\.json"):
        load_model(split, stage=0, n_stages=2)


def test_truncated_stage_file(split):
    path = split / "stage.01.pth"
    path.write_bytes(path.read_bytes()[:5000])
    # Recorded as the file's sha256: the file is cut short, not tampered with.
    edit_manifest(split, lambda m: m["stages"][1].update(sha256=sha256_of(path)))
    with pytest.raises(BadInput, match=r"stage\.01\.pth is corrupt or truncated"):
        load_model(split, stage=1, n_stages=2)


# ---- stage counts ----

@pytest.mark.parametrize("n_stages", [6, 0, -1])
def test_n_stages_outside_1_to_n_layers(bin_path, tmp_path, n_stages):
    out_dir = tmp_path / "out"
    with pytest.raises(BadInput, match=rf"n_stages={n_stages} must be an integer from 1 to the "
                                       r"model's n_layers=5"):
        split_model.main(str(bin_path), n_stages, out_dir=str(out_dir))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_torchrun_world_size_different_from_n_stages(split):
    started = time.monotonic()
    results = launch(["example.py", "--ckpt_dir", str(split), "--max_gen_len", "2"], 3,
                     timeout_s=90)
    assert time.monotonic() - started < 60  # every rank stops at once, none waits for a peer
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, f"rank {rank} exited {code}\n{err}"
        assert "Traceback" not in err and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "torchrun started 3 processes but the checkpoint is split into 2 stages" in lines[0]
        assert "--nproc_per_node 2" in lines[0]


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_ranks_started_without_torchrun(monkeypatch, missing):
    """WORLD_SIZE set by hand, without the address of the job's store that torchrun gives."""
    from llama.parallel.distributed import init_distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv(missing)
    with pytest.raises(BadInput, match=r"^WORLD_SIZE=2 but MASTER_ADDR or MASTER_PORT is not set: "
                                       r"start the ranks with torchrun"):
        init_distributed(device="cpu", timeout_s=5)


def test_split_asked_for_a_different_number_of_stages(split):
    with pytest.raises(BadInput, match=r"split into 2 stages but 3 were asked for"):
        load_model(split, stage=0, n_stages=3)


# ---- tokenizer and prompt ----

def test_tokenizer_whose_vocabulary_differs_from_the_model(split, assets, capsys):
    tokenizer = assets / "llama" / "tokenizer.model"
    with pytest.raises(BadInput, match=r"tokenizer \S*llama/tokenizer\.model has 32000 pieces but "
                                       r"the model's vocabulary has 512"):
        example.main(str(split), tokenizer_path=str(tokenizer), max_gen_len=2)
    assert capsys.readouterr().out == ""


def test_prompt_longer_than_max_seq_len(split, capsys):
    with pytest.raises(BadInput, match=r"a prompt of \d+ tokens .* does not fit max_seq_len=16"):
        example.main(str(split), prompts=["Once upon a time " * 8, "Hi"], max_seq_len=16)
    assert capsys.readouterr().out == ""  # not even the short prompt's text


# ---- pickles that would run code ----

def test_the_crafted_pickle_really_runs_code_when_loaded_unsafely(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": RunsCode(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()  # so its absence below means the loader refused it


def test_stage_file_that_needs_code_to_unpickle(split, tmp_path):
    marker = tmp_path / "marker"
    tensors = stage_tensors(split, 0)
    tensors["layers.0.attention.wq.weight"] = RunsCode(marker)
    replace_stage_file(split, 0, tensors)
    with pytest.raises(BadInput, match=r"stage\.00\.pth needs code to unpickle and was refused"):
        load_model(split, stage=0, n_stages=2)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_meta_shard_that_needs_code_to_unpickle(meta_dir, tmp_path, zip_format):
    marker = tmp_path / "marker"
    shard = meta_dir / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": RunsCode(marker)}, shard,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(BadInput, match=r"consolidated\.00\.pth needs code to unpickle"):
        load_model(meta_dir)
    with pytest.raises(BadInput, match=r"consolidated\.00\.pth needs code to unpickle"):
        split_model.main(str(meta_dir), 2, out_dir=str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---- strict keys ----

def test_stage_file_with_an_unknown_key(split):
    tensors = stage_tensors(split, 0)
    tensors["layers.0.attention.wq.bias"] = torch.zeros(64)
    replace_stage_file(split, 0, tensors)
    with pytest.raises(BadInput, match=r"stage 0 has unexpected weights \(first: "
                                       r"layers\.0\.attention\.wq\.bias\)"):
        load_model(split, stage=0, n_stages=2)
    with pytest.raises(BadInput, match=r"'layers\.0\.attention\.wq\.bias' is extra"):
        convert.main(str(split), str(split.parent / "converted"))
    assert not (split.parent / "converted").exists()


def test_stage_file_with_another_stages_weights(split):
    tensors = {**stage_tensors(split, 0), **stage_tensors(split, 1)}
    replace_stage_file(split, 0, tensors)
    with pytest.raises(BadInput, match=r"stage 0 has unexpected weights \(first: layers\.3\."):
        load_model(split, stage=0, n_stages=2)


def test_stage_file_with_a_missing_weight(split):
    tensors = stage_tensors(split, 1)
    del tensors["layers.4.feed_forward.w2.weight"]
    replace_stage_file(split, 1, tensors)
    with pytest.raises(BadInput, match=r"lacks 1 weights of stage 1 \(first: "
                                       r"layers\.4\.feed_forward\.w2\.weight\)"):
        load_model(split, stage=1, n_stages=2)


def test_stage_file_with_a_wrong_shape(split):
    tensors = stage_tensors(split, 1)
    tensors["norm.weight"] = torch.ones(32)
    replace_stage_file(split, 1, tensors)
    with pytest.raises(BadInput, match=r"norm\.weight has shape \(32,\), the model expects "
                                       r"\(64,\)"):
        load_model(split, stage=1, n_stages=2)


def test_meta_checkpoint_with_more_layers_than_params_json(meta_dir, tmp_path):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "n_layers": 4}))
    message = r"meta has 9 weights this model does not have \(first: layers\.4\."
    with pytest.raises(BadInput, match=message):
        load_model(meta_dir)
    with pytest.raises(BadInput, match=r"weights this model does not have"):
        write_split(open_source(meta_dir), tmp_path / "out", 2, log=quiet)
    assert not (tmp_path / "out").exists()


def test_meta_checkpoint_with_a_missing_weight(all_tensors, tmp_path):
    args, tensors = all_tensors
    save_meta({k: v for k, v in tensors.items() if k != "norm.weight"}, args, tmp_path / "meta")
    with pytest.raises(BadInput, match=r"lacks 1 weights of stage 0 \(first: norm\.weight\)"):
        load_model(tmp_path / "meta")


# ---- split.json naming files outside its folder ----

@pytest.mark.parametrize("name", ["../stage.00.pth", "ABSOLUTE", "sub/stage.00.pth", ".."])
def test_split_json_naming_a_file_outside_its_folder(split, name):
    # A real stage file waits at each of those places: only the name check can refuse it.
    shutil.copyfile(split / "stage.00.pth", split.parent / "stage.00.pth")
    (split / "sub").mkdir()
    shutil.copyfile(split / "stage.00.pth", split / "sub" / "stage.00.pth")
    name = str(split.parent / "stage.00.pth") if name == "ABSOLUTE" else name
    edit_manifest(split, lambda m: m["stages"][0].update(file=name))
    with pytest.raises(BadInput, match=rf"names stage 0 file {re.escape(repr(name))}, which is not "
                                       r"a plain file name inside the folder"):
        load_model(split, stage=0, n_stages=2)


# ---- the scripts themselves: exit status 2, one line on stderr, no traceback ----

def test_scripts_exit_with_one_error_line_and_write_nothing(bin_path, split, meta_dir, tmp_path):
    marker = tmp_path / "marker"
    evil_meta = shutil.copytree(meta_dir, tmp_path / "evil_meta")
    torch.save({"tok_embeddings.weight": RunsCode(marker)}, evil_meta / "consolidated.00.pth")
    (meta_dir / "params.json").unlink()
    (split / "stage.01.pth").unlink()
    cases = [
        (["split_model.py", "--ckpt_dir", str(bin_path), "--n_stages", "6",
          "--out_dir", str(tmp_path / "out6")], r"n_stages=6 must be an integer from 1",
         tmp_path / "out6"),
        (["split_model.py", "--ckpt_dir", str(evil_meta), "--n_stages", "2",
          "--out_dir", str(tmp_path / "out_evil")], r"consolidated\.00\.pth needs code to unpickle",
         tmp_path / "out_evil"),
        (["-m", "llama.formats.convert", "--src", str(meta_dir), "--dst", str(tmp_path / "converted")],
         r"params\.json is missing", tmp_path / "converted"),
        (["example.py", "--ckpt_dir", str(split)], r"stage\.01\.pth is missing", None),
        # a folder that cannot take files (as a read-only one; root writes into those anyway)
        (["split_model.py", "--ckpt_dir", str(bin_path), "--n_stages", "2",
          "--out_dir", str(tmp_path / "marker.txt" / "pp2")],
         r"--out_dir \S+marker\.txt/pp2 cannot be written: its folder \S+marker\.txt does not "
         r"take new files \(Not a directory\)", None),
        (["-m", "llama.formats.convert", "--src", str(bin_path), "--dst",
          str(tmp_path / "marker.txt" / "conv")], r"--dst \S+conv cannot be written", None),
        (["-m", "llama.formats.convert", "--src", str(bin_path), "--dst", str(tmp_path / "conv"),
          "--sha256", str(tmp_path / "nested.json")],
         r"--sha256 \S+nested\.json nests lists or objects too deeply", tmp_path / "conv"),
        (["-m", "llama.tools.plan", "--global_batch", "0"], r"--global_batch=0 must be a positive "
                                                      r"integer", None),
    ]
    (tmp_path / "marker.txt").write_text("a file where a folder is asked for")
    (tmp_path / "nested.json").write_text("[" * 100_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv, _, _ in cases]
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (argv, message, must_not_exist), proc, (out, err) in zip(cases, procs, results):
        assert proc.returncode == 2, f"{argv}: exit {proc.returncode}\n{err}"
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(message, lines[0]), lines[0]
        if must_not_exist is not None:
            assert not must_not_exist.exists()
    assert not marker.exists()
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in tmp_path.iterdir())


# ---- the command line itself: checked against main's signature before any work ----

def run_command(main, argv, monkeypatch, capsys):
    """run_cli(main) as `script.py argv...`: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    try:
        run_cli(main)
        status = 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(status, err) -> str:
    assert status == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def calls(monkeypatch):
    """ft_main's training and example's start recorded instead of run (the parsed arguments as
    given: RunConfig's own checks of their values are tested in test_train and test_fuzz)."""
    seen = []
    monkeypatch.setattr(ft_main, "RunConfig", dict)
    monkeypatch.setattr(ft_main, "train", seen.append)

    def run_on_stage(options, *rest):
        seen.append(options)
        raise BadInput("start-up reached")
    monkeypatch.setattr(example, "run_on_stage", run_on_stage)
    return seen


FT_REQUIRED = ["--ckpt_dir", "m", "--data", "d.json", "--out", "o"]


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "30"], r"unknown flag --max_steps \(did you mean --steps\?\)"),
    (["--max-steps=30"], r"unknown flag --max-steps \(did you mean --steps\?\)"),
    (["--lr_shedule", "constant"], r"unknown flag --lr_shedule \(did you mean --lr_schedule\?\)"),
    (["--norecompte"], r"unknown flag --norecompte \(did you mean --recompute\?\)"),
    (["--zzzzzz", "1"], r"unknown flag --zzzzzz \(no flag is close to it\)"),
    (["extra"], r"unexpected value 'extra' after --out: every value needs its --name"),
    (["--steps", "3", "--steps", "5"], r"--steps is given twice \('3' and '5'\): keep one"),
    (["--steps", "2.5"], r"--steps '2\.5' is not an integer"),
    (["--lr", "fast"], r"--lr 'fast' is not a number"),
    (["--recompute", "maybe"], r"--recompute 'maybe' is not True or False"),
    (["--debug_overflow_steps", "[1, 'x']"], r"holds 'x', which is not an integer"),
    (["--", "--trace"], r"--trace after '--' is not understood: only --help is"),
    (["-s", "3"], r"unknown flag -s \(no flag is close to it\)"),  # fire's one-letter forms are gone
])
def test_ft_main_refuses_a_bad_command_line_before_any_work(argv, message, calls, monkeypatch,
                                                             capsys):
    line = one_error_line(*run_command(ft_main.main, FT_REQUIRED + argv, monkeypatch, capsys)[::2])
    assert re.search(message, line), line
    assert calls == []  # nothing trained


def test_missing_required_flag_names_it_and_its_meaning(calls, monkeypatch, capsys):
    status, _, err = run_command(ft_main.main, ["--ckpt_dir", "m", "--data", "d"], monkeypatch,
                                 capsys)
    assert re.search(r"^error: --out is required \(the folder for the prompt", one_error_line(
        status, err))


def test_flags_in_every_form_fire_accepts(calls, monkeypatch, capsys):
    argv = ["m", "d.json", "--out=o", "--steps", "3", "--no-recompute", "--train_on_prompt",
            "--nostrict", "--lr=-1", "--init-text", "2024", "--resume", "True", "--offload",
            "optimizer,activations", "--tokenizer_path", "None", "--debug_overflow_steps", "2,4"]
    status, _, err = run_command(ft_main.main, argv, monkeypatch, capsys)
    assert status == 0, err
    (cfg,) = calls
    assert (cfg["ckpt_dir"], cfg["data"], cfg["out"], cfg["steps"]) == ("m", "d.json", "o", 3)
    assert cfg["recompute"] is False and cfg["train_on_prompt"] is True and cfg["strict"] is False
    assert cfg["lr"] == -1.0 and cfg["init_text"] == "2024" and cfg["resume"] is True
    assert cfg["offload"] == "optimizer,activations" and cfg["tokenizer_path"] is None
    assert cfg["debug_overflow_steps"] == (2, 4)


def test_a_value_without_an_annotation_is_a_python_literal_or_the_text():
    from llama.cli import parse_command_line

    def main(batch=(1, 8), schedule="1f1b", force=False, mirror=None):
        """Doc."""
    assert parse_command_line(main, ["--batch", "1,2,4", "--schedule", "gpipe,1f1b", "--force",
                                     "--mirror", "None"], "bench.py") == {
        "batch": (1, 2, 4), "schedule": "gpipe,1f1b", "force": True, "mirror": None}
    assert parse_command_line(main, ["--batch", "[" * 5000, "--schedule", "2"], "bench.py") == {
        "batch": "[" * 5000, "schedule": 2}


@pytest.mark.parametrize("argv, prompts", [
    (["--prompts", "2024"], ("2024",)),  # a text parameter keeps the text as typed
    (["--prompts", "True"], ("True",)),
    (["--prompts", "Hello, world"], ("Hello, world",)),  # fire made this two prompts
    (["--prompts", '["a", "b"]'], ("a", "b")),
    (["--prompts", " ".join(["word"] * 2500)], (" ".join(["word"] * 2500),)),  # fire: MemoryError
])
def test_example_prompts_are_texts_as_typed(argv, prompts):
    from llama.cli import parse_command_line
    assert parse_command_line(example.main, ["--ckpt_dir", "m", *argv], "example.py") == {
        "ckpt_dir": "m", "prompts": prompts}


@pytest.mark.parametrize("argv, message", [
    (["--prompts", '[["a"]]'], r"--prompts '\[\[\"a\"\]\]' holds \['a'\], which is not a text: "
                               r"write one value or a list such as"),
    (["--prompts", "[1, 2]"], r"holds 1, which is not a text"),
    (["--prompts", '["a", "b"'], r"--prompts '\[\"a\", \"b\"' is not a list of quoted texts"),
    (["--prompts", *["word"] * 2500], r"unexpected value 'word' after --prompts: every value "
                                      r"needs its --name; several texts for --prompts go in one "
                                      r"list: --prompts '\[\"first text\", \"second text\"\]'"),
    (["--max_gen_len", "[3]"], r"--max_gen_len '\[3\]' is not an integer"),
    (["--temprature", "0.5"], r"unknown flag --temprature \(did you mean --temperature\?\)"),
])
def test_example_refuses_values_of_the_wrong_type(argv, message, calls, monkeypatch, capsys):
    status, _, err = run_command(example.main, ["--ckpt_dir", "m", *argv], monkeypatch, capsys)
    line = one_error_line(status, err)
    assert re.search(message, line), line
    assert calls == []


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], r"--temperature=nan must be a finite number >= 0 \(0: greedy\)"),
    (["--temperature", "inf"], r"--temperature=inf must be a finite number"),
    (["--temperature", "0.8", "--top_p", "-1"], r"--top_p=-1 must be a number in \(0, 1\]"),
    (["--top_p", "nan"], r"--top_p=nan must be a number in \(0, 1\]"),
    (["--prompts", "\udced\udca0\udc80"],  # what Python makes of the bytes ED A0 80 in argv
     r"the text '\\udced\\udca0\\udc80' holds '\\udced' at character 0, which is not a Unicode "
     r"character \(bytes that are not UTF-8, or a lone surrogate\): give UTF-8 text"),
])
def test_generation_refuses_sampling_settings_and_text_it_cannot_use(model_bin, argv, message,
                                                                     monkeypatch, capsys):
    status, _, err = run_command(example.main, ["--ckpt_dir", str(model_bin), "--max_gen_len", "4",
                                                *argv], monkeypatch, capsys)
    line = one_error_line(status, err)
    assert re.search(message, line), line


def test_chat_refuses_a_temperature_of_nan(monkeypatch, capsys):
    import chat
    status, _, err = run_command(chat.main, ["--ckpt_dir", "m", "--temperature", "nan"],
                                 monkeypatch, capsys)
    assert "--temperature=nan must be a finite number" in one_error_line(status, err)


def test_a_temperature_so_small_that_logits_overflow_is_greedy(model_bin, monkeypatch, capsys):
    runs = [run_command(example.main, ["--ckpt_dir", str(model_bin), "--max_gen_len", "12",
                                       *argv], monkeypatch, capsys)
            for argv in ([], ["--temperature", "1e-40"], ["--temperature", "5e-324"])]
    assert [status for status, _, _ in runs] == [0, 0, 0], runs
    assert runs[0][1] == runs[1][1] == runs[2][1] and "Once upon a time" in runs[0][1]


def test_a_misspelt_flag_stops_ft_main_before_it_reads_anything(model_bin, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "ft_main.py", "--ckpt_dir", str(model_bin), "--data",
                           str(tmp_path / "absent.json"), "--out", str(out), "--max_steps", "30"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, text=True,
                          capture_output=True, timeout=120)
    assert one_error_line(proc.returncode, proc.stderr) == (
        "error: unknown flag --max_steps (did you mean --steps?); python ft_main.py --help lists "
        "the flags")
    assert not out.exists()


# ---- --help: what the script does, then every option with its type, default and meaning ----

def script_mains():
    from llama.formats import download
    from llama.tools import distill, explain, plot
    return {"example.py": example.main, "example_ft.py": example_ft.main,
            "ft_main.py": ft_main.main, "split_model.py": split_model.main,
            "convert": convert.main, "download": download.main, "explain": explain.main,
            "plot schedule": plot.schedule, "plot losses": plot.losses,
            "distill teach": distill.teach, "distill score": distill.score}


FIRST_LINES = {"example.py": "Generate text", "example_ft.py": "Generate with a trained soft "
               "prompt", "ft_main.py": "Train a soft prompt", "split_model.py": "Split a LLaMA "
               "checkpoint", "convert": "Convert a checkpoint", "download": "Download a model",
               "explain": "Print who owns what", "plot schedule": "Draw one step of a trace",
               "plot losses": "Draw the train", "distill teach": "Sample stories",
               "distill score": "Share of stories"}


@pytest.mark.parametrize("name", list(FIRST_LINES))
def test_help_says_what_the_script_does_and_every_option(name, monkeypatch, capsys):
    main = script_mains()[name]
    status, out, err = run_command(main, ["--help"], monkeypatch, capsys)
    assert status == 0 and err == "", err
    assert out.splitlines()[0].startswith(FIRST_LINES[name]), out
    assert "INFO:" not in out and "Optional[" not in out and "..." not in out.replace(
        "[TEXT, ...]", "").replace("[INT, ...]", "").replace("[FLOAT, ...]", "")
    for param_name, param in inspect.signature(main).parameters.items():
        block = re.search(rf"^  --{param_name} ([^\n]+?) \((required|default [^\n]*)\)\n"
                          rf"((?:      \S[^\n]*\n?)+)", out, re.M)
        assert block, f"{name}: --{param_name} without its type, default and meaning:\n{out}"
        if param.default is not inspect.Parameter.empty:
            assert block.group(2) == f"default {json.dumps(list(param.default)) if isinstance(param.default, tuple) else param.default}"


def test_help_of_a_module_with_commands_and_after_fires_separator():
    env = {**os.environ, "PYTHONPATH": REPO}
    plot = subprocess.run([sys.executable, "-m", "llama.tools.plot", "--help"], cwd=REPO, env=env,
                          text=True, capture_output=True, timeout=120)
    assert plot.returncode == 0 and plot.stderr == ""
    assert plot.stdout.startswith("Draw a pipeline trace as an SVG timeline")
    assert "usage: python -m llama.tools.plot COMMAND [options]" in plot.stdout
    assert re.search(r"^  schedule +Draw one step", plot.stdout, re.M)
    split = subprocess.run([sys.executable, "split_model.py", "--", "--help"], cwd=REPO, env=env,
                           text=True, capture_output=True, timeout=120)
    assert split.returncode == 0 and split.stdout.startswith("Split a LLaMA checkpoint")
    assert "usage: python split_model.py --ckpt_dir TEXT --n_stages INT [options]" in split.stdout


def test_a_skipped_record_note_names_the_flag_as_typed(tmp_path):
    from llama.training.records import load_records
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"instruction": "a", "output": 1}, {"instruction": "b",
                                                                     "output": "c"}]))
    notes = []
    load_records(path, strict=False, log=notes.append)
    assert notes and notes[0].endswith("; pass --strict to refuse the file instead"), notes


def test_no_flag_of_a_torchrun_script_is_taken_by_torchrun():
    """torchrun's parser reads every --flag of the command line, the script's too, and takes a
    flag that begins one of its own options (serve.py's old --log: 'ambiguous option ...
    --log_dir'; a single match would be taken silently)."""
    import chat
    import serve
    from torch.distributed.run import get_args_parser
    theirs = [s for action in get_args_parser()._actions for s in action.option_strings
              if s.startswith("--") and s != "--help"]
    for script in (example, example_ft, ft_main, chat, serve):
        for name in inspect.signature(script.main).parameters:
            for flag in (f"--{name}", f"--{name.replace('_', '-')}"):
                assert not [s for s in theirs if s.startswith(flag)], (script.__name__, flag)
