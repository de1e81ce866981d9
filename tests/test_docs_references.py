"""Every reference to the code in README.md and docs/*.md still points at something that exists.

A reference is `path.py` (a file), `path.py:name` or `path.py::name` (a function, class, method
`Class.method`, or module-level constant defined in that file, found by parsing it: a comment or
an import that mentions the name does not count), or a dotted `llama.module.name` whose first
part after `llama.` is a package or module here (`llama.cpp` and GGUF's `llama.block_count`
keys are other projects' names), or a test named alone (`test_truncated_stage_file`; a `*` in it
stands for the rest of several names). A page that
names a function the code no longer has fails here, naming the page, the line and the reference.
Files of other projects that pages cite (PEFT's, transformers', llama.cpp's) are listed in
NOT_OURS. Run: python -m pytest -q tests/test_docs_references.py
"""
import ast
import fnmatch
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# path.py, path.py:name, path.py::name (pytest's form), name possibly Class.method
FILE_REFERENCE = re.compile(
    r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)(?:::?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?")
MODULE_REFERENCE = re.compile(r"(?<![\w/.-])llama(?:\.[A-Za-z_]\w*)+")
# a test named on its own (`test_truncated_stage_file`, `test_stage_file_with_*`)
TEST_NAME = re.compile(r"(?<![\w/.*-])test_[\w*]+(?!\.py|[\w*])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# Other projects' files and names, cited as where a format or a rule comes from.
NOT_OURS = {"peft/tuners/lora/layer.py", "utils/save_and_load.py", "config.py",
            "convert_llama_weights_to_hf.py", "convert_hf_to_gguf.py"}


@lru_cache(maxsize=None)
def python_files(root: Path) -> tuple:
    return tuple(path.relative_to(root) for path in root.rglob("*.py")
                 if not any(part.startswith(".") or part in ("runs", "ckpts", "build")
                            for part in path.relative_to(root).parts))


def files_named(root: Path, reference: str) -> list:
    """The repository's files a `path.py` reference can mean: the path from the root, or, for
    a bare file name, every file of that name (pages say `train.py` beside its folder)."""
    if "/" in reference:
        return [root / reference] if (root / reference).is_file() else []
    return [root / path for path in python_files(root) if path.name == reference]


@lru_cache(maxsize=None)
def definitions(path: Path) -> dict:
    """{name: {member names}} of a file's top-level functions, classes and assignments; a class
    lists its methods, nested classes and class-level fields."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {}
    for node in tree.body:
        for name in defined_names(node):
            names[name] = set()
        if isinstance(node, ast.ClassDef):
            names[node.name] = {member for child in node.body for member in defined_names(child)}
    return names


def defined_names(node) -> list:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def defines(path: Path, dotted: str) -> bool:
    """Whether the file defines `name` or `Class.member`."""
    first, *rest = dotted.split(".")
    names = definitions(path)
    if first not in names:
        return False
    return not rest or (len(rest) == 1 and rest[0] in names[first])


def module_resolves(root: Path, dotted: str) -> bool:
    """`llama.a.b.name`: the longest prefix that is a module or package of the repository, and
    what follows it (a name, or Class.member) defined there."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else \
            base / "__init__.py" if (base / "__init__.py").is_file() else None
        if module is not None:
            rest = ".".join(parts[cut:])
            return not rest or defines(module, rest)
    return False


@lru_cache(maxsize=None)
def functions_in_tests(root: Path) -> frozenset:
    """Every function defined in tests/*.py (test functions, methods of test classes)."""
    return frozenset(node.name for path in (root / "tests").glob("*.py")
                     for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def names_our_module(root: Path, dotted: str) -> bool:
    """`llama.formats...` is ours; `llama.cpp` and GGUF's keys (`llama.block_count`) are not."""
    part = root / "llama" / dotted.split(".")[1]
    return part.is_dir() or part.with_suffix(".py").is_file()


def references(page: Path, root: Path = REPO):
    """(line number, reference, problem or None) for every reference on the page."""
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        for match in FILE_REFERENCE.finditer(line):
            path, name = match.groups()
            if path in NOT_OURS:
                continue
            candidates = files_named(root, path)
            if not candidates:
                yield number, match.group(0), f"no file {path} in the repository"
            elif name and not any(defines(c, name) for c in candidates):
                yield number, match.group(0), \
                    f"{' or '.join(str(c.relative_to(root)) for c in candidates)} defines no {name}"
            else:
                yield number, match.group(0), None
        for match in MODULE_REFERENCE.finditer(line):
            dotted = match.group(0)
            if not names_our_module(root, dotted):
                continue
            problem = None if module_resolves(root, dotted) else "no such module or name"
            yield number, dotted, problem
        for match in TEST_NAME.finditer(line):
            pattern = match.group(0)  # a * stands for the rest of several tests' names
            found = any(fnmatch.fnmatchcase(name, pattern) for name in functions_in_tests(root))
            yield number, pattern, None if found else "no test of that name in tests/"
        for match in LINK.finditer(line):
            target = match.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            exists = (page.parent / target).exists()
            yield number, target, None if exists else "the link leads to no file"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_code_reference_on_the_page_exists(page):
    broken = [f"{page.relative_to(REPO)}:{number}: {reference}: {problem}"
              for number, reference, problem in references(page) if problem]
    assert not broken, "stale references:\n" + "\n".join(broken)


def test_the_checker_sees_a_name_only_in_code_not_in_a_comment(tmp_path):
    """A function mentioned only in a comment, a docstring or an import is not defined; a method
    is found through its class; a wrong member of a real class, a missing file, a dotted name
    the module lacks and a link to no file are reported."""
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "def test_stage_file_with_a_bad_key():\n    pass\n")
    mod = tmp_path / "llama" / "mod.py"
    mod.write_text("from os import path as imported\n"
                   "# def only_in_a_comment(): ...\n"
                   "LIMIT = 3\n"
                   "class Stage:\n    size: int = 0\n    def train_step(self):\n        pass\n"
                   "def loss_sum():\n    \"def in_a_docstring\"\n")
    assert defines(mod, "loss_sum") and defines(mod, "Stage.train_step")
    assert defines(mod, "LIMIT") and defines(mod, "Stage.size")
    assert not defines(mod, "only_in_a_comment") and not defines(mod, "in_a_docstring")
    assert not defines(mod, "imported") and not defines(mod, "Stage.missing")
    page = tmp_path / "page.md"
    page.write_text("See `llama/mod.py:loss_sum`, `llama/mod.py:gone`, `mod.py::Stage.train_step`,"
                    "\n`llama/other.py`, `llama.cpp`, `llama.block_count`, `llama.mod.LIMIT`,\n"
                    "`python -m llama.mod`, `llama.mod.gone`, `test_stage_file_with_*`,\n"
                    "`test_gone` and [a page](missing.md).\n")
    problems = [ref for _, ref, problem in references(page, tmp_path) if problem]
    assert problems == ["llama/mod.py:gone", "llama/other.py", "llama.mod.gone", "test_gone",
                        "missing.md"]


def questions_page_sections():
    text = (REPO / "docs" / "questions.md").read_text(encoding="utf-8")
    return [section for section in text.split("\n## ")[1:]]


def test_each_question_is_answered_with_one_file_to_read():
    """docs/questions.md: every question has one **Read:** line, whose first reference is a file
    of the repository, and the list at the top links every question."""
    sections = questions_page_sections()
    assert len(sections) >= 8
    top = (REPO / "docs" / "questions.md").read_text(encoding="utf-8").split("\n## ")[0]
    for section in sections:
        question = section.splitlines()[0]
        reads = [line for line in section.splitlines() if line.startswith("**Read:**")]
        assert len(reads) == 1, f"{question}: {len(reads)} **Read:** lines"
        first = FILE_REFERENCE.search(reads[0])
        assert first and (REPO / first.group(1)).is_file(), f"{question}: {reads[0]}"
        assert f"[{question}]" in top, f"{question} is missing from the list at the top"


def test_the_loss_example_on_the_questions_page_is_loss_sum_without_smoothing():
    """The page's example loss, run as written: with smoothing 0 it is loss_sum's value, and
    it is a sum over the target positions only."""
    import torch
    from llama.model.transformer import ModelArgs, Transformer
    from llama.parallel.pipeline import loss_sum
    section = next(s for s in questions_page_sections() if s.startswith("Where does the loss"))
    code = section.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(code, namespace)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=40))
    h, targets = torch.randn(2, 7, 16), torch.randint(0, 40, (2, 7))
    targets[:, :3] = -100
    example = namespace["smoothed_cross_entropy"]
    torch.testing.assert_close(example(model, h, targets, smoothing=0.0),
                               loss_sum(model, h, targets))
    smoothed = example(model, h, targets)
    targets[:, :3] = 5  # more target positions: a larger sum
    assert example(model, h, targets) > smoothed
