"""No contract name is spelled outside ``core/names.py``: the product imports it from there.

Every string constant of the product's Python source (f-string parts included, docstrings aside)
is read with :mod:`ast`; one that starts with a contract name's spelling is an offender.
"""

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from gpushare.core import names

ROOT: Final = Path(__file__).resolve().parents[2]
PRODUCT: Final = ("cli", "core", "runtime", "scheduler", "webhook", "device-plugin", "simulator")
"""The product's folders (the generated gRPC stubs under ``device-plugin/api/`` aside)."""
HOME: Final = ROOT / "core" / "names.py"
CONTRACT: Final = (
    f"{names.DOMAIN}/",
    "CUDA_MPS_",
    names.ENV_PREFIX,
    names.ENV_VISIBLE_DEVICES,
    "NVIDIA_GPU_MEMORY_",
    names.VLLM_UTILIZATION_FLAG,
    names.NAMESPACE,
    names.SCHEDULER_NAME,
    names.DRA_DRIVER,
    names.DRA_DEVICE_CLASS,
    names.DRA_CLAIM_NAME,
)
"""The spellings a contract name starts with: gpushare's domain, its environment and vLLM's flag,
its namespace, scheduler, and DRA driver, class and claim."""


def _sources() -> Iterator[Path]:
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != HOME and (ROOT / "device-plugin" / "api") not in path.parents:
                yield path


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that stand alone as statements (docstrings)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def offenders(source: str, where: str) -> list[str]:
    """``where:line: 'literal'`` for each string constant of ``source`` spelling a contract name."""
    tree = ast.parse(source, where)
    skip = _docstrings(tree)
    return [
        f"{where}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and node.value.lstrip().startswith(CONTRACT)
    ]


def test_the_scan_reads_the_product() -> None:
    read = {path.relative_to(ROOT).parts[0] for path in _sources()}
    assert read == set(PRODUCT)


@pytest.mark.parametrize(
    "source",
    [
        'X = "gpushare.io/card-uuid"',
        'x = f"CUDA_MPS_PIPE_DIRECTORY={pipe}"',
        'env = {"GPUSHARE_BACKEND": "dra"}',
        'args = ["--gpu-memory-utilization", "0.9"]',
        'def f():\n    return "gpushare-system"',
        'x = {"driver": "gpu.gpushare.io"}',
    ],
)
def test_a_contract_literal_is_found(source: str) -> None:
    assert len(offenders(source, "scratch.py")) == 1


@pytest.mark.parametrize(
    "source",
    [
        '"""Reads gpushare.io/card-uuid."""',
        'def f():\n    """gpushare.io/gpu-memory, in units."""',
        "X = names.ANNOTATION_CARD_UUID",
        'x = f"{names.DOMAIN}/other"',
        'message = "ask for gpushare.io/gpu-memory instead"',
    ],
)
def test_docstrings_names_and_prose_are_not_offenders(source: str) -> None:
    assert offenders(source, "scratch.py") == []


def test_no_contract_literal_outside_names() -> None:
    found = [
        line
        for path in _sources()
        for line in offenders(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "import these from gpushare.core.names instead:\n" + "\n".join(found)
