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
FILE_NAME = re.compile(r"[\w.\-/\\]*\w\.\w+")  # a table cell naming a file: it has an extension
ACCEPTED = "a list of 'hash  file' lines, a SHA256.md table or a JSON object {\"file\": \"hash\"}"


class Sha256List:
    """{file name or relative path: set of hashes}, and the format it was written in."""

    def __init__(self, path):
        self.path = Path(path)
        try:  # utf-8-sig: a list saved by Windows Notepad starts with a byte-order mark
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise BadInput(f"--sha256 {path} cannot be read ({error}): pass {ACCEPTED}") from None
        if text.lstrip().startswith(("{", "[")):
            self.format, pairs = "json", json_pairs(text, self.path)
        else:
            self.format = "markdown" if re.search(r"^\s*\|", text, re.MULTILINE) else "plain"
            pairs = list(filter(None, map(line_pair, text.splitlines())))
        if not pairs:
            raise BadInput(f"--sha256 {path} holds no 'hash  file' pair: list each file as its "
                           "64-digit sha256 and its name")
        self.hashes = {}
        for name, digest in pairs:
            name = name.replace("\\", "/").removeprefix("./")
            self.hashes.setdefault(name, set()).add(digest.lower())

    def listed(self, path) -> set:
        """The hashes listed for path: under the longest tail of its path the list names."""
        parts = Path(path).resolve().parts
        tails = ("/".join(parts[-length:]) for length in range(len(parts), 0, -1))
        return next((self.hashes[tail] for tail in tails if tail in self.hashes), set())


def json_pairs(text: str, path) -> list:
    """[(file, hash)] of {"file": "hash"} (or {"hash": "file"}), or of a list of
    {"file"|"name"|"path": ..., "sha256"|"hash": ...}; entries of any other shape are skipped."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise BadInput(f"--sha256 {path} is not valid JSON ({error}): pass {ACCEPTED}") from None
    except RecursionError:  # json recurses once per bracket: 100,000 '[' exhaust the stack
        raise BadInput(f"--sha256 {path} nests lists or objects too deeply to be a sha256 list: "
                       "pass a JSON object {\"file\": \"hash\"} or 'hash  file' lines") from None
    if isinstance(data, dict):
        items = data.items()
    else:
        items = [(entry.get("file", entry.get("name", entry.get("path"))),
                  entry.get("sha256", entry.get("hash")))
                 for entry in data if isinstance(entry, dict)]
    pairs = []
    for first, second in items:
        for name, digest in ((first, second), (second, first)):
            if isinstance(name, str) and isinstance(digest, str) and HASH.fullmatch(digest):
                pairs.append((name, digest))
                break
    return pairs


def line_pair(line: str):
    """(file, hash) of one line: 'hash  file', 'hash *file' (sha256sum -b) or a table row with
    one hash and one cell that is a file name; None for a line that names no file or two."""
    hashes = HASH.findall(line)
    if len(hashes) != 1:
        return None
    if line.strip().startswith("|"):
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        names = [cell for cell in cells if FILE_NAME.fullmatch(cell) and not HASH.fullmatch(cell)]
    else:
        name = line.replace(hashes[0], " ", 1).strip().lstrip("*").strip()
        names = [name] if name else []
    return (names[0], hashes[0]) if len(names) == 1 else None


def check_files(sha_list: Sha256List, files, what: str, exclude=frozenset(),
                digests=None) -> dict:
    """Check each file the list names, given as (the path it is known by, where it lies now);
    a mismatch stops with its name. Returns {path: hash} of the files checked. exclude: hashes
    not to hold a file to (an output is not held to what its input of the same name matched);
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
