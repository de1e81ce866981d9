"""The command line of every script: argv checked against main's signature before any work.

fire.Fire(main) consumes arguments lazily: a misspelt flag surfaced only after main had run, and
its value parser turned "Hello, world" into a tuple and 2,500 words into a MemoryError. Here each
flag is matched to a parameter first (an unknown one is refused, naming the nearest real one),
each value is converted by the parameter's annotation (text stays the text the user typed;
unannotated values go through fire's own parser), and only then is main called. --help is
written from main's docstring: its first line, then one "name: meaning" line per parameter.
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

from fire.parser import DefaultParseValue

from llama.errors import BadInput

HELP_FLAGS = ("--help", "-h")
NO_DEFAULT = inspect.Parameter.empty


# ---- parsing argv against a signature ----

def is_flag(token: str) -> bool:
    """fire's rule: '--x' or '-x...' is a flag; '-1' and '-0.5' are values."""
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


def parse_command_line(main, argv, prog: str) -> dict:
    """The keyword arguments main gets from argv, each checked and converted; BadInput if not."""
    params = inspect.signature(main).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    texts, positionals, index, last_flag = {}, [], 0, None
    while index < len(argv):
        token = argv[index]
        index += 1
        if not is_flag(token):
            positionals.append((token, last_flag))
            continue
        key, has_value, value = token.lstrip("-").partition("=")
        key = key.replace("-", "_")
        bool_syntax = not has_value and (index == len(argv) or is_flag(argv[index]))
        name, negated = flag_name(key, names, params, bool_syntax, takes_any, token, prog)
        if not has_value:
            if bool_syntax:
                value = "False" if negated else "True"
            else:
                value, index = argv[index], index + 1
        if name in texts:
            raise BadInput(f"--{name} is given twice ({texts[name]!r} and {value!r}): keep one")
        texts[name] = value
        last_flag = f"--{name}"
    required = [n for n in names if params[n].default is NO_DEFAULT and n not in texts]
    for name, (value, _) in zip(required, positionals):
        texts[name] = value
    if len(positionals) > len(required):
        raise BadInput(unexpected_value(*positionals[len(required)], required, params, prog))
    missing = [n for n in names if params[n].default is NO_DEFAULT and n not in texts]
    if missing:
        raise BadInput(f"--{missing[0]} is required ({meaning_or_type(main, missing[0])}); "
                       f"see {prog} --help")
    return {name: convert(name, text, params[name] if name in params else None)
            for name, text in texts.items()}


def flag_name(key: str, names: list, params, bool_syntax: bool, takes_any: bool, token: str,
              prog: str) -> tuple:
    """(the parameter a flag names, whether it is negated): the name itself, a bool's
    --no<name> / --no-<name>, or fire's one-letter shortcut when just one parameter starts
    with that letter."""
    if key in names or (takes_any and key not in ("no" + n for n in names)):
        return key, False
    for prefix in ("no_", "no"):
        negated = key[len(prefix):]
        if key.startswith(prefix) and negated in names and annotation_of(params[negated]) is bool:
            if not bool_syntax:
                raise BadInput(f"{token} takes no value: write --{negated} False instead")
            return negated, True
    if len(key) == 1:
        starting = [n for n in names if n.startswith(key)]
        if len(starting) == 1:
            return starting[0], False
        if starting:
            raise BadInput(f"{token} is ambiguous: it could be "
                           f"{', '.join('--' + n for n in starting)}; write the whole name")
    nearest = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean --{nearest[0]}?" if nearest else "no flag is close to it"
    raise BadInput(f"unknown flag {token.split('=')[0]} ({hint}); {prog} --help lists the flags")


def unexpected_value(value: str, after, required: list, params, prog: str) -> str:
    shown = value if len(value) <= 40 else value[:40] + "…"
    where = f" after {after}" if after else ""
    listed = [n for n, p in params.items() if is_text_list(annotation_of(p))]
    hint = (f"; several texts for --{listed[0]} go in one list: --{listed[0]} "
            "'[\"first text\", \"second text\"]'") if listed else ""
    only = (f"only {', '.join(required)} can be given without its --name"
            if required else "every value needs its --name")
    return f"unexpected value {shown!r}{where}: {only}{hint}; see {prog} --help"


# ---- values by annotation ----

def annotation_of(param):
    """The parameter's type: its annotation, Optional[...] unwrapped to its one other type."""
    annotation = param.annotation
    if typing.get_origin(annotation) is typing.Union:
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = others[0] if len(others) == 1 else annotation
    return annotation


def is_text_list(annotation) -> bool:
    return (typing.get_origin(annotation) in (list, tuple, Sequence)
            and typing.get_args(annotation)[:1] == (str,))


def convert(name: str, text: str, param):
    """The value of --name from the text the user typed, by the parameter's annotation."""
    annotation = annotation_of(param) if param is not None else NO_DEFAULT
    may_be_none = param is not None and (param.default is None or annotation is not param.annotation)
    if text == "None" and may_be_none:
        return None
    if annotation is NO_DEFAULT:
        return fire_value(text)
    if typing.get_origin(annotation) is typing.Union:  # several types: the first that fits
        for alternative in typing.get_args(annotation):
            try:
                return convert_to(name, text, alternative)
            except BadInput:
                pass
        raise BadInput(f"--{name} {text!r} is not {describe(annotation)}")
    return convert_to(name, text, annotation)


def convert_to(name: str, text: str, annotation):
    if annotation is str:
        return text  # as typed: fire would make "2024" a number and "a, b" a tuple
    if annotation is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise BadInput(f"--{name} {text!r} is not True or False: write --{name} or --no{name}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise BadInput(f"--{name} {text!r} is not an integer: give a whole number") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise BadInput(f"--{name} {text!r} is not a number") from None
    if typing.get_origin(annotation) in (list, tuple, Sequence):
        return convert_list(name, text, typing.get_args(annotation)[0])
    if annotation is type(None) and text == "None":
        return None
    raise BadInput(f"--{name} {text!r} is not {describe(annotation)}")


def convert_list(name: str, text: str, item_type):
    """One value, or several written as a list: a text is the whole of what was typed unless
    it is written as a list ('["a", "b"]'), so a prompt with a comma stays one prompt."""
    if item_type is str and not text.lstrip().startswith(("[", "(")):
        return (text,)
    value = literal(name, text) if item_type is str else fire_value(text)
    items = value if isinstance(value, (list, tuple)) else (value,)
    if item_type is float:  # "4,8" GiB are numbers too
        items = [float(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in items]
    for item in items:
        if not isinstance(item, item_type) or isinstance(item, bool) is not (item_type is bool):
            example = '\'["first text", "second text"]\'' if item_type is str else "1,2,3"
            raise BadInput(f"--{name} {text!r} holds {item!r}, which is not "
                           f"{describe(item_type)}: write one value or a list such as {example}")
    return tuple(items)


def literal(name: str, text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise BadInput(f"--{name} {text[:40]!r} is not a list of quoted texts: write it as "
                       "'[\"first text\", \"second text\"]'") from None


def fire_value(text: str):
    """fire's own parser (Python literals, else the text); what it cannot parse stays text."""
    try:
        return DefaultParseValue(text)
    except (MemoryError, RecursionError):
        return text


def describe(annotation) -> str:
    names = {str: "a text", int: "an integer", float: "a number", bool: "True or False",
             type(None): "None"}
    if annotation in names:
        return names[annotation]
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple, Sequence):
        return f"one or a list of {describe(typing.get_args(annotation)[0])[2:]}s"
    return getattr(annotation, "__name__", str(annotation))


# ---- help from the docstring and the signature ----

def split_docstring(main):
    """(description lines, {parameter: meaning}) from "name: meaning" lines (or "a, b: ...")."""
    names = set(inspect.signature(main).parameters)
    description, meanings, current = [], {}, None
    for line in inspect.cleandoc(main.__doc__ or "").splitlines():
        match = re.match(r"^([\w, ]+): (.*)$", line)
        keys = [k.strip() for k in match.group(1).split(",")] if match else []
        if keys and all(k in names for k in keys):
            current = keys
            for key in keys:
                meanings[key] = match.group(2).strip()
        elif current and line.startswith((" ", "\t")) and line.strip():
            for key in current:
                meanings[key] += " " + line.strip()
        else:
            current = None
            description.append(line)
    while description and not description[-1].strip():
        description.pop()
    # the shared options' meanings (llama/options.py), in the order of the signature
    shared = getattr(main, "option_meanings", {})
    meanings = {name: meanings.get(name) or shared.get(name, "") for name in names
                if name in meanings or name in shared}
    return description, meanings


def meaning_or_type(main, name: str) -> str:
    meaning = split_docstring(main)[1].get(name)
    return meaning or describe(annotation_of(inspect.signature(main).parameters[name]))


def type_word(param) -> str:
    annotation = annotation_of(param)
    if annotation is NO_DEFAULT:
        annotation = type(param.default) if param.default not in (None, NO_DEFAULT) else None
    words = {str: "TEXT", int: "INT", float: "FLOAT", bool: "True|False"}
    if annotation in words:
        return words[annotation]
    if typing.get_origin(annotation) is typing.Union:
        return "|".join(words.get(a, "None") for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple, Sequence) or annotation in (list, tuple):
        item = (typing.get_args(annotation) or (str,))[0]
        return f"{words.get(item, 'VALUE')} or [{words.get(item, 'VALUE')}, ...]"
    return "VALUE"


def show_default(default) -> str:
    if default is NO_DEFAULT:
        return "required"
    if isinstance(default, (tuple, list)):
        return "default " + json.dumps(list(default))
    return f"default {default}"


def help_text(main, prog: str) -> str:
    params = {n: p for n, p in inspect.signature(main).parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    description, meanings = split_docstring(main)
    required = " ".join(f"--{n} {type_word(p)}" for n, p in params.items()
                        if p.default is NO_DEFAULT)
    lines = [description[0] if description else prog, "",
             f"usage: {prog} {required} [options]".replace("  ", " ")]
    if description[1:]:
        lines += [*description[1:]]
    lines += ["", "options:"]
    for name, param in params.items():
        lines.append(f"  --{name} {type_word(param)} ({show_default(param.default)})")
        lines += textwrap.wrap(meanings.get(name, ""), 92, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    lines.append("  --help, -h\n      show this help and exit")
    return "\n".join(lines)


def commands_help(commands: dict, prog: str) -> str:
    module = sys.modules[next(iter(commands.values())).__module__]
    summary = inspect.cleandoc(module.__doc__ or "").splitlines()
    lines = [summary[0] if summary else prog, "", f"usage: {prog} COMMAND [options]", "",
             "commands:"]
    for name, command in commands.items():
        first = split_docstring(command)[0]
        lines.append(f"  {name:10s} {first[0] if first else ''}")
    lines.append(f"\n{prog} COMMAND --help shows a command's options.")
    return "\n".join(lines)


def program_name() -> str:
    """How the user started us: 'python -m llama.tools.plot' or 'python ft_main.py'."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {os.path.basename(sys.argv[0])}"


# ---- the entry point ----

def wants_help(argv) -> bool:
    """--help or -h anywhere among the flags, or after fire's '--' separator."""
    return any(token in HELP_FLAGS for token in argv)


def split_fire_flags(argv) -> list:
    """The arguments before fire's '--' separator (then --help, if it follows the separator);
    after it fire took its own flags, of which only --help is understood here."""
    if "--" not in argv:
        return argv
    at = argv.index("--")
    rest = [token for token in argv[at + 1:] if token not in HELP_FLAGS]
    if rest:
        raise BadInput(f"{' '.join(rest)} after '--' is not understood: only --help is")
    return argv[:at] + (["--help"] if len(argv) > at + 1 else [])


def pick_command(commands: dict, argv, prog: str):
    if not argv or argv[0] in HELP_FLAGS:
        return None, argv
    name = argv[0]
    if name not in commands:
        nearest = difflib.get_close_matches(name, list(commands), n=1, cutoff=0.5)
        hint = f"did you mean {nearest[0]}?" if nearest else f"one of {', '.join(commands)}"
        raise BadInput(f"unknown command {name!r} ({hint}); see {prog} --help")
    return commands[name], argv[1:]


def fail(message: str, status: int):
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    # A script that can run as a rank under torchrun has imported llama.parallel.faults (through
    # llama.parallel.distributed): it writes the line for torchrun and tells the other ranks. The other
    # scripts are spared torch's import time.
    faults = sys.modules.get("llama.parallel.faults")
    if faults is not None and faults.note_own_error(line):
        leave_without_teardown(status)  # the group's threads could hold up a normal exit
    sys.exit(status)


def run(main, argv=None):
    """Parse argv (default sys.argv[1:]) for main (a function, or {command: function}), call it.

    --help prints the help and exits 0; a BadInput, from the command line or from main, ends
    the program with its one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = program_name()
    try:
        argv = split_fire_flags(argv)
        if isinstance(main, dict):
            command, rest = pick_command(main, argv, prog)
            if command is None:
                print(commands_help(main, prog))
                return
            prog, main, argv = f"{prog} {argv[0]}", command, rest
        if wants_help(argv):
            print(help_text(main, prog))
            return
        kwargs = parse_command_line(main, argv, prog)
        main(**kwargs)
    except BadInput as error:
        fail(str(error), 2)


def run_cli(main):
    """Run a script's main (or {command: function}) from the command line: every flag checked
    against the signature before any work, --help from the docstring, and a BadInput ends the
    program with its message and exit status 2."""
    if not is_rank_of_a_job():
        run(main)
        return
    try:
        run(main)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # a bug or Ctrl+C: show it, leave with the status Python gives
        traceback.print_exc()
        status = 130 if isinstance(error, KeyboardInterrupt) else 1
    leave_without_teardown(status)


def is_rank_of_a_job() -> bool:
    """Started by torchrun (or by hand) as one of several ranks that join a process group."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def leave_without_teardown(status: int):
    """End a rank with status, skipping the interpreter's teardown.

    gloo's worker threads release each finished operation, and with it the Python tensors it
    used, a moment after the operation has completed. The process group (and its threads) should
    go away in destroy_process_group, but once torch._dynamo is imported (initialising any module
    on the meta device imports it) torch keeps the group alive to the end. If the interpreter is
    being torn down when a worker thread releases a tensor, that thread cannot take the GIL and
    the process dies with SIGABRT ("terminate called without an active exception"), although its
    work was done. Every file this project writes is complete (fsynced and renamed) before this
    point, so flushing the standard streams is all that is left to do."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said on it
    os._exit(status)
