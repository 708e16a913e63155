"""Which container runs vLLM, and its command line with gpushare's utilization argument.

A container runs vLLM when its command starts the server (``vllm serve``, ``python -m
vllm.entrypoints.openai.api_server``, the legacy ``vllm.entrypoints.api_server``, KServe's
``huggingfaceserver`` with its vLLM backend), directly or through ``sh -c "..."``; or when it sets
no command and its image's entrypoint is the server (``vllm/vllm-openai``, KServe's
``huggingfaceserver``), or it is KServe's ``kserve-container`` of a runtime that is not a known
non-vLLM server. vLLM takes every spelling of ``--gpu-memory-utilization`` (``--flag v``,
``--flag=v``, ``--gpu_memory_utilization v``, unique prefixes) and the last one wins, so every one
is removed and :data:`gpushare.names.VLLM_UTILIZATION_ARG` is added once, last.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gpushare import names
from gpushare.webhook import shell

KSERVE_CONTAINER: Final = "kserve-container"
"""The name KServe gives the model server's container in every predictor pod."""

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

PARALLEL_FLAGS: Final = {
    "--tensor-parallel-size": "-tp",
    "--pipeline-parallel-size": "-pp",
    "--data-parallel-size": "-dp",
}
"""vLLM flags that spread one server over several GPUs, with their short forms."""

_OTHER_SERVERS: Final = (
    "sklearnserver",
    "xgbserver",
    "lgbserver",
    "pmmlserver",
    "paddleserver",
    "tritonserver",
    "torchserve",
    "mlserver",
    "tensorflow/serving",
    "art-explainer",
)
"""Images of KServe runtimes that are not vLLM: their ``kserve-container`` gets no vLLM flag."""


@dataclass(frozen=True)
class Plan:
    """What the webhook does to one container's command line.

    ``problem`` is set when the container runs vLLM but its command line cannot be rewritten
    exactly; ``command`` and ``args`` are the rewritten fields otherwise (``None``: leave unset).
    """

    runs_vllm: bool
    how: str = ""
    command: list[str] | None = None
    args: list[str] | None = None
    removed: tuple[str, ...] = ()
    parallel: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


NOT_VLLM: Final = Plan(runs_vllm=False)


def is_utilization_flag(token: str) -> bool:
    """Whether ``token`` (``--flag`` or ``--flag=value``) spells vLLM's utilization flag."""
    name = token.split("=", 1)[0].replace("_", "-")
    return len(name) >= len(_SHORTEST_PREFIX) and names.VLLM_UTILIZATION_FLAG.startswith(name)


def plan(container: Mapping[str, Any]) -> Plan:
    """Decide whether ``container`` runs vLLM and how its command line becomes gpushare's."""
    command = _strings(container.get("command"))
    args = _strings(container.get("args"))
    image = str(container.get("image") or "")
    name = str(container.get("name") or "")
    if command and _basename(command[0]) in _SHELLS:
        return _plan_shell(command, args, image=image)
    argv = command + args
    found = _find_server(argv)
    if found is not None:
        start, how = found
        return _plan_argv(command, args, start=start, how=how)
    if command:
        if _is_vllm_image(image):
            return Plan(
                runs_vllm=True,
                problem=(
                    f"the image {image} runs vLLM, but the command {' '.join(command)!r} starts no"
                    " vLLM server gpushare can see: put the server in command/args, e.g."
                    ' command: ["vllm", "serve"], args: ["MODEL", ...]'
                ),
            )
        return NOT_VLLM
    if _is_vllm_image(image):
        how = f"the entrypoint of {image}"
    elif _is_hf_image(image):
        how = f"the entrypoint of {image} (python -m {_HF_MODULE})"
    elif name == KSERVE_CONTAINER and not any(other in image for other in _OTHER_SERVERS):
        how = f"KServe's {KSERVE_CONTAINER} (image {image or 'unset'})"
    else:
        return NOT_VLLM
    return _plan_argv([], args, start=0, how=how)


def _plan_argv(command: list[str], args: list[str], *, start: int, how: str) -> Plan:
    argv = command + args
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
    cut = max(start - len(command), 0)
    kept_command, removed_command = _strip(command, start=start)
    kept_args, removed_args = _strip(args, start=cut)
    return Plan(
        runs_vllm=True,
        how=how,
        command=kept_command if command else None,
        args=[*kept_args, names.VLLM_UTILIZATION_ARG],
        removed=_user_values(removed_command + removed_args),
        parallel=parallel_sizes(server_args),
    )


def _plan_shell(command: list[str], args: list[str], *, image: str) -> Plan:
    argv = command + args
    where = _script_index(argv)
    if where is None:  # ``sh FILE``: the script is not in the pod spec
        return _unseen(image, argv) if _is_vllm_image(image) else NOT_VLLM
    script = argv[where]
    try:
        commands = shell.commands(script)
    except shell.Unsupported as exc:
        mentions = any(word in script.lower() for word in ("vllm", _HF_MODULE))
        return _unseen(image, argv, reason=str(exc)) if mentions else NOT_VLLM
    found = [
        (cmd, hit)
        for cmd in commands
        if (hit := _find_server([w or "" for w in cmd.literals()])) is not None
    ]
    if not found:
        texts = [w.literal or w.prefix for cmd in commands for w in cmd.words]
        if _is_vllm_image(image) or any(_names_server(text) for text in texts):
            return _unseen(image, argv)
        return NOT_VLLM
    how = f"{_basename(argv[0])} -c script: {found[0][1][1]}"
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
    trailing, removed_trailing = _strip(new_argv[where + 2 :], start=0)
    new_argv[where + 2 :] = trailing
    split = len(command)
    return Plan(
        runs_vllm=True,
        how=how,
        command=new_argv[:split],
        args=new_argv[split:] if args else None,
        removed=_user_values([script[w.start : w.end] for w in cuts] + removed_trailing),
        parallel=parallel_sizes(literal_args),
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


def _strip(tokens: list[str], *, start: int) -> tuple[list[str], list[str]]:
    """Remove every utilization flag (and its separate value) at or after ``start``."""
    kept: list[str] = list(tokens[:start])
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
            kept.append(token)
        index += 1
    return kept, removed


def _find_server(argv: Sequence[str]) -> tuple[int, str] | None:
    """Index of the first argument the server reads, and how it was started."""
    for index, token in enumerate(argv):
        if token == "-m" and index + 1 < len(argv) and argv[index + 1] in SERVER_MODULES:
            module = argv[index + 1]
            if module == "vllm.entrypoints.cli.main":
                if index + 2 < len(argv) and argv[index + 2] == "serve":
                    return index + 3, f"python -m {module} serve"
                continue
            return index + 2, f"python -m {module}"
        if _basename(token) == "vllm" and index + 1 < len(argv) and argv[index + 1] == "serve":
            return index + 2, "vllm serve"
    return None


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


def _names_server(word: str) -> bool:
    """Whether a script's word names a vLLM server (``vllm``, ``vllm serve ...``, a module)."""
    return (
        _basename(word) in ("vllm", _HF_MODULE)
        or word in SERVER_MODULES
        or any(mark in word for mark in ("vllm serve", "vllm.entrypoints", f"-m {_HF_MODULE}"))
    )


def _unseen(image: str, argv: list[str], *, reason: str = "") -> Plan:
    detail = f" ({reason})" if reason else ""
    return _shell_problem(
        f"{_basename(argv[0])} -c script",
        f"gpushare cannot find exactly where the script starts vLLM{detail}",
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
    return repository.endswith("vllm/vllm-openai") or "vllm/vllm-openai-" in repository


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
