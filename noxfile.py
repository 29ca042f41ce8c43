"""Developer sessions. `nox -l` lists them; every install is pinned by constraints.txt.

nox -s tests        fast offline test suite (what CI and the README run)
nox -s tests_slow   the slow end-to-end tests
nox -s lint         ruff check + ruff format --check
nox -s typecheck    mypy on the package
nox -s docs         regenerate docs/configuration-reference.md and fail if it was stale
nox -s bench        run the benchmarks and print their figures
"""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

CONSTRAINTS = ("-c", "constraints.txt")


def _install(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """Fast offline test suite (unit, component, config, short end-to-end)."""
    _install(session)
    session.run("pytest", "-m", "not slow and not gpu", *session.posargs)


@nox.session
def tests_slow(session: nox.Session) -> None:
    """Slow end-to-end tests (resume, longer runs)."""
    _install(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*CONSTRAINTS, "ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "scripts", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "scripts", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the package."""
    _install(session)
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate the configuration reference from the CLI and fail if docs/ was stale."""
    _install(session)
    session.run("python", "scripts/gen_config_reference.py", "--check")


@nox.session
def bench(session: nox.Session) -> None:
    """Time the training step of the default run (rollout vs update) and print the figures."""
    _install(session)
    session.run("python", "benchmarks/step_time.py", *session.posargs)
