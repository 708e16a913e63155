"""Which container runs vLLM, and how its command line gets gpushare's utilization argument."""

import shlex
from typing import Any

import pytest

from gpushare.core import names
from gpushare.webhook import vllm

OURS = names.VLLM_UTILIZATION_ARG


def container(**fields: Any) -> dict[str, Any]:
    return {"name": "server", "image": "example.com/server:1", **fields}


RECOGNISED = [
    ("openai module", container(command=["python", "-m", "vllm.entrypoints.openai.api_server"])),
    ("legacy module", container(command=["python3", "-m", "vllm.entrypoints.api_server"])),
    (
        "python options",
        container(command=["/usr/bin/python3", "-u", "-m", "vllm.entrypoints.api_server"]),
    ),
    ("vllm serve", container(command=["vllm", "serve"], args=["m"])),
    ("vllm serve by path", container(command=["/opt/venv/bin/vllm", "serve", "m"])),
    ("cli module", container(command=["python", "-m", "vllm.entrypoints.cli.main", "serve", "m"])),
    ("args only start it", container(args=["vllm", "serve", "m"])),
    (
        "vllm-openai entrypoint",
        container(image="docker.io/vllm/vllm-openai:latest", args=["--model", "m"]),
    ),
    ("vllm-openai by digest", container(image="vllm/vllm-openai@sha256:abc", args=[])),
    ("vllm-openai-cpu", container(image="vllm/vllm-openai-cpu:v0.24.0")),
    ("kserve-container", container(name="kserve-container", image="kserve/vllmserver:latest")),
    (
        "huggingfaceserver",
        container(image="kserve/huggingfaceserver:v0.21.0-gpu", args=["--backend=vllm"]),
    ),
    ("huggingfaceserver auto", container(image="kserve/huggingfaceserver:v0.21.0", args=[])),
    ("under tini", container(command=["tini", "--", "vllm", "serve", "m"])),
    ("tini, then sh -c", container(command=["tini", "--", "sh", "-c", "exec vllm serve m"])),
    (
        "tini with options",
        container(command=["tini", "-g", "-p", "SIGTERM", "--", "vllm", "serve"]),
    ),
    ("env, then bash -c", container(command=["/usr/bin/env", "bash", "-c", "vllm serve m"])),
    ("env with a variable", container(command=["env", "-u", "X", "A=1", "vllm", "serve", "m"])),
    ("dumb-init", container(command=["dumb-init", "--single-child", "vllm", "serve", "m"])),
    ("exec chain", container(command=["sh", "-c", "cd /m && exec env A=1 nohup vllm serve m"])),
    ("inside an if", container(command=["sh", "-c", "if [ -d /m ]; then exec vllm serve m; fi"])),
    ("sh -c", container(command=["sh", "-c", "exec vllm serve m"])),
    ("bash -lc with args", container(command=["bash", "-lc"], args=["vllm serve m --port 8000"])),
]

NOT_VLLM = [
    ("trainer", container(command=["python", "train.py"])),
    (
        "kserve transformer",
        container(
            name="kserve-container",
            image="kserve/image-transformer:v0.21.0",
            args=["--model_name", "m", "--predictor_host", "m-predictor.ns"],
        ),
    ),
    (
        "text-generation-inference in kserve-container",
        container(
            name="kserve-container",
            image="ghcr.io/huggingface/text-generation-inference:3.3.4",
            args=["--model-id", "/mnt/models"],
        ),
    ),
    ("nginx", container(image="nginx:1.27")),
    (
        "other kserve runtime",
        container(name="kserve-container", image="kserve/sklearnserver:v0.21.0"),
    ),
    (
        "hf with the transformers backend",
        container(image="kserve/huggingfaceserver:v0.21.0", args=["--backend", "huggingface"]),
    ),
    ("vllm bench", container(command=["vllm", "bench", "serve"])),
    ("shell without vllm", container(command=["sh", "-c", "python train.py && echo done"])),
    ("shell script file", container(command=["sh", "/start.sh"])),
]


@pytest.mark.parametrize(("spec"), [spec for _, spec in RECOGNISED], ids=[i for i, _ in RECOGNISED])
def test_vllm_is_recognised_in_every_launch_form(spec: dict[str, Any]) -> None:
    plan = vllm.plan(spec)
    assert plan.runs_vllm and plan.problem is None, plan
    argv = (plan.command or spec.get("command") or []) + (plan.args or [])
    assert argv[-1] == OURS or OURS in argv[-1]


@pytest.mark.parametrize(("spec"), [spec for _, spec in NOT_VLLM], ids=[i for i, _ in NOT_VLLM])
def test_other_containers_are_not_taken_for_vllm(spec: dict[str, Any]) -> None:
    assert not vllm.plan(spec).runs_vllm


SPELLINGS = [
    ("space", ["--gpu-memory-utilization", "0.9"]),
    ("equals", ["--gpu-memory-utilization=0.9"]),
    ("underscores", ["--gpu_memory_utilization", "0.9"]),
    ("underscores equals", ["--gpu_memory_utilization=0.9"]),
    ("mixed", ["--gpu-memory_utilization", "0.9"]),
    ("unique prefix", ["--gpu-memory-util", "0.9"]),
    ("repeated, last wins", ["--gpu-memory-utilization", "0.5", "--gpu_memory_utilization=0.9"]),
    ("ours already", [OURS]),
]


@pytest.mark.parametrize("flags", [f for _, f in SPELLINGS], ids=[i for i, _ in SPELLINGS])
def test_every_spelling_of_the_flag_is_replaced_by_ours(flags: list[str]) -> None:
    spec = container(command=["vllm", "serve"], args=["m", *flags, "--port", "8000"])
    plan = vllm.plan(spec)
    assert plan.args == ["m", "--port", "8000", OURS]
    assert plan.command == ["vllm", "serve"]


def test_a_flag_in_the_command_is_removed_there() -> None:
    spec = container(
        command=["vllm", "serve", "m", "--gpu-memory-utilization=0.3"], args=["--port", "1"]
    )
    plan = vllm.plan(spec)
    assert plan.command == ["vllm", "serve", "m"]
    assert plan.args == ["--port", "1", OURS]
    assert plan.removed == ("--gpu-memory-utilization=0.3",)


def test_arguments_before_the_server_are_left_alone() -> None:
    spec = container(command=["tini", "--gpu-memory-utilization", "--", "vllm", "serve", "m"])
    plan = vllm.plan(spec)
    assert plan.command == spec["command"]
    assert plan.args == [OURS]


@pytest.mark.parametrize(
    "command",
    [["vllm", "serve", "m", "--", "x"], ["sh", "-c", "exec vllm serve m -- x"]],
    ids=["list", "shell"],
)
def test_a_double_dash_among_vllm_arguments_is_a_problem(command: list[str]) -> None:
    plan = vllm.plan(container(command=command))
    assert plan.problem is not None and "'--'" in plan.problem


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tensor-parallel-size", "2"], {"--tensor-parallel-size": "2"}),
        (["--tensor_parallel_size=4"], {"--tensor-parallel-size": "4"}),
        (["-tp", "2"], {"--tensor-parallel-size": "2"}),
        (["--pipeline-parallel-size", "2"], {"--pipeline-parallel-size": "2"}),
        (["-dp=2"], {"--data-parallel-size": "2"}),
        (["--port", "1"], {}),
    ],
)
def test_multi_gpu_flags_are_read(flags: list[str], expected: dict[str, str]) -> None:
    assert vllm.plan(container(command=["vllm", "serve", "m", *flags])).parallel == expected


SHELL_REWRITES = [
    (
        "flag with value",
        "exec vllm serve m --gpu-memory-utilization 0.9 --port 8000",
        f"exec vllm serve m --port 8000 {OURS}",
    ),
    (
        "no flag yet",
        "exec python3 -m vllm.entrypoints.openai.api_server --model m",
        f"exec python3 -m vllm.entrypoints.openai.api_server --model m {OURS}",
    ),
    (
        "quoted value from an expansion",
        'vllm serve "$MODEL" --gpu_memory_utilization="$UTIL" --port "$PORT"',
        f'vllm serve "$MODEL" --port "$PORT" {OURS}',
    ),
    (
        "before a redirection and after setup",
        "pip install x && vllm serve m --gpu-memory-utilization=0.9 > /tmp/log 2>&1; echo done",
        f"pip install x && vllm serve m {OURS} > /tmp/log 2>&1; echo done",
    ),
    (
        "line continuations",
        "vllm serve m \\\n  --gpu-memory-utilization 0.9 \\\n  --port 8000\n",
        f"vllm serve m \\\n \\\n  --port 8000 {OURS}\n",
    ),
    (
        "flag mentioned by another command",
        "echo --gpu-memory-utilization; vllm serve m",
        f"echo --gpu-memory-utilization; vllm serve m {OURS}",
    ),
    ("already ours", f"vllm serve m {OURS}", f"vllm serve m {OURS}"),
]


@pytest.mark.parametrize(
    ("script", "expected"),
    [(s, e) for _, s, e in SHELL_REWRITES],
    ids=[i for i, _, _ in SHELL_REWRITES],
)
def test_a_shell_string_is_rewritten_exactly(script: str, expected: str) -> None:
    plan = vllm.plan(container(command=["/bin/sh", "-c", script]))
    assert plan.problem is None
    assert plan.command == ["/bin/sh", "-c", expected]


def test_positional_parameters_of_the_shell_lose_the_flag_too() -> None:
    spec = container(
        command=["sh", "-c", 'exec vllm serve "$@"', "sh", "m", "--gpu-memory-utilization", "0.9"]
    )
    plan = vllm.plan(spec)
    assert plan.command == ["sh", "-c", f'exec vllm serve "$@" {OURS}', "sh", "m"]


SHELL_REFUSALS = [
    ("two servers", "vllm serve a & vllm serve b", "more than one"),
    ("server in a function", 'run() { vllm "$@"; }; run serve m', "cannot find"),
    ("flag built from a variable", "vllm serve m --gpu-memory-$KIND=0.9", "expansion"),
    ("here-document", "cat <<EOF > /tmp/x\nhi\nEOF\nvllm serve m", "here-documents"),
    ("unterminated quote", "vllm serve 'm", "not closed"),
    ("nested shell", "sh -c 'vllm serve m'", "cannot find"),
]


@pytest.mark.parametrize(
    ("script", "why"), [(s, w) for _, s, w in SHELL_REFUSALS], ids=[i for i, _, _ in SHELL_REFUSALS]
)
def test_a_shell_string_that_cannot_be_rewritten_exactly_is_a_problem(
    script: str, why: str
) -> None:
    plan = vllm.plan(container(command=["sh", "-c", script]))
    assert plan.problem is not None and why in plan.problem
    assert "vllm serve" in plan.problem  # it says what to write instead


def test_a_vllm_image_whose_script_hides_the_server_is_a_problem() -> None:
    spec = container(image="vllm/vllm-openai:v0.24.0", command=["sh", "-c", "exec $SERVER"])
    plan = vllm.plan(spec)
    assert plan.problem is not None and "cannot find" in plan.problem


@pytest.mark.parametrize(
    "script",
    [
        "python finetune.py --out /models/vllm-ready",
        "echo 'vllm is not used here' && python train.py",
        "$SERVER --port 8000  # runs vllm",
    ],
)
def test_scripts_that_only_mention_vllm_are_not_taken_for_it(script: str) -> None:
    assert vllm.plan(container(command=["sh", "-c", script])) == vllm.NOT_VLLM


def test_rewritten_shell_strings_keep_every_other_word() -> None:
    script = "A=1 exec vllm serve 'my model' --port=8000 --gpu-memory-utilization 0.9 -tp 1"
    plan = vllm.plan(container(command=["sh", "-c", script]))
    assert plan.command is not None
    assert shlex.split(plan.command[2]) == [
        "A=1",
        "exec",
        "vllm",
        "serve",
        "my model",
        "--port=8000",
        "-tp",
        "1",
        OURS,
    ]


SIDECARS = [
    (
        "readiness loop",
        "until curl -sf localhost:8000/health; do sleep 2; done; echo 'vllm serve is up'",
    ),
    ("mentions in echo", "echo vllm serve m; sleep infinity"),
    ("process watch", "while pgrep -f 'vllm serve'; do sleep 5; done"),
]


@pytest.mark.parametrize("script", [s for _, s in SIDECARS], ids=[i for i, _ in SIDECARS])
def test_a_sidecar_script_that_mentions_vllm_serve_does_not_run_it(script: str) -> None:
    plan = vllm.plan(container(image="curlimages/curl:8.11.0", command=["sh", "-c", script]))
    assert not plan.runs_vllm


def test_a_command_line_that_names_vllm_where_it_cannot_be_seen_is_a_problem() -> None:
    plan = vllm.plan(container(command=["uv", "run", "vllm", "serve", "m"]))
    assert not plan.runs_vllm
    assert plan.problem is not None and 'command: ["vllm", "serve"]' in plan.problem


def test_a_flag_split_across_command_and_args_goes_with_its_value() -> None:
    spec = container(
        command=["vllm", "serve", "m", "--gpu-memory-utilization"], args=["0.9", "--port", "1"]
    )
    plan = vllm.plan(spec)
    assert plan.command == ["vllm", "serve", "m"]
    assert plan.args == ["--port", "1", OURS]
    assert plan.removed == ("--gpu-memory-utilization", "0.9")


def test_the_flag_lands_inside_the_script_behind_wrappers() -> None:
    spec = container(command=["tini", "--", "sh", "-c", "exec vllm serve m --port 8000"])
    plan = vllm.plan(spec)
    assert plan.command == ["tini", "--", "sh", "-c", f"exec vllm serve m --port 8000 {OURS}"]


@pytest.mark.parametrize(
    "token",
    ["--kv-cache-memory-bytes=8G", "--kv_cache_memory_bytes", "--kv-cache-memory"],
)
def test_a_fixed_kv_cache_size_is_found_in_every_spelling(token: str) -> None:
    listed = vllm.plan(container(command=["vllm", "serve", "m", token, "8589934592"]))
    shelled = vllm.plan(container(command=["sh", "-c", f"exec vllm serve m {token} 8589934592"]))
    assert listed.kv_cache == token and shelled.kv_cache == token


def test_the_kv_cache_dtype_is_no_kv_cache_size() -> None:
    assert (
        vllm.plan(container(command=["vllm", "serve", "m", "--kv-cache-dtype", "fp8"])).kv_cache
        is None
    )


@pytest.mark.parametrize(
    "command",
    [
        ["python", "train.py", "--output", "/data/vllm"],
        ["sh", "-c", "python train.py --output /data/vllm && echo done"],
    ],
    ids=["list", "shell"],
)
def test_a_path_named_vllm_is_no_mention_of_the_server(command: list[str]) -> None:
    assert vllm.plan(container(command=command)) == vllm.NOT_VLLM
