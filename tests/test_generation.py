"""Pipelined generation: 2 and 3 real processes (gloo) generate exactly what one process does,
greedy and sampled, for prompts of unequal length; example.py agrees with itself under torchrun.
Run: python3 -m pytest -q tests/test_generation.py
"""
import json
import os
import re
import subprocess
import sys

import pytest

import split_model
from launch import REPO, check_all_ok, free_port, launch
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage
from llama.model.tokenizer import Tokenizer

MAX_GEN_LEN = 16
SETTINGS = dict(temperature=0.8, top_p=0.9, seed=0, stop_ids=(1, 2))


@pytest.fixture(scope="module")
def stories(assets):
    return assets / "stories260K"


@pytest.fixture(scope="module")
def prompts(stories):
    tokenizer = Tokenizer(str(stories / "tok512.model"))
    texts = ["Once upon a time", "Tom and Lily went to the park. They saw", "The cat"]
    return [tokenizer.encode(t, bos=True, eos=False) for t in texts] + [[1]]


@pytest.fixture(scope="module")
def splits(stories, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_splits")
    for n_stages in (2, 3):
        split_model.main(str(stories / "stories260K.bin"), n_stages,
                         out_dir=str(root / f"pp{n_stages}"))
    return {n: root / f"pp{n}" for n in (2, 3)}


@pytest.fixture(scope="module")
def single_process(stories, prompts):
    """What one process generates: the reference for the pipelines."""
    stage = Stage(load_model(stories / "stories260K.bin"), DistContext())
    settings = dict(SETTINGS)
    temperature = settings.pop("temperature")
    return {"greedy": generate(stage, prompts, MAX_GEN_LEN, 0.0, **settings),
            "sampled": generate(stage, prompts, MAX_GEN_LEN, temperature, **settings)}


def test_single_process_batch_equals_each_prompt_alone(stories, prompts, single_process):
    stage = Stage(load_model(stories / "stories260K.bin"), DistContext())
    for prompt, batched in zip(prompts, single_process["greedy"]):
        assert generate(stage, [prompt], MAX_GEN_LEN, stop_ids=(1, 2)) == [batched]
    assert all(len(ids) == MAX_GEN_LEN for ids in single_process["greedy"])
    assert single_process["sampled"] != single_process["greedy"]  # sampling really sampled


@pytest.mark.parametrize("n_stages, cuda_graph", [(2, False), (3, False), (2, True)])
def test_pipeline_generates_what_one_process_generates(splits, prompts, single_process, n_stages,
                                                       cuda_graph, tmp_path):
    """cuda_graph: the static decode path (uncaptured on the CPU) on every stage, against the
    eager path of one process."""
    out = tmp_path / "ids.json"
    argv = [os.path.join("tests", "workers", "gen_worker.py"), "--ckpt", str(splits[n_stages]),
            "--out", str(out), "--prompts", json.dumps(prompts), "--max_gen_len", str(MAX_GEN_LEN),
            "--temperature", str(SETTINGS["temperature"]), "--top_p", str(SETTINGS["top_p"]),
            "--seed", str(SETTINGS["seed"]), f"--cuda_graph={cuda_graph}"]
    check_all_ok(launch(argv, n_stages, timeout_s=120))
    assert json.loads(out.read_text()) == single_process


def test_example_prints_the_same_text_in_one_process_and_under_torchrun(splits):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    args = ["example.py", "--ckpt_dir", str(splits[2]), "--max_gen_len", "16"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            for command in ([sys.executable, *args], [*torchrun, *args])]
    results = []
    try:
        for run in runs:
            out, err = run.communicate(timeout=120)
            results.append((run.returncode, out, err))
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    for code, out, err in results:
        assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    single, pipelined = results[0][1], results[1][1]
    assert single.startswith("Once upon a time") and single.count("-" * 40) == 3
    assert pipelined == single


def test_long_generation_shows_progress_on_stderr_and_the_same_tokens(stories, prompts, capsys):
    stage = Stage(load_model(stories / "stories260K.bin"), DistContext())
    quiet = generate(stage, prompts, MAX_GEN_LEN, **SETTINGS)
    assert capsys.readouterr().err == ""  # short work, or no progress asked: nothing
    shown = generate(stage, prompts, MAX_GEN_LEN, **SETTINGS, progress_every_s=0)
    captured = capsys.readouterr()
    assert shown == quiet and captured.out == ""
    lines = captured.err.splitlines()
    assert lines and all(re.fullmatch(r"generating 4 texts: \d+/\d+ tokens, elapsed \d+s"
                                      r"(, ETA \d+s)?", line) for line in lines), lines
