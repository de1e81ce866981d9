"""Published sha256 lists: read one (a "hash  file" list as sha256sum writes it, a Markdown
table such as a SHA256.md, or JSON), check the files it names, and print a list in its format.

Used by llama.formats.convert --sha256 LIST: inputs are checked before anything is written, outputs
before they replace anything.
"""
import json
import re
from pathlib import Path

from llama.errors import BadInput
from llama.formats.files import sha256_of

HASH = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
FILE_NAME = re.compile(r"[\w.\-/\\]*\w\.\w+")


class Sha256List:
    """{file name or relative path: set of hashes}, and the format it was written in."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BadInput(f"--sha256 {path} cannot be read ({error}): pass a list of "
                           "'hash  file' lines, a SHA256.md table or a JSON object") from None
        if text.lstrip().startswith(("{", "[")):
            self.format, pairs = "json", json_pairs(text, self.path)
        else:
            self.format = "markdown" if re.search(r"^\s*\|", text, re.MULTILINE) else "plain"
            pairs = [pair for line in text.splitlines() for pair in line_pairs(line)]
        if not pairs:
            raise BadInput(f"--sha256 {path} holds no 'hash  file' pair: list each file as its "
                           "64-digit sha256 and its name")
        self.hashes = {}
        for name, digest in pairs:
            self.hashes.setdefault(name.replace("\\", "/").removeprefix("./"), set()).add(
                digest.lower())

    def listed(self, path) -> set:
        """The hashes listed for path: under the longest tail of its path the list names."""
        parts = Path(path).resolve().parts
        for length in range(len(parts), 0, -1):
            tail = "/".join(parts[-length:])
            if tail in self.hashes:
                return self.hashes[tail]
        return set()


def json_pairs(text: str, path) -> list:
    try:
        data = json.loads(text)
    except ValueError as error:
        raise BadInput(f"--sha256 {path} is not valid JSON ({error})") from None
    except RecursionError:  # json recurses once per bracket: 100,000 '[' exhaust the stack
        raise BadInput(f"--sha256 {path} nests lists or objects too deeply to be a sha256 list: "
                       "pass a JSON object {\"file\": \"hash\"} or 'hash  file' lines") from None
    items = data.items() if isinstance(data, dict) else [
        (entry.get("file", entry.get("name", entry.get("path"))),
         entry.get("sha256", entry.get("hash"))) for entry in data if isinstance(entry, dict)]
    pairs = []
    for first, second in items:
        for name, digest in ((first, second), (second, first)):
            if isinstance(name, str) and isinstance(digest, str) and HASH.fullmatch(digest):
                pairs.append((name, digest))
                break
    return pairs


def line_pairs(line: str) -> list:
    """[(file, hash)] of one line: 'hash  file', 'hash *file' (sha256sum -b) or a table row
    with one hash and one cell that is a file name; a line naming no file gives nothing."""
    hashes = HASH.findall(line)
    if len(hashes) != 1:
        return []
    if line.strip().startswith("|"):
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        names = [c for c in cells if FILE_NAME.fullmatch(c) and not HASH.fullmatch(c)]
    else:
        rest = line.replace(hashes[0], " ", 1).strip().lstrip("*").strip()
        names = [rest] if rest else []
    return [(names[0], hashes[0])] if len(names) == 1 else []


def check_files(sha_list: Sha256List, files, what: str, exclude=frozenset(),
                digests=None) -> dict:
    """Check each file the list names, given as (the path it is known by, where it lies now);
    a mismatch stops with its name. Returns {path: hash} of the files
    checked; an output is not held to the hash its input of the same name matched (exclude).
    digests: {where it lies: hash} already computed."""
    matched = {}
    for known_as, lies_at in files:
        listed = sha_list.listed(known_as) - exclude
        if not listed:
            continue
        digest = (digests or {}).get(lies_at) or sha256_of(lies_at)
        if digest not in listed:
            raise BadInput(f"{what} {known_as} has sha256 {digest}, but {sha_list.path} lists "
                           f"{' or '.join(sorted(listed))}: the file is corrupt or not the "
                           "published one; nothing was written")
        matched[str(known_as)] = digest
    return matched


def format_list(hashes: dict, style: str) -> str:
    """{file name: hash} as a list in style: plain (sha256sum), markdown or json."""
    if style == "json":
        return json.dumps(hashes, indent=2)
    if style == "markdown":
        rows = [f"| {name} | {digest} |" for name, digest in hashes.items()]
        return "\n".join(["| File | SHA256 |", "| --- | --- |", *rows])
    return "\n".join(f"{digest}  {name}" for name, digest in hashes.items())
