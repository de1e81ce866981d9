"""llama.tools.explain against what split_model.py writes: the same layer ranges, names and bytes, in
the checkpoint's own precision. Run: python3 -m pytest -q tests/test_explain.py
"""
import pytest

from llama.tools import explain
from llama.formats.checkpoint import open_source, write_split
from llama.errors import BadInput
from llama.model.partition import describe_stage

# torch.save's zip container: a few hundred bytes of header and pickle per tensor.
FILE_OVERHEAD = 64 * 1024


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def split_4(model_bin, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("explain") / "pp4"
    return out_dir, write_split(open_source(model_bin), out_dir, 4, log=quiet)


def test_explain_reads_a_split_folder_and_prints_its_stages(split_4, capsys):
    out_dir, manifest = split_4
    explain.main(ckpt_dir=str(out_dir))
    printed = capsys.readouterr().out
    assert "weights in float32" in printed
    for index, stage in enumerate(manifest["stages"]):
        name = describe_stage(stage["layers"], stage["embeddings"], stage["head"])
        assert f"stage {index}: {name} " in printed
        assert stage["file"] in printed
    rows = explain.stage_rows(out_dir, None, None)[2]
    assert [row["bytes"] for row in rows] == [stage["bytes"] for stage in manifest["stages"]]


def test_explain_of_the_checkpoint_predicts_the_split(split_4, model_bin, capsys):
    """Same ranges as split.json, fp32 sizes (not fp16) within the files' header overhead."""
    _, manifest = split_4
    args, dtype, rows = explain.stage_rows(model_bin, 4, None)
    assert dtype == "float32"
    for row, stage in zip(rows, manifest["stages"]):
        assert (row["layers"], row["embeddings"], row["head"]) == \
            (stage["layers"], stage["embeddings"], stage["head"])
        assert 0 <= stage["bytes"] - row["bytes"] < FILE_OVERHEAD
    explain.main(ckpt_dir=str(model_bin), n_stages=4)
    printed = capsys.readouterr().out
    assert "weights in float32" in printed
    assert describe_stage(manifest["stages"][3]["layers"], False, True) in printed


def test_explain_sizes_follow_an_explicit_dtype(model_bin):
    _, _, fp32 = explain.stage_rows(model_bin, 2, None)
    _, dtype, fp16 = explain.stage_rows(model_bin, 2, "float16")
    assert dtype == "float16"
    assert [row["bytes"] for row in fp16] == [row["bytes"] // 2 for row in fp32]


def test_explain_refuses_another_stage_count_than_the_split(split_4):
    out_dir, _ = split_4
    with pytest.raises(BadInput, match=r"split into 4 stages.*--n_stages 2"):
        explain.main(ckpt_dir=str(out_dir), n_stages=2)
