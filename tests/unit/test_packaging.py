"""The Dockerfile installs what ``make setup`` installs (torch spec default, extras, order), the image and build
context the cluster configs name, and the TensorBoard dependency."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]


def makefile_defaults(text: str) -> dict[str, str]:
    """``NAME ?= value`` defaults of a Makefile."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s*\?=\s*(.*)$", text, re.M)}


def dockerfile_args(text: str) -> dict[str, str]:
    """``ARG NAME=default`` defaults of a Dockerfile (quotes removed)."""
    return {m.group(1): shlex.split(m.group(2))[0] if m.group(2).strip() else ""
            for m in re.finditer(r"^ARG\s+(\w+)=(.*)$", text, re.M)}


def _pip_steps(commands: list[str]) -> list[list[str]]:
    """Each ``pip install`` command as words, with the invocation (``$(PY) -m pip``, ``pip``), ``--no-cache-dir``
    and quotes dropped and Make/shell variables written ``${NAME}``."""
    steps = []
    for command in commands:
        command = re.sub(r"\$\((\w+)\)|\$(\w+)", lambda m: "${" + (m.group(1) or m.group(2)) + "}", command)
        words = [w for w in shlex.split(command) if w != "--no-cache-dir"]
        if "pip" in words and words[words.index("pip") + 1:words.index("pip") + 2] == ["install"]:
            steps.append(words[words.index("pip") + 1:])
    return steps


def makefile_install_steps(text: str) -> list[list[str]]:
    """pip steps of the recipe that builds the virtual environment (``$(VENV)/.installed``)."""
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "Makefile has no $(VENV)/.installed recipe"
    return _pip_steps([line.strip() for line in recipe.group(1).splitlines()])


def dockerfile_install_steps(text: str) -> list[list[str]]:
    """pip steps of the Dockerfile's RUN instructions (continuations joined, ``&&`` chains split)."""
    text = re.sub(r"\\\n\s*", " ", text)
    commands = [c for m in re.finditer(r"^RUN\s+(.*)$", text, re.M) for c in m.group(1).split("&&")]
    return _pip_steps(commands)


def unquoted_variable(commands_text: str, name: str) -> bool:
    """True when every use of ``name`` in the text is outside quotes (so pip options in it become words)."""
    uses = re.findall(rf"(\S*\$[({{]?{name}[)}}]?\S*)", commands_text)
    return bool(uses) and not any(u.startswith(("'", '"')) for u in uses)


@pytest.fixture(scope="module")
def makefile() -> str:
    return (REPO / "Makefile").read_text()


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_defaults_match_the_makefile(makefile, dockerfile):
    make, docker = makefile_defaults(makefile), dockerfile_args(dockerfile)
    for name in ("TORCH_SPEC", "EXTRAS", "SUITE2P_SPEC"):
        assert docker.get(name) == make.get(name), (name, docker.get(name), make.get(name))


def test_dockerfile_install_steps_match_the_makefile(makefile, dockerfile):
    expected = [["install", "--upgrade", "pip", "setuptools", "wheel"], ["install", "${TORCH_SPEC}"],
                ["install", "-e", ".[${EXTRAS}]"], ["install", "--no-deps", "${SUITE2P_SPEC}"]]
    assert makefile_install_steps(makefile) == expected
    assert dockerfile_install_steps(dockerfile) == expected
    # a TORCH_SPEC with `--index-url ...` must reach pip as separate words in both
    assert unquoted_variable(makefile, "TORCH_SPEC") and unquoted_variable(dockerfile.split("FROM", 1)[1], "TORCH_SPEC")


def test_install_step_parsers_are_not_vacuous(makefile, dockerfile):
    assert makefile_install_steps(makefile.replace('".[$(EXTRAS)]"', '".[dev,gpu]"'))[-2] == ["install", "-e", ".[dev,gpu]"]
    reordered = dockerfile.replace("pip install --no-cache-dir $TORCH_SPEC \\", "true \\")
    assert len(dockerfile_install_steps(reordered)) == 3
    assert dockerfile_args('ARG TORCH_SPEC="torch==9"\nARG EXTRAS=""\n') == {"TORCH_SPEC": "torch==9", "EXTRAS": ""}
    assert not unquoted_variable('pip install "$(TORCH_SPEC)"', "TORCH_SPEC")


def test_dockerfile_base_image_matches_the_cluster_ray_version(dockerfile):
    base = dockerfile_args(dockerfile)["RAY_IMAGE"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base.startswith(f"rayproject/ray:{ray.__version__}-{py}-"), base
    assert "ENV RAY_TRAIN_V2_ENABLED=1" in dockerfile


def test_dockerignore_keeps_local_state_out_and_the_copied_files_in(dockerfile):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "outputs"} <= set(patterns)
    copied = [w for m in re.finditer(r"^COPY\s+(?:--\S+\s+)*(.+)$", dockerfile, re.M) for w in m.group(1).split()[:-1]]
    assert "pyproject.toml" in copied and "README.md" in copied  # pyproject's `readme` is read at install
    for path in copied:
        if path != ".":
            assert (REPO / path).is_file(), path
            assert not any(Path(path).match(p) for p in patterns), path
    # .dockerignore patterns are anchored at the context root: "data" leaves the cadiff/data package in
    assert not any(p.endswith("/data") or p.startswith("cadiff") for p in patterns), patterns


def _image_tag() -> str:
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return f"cadiff:{version.group(1)}"


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests_run_the_dockerfile_image(name):
    text = (REPO / "cluster" / name).read_text()
    images = set(re.findall(r"image:\s*(\S+)", "\n".join(yaml.safe_dump(d) for d in yaml.safe_load_all(text) if d)))
    assert images == {_image_tag()}, images
    assert "Dockerfile" in text


def test_cluster_readme_builds_the_image_with_the_dockerfile():
    text = (REPO / "cluster" / "README.md").read_text()
    assert f"docker build -t {_image_tag()} ." in text
    assert "<<'EOF'" not in text and "-f -" not in text, "the image recipe lives in the Dockerfile, not a heredoc"
    for name in ("aws.yaml", "gcp.yaml"):
        assert "Dockerfile" in (REPO / "cluster" / name).read_text(), name


def test_tensorboard_is_a_dependency():
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert re.search(r'^\s*"tensorboard[>=<~]', dependencies.group(1), re.M), dependencies.group(1)


def test_make_test_keeps_the_ray_tests_on_one_worker(makefile):
    """`make test` spreads the suite over xdist workers a file at a time, except that every test that starts Ray is
    in one unit (one worker runs them one at a time); the integration tests left out of it start no Ray."""
    import ast

    from tests.conftest import RAY_FIXTURES, RAY_FREE_INTEGRATION, RAY_FREE_TESTS, RAY_UNIT, xdist_unit_of

    assert re.search(r"^XDIST := .*-n \$\(TEST_WORKERS\) --dist loadfile\)", makefile, re.M), "the hook needs loadfile"
    files = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py")}
    integration = {f for f in files if f.startswith("tests/integration/")}
    for file in files:
        tree = ast.parse((REPO / file).read_text())
        tests = {n.name: [a.arg for a in n.args.args] for n in tree.body
                 if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
        name = file.rsplit("/", 1)[1]
        assert set(RAY_FREE_TESTS.get(name, ())) <= set(tests), f"{file}: a Ray-free test that does not exist"
        for test, args in tests.items():
            unit = xdist_unit_of(f"{file}::{test}[p0]")
            if file not in integration:
                assert unit == file  # every file outside tests/integration its own unit
            elif name in RAY_FREE_INTEGRATION or test in RAY_FREE_TESTS.get(name, ()):
                assert unit == f"{file} (no Ray)" and not set(args) & set(RAY_FIXTURES), (file, test)
            else:
                assert unit == RAY_UNIT, (file, test)
    assert xdist_unit_of("tests/integration/test_train_ae.py::test_ddp_trains_exports_media_and_resumes_exactly") == RAY_UNIT
    assert xdist_unit_of("tests/integration/test_train_ae.py::test_exact_resume_single_process") != RAY_UNIT
    for name in RAY_FREE_INTEGRATION:
        text = (REPO / "tests" / "integration" / name).read_text()
        assert not re.search(r"ray_cluster|import ray|init_ray|job_command|RAY_ADDRESS", text), name


def test_the_scheduler_hands_out_the_ray_unit_first():
    """Whatever the order pytest-xdist queued the units in (by test count), the Ray unit starts first: it is the
    longest, and the other units fill in around it."""
    from collections import OrderedDict

    xdist = pytest.importorskip("xdist.scheduler")
    from tests import conftest

    class Option:
        dist, loadscopereorder = "loadfile", True

    class Config:
        option = Option()

        def getoption(self, name):
            return getattr(self.option, name)

        def getvalue(self, name):  # `-n 2` as pytest-xdist passes it on
            return {"tx": ["2*popen"]}[name]

    class Node:
        def send_runtest_some(self, indexes):
            pass

    scheduler = conftest.pytest_xdist_make_scheduler(Config(), None)
    assert isinstance(scheduler, xdist.LoadFileScheduling) and not scheduler.workqueue
    collection = ["tests/unit/test_cli.py::test_a", "tests/unit/test_cli.py::test_b",
                  "tests/integration/test_train_ae.py::test_exact_resume_single_process",
                  "tests/integration/test_job_submit.py::test_ray_job_submit_trains_on_local_head"]
    scheduler.workqueue = OrderedDict()
    for nodeid in collection:  # queued in collection order: the Ray unit last
        scheduler.workqueue.setdefault(scheduler._split_scope(nodeid), {})[nodeid] = False
    assert list(scheduler.workqueue) == ["tests/unit/test_cli.py", "tests/integration/test_train_ae.py (no Ray)",
                                         conftest.RAY_UNIT]
    nodes = [Node(), Node()]
    for node in nodes:
        scheduler.registered_collections[node] = collection
        scheduler._assign_work_unit(node)
    assert [list(scheduler.assigned_work[n]) for n in nodes] == [[conftest.RAY_UNIT], ["tests/unit/test_cli.py"]]
