"""scripts/download_wheels.py, without the network: the requirements it writes are the lock's own
pins minus what the node keeps, and its check refuses a folder that differs from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from scripts import download_wheels

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "locks" / "run.txt"


def _requirements(path: Path) -> dict[str, str]:
    """name -> version of ``name==version`` lines, read with packaging (not the script's parser)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


LOCKED = _requirements(LOCK)


def _listed(tmp_path: Path, *flags: str) -> dict[str, str]:
    assert download_wheels.main(["--dest", str(tmp_path), "--list", *flags]) == 0
    return _requirements(tmp_path / "requirements.txt")


def test_every_pin_but_the_nodes_torch_exactly_as_locked(tmp_path):  # type: ignore[no-untyped-def]
    listed = _listed(tmp_path)
    assert "torch" in LOCKED and "torch" not in listed
    assert not any(name.startswith("nvidia-") or name == "triton" for name in listed)
    assert listed == {name: v for name, v in LOCKED.items() if name != "torch"}


def test_packages_the_node_has_are_left_out(tmp_path):  # type: ignore[no-untyped-def]
    listed = _listed(tmp_path, "--have", "transformers", "Lightning", "peft")
    kept = {"torch", "transformers", "lightning", "peft"}
    assert listed == {name: v for name, v in LOCKED.items() if name not in kept}


def test_a_node_freeze_drops_the_pins_it_already_has(tmp_path):  # type: ignore[no-untyped-def]
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(f"numpy=={LOCKED['numpy']}\npandas==1.0.0\ntorch==2.9.0+cu128\n")
    listed = _listed(tmp_path / "out", "--installed", str(freeze))
    assert "numpy" not in listed  # the node's is the locked one
    assert listed["pandas"] == LOCKED["pandas"]  # another version there: the locked one comes
    assert len(listed) == len(LOCKED) - 2


def _wheels(folder: Path, pins: dict[str, str]) -> None:
    folder.mkdir(exist_ok=True)
    for name, version in pins.items():
        (folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")


def test_the_check_accepts_exactly_the_pins_and_names_every_difference(tmp_path):  # type: ignore[no-untyped-def]
    pins = {"typing-extensions": "4.16.0", "pyyaml": "6.0.4", "kornia-rs": "0.2.0"}
    _wheels(tmp_path, pins)
    assert download_wheels.check(tmp_path, pins) == []
    (tmp_path / "PyYAML-6.0.4-py3-none-any.whl").unlink(missing_ok=True)
    (tmp_path / "pyyaml-6.0.4-py3-none-any.whl").unlink()
    (tmp_path / "pyyaml-6.0.3-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"")
    (tmp_path / "kornia_rs-0.2.0-py3-none-any.whl").unlink()
    (tmp_path / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"")
    (tmp_path / "antlr4-python3-runtime-4.13.2.tar.gz").write_bytes(b"")
    problems = download_wheels.check(tmp_path, pins)
    assert problems == [
        "kornia-rs==0.2.0: no wheel",
        "pyyaml==6.0.4: wheels of 6.0.3",
        "six 1.17.0: a wheel the lock's selection does not pin",
        "antlr4-python3-runtime-4.13.2.tar.gz: not a wheel (a source distribution needs "
        "building on the node)",
    ]


def test_check_mode_fails_on_a_folder_that_differs(tmp_path, capsys):  # type: ignore[no-untyped-def]
    pins = _listed(tmp_path, "--have", "peft")  # the folder's requirements.txt
    _wheels(tmp_path, pins)
    assert download_wheels.main(["--dest", str(tmp_path), "--check"]) == 0
    assert f"{len(pins)} wheels" in capsys.readouterr().out
    (tmp_path / f"numpy-{pins['numpy']}-py3-none-any.whl").unlink()
    assert download_wheels.main(["--dest", str(tmp_path), "--check"]) == 1
    assert f"numpy=={pins['numpy']}: no wheel" in capsys.readouterr().err
    # A requirements.txt edited away from the lock is refused too.
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(requirements.read_text() + "six==1.17.0\n")
    assert download_wheels.main(["--dest", str(tmp_path), "--check"]) == 1
    assert "six==1.17.0 in requirements.txt: not in the lock" in capsys.readouterr().err


@pytest.mark.parametrize(("arch", "glibc"), [("x86_64", "2.28"), ("aarch64", "2.35")])
def test_platform_tags_cover_every_older_glibc(arch, glibc):  # type: ignore[no-untyped-def]
    tags = download_wheels.platforms(arch, glibc)
    assert tags[0] == f"manylinux_{glibc.replace('.', '_')}_{arch}"
    assert f"manylinux_2_17_{arch}" in tags and tags[-1] == f"manylinux2014_{arch}"


def test_the_locks_python_is_the_default():
    assert download_wheels.lock_python(LOCK) == "3.11"
