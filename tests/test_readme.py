"""The README's "The commands" block runs as written after its own download command: every file a
command reads is one that the download or an earlier command in the block writes.
(Running the block itself takes minutes; this reads it.) Run: python3 -m pytest -q tests/test_readme.py
"""
import inspect
import shlex
from pathlib import Path

from llama.formats import download

REPO = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The commands"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def flag(words, name):
    return words[words.index(name) + 1] if name in words else None


def test_every_readme_command_reads_only_what_an_earlier_one_wrote():
    commands = readme_commands()
    first = commands[0]
    assert first[:3] == ["python", "-m", "llama.formats.download"], "the block starts with the download"
    defaults = {name: p.default for name, p in inspect.signature(download.main).parameters.items()}
    model_folder = flag(first, "--folder") or defaults["folder"]
    data_folder = flag(first, "--data_folder") or defaults["data_folder"]
    written = set()
    for name in (flag(first, "--model") or defaults["model"]).split(","):
        written |= {str(Path(model_folder, Path(f.dest).parts[0])) for f in download.MODELS[name]}
    for name in (flag(first, "--data") or defaults["data"]).split(","):
        written |= {str(Path(data_folder, f.dest)) for f in download.DATASETS[name]}

    for words in commands[1:]:
        script = next(w for w in words if w.endswith(".py") or w.startswith("llama."))
        reads = [flag(words, f) for f in ("--ckpt_dir", "--data", "--prompt", "--src")]
        if script == "llama.tools.plot":
            reads.append(words[words.index(script) + 2])  # plot KIND INPUT
        for path in filter(None, reads):
            assert any(path == w or path.startswith(w + "/") for w in written), \
                f"README runs {script} on {path}, which no earlier command writes"
        if script == "split_model.py":
            written.add(flag(words, "--out_dir") or
                        f"{flag(words, '--ckpt_dir')}_pp{flag(words, '--n_stages')}")
        written |= {flag(words, f) for f in ("--out", "--trace", "--dst")} - {None}


def test_readme_commands_run_after_the_quickstart_without_torchruns_banner():
    """After ./quickstart.sh, a split the README makes again must be replaced, not refused; and
    torchrun prints its OMP_NUM_THREADS banner on every launch unless the variable is set."""
    quickstart = (REPO / "quickstart.sh").read_text()
    made_by_quickstart = {flag(words, "--out_dir") or
                          f"{flag(words, '--ckpt_dir')}_pp{flag(words, '--n_stages')}"
                          for words in (shlex.split(line, comments=True)
                                        for line in quickstart.splitlines()
                                        if "split_model.py" in line)}
    for words in readme_commands():
        if "split_model.py" in words:
            out_dir = flag(words, "--out_dir") or \
                f"{flag(words, '--ckpt_dir')}_pp{flag(words, '--n_stages')}"
            assert out_dir not in made_by_quickstart or "--overwrite" in words, words
        if "torchrun" in words:
            assert words[:words.index("torchrun")] == ["OMP_NUM_THREADS=1"], words
    assert "export OMP_NUM_THREADS=1" in quickstart
