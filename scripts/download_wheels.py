"""Download, on a connected machine, the wheels an air-gapped GPU node lacks, exactly as locked.

    python scripts/download_wheels.py --dest wheels/       # locks/run.txt but torch (the node's)
    python scripts/download_wheels.py --dest wheels/ --have transformers lightning peft
    python scripts/download_wheels.py --dest wheels/ --installed node-freeze.txt
    python scripts/download_wheels.py --dest wheels/ --list       # requirements.txt only
    python scripts/download_wheels.py --dest wheels/ --check      # check a folder again

The node keeps its own CUDA torch: torch, triton and nvidia-* are never downloaded (the lock's
torch is the CPU build). `--have NAME ...` keeps more of the node's packages, whatever their
version; `--installed FILE` (the node's `pip freeze`) drops the pins the node already has at the
locked version. The rest is written to DEST/requirements.txt as the lock's own pins, downloaded
with `pip download --no-deps --only-binary=:all:` for the node's Python and platform (by default
the lock's Python, CPython 3.11, manylinux x86_64 up to glibc 2.28), and checked: one wheel per
pin, of exactly the locked name and version, and nothing else. DEST/SHA256SUMS lets the node
check the copy (`sha256sum -c SHA256SUMS`). On the node (docs/paper-recipe.md):

    pip install --no-index --find-links wheels/ -r wheels/requirements.txt -e .
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "locks" / "run.txt"
#: Never downloaded: the node's CUDA torch and what comes with it.
NODE_OWNS = ("torch", "triton")
NODE_OWNS_PREFIXES = ("nvidia-",)


def canonical(name: str) -> str:
    """The PEP 503 form of a distribution name (``Foo_Bar.baz`` -> ``foo-bar-baz``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a lock or a ``pip
    freeze`` (comments, options and other lines are skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def lock_python(path: Path) -> str:
    """The Python version the lock was compiled with (its pip-compile header), else 3.11."""
    match = re.search(r"pip-compile with Python (\d+\.\d+)", path.read_text())
    return match.group(1) if match else "3.11"


def node_owns(name: str, have: set[str]) -> bool:
    return name in NODE_OWNS or name.startswith(NODE_OWNS_PREFIXES) or name in have


def wanted(
    lock: dict[str, str], have: set[str], installed: dict[str, str] | None = None
) -> dict[str, str]:
    """The lock's pins the node lacks: not its own (torch, triton, nvidia-*, ``have``), nor
    already ``installed`` at the locked version."""
    installed = installed or {}
    return {
        name: version
        for name, version in lock.items()
        if not node_owns(name, have) and installed.get(name) != version
    }


def _same_version(a: str, b: str) -> bool:
    try:
        from packaging.version import Version
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]
    try:
        return Version(a) == Version(b)
    except ValueError:
        return a == b


def check(folder: Path, pins: dict[str, str]) -> list[str]:
    """What is wrong with the wheels in ``folder`` for ``pins`` (empty: one wheel per pin, of
    the locked name and version, and no other file)."""
    problems = []
    found: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]  # {name}-{version}(-{build})?-{py}-{abi}-{plat}
        found.setdefault(canonical(name), []).append(version)
    for name, version in sorted(pins.items()):
        versions = found.pop(name, [])
        if not versions:
            problems.append(f"{name}=={version}: no wheel")
        elif len(versions) > 1 or not _same_version(versions[0], version):
            problems.append(f"{name}=={version}: wheels of {', '.join(versions)}")
    for name, versions in sorted(found.items()):
        problems.append(f"{name} {', '.join(versions)}: a wheel the lock's selection does not pin")
    others = [p.name for p in folder.iterdir() if p.suffix != ".whl"]
    problems += [
        f"{name}: not a wheel (a source distribution needs building on the node)"
        for name in others
        if name not in ("requirements.txt", "SHA256SUMS")
    ]
    return problems


def write_sums(folder: Path) -> None:
    lines = [
        f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}"
        for wheel in sorted(folder.glob("*.whl"))
    ]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def platforms(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag a node with ``glibc`` (e.g. 2.28) runs: pip matches ``--platform``
    literally (it only expands ``manylinux2014`` to the older aliases)."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{arch}"]


def download(folder: Path, requirements: Path, python: str, arch: str, glibc: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",  # the lock is already the whole set
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *(f"--platform={tag}" for tag in platforms(arch, glibc)),
        "-r",
        str(requirements),
        "-d",
        str(folder),
    ]
    print("$ " + " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, required=True, help="the folder to carry")
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument(
        "--have", nargs="+", default=[], metavar="NAME", help="packages the node keeps"
    )
    parser.add_argument(
        "--installed", type=Path, help="the node's `pip freeze`: pins it has are not downloaded"
    )
    parser.add_argument("--python-version", help="the node's Python (default: the lock's)")
    parser.add_argument("--arch", default="x86_64", help="x86_64 or aarch64")
    parser.add_argument("--glibc", default="2.28", help="the node's glibc (ldd --version)")
    parser.add_argument("--list", action="store_true", help="write requirements.txt only")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check DEST against its requirements.txt and the lock, download nothing",
    )
    args = parser.parse_args(argv)

    lock = read_pins(args.lock)
    installed = read_pins(args.installed) if args.installed else None
    pins = wanted(lock, {canonical(name) for name in args.have}, installed)
    args.dest.mkdir(parents=True, exist_ok=True)
    requirements = args.dest / "requirements.txt"
    if not args.check:
        lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
        requirements.write_text(
            f"# {len(lines)} of the {len(lock)} pins of {args.lock.name}: those the node lacks "
            "(scripts/download_wheels.py)\n" + "\n".join(lines) + "\n"
        )
        print(f"{requirements}: {len(lines)} of {len(lock)} locked packages", file=sys.stderr)
        if args.list:
            return 0
        python = args.python_version or lock_python(args.lock)
        download(args.dest, requirements, python, args.arch, args.glibc)
        write_sums(args.dest)
    if args.check:  # the folder's own selection, which must be the lock's pins
        pins = read_pins(requirements)
        problems = [
            f"{name}=={version} in {requirements.name}: "
            + (f"the lock pins {lock[name]}" if name in lock else "not in the lock")
            for name, version in sorted(pins.items())
            if lock.get(name) != version
        ]
    else:
        problems = []
    problems += check(args.dest, pins)
    if problems:
        print(f"{args.dest} does not match {args.lock}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    wheels = list(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{args.dest}: {len(wheels)} wheels, {size:.0f} MiB, each exactly as in {args.lock.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
