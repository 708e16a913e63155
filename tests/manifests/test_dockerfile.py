"""The container image: one for every part, built in stages, unprivileged by default."""

import re
import tomllib
from typing import Final

from tests.manifests.render import ROOT

DOCKERFILE: Final = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last:]


def test_the_image_is_built_in_stages() -> None:
    stages = [rest for keyword, rest in _instructions() if keyword == "FROM"]
    assert len(stages) >= 2
    assert any("--from=" in rest for keyword, rest in _final_stage() if keyword == "COPY")


def test_the_image_runs_as_an_unprivileged_user_by_default() -> None:
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] == "65532"


def test_the_image_runs_the_gpushare_command() -> None:
    entrypoints = [rest for keyword, rest in _final_stage() if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["gpushare"]']


def test_the_build_copies_every_package_folder() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in _instructions()
        if keyword == "COPY" and not rest.startswith("--from")
    }
    assert folders <= copied, f"not copied into the image: {sorted(folders - copied)}"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for folder in folders:
        assert f"!{folder}/" in ignore, f".dockerignore leaves {folder}/ out of the build context"
