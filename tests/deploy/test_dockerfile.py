"""The Dockerfile, checked without a Docker engine: a lint of what matters for a controller image,
and the wheel it builds installed into a clean venv to run what the image's entrypoint runs."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


@dataclass
class Stage:
    image: str  # with ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Split a Dockerfile into global ARG defaults and stages (enough of the syntax for a lint)."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--platform")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=name))
            continue
        assert stages, f"instruction before FROM: {line}"
        stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def test_multi_stage_with_a_named_build_stage(dockerfile):
    _, stages = dockerfile
    assert len(stages) >= 2, "wheels are built in a first stage, the final stage only installs"
    assert stages[0].name, "the build stage is named so the final stage can refer to it"


def test_every_base_image_is_a_pinned_slim_python_311(dockerfile):
    _, stages = dockerfile
    for stage in stages:
        image = stage.image
        if any(image == s.name for s in stages):
            continue  # FROM an earlier stage
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        pinned_tag = re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image)
        assert pinned_tag, f"base image {image!r} must be python:3.11.<patch>-slim[-<debian>]"
        assert not image.endswith(":latest")


def test_final_stage_runs_as_numeric_non_root_user(dockerfile):
    _, stages = dockerfile
    users = stages[-1].all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].args.split(":")
    assert all(part.isdigit() for part in user), "numeric uid[:gid], so runAsNonRoot can check it"
    assert int(user[0]) == 65532
    assert all(int(part) != 0 for part in user)
    # USER comes after every RUN: nothing runs as root after the switch is needed, and nothing
    # after it switches back.
    keywords = [i.keyword for i in stages[-1].instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_no_add_of_urls_and_no_curl_pipes(dockerfile):
    _, stages = dockerfile
    for stage in stages:
        for add in stage.all("ADD"):
            assert not re.search(r"https?://|git@", add.args), f"ADD of a URL: {add.args}"
        for run in stage.all("RUN"):
            assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", run.args), run.args


def test_no_secrets_baked_in(dockerfile):
    args, stages = dockerfile
    secret_name = re.compile(r"TOKEN|KEY|PASSWORD|SECRET|CREDENTIAL", re.I)
    names = list(args)
    for stage in stages:
        for inst in stage.all("ENV") + stage.all("ARG"):
            for assignment in shlex.split(inst.args):
                names.append(assignment.partition("=")[0])
    offenders = [n for n in names if secret_name.search(n)]
    assert not offenders, f"secret-looking ENV/ARG: {offenders}"
    text = DOCKERFILE.read_text()
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in text, "credentials come from Workload Identity"
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            assert not re.search(r"\.(json|pem|key)\b|kubeconfig|\.env\b", copy.args), copy.args


def test_final_stage_has_no_compilers_and_no_source_tree(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    text = " ".join(f"{i.keyword} {i.args}" for i in final.instructions)
    for tool in ("gcc", "g++", "build-essential", "clang", "make ", "apt-get install", "-dev "):
        assert tool not in text, f"the final stage installs build tooling ({tool.strip()})"
    for copy in final.all("COPY"):
        assert "--from=" in copy.args, f"the final stage copies sources from the context: {copy}"
    installs = [r.args for r in final.all("RUN") if "pip install" in r.args]
    assert installs, "the final stage installs the wheels"
    assert all("--no-index" in r for r in installs), "only the wheels built in stage 1, no index"


def test_read_only_root_friendly(dockerfile):
    _, stages = dockerfile
    env = " ".join(i.args for i in stages[-1].all("ENV"))
    assert re.search(r"PYTHONDONTWRITEBYTECODE=1", env), (
        "no .pyc writes next to the code at run time"
    )
    assert re.search(r"HOME=/tmp\b", env), "HOME on the one writable mount"
    deployment = yaml.safe_load((REPO / "manifests" / "controller" / "deployment.yaml").read_text())
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/tmp" for m in mounts), "the Deployment mounts /tmp writable"


def test_entrypoint_is_python_m_controller(dockerfile):
    _, stages = dockerfile
    entrypoints = stages[-1].all("ENTRYPOINT")
    assert entrypoints, "the final stage has an ENTRYPOINT"
    assert yaml.safe_load(entrypoints[-1].args) == ["python", "-m", "controller"], (
        "exec form, so the controller is PID 1 and gets SIGTERM"
    )


def test_default_cmd_is_what_the_deployment_runs(dockerfile):
    """`docker run IMAGE` without arguments behaves like the Deployment."""
    _, stages = dockerfile
    [cmd] = stages[-1].all("CMD")
    deployment = yaml.safe_load((REPO / "manifests" / "controller" / "deployment.yaml").read_text())
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert yaml.safe_load(cmd.args) == args


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, simplified: the last matching pattern wins, ! re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes
        ):
            ignored = not negate
    return ignored


def _context_copies(stages: list[Stage]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    copies = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy.args) if not w.startswith("--")]
            if "--from=" in copy.args:
                continue
            copies.append((words[:-1], words[-1]))
    return copies


def test_dockerignore_keeps_the_context_small_and_the_copies_working(dockerfile):
    _, stages = dockerfile
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for junk in (
        ".git/config",
        ".venv/bin/python",
        ".cache/testenv/bin/kubectl",
        "tests/conftest.py",
    ):
        assert _ignored(junk, patterns), f"{junk} would be sent to the Docker daemon"
    for sources, _ in _context_copies(stages):
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert not _ignored(
                src.rstrip("/") + ("/__init__.py" if src.endswith("/") else ""), patterns
            ), f"COPY {src}: excluded by .dockerignore"


def _build_context(stages: list[Stage], dest: Path) -> Path:
    """Lay out exactly what the build stage COPYs: a file the Dockerfile forgets breaks the test."""
    workdir = "/"
    for inst in stages[0].instructions:
        if inst.keyword == "WORKDIR":
            workdir = inst.args
    root = dest / "context"
    for sources, target in _context_copies(stages[:1]):
        for src in sources:
            into = root / target.lstrip("./") if target not in ("./", ".") else root
            if (REPO / src).is_dir():
                shutil.copytree(
                    REPO / src,
                    into,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            else:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, into / Path(src).name)
    assert workdir, "the build stage has a WORKDIR"
    return root


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, text=True, capture_output=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.timeout(900)
def test_wheel_installs_in_a_clean_venv_and_runs_the_entrypoint(dockerfile, tmp_path):
    """What the image does, minus Docker: wheel from the copied context, runtime deps pinned by the
    lock, no pip/setuptools at run time, `python -m controller --help` from outside the repo."""
    _, stages = dockerfile
    context = _build_context(stages, tmp_path)
    wheels = tmp_path / "wheels"
    # The outer venv holds the pinned build backend (setuptools/wheel from the lock).
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(context),
        ]
    )
    built = sorted(wheels.glob("runwarden-*.whl"))
    assert len(built) == 1, f"one runwarden wheel, got {built}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--constraint",
            str(REPO / "requirements.lock"),
            str(built[0]),
        ],
        env=env,
        cwd=tmp_path,
    )
    # As the final stage does: no packaging tools at run time.
    _run(
        [str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools", "wheel"],
        env=env,
        cwd=tmp_path,
    )

    freeze = _run([str(python), "-m", "pip", "freeze"], env=env, cwd=tmp_path).stdout.lower()
    for tool in ("pytest", "hypothesis", "mypy", "ruff", "import-linter"):
        assert f"{tool}==" not in freeze, f"test tool {tool} installed with the runtime deps"

    env["PYTHONDONTWRITEBYTECODE"] = "1"
    help_ = _run([str(python), "-m", "controller", "--help"], env=env, cwd=tmp_path)
    deployment = yaml.safe_load((REPO / "manifests" / "controller" / "deployment.yaml").read_text())
    flags = {
        a.split("=")[0] for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    }
    missing = [flag for flag in sorted(flags) if flag not in help_.stdout]
    assert not missing, f"flags the Deployment passes but --help does not list: {missing}"
    # The package imported is the installed one, not the checkout's.
    where = _run(
        [str(python), "-c", "import controller; print(controller.__file__)"], env=env, cwd=tmp_path
    ).stdout
    assert str(venv) in where, where
