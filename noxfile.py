"""Sessions: tests (the whole suite, CPU, lm-eval harness included), demo (the main job), bench, lint.

pip install nox && nox -s tests
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
# The CPU build of torch 2.13.0 lies on this project's machines; naming it exactly keeps pip
# from pulling a multi-GB CUDA build. Override with TORCH_SPEC (e.g. on a CUDA machine).
TORCH_SPEC = "torch==2.13.0"


def _install(session: nox.Session, extras: str) -> None:
    import os

    session.install(os.environ.get("TORCH_SPEC", TORCH_SPEC))
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite on CPU (Hypothesis profile 'ci': derandomised, bounded)."""
    _install(session, "test,demo,eval")
    session.env.setdefault("HYPOTHESIS_PROFILE", "ci")
    session.run("pytest", "-q", "--hypothesis-show-statistics", *session.posargs)


@nox.session(python=PYTHON)
def tests_oldest(session: nox.Session) -> None:
    """The suite against the oldest transformers we support (5.17)."""
    _install(session, "test,demo")
    session.install("transformers==5.17.0")
    session.env.setdefault("HYPOTHESIS_PROFILE", "ci")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: the shipped retrieval model, dense vs sparsed, offline on CPU."""
    _install(session, "demo")
    session.run("sparsed", "demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Attention and end-to-end benchmarks (a CPU smoke size where there is no GPU)."""
    _install(session, "bench")
    session.run("python", "benchmarks/bench_attention.py", *session.posargs)
    session.run("python", "benchmarks/bench_e2e.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "training", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "training", "noxfile.py")
