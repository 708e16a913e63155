"""Which container runs vLLM, and its command line with gpushare's utilization argument.

A container runs vLLM when the program its command line starts is the server (``vllm serve``,
``python -m vllm.entrypoints.openai.api_server``, the legacy ``vllm.entrypoints.api_server``,
KServe's ``huggingfaceserver`` with its vLLM backend), directly, behind wrappers (``tini``,
``dumb-init``, ``env``, ``exec``, ``nohup``, variable assignments) or through ``sh -c "..."``; or
when it sets no command and its image's entrypoint is the server (``vllm/vllm-openai``, KServe's
``vllmserver`` and ``huggingfaceserver``). A container's name says nothing: KServe names its
transformer ``kserve-container`` too. A word that merely mentions vLLM (``echo vllm serve``, a
readiness loop) starts nothing; a command line that names vLLM where gpushare cannot see it start
gets a :attr:`Plan.problem`, which refuses the container that holds the GPU.

vLLM takes every spelling of ``--gpu-memory-utilization`` (``--flag v``, ``--flag=v``,
``--gpu_memory_utilization v``, unique prefixes) and the last one wins, so every one is removed,
with its value even where ``command`` ends with the flag and ``args`` starts with the value, and
:data:`gpushare.core.names.VLLM_UTILIZATION_ARG` is added once, last.
"""

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gpushare.core import names
from gpushare.webhook import shell

SERVER_MODULES: Final = frozenset(
    {
        "vllm.entrypoints.openai.api_server",
        "vllm.entrypoints.api_server",
        "vllm.entrypoints.cli.main",
        "huggingfaceserver",
    }
)
_HF_MODULE: Final = "huggingfaceserver"
_SHELLS: Final = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh"})
_SHORTEST_PREFIX: Final = "--gpu-memory"
"""argparse accepts unique prefixes; no other vLLM flag starts with ``--gpu-memory``."""
_KV_CACHE_PREFIX: Final = "--kv-cache-mem"
"""The shortest prefix of ``--kv-cache-memory-bytes`` that no other vLLM flag shares."""

_INIT_WRAPPERS: Final = {
    "tini": frozenset({"-p", "-e"}),
    "tini-static": frozenset({"-p", "-e"}),
    "dumb-init": frozenset({"-r", "--rewrite"}),
    "catatonit": frozenset[str](),
}
"""Init programs that run the rest of the command line, with their options that take a value."""
_PLAIN_WRAPPERS: Final = frozenset({"nohup", "setsid", "time", "!", "{"})
_SHELL_WORDS: Final = frozenset({"if", "then", "else", "elif", "do", "while", "until"})
_ENV_VALUE_OPTIONS: Final = frozenset({"-u", "--unset", "-C", "--chdir"})
_EXEC_VALUE_OPTIONS: Final = frozenset({"-a"})
_PYTHON_VALUE_OPTIONS: Final = frozenset({"-W", "-X"})

PARALLEL_FLAGS: Final = {
    "--tensor-parallel-size": "-tp",
    "--pipeline-parallel-size": "-pp",
    "--data-parallel-size": "-dp",
}
"""vLLM flags that spread one server over several GPUs, with their short forms."""


@dataclass(frozen=True)
class Plan:
    """What the webhook does to one container's command line.

    ``runs_vllm``: gpushare sees where vLLM starts (or the image's entrypoint is vLLM).
    ``problem``: vLLM runs, or may run, here but its command line cannot be rewritten exactly;
    ``command`` and ``args`` are the rewritten fields otherwise (``None``: leave unset).
    ``kv_cache``: the ``--kv-cache-memory-bytes`` argument the server is given, if any.
    """

    runs_vllm: bool
    how: str = ""
    command: list[str] | None = None
    args: list[str] | None = None
    removed: tuple[str, ...] = ()
    parallel: dict[str, str] = field(default_factory=dict)
    problem: str | None = None
    kv_cache: str | None = None


NOT_VLLM: Final = Plan(runs_vllm=False)


def is_utilization_flag(token: str) -> bool:
    """Whether ``token`` (``--flag`` or ``--flag=value``) spells vLLM's utilization flag."""
    return _spells(token, names.VLLM_UTILIZATION_FLAG, _SHORTEST_PREFIX)


def plan(container: Mapping[str, Any]) -> Plan:
    """Decide whether ``container`` runs vLLM and how its command line becomes gpushare's."""
    command = _strings(container.get("command"))
    args = _strings(container.get("args"))
    image = str(container.get("image") or "")
    argv = command + args
    at = program(argv)
    if at < len(argv) and _basename(argv[at]) in _SHELLS:
        return _plan_shell(argv, split=len(command), at=at, image=image)
    found = _server_at(argv, at)
    if found is not None:
        start, how = found
        return _plan_argv(argv, split=len(command), start=start, how=how)
    if command:
        if _is_vllm_image(image):
            return Plan(
                runs_vllm=False,
                problem=(
                    f"the image {image} runs vLLM, but the command {' '.join(command)!r} starts no"
                    " vLLM server gpushare can see: put the server in command/args, e.g."
                    ' command: ["vllm", "serve"], args: ["MODEL", ...]'
                ),
            )
        return _unseen() if _mentions(argv) else NOT_VLLM
    if _is_vllm_image(image):
        how = f"the entrypoint of {image}"
    elif _is_hf_image(image):
        how = f"the entrypoint of {image} (python -m {_HF_MODULE})"
    elif _mentions(argv):
        return _unseen()
    else:
        return NOT_VLLM
    return _plan_argv(argv, split=0, start=0, how=how)


def program(words: Sequence[str | None]) -> int:
    """The index of the program a command line runs, past wrappers and assignments."""
    index = 0
    while index < len(words):
        word = words[index]
        if word is None:
            return index
        name = _basename(word)
        if name in _SHELL_WORDS or name in _PLAIN_WRAPPERS or _is_assignment(word):
            index += 1
        elif name == "exec":
            index = _options(words, index + 1, _EXEC_VALUE_OPTIONS)
        elif name == "env":
            index = _options(words, index + 1, _ENV_VALUE_OPTIONS)
        elif name in _INIT_WRAPPERS:
            index = _options(words, index + 1, _INIT_WRAPPERS[name])
        else:
            return index
    return index


def _options(words: Sequence[str | None], index: int, valued: frozenset[str]) -> int:
    """The index past a wrapper's options (and its ``--``)."""
    while index < len(words):
        word = words[index]
        if word is None or not word.startswith("-") or word == "-":
            return index
        if word == "--":
            return index + 1
        index += 2 if word in valued else 1
    return index


def _server_at(argv: Sequence[str | None], at: int) -> tuple[int, str] | None:
    """Index of the first argument the server reads, when the program at ``at`` is the server."""
    word = argv[at] if at < len(argv) else None
    if word is None:
        return None
    name = _basename(word)
    if name == "vllm":
        return (at + 2, "vllm serve") if at + 1 < len(argv) and argv[at + 1] == "serve" else None
    if not name.startswith("python"):
        return None
    index = at + 1
    while index < len(argv):
        token = argv[index]
        if token == "-m":
            module = argv[index + 1] if index + 1 < len(argv) else None
            if module == "vllm.entrypoints.cli.main":
                if index + 2 < len(argv) and argv[index + 2] == "serve":
                    return index + 3, f"python -m {module} serve"
                return None
            return (index + 2, f"python -m {module}") if module in SERVER_MODULES else None
        if token is None or not token.startswith("-") or token == "-c":
            return None
        index += 2 if token in _PYTHON_VALUE_OPTIONS else 1
    return None


def _plan_argv(argv: list[str], *, split: int, start: int, how: str) -> Plan:
    server_args = argv[start:]
    if _hf_backend(server_args) == "huggingface":
        return NOT_VLLM
    if "--" in server_args:
        return Plan(
            runs_vllm=True,
            how=how,
            problem=(
                f"the vLLM arguments contain '--', after which {names.VLLM_UTILIZATION_FLAG} would"
                " not be read as a flag: remove the '--'"
            ),
        )
    kept, removed = _strip(argv, start=start)
    return Plan(
        runs_vllm=True,
        how=how,
        command=[argv[i] for i in kept if i < split] if split else None,
        args=[*(argv[i] for i in kept if i >= split), names.VLLM_UTILIZATION_ARG],
        removed=_user_values(removed),
        parallel=parallel_sizes(server_args),
        kv_cache=_kv_cache(server_args),
    )


def _plan_shell(argv: list[str], *, split: int, at: int, image: str) -> Plan:
    relative = _script_index(argv[at:])
    if relative is None:  # ``sh FILE``: the script is not in the pod spec
        return _unseen(image=image) if _is_vllm_image(image) else NOT_VLLM
    where = at + relative
    script = argv[where]
    try:
        commands = shell.commands(script)
    except shell.Unsupported as exc:
        mentions = any(word in script.lower() for word in ("vllm", _HF_MODULE))
        return _unseen(image=image, reason=str(exc)) if mentions else NOT_VLLM
    found = [
        (cmd, hit)
        for cmd in commands
        if (hit := _server_at(seen := cmd.literals(), program(seen))) is not None
    ]
    if not found:
        if _is_vllm_image(image) or any(_mentions(cmd.literals()) for cmd in commands):
            return _unseen(image=image)
        return NOT_VLLM
    how = f"{_basename(argv[at])} -c script: {found[0][1][1]}"
    if len(found) > 1:
        return _shell_problem(how, "the script starts more than one vLLM server")
    cmd, (start, _) = found[0]
    words = cmd.words[start:]
    literal_args = [w.literal or w.prefix for w in words]
    if _hf_backend(literal_args) == "huggingface":
        return NOT_VLLM
    cuts: list[shell.Word] = []
    for index, word in enumerate(words):
        text = script[word.start : word.end]
        if word.literal == "--":
            hidden = names.VLLM_UTILIZATION_FLAG
            return _shell_problem(how, f"'--' in the vLLM arguments hides {hidden}")
        unknown_name = word.literal is None and "=" not in word.prefix
        if unknown_name and (is_utilization_flag(word.prefix) or _mentions_flag(text)):
            return _shell_problem(how, f"the word {text!r} builds the flag from an expansion")
        flag = word.literal if word.literal is not None else word.prefix
        if not flag.startswith("--") or not is_utilization_flag(flag) or word in cuts:
            continue
        cuts.append(word)
        if "=" not in flag and index + 1 < len(words) and not _is_flag(words[index + 1].literal):
            cuts.append(words[index + 1])
    kept = [w for w in cmd.words if w not in cuts]
    edits = [(_blank_start(script, w.start), w.end, "") for w in cuts]
    edits.append((kept[-1].end, kept[-1].end, " " + names.VLLM_UTILIZATION_ARG))
    new_script = _apply(script, edits)
    expected = [script[w.start : w.end] for w in kept] + [names.VLLM_UTILIZATION_ARG]
    if not _same_words(new_script, expected):
        return _shell_problem(how, "the rewritten script would not parse to the same words")
    new_argv = list(argv)
    new_argv[where] = new_script
    trailing = new_argv[where + 2 :]
    kept_trailing, removed_trailing = _strip(trailing, start=0)
    new_argv[where + 2 :] = [trailing[i] for i in kept_trailing]
    return Plan(
        runs_vllm=True,
        how=how,
        command=new_argv[:split],
        args=new_argv[split:] if split < len(argv) else None,
        removed=_user_values([script[w.start : w.end] for w in cuts] + removed_trailing),
        parallel=parallel_sizes(literal_args),
        kv_cache=_kv_cache(literal_args),
    )


def parallel_sizes(argv: Sequence[str]) -> dict[str, str]:
    """The values given to vLLM's multi-GPU flags (``--tensor-parallel-size`` and its kin)."""
    found: dict[str, str] = {}
    for index, token in enumerate(argv):
        name, _, value = token.partition("=")
        name = name.replace("_", "-") if name.startswith("--") else name
        for long, short in PARALLEL_FLAGS.items():
            if name in (long, short):
                if not value and index + 1 < len(argv):
                    value = argv[index + 1]
                found[long] = value
    return found


def _strip(tokens: list[str], *, start: int) -> tuple[list[int], list[str]]:
    """The indices kept once every utilization flag (and its separate value) at or after
    ``start`` is removed, and the tokens removed."""
    kept = list(range(min(start, len(tokens))))
    removed: list[str] = []
    index = start
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--") and is_utilization_flag(token):
            removed.append(token)
            if "=" not in token and index + 1 < len(tokens) and not _is_flag(tokens[index + 1]):
                removed.append(tokens[index + 1])
                index += 1
        else:
            kept.append(index)
        index += 1
    return kept, removed


def _kv_cache(argv: Sequence[str]) -> str | None:
    """The argument that gives vLLM a fixed KV-cache size, if any."""
    return next((t for t in argv if _spells(t, names.VLLM_KV_CACHE_FLAG, _KV_CACHE_PREFIX)), None)


def _spells(token: str, flag: str, shortest: str) -> bool:
    """Whether ``token`` is ``flag`` in a spelling vLLM's parser takes (``_``, unique prefixes)."""
    name = token.split("=", 1)[0].replace("_", "-")
    return len(name) >= len(shortest) and flag.startswith(name)


def _script_index(argv: list[str]) -> int | None:
    """Where ``sh [options] -c SCRIPT`` keeps its script, or ``None`` when it runs a file."""
    index = 1
    reads_string = False
    while index < len(argv) and argv[index][:1] in ("-", "+") and argv[index] not in ("-", "--"):
        option = argv[index]
        if option in ("-o", "+o", "-O", "+O"):
            index += 1  # the option's own argument
        elif not option.startswith("--") and "c" in option[1:]:
            reads_string = True
        index += 1
    if index < len(argv) and argv[index] == "--":
        index += 1
    return index if reads_string and index < len(argv) else None


def _mentions(words: Sequence[str | None]) -> bool:
    """Whether a command line names a vLLM server without gpushare seeing it start: its program
    is ``vllm`` (or KServe's server), a nested shell whose script names one, or ``vllm serve`` or
    ``-m <server module>`` stand somewhere among its words (``uv run vllm serve``)."""
    at = program(words)
    name = _basename(words[at] or "") if at < len(words) else ""
    if name in ("vllm", _HF_MODULE):
        return True
    if name in _SHELLS and any(word is not None and _names_server(word) for word in words[at:]):
        return True
    return any(
        (word is not None and _basename(word) == "vllm" and after == "serve")
        or (word == "-m" and after in SERVER_MODULES)
        for word, after in itertools.pairwise(words)
    )


def _names_server(word: str) -> bool:
    """Whether a script's word names a vLLM server (``vllm``, ``vllm serve ...``, a module)."""
    return (
        _basename(word) in ("vllm", _HF_MODULE)
        or word in SERVER_MODULES
        or any(mark in word for mark in ("vllm serve", "vllm.entrypoints", f"-m {_HF_MODULE}"))
    )


def _unseen(*, image: str = "", reason: str = "") -> Plan:
    """vLLM may run here (its image, or a word naming it), but gpushare cannot see it start."""
    detail = f" ({reason})" if reason else ""
    what = (
        f"the image {image} runs vLLM" if _is_vllm_image(image) else "the command line names vLLM"
    )
    return Plan(
        runs_vllm=False,
        problem=(
            f"{what}, but gpushare cannot find exactly where it starts the server{detail}, so"
            f" {names.VLLM_UTILIZATION_FLAG} cannot be set: start vLLM as a plain command"
            ' (command: ["vllm", "serve"], args: ["MODEL", ...]), behind tini, dumb-init or env'
            " if need be, or as one simple command in a shell string, e.g."
            " sh -c 'exec vllm serve MODEL --port 8080'"
        ),
    )


def _shell_problem(how: str, why: str) -> Plan:
    return Plan(
        runs_vllm=True,
        how=how,
        problem=(
            f"the server is started through a shell string and {why}, so"
            f" {names.VLLM_UTILIZATION_FLAG} cannot be set exactly: start vLLM as a plain command"
            ' (command: ["vllm", "serve"], args: ["MODEL", ...]) or write the server as one simple'
            " command in the script, e.g. sh -c 'exec vllm serve MODEL --port 8080'"
        ),
    )


def _user_values(removed: list[str]) -> tuple[str, ...]:
    """What the user had written (gpushare's own argument, found again, is no user value)."""
    return tuple(token for token in removed if token != names.VLLM_UTILIZATION_ARG)


def _same_words(script: str, expected: list[str]) -> bool:
    try:
        commands = shell.commands(script)
    except shell.Unsupported:
        return False
    for cmd in commands:
        texts = [script[w.start : w.end] for w in cmd.words]
        if texts == expected:
            return True
    return False


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    out: list[str] = []
    pos = 0
    for start, end, replacement in sorted(edits, key=lambda edit: (edit[0], edit[1])):
        out.append(text[pos:start])
        out.append(replacement)
        pos = max(pos, end)
    out.append(text[pos:])
    return "".join(out)


def _blank_start(text: str, pos: int) -> int:
    while pos > 0 and text[pos - 1] in " \t":
        pos -= 1
    return pos


def _mentions_flag(text: str) -> bool:
    return "gpu-memory-util" in text.replace("_", "-")


def _is_flag(token: str | None) -> bool:
    """Whether ``token`` is an option rather than a value (negative numbers are values)."""
    if token is None or not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def _hf_backend(argv: Sequence[str]) -> str | None:
    for index, token in enumerate(argv):
        name, _, value = token.partition("=")
        if name == "--backend":
            return value or (argv[index + 1] if index + 1 < len(argv) else None)
    return None


def _is_vllm_image(image: str) -> bool:
    repository = _repository(image)
    return (
        repository.endswith(("vllm/vllm-openai", "kserve/vllmserver"))
        or "vllm/vllm-openai-" in repository
    )


def _is_assignment(word: str) -> bool:
    """``NAME=value``: a shell assignment or an ``env`` argument, not a program."""
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier() and name.isascii()


def _is_hf_image(image: str) -> bool:
    return _repository(image).rsplit("/", 1)[-1].startswith(_HF_MODULE)


def _repository(image: str) -> str:
    """``docker.io/vllm/vllm-openai:latest@sha256:...`` → ``docker.io/vllm/vllm-openai``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        last[-1] = last[-1].split(":", 1)[0]
    return "/".join(last)


def _basename(token: str) -> str:
    return token.rsplit("/", 1)[-1]


def _strings(value: object) -> list[str]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return []
