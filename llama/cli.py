"""The command line of every script: run_cli(main), or run_cli({command: function}).

argv is checked against main's signature before any work: an unknown flag is refused with the
nearest real one, each value is converted by its parameter's annotation (a text stays as typed),
and --help is written from main's docstring. A BadInput ends the program with one line, exit 2.
"""
import ast
import difflib
import inspect
import json
import os
import re
import sys
import textwrap
import traceback
import typing
from collections.abc import Sequence

from llama.errors import BadInput

EMPTY = inspect.Parameter.empty
HELP_FLAGS = ("--help", "-h")
WORDS = {str: ("TEXT", "a text"), int: ("INT", "an integer"), float: ("FLOAT", "a number"),
         bool: ("True|False", "True or False"), EMPTY: ("VALUE", "a value")}  # help, errors
TEXTS_EXAMPLE = '\'["first text", "second text"]\''


def parse_command_line(main, argv, prog: str) -> dict:
    """The keyword arguments main gets from argv, each checked and converted; BadInput if not."""
    params = inspect.signature(main).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    texts, loose = {}, []  # loose: (a value without its flag, the flag before it)
    # '--x' and '-x' are flags, '-1' is a value; the end of argv counts as a flag
    is_flag = [t.startswith("--") or re.match("-[a-zA-Z]", t) is not None for t in argv] + [True]
    index = 0
    while index < len(argv):
        token, index = argv[index], index + 1
        if not is_flag[index - 1]:
            loose.append((token, f"--{next(reversed(texts))}" if texts else None))
            continue
        key, has_value, value = token.lstrip("-").partition("=")
        name, negated = flag_name(key.replace("-", "_"), params, names, token, prog)
        if negated and (has_value or not is_flag[index]):
            raise BadInput(f"{token} takes no value: write --{name} False instead")
        if not has_value:  # '--x' alone, before another flag or the end, is True ('--nox' False)
            value, index = (str(not negated), index) if is_flag[index] else (argv[index], index + 1)
        if name in texts:
            raise BadInput(f"--{name} is given twice ({texts[name]!r} and {value!r}): keep one")
        texts[name] = value
    required = [n for n in names if params[n].default is EMPTY and n not in texts]
    if len(loose) > len(required):
        raise BadInput(unexpected_value(*loose[len(required)], required, params, prog))
    texts.update(zip(required, (value for value, _ in loose)))
    if len(loose) < len(required):
        name = required[len(loose)]
        meaning = split_docstring(main)[1].get(name) or describe(params[name].annotation)
        raise BadInput(f"--{name} is required ({meaning}); see {prog} --help")
    return {name: convert(name, text, params.get(name)) for name, text in texts.items()}


def flag_name(key: str, params, names: list, token: str, prog: str) -> tuple:
    """(the parameter a flag names, whether it is negated): its name, a bool's --noname or
    --no-name, or any name where main takes **kwargs."""
    if key in names:
        return key, False
    negated = key[2:].removeprefix("_")
    if key.startswith("no") and negated in names and kinds(params[negated].annotation) == [bool]:
        return negated, True
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return key, False
    nearest = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean --{nearest[0]}?" if nearest else "no flag is close to it"
    raise BadInput(f"unknown flag {token.split('=')[0]} ({hint}); {prog} --help lists the flags")


def unexpected_value(value: str, after, required: list, params, prog: str) -> str:
    shown = repr(value if len(value) <= 40 else value[:40] + "…")
    shown += f" after {after}" if after else ""
    only = (f"only {', '.join(required)} can be given without its --name" if required
            else "every value needs its --name")
    lists = [n for n, p in params.items() if item_type(kinds(p.annotation)[0]) is str]
    if lists:
        only += f"; several texts for --{lists[0]} go in one list: --{lists[0]} {TEXTS_EXAMPLE}"
    return f"unexpected value {shown}: {only}; see {prog} --help"


def kinds(annotation) -> list:
    """The types a value may have: [int] for Optional[int], [bool, str] for Union[bool, str]."""
    if typing.get_origin(annotation) is not typing.Union:
        return [annotation]
    return [a for a in typing.get_args(annotation) if a is not type(None)]


def item_type(annotation):
    """int for tuple[int, ...] or Sequence[int], str for a bare tuple; None if not a list."""
    if annotation in (list, tuple) or typing.get_origin(annotation) in (list, tuple, Sequence):
        return (typing.get_args(annotation) or (str,))[0]
    return None


def describe(annotation) -> str:
    return " or ".join(WORDS[k][1] if k in WORDS else getattr(k, "__name__", str(k))
                       for k in kinds(annotation))


def convert(name: str, text: str, param):
    """The value of --name from the text typed, by its parameter's annotation (param is None
    for a flag that only main's **kwargs takes)."""
    annotation = EMPTY if param is None else param.annotation
    if text == "None" and param is not None and (
            param.default is None or type(None) in typing.get_args(annotation)):
        return None
    if annotation is EMPTY:
        return python_value(text)
    for kind in kinds(annotation):  # the first that fits
        if item_type(kind) is not None:
            return to_list(name, text, item_type(kind))
        if kind is str:
            return text  # as typed: fire made "2024" a number and "a, b" a tuple
        if kind is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    hint = {(int,): ": give a whole number", (bool,): f": write --{name} or --no{name}"}
    raise BadInput(f"--{name} {text!r} is not {describe(annotation)}"
                   f"{hint.get(tuple(kinds(annotation)), '')}")


def to_list(name: str, text: str, kind) -> tuple:
    """One value, or several written as a list. A text is all that was typed unless it is
    written as a list ('["a", "b"]'), so a prompt with a comma stays one prompt."""
    if kind is str and not text.lstrip().startswith(("[", "(")):
        return (text,)
    value = python_value(text)
    if kind is str and value is text:  # python_value gave the text back: no Python literal
        raise BadInput(f"--{name} {text[:40]!r} is not a list of quoted texts: write it as "
                       f"{TEXTS_EXAMPLE}")
    items = value if isinstance(value, (list, tuple)) else (value,)
    if kind is float:  # "4,8" GiB are numbers too
        items = [float(item) if type(item) is int else item for item in items]
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool) is not (kind is bool):
            example = TEXTS_EXAMPLE if kind is str else "1,2,3"
            raise BadInput(f"--{name} {text!r} holds {item!r}, which is not {describe(kind)}: "
                           f"write one value or a list such as {example}")
    return tuple(items)


def python_value(text: str):
    """A Python literal ('3', '1,2', "['a']", 'None'), else the text as typed."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def split_docstring(main):
    """(description lines, {parameter: meaning}) from main's docstring, where a line "name:
    meaning" (continued on indented lines) describes a parameter; the shared options' meanings
    come from llama/options.py's @takes (main.option_meanings)."""
    names = inspect.signature(main).parameters
    description, meanings, current = [], {}, None
    for line in inspect.cleandoc(main.__doc__ or "").splitlines():
        match = re.match(r"(\w+): (.*)$", line)
        if match and match.group(1) in names:
            current = match.group(1)
            meanings[current] = match.group(2).strip()
        elif current and line[:1].isspace() and line.strip():
            meanings[current] += " " + line.strip()
        else:
            current = None
            description.append(line)
    shared = getattr(main, "option_meanings", {})
    meanings = {n: meanings.get(n) or shared.get(n, "") for n in names
                if n in meanings or n in shared}
    return "\n".join(description).rstrip().splitlines(), meanings


def type_word(param) -> str:
    """INT, True|False|TEXT, TEXT or [TEXT, ...]: a parameter's type in --help (without an
    annotation, its default's)."""
    annotation = param.annotation
    if annotation is EMPTY and param.default not in (None, EMPTY):
        annotation = type(param.default)
    if item_type(annotation) is not None:
        word = WORDS.get(item_type(annotation), ("VALUE",))[0]
        return f"{word} or [{word}, ...]"
    return "|".join(WORDS.get(kind, ("VALUE",))[0] for kind in kinds(annotation))


def help_text(main, prog: str) -> str:
    """What main does (its docstring's first line), the usage, then every option with its
    type, default and meaning."""
    params = [p for p in inspect.signature(main).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    description, meanings = split_docstring(main)
    required = "".join(f" --{p.name} {type_word(p)}" for p in params if p.default is EMPTY)
    lines = [description[0] if description else prog, "", f"usage: {prog}{required} [options]",
             *description[1:], "", "options:"]
    for p in params:
        default = json.dumps(list(p.default)) if isinstance(p.default, (tuple, list)) else p.default
        default = "required" if p.default is EMPTY else f"default {default}"
        lines.append(f"  --{p.name} {type_word(p)} ({default})")
        lines += textwrap.wrap(meanings.get(p.name, ""), 92, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines + ["  --help, -h", "      show this help and exit"])


def commands_help(commands: dict, prog: str) -> str:
    module = sys.modules[next(iter(commands.values())).__module__]
    lines = [(inspect.cleandoc(module.__doc__ or "") or prog).splitlines()[0], "",
             f"usage: {prog} COMMAND [options]", "", "commands:"]
    lines += [f"  {name:10s} {(split_docstring(command)[0] or [''])[0]}"
              for name, command in commands.items()]
    return "\n".join(lines + [f"\n{prog} COMMAND --help shows a command's options."])


def program_name() -> str:
    """How the user started us: 'python -m llama.tools.plot' or 'python ft_main.py'."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {os.path.basename(sys.argv[0])}"


def run(main, argv=None):
    """Parse argv (default sys.argv[1:]) for main (a function, or {command: function}) and call
    it; --help prints the help; a BadInput ends the program with its line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = program_name()
    try:
        if "--" in argv:  # fire read its own flags after '--'; only --help is understood here
            rest = [token for token in argv[argv.index("--") + 1:] if token not in HELP_FLAGS]
            if rest:
                raise BadInput(f"{' '.join(rest)} after '--' is not understood: only --help is")
            argv.remove("--")
        if isinstance(main, dict) and argv and argv[0] not in HELP_FLAGS:
            if argv[0] not in main:
                nearest = difflib.get_close_matches(argv[0], list(main), n=1, cutoff=0.5)
                hint = f"did you mean {nearest[0]}?" if nearest else f"one of {', '.join(main)}"
                raise BadInput(f"unknown command {argv[0]!r} ({hint}); see {prog} --help")
            prog, main, argv = f"{prog} {argv[0]}", main[argv[0]], argv[1:]
        if isinstance(main, dict):
            print(commands_help(main, prog))
        elif any(token in HELP_FLAGS for token in argv):
            print(help_text(main, prog))
        else:
            main(**parse_command_line(main, argv, prog))
    except BadInput as error:
        line = f"error: {error}"
        print(line, file=sys.stderr, flush=True)
        # A script that can run as a rank under torchrun has imported llama.parallel.faults
        # (through llama.parallel.distributed): it writes the line for torchrun and tells the
        # other ranks. The other scripts are spared torch's import time.
        faults = sys.modules.get("llama.parallel.faults")
        if faults is not None and faults.note_own_error(line):
            leave_without_teardown(2)  # the group's threads could hold up a normal exit
        sys.exit(2)


def run_cli(main):
    """run(main) from the command line; a rank of a multi-process job (WORLD_SIZE > 1) then
    leaves through leave_without_teardown, with the status Python would have given."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return run(main)
    try:
        run(main)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except KeyboardInterrupt:  # Ctrl+C reaches every rank of the job: one line each, not a trace
        line = f"rank {os.environ.get('RANK', '?')}: stopped by Ctrl+C"
        print(line, file=sys.stderr, flush=True)
        faults = sys.modules.get("llama.parallel.faults")
        if faults is not None:  # so a neighbour that sees it leave does not call it silent
            faults.note_own_error(line)
        status = 130
    except BaseException:  # a bug: show it, leave with the status Python gives
        traceback.print_exc()
        status = 1
    leave_without_teardown(status)


def leave_without_teardown(status: int):
    """End a rank with status, skipping the interpreter's teardown: once torch._dynamo is
    imported (any module initialised on the meta device imports it), torch keeps the gloo group
    alive to the end, and a gloo thread that releases a finished operation's tensors while the
    interpreter is torn down cannot take the GIL: the rank dies with SIGABRT ("terminate called
    without an active exception") after its work was done. Every file this project writes is
    complete (fsynced and renamed) before this point; only the standard streams need a flush."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said on it
    os._exit(status)
