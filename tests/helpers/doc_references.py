"""What the docs name must exist: repository paths, links and their anchors, ``cppo`` flags and
config keys, ``cppo_lightning`` names.

:class:`References` reads Markdown (README.md, docs/*.md) and the comments of YAML files and
returns one line per problem (``file:line: what``). It checks

- paths under the repository's folders (``configs/...``, ``src/...``, ``docs/...``,
  ``benchmarks/...``, ``scripts/...``, ``tests/...``, ``locks/...``): they must exist (globs,
  ``{a,b}`` lists and ``<placeholders>`` must match something; ``tests/x.py::name`` must name a
  function or class of the file);
- relative Markdown links, and their ``#anchors`` against the target's headings (GitHub's slugs);
- ``cppo fit`` flags (``--model.kl_coef``) and config keys written in code spans
  (`` `data.dataset.init_args.train.path` ``) against the parser LightningCLI builds: a key below
  a ``class_path`` value is accepted when the value's type, or one of its subclasses, takes it in
  ``__init__`` (a YAML block of fit sections is checked the same way, against the classes it
  names);
- the flags of ``cppo evaluate``, ``cppo study`` and ``cppo export`` against their parsers, and
  those of ``python benchmarks/x.py`` / ``scripts/x.py`` against the flags in the script;
- ``cppo_lightning.a.b`` names: the module must import and have the attribute;
- references to a method text outside the repository (``spec/cppo.md``, ``spec §N``): the method
  is ``docs/method.md``.
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import importlib
import inspect
import io
import pkgutil
import re
import types
import typing
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

#: Top-level folders whose paths the docs name.
FOLDERS = ("configs", "src", "docs", "benchmarks", "scripts", "tests", "locks")
#: The sections of a ``cppo fit`` config.
SECTIONS = ("trainer", "model", "data", "rollout", "perception_tokens", "cpl_weight")
#: Flags of other programs the docs mention in prose (commands of theirs are not checked).
OTHER_PROGRAMS = re.compile(
    r"(^|[\s`(#])(pip3?|pip-compile|nox|torchrun|srun|sbatch|python3? -m (?!cppo)|huggingface-cli|"
    r"tensorboard|pytest|git|lmms_eval|ruff|mypy|iconv|unzip|salloc|SBATCH|SLURM)\b"
)

_PATH = re.compile(
    r"(?<![\w./~@:-])((?:" + "|".join(FOLDERS) + r")/[\w./*<>{},=+-]*)(::[\w\[\]-]+)?"
)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.-]*?)(\+?=|(?=[^\w.-])|$)")
_CODE = re.compile(r"`([^`\n]+)`")
_KEY = re.compile(r"^(" + "|".join(SECTIONS) + r")((?:\.[A-Za-z_]\w*)+)\s*(?:[:=+].*)?$")
_PY_NAME = re.compile(r"(?<![\w./-])(cppo_lightning(?:\.[A-Za-z_]\w*)+)")
_COMMAND = re.compile(r"\bcppo (fit|validate|evaluate|study|export)\b")
_SCRIPT = re.compile(r"\bpython3? ((?:benchmarks|scripts)/[\w.-]+\.py)\b")
# The team's method text that is not in the repository (the dataset specs, `DatasetSpec` and a
# spec's `image_root` / `columns`, are another thing).
_SPEC = re.compile(
    r"spec/cppo\.md|\bspec\s*§|\(spec\b|\bspec\)|\bthe spec\b(?!'s `(?:image_root|columns|split)`)",
    re.IGNORECASE,
)
_FILE_NAME = re.compile(r"\.(py|md|ya?ml|json|txt|ckpt|csv|parquet|jsonl)$")
#: Paths the docs ask a user to create (examples), not files of the repository.
USER_FILES = frozenset({"configs/eval/mine.yaml"})


@dataclasses.dataclass
class Line:
    """One line of a document, the command it continues, and whether it is in a code block."""

    number: int
    text: str
    command: str  # the text of the (possibly continued) command line it belongs to
    code: bool


def markdown_lines(text: str) -> Iterator[Line]:
    """The lines of a Markdown text; a line ending in ``\\`` carries its command onward."""
    code = False
    carried = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            code = not code
            carried = ""
            continue
        command = carried + " " + line if carried else line
        carried = command if line.rstrip().endswith("\\") else ""
        yield Line(number, line, command, code)


def yaml_comment_lines(text: str) -> Iterator[Line]:
    """The comments of a YAML file (the text after ``#``) as lines."""
    carried = ""
    for number, line in enumerate(text.splitlines(), start=1):
        at = line.find("#") if line.lstrip().startswith("#") else line.find(" #")
        if at < 0:
            carried = ""
            continue
        comment = line[at:].lstrip(" #")
        command = carried + " " + comment if carried else comment
        carried = command if comment.rstrip().endswith("\\") else ""
        yield Line(number, comment, command, False)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (repeated headings get -1, -2, ...)."""
    found: set[str] = set()
    seen: collections.Counter[str] = collections.Counter()
    for line in markdown_lines(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line.text)
        if match and not line.code:
            base = slug(match.group(1))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def expand(path: str) -> list[str]:
    """``a/{b,c}.yaml`` -> ``[a/b.yaml, a/c.yaml]`` (one level), ``<name>`` -> ``*``."""
    path = re.sub(r"<[^<>/]*>", "*", path)
    match = re.search(r"\{([^{}]*)\}", path)
    if not match or "," not in match.group(1):
        return [path.replace("{", "").replace("}", "")]
    head, tail = path[: match.start()], path[match.end() :]
    return [head + part + tail for part in match.group(1).split(",")]


def _clean(path: str) -> str:
    """A path as written in prose, without what follows it: a comma (outside braces), the end of
    a sentence, a closing quote."""
    if "{" not in path:
        path = path.split(",")[0]
    path = re.sub(r"[=+]+.*$", "", path) if "=" in path.split("/")[-1] else path
    return path.rstrip(".,;:'\")>+=")


def _unwrap_optional(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


class References:
    """Checks documents against the repository and the ``cppo`` parsers (built once)."""

    def __init__(self, repo: Path = REPO) -> None:
        self.repo = repo

    # ------------------------------------------------------------------ parsers
    @cached_property
    def fit_parser(self) -> Any:
        """The ``cppo fit`` parser, built as the CLI builds it, with base.yaml parsed (nothing
        instantiated)."""
        from cppo_lightning.cli import CPPOCLI
        from cppo_lightning.data import VisionLanguageDataModule
        from cppo_lightning.module import CPPOModule

        class ParseOnly(CPPOCLI):
            def before_instantiate_classes(self) -> None:
                pass

            def instantiate_classes(self) -> None:
                pass

            def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
                pass

            def _set_seed(self) -> None:
                pass

            def _parse_ckpt_path(self) -> None:
                pass

            def _run_subcommand(self, subcommand: str) -> None:
                pass

        cli = ParseOnly(
            CPPOModule,
            VisionLanguageDataModule,
            args=["fit", "--config", str(self.repo / "configs" / "base.yaml")],
            auto_configure_optimizers=False,
        )
        return cli.parser._subcommands_action._name_parser_map["fit"]

    @cached_property
    def fit_actions(self) -> dict[str, Any]:
        return {action.dest: action for action in self.fit_parser._actions}

    @cached_property
    def command_flags(self) -> dict[str, set[str]]:
        """The flags (without ``--``) of each ``cppo`` command."""
        from cppo_lightning.evaluation.command import build_parser as evaluate_parser
        from cppo_lightning.export import main as export_main
        from cppo_lightning.study.command import build_parser as study_parser

        def flags(parser: argparse.ArgumentParser) -> set[str]:
            return {
                option[2:]
                for action in parser._actions
                for option in action.option_strings
                if option.startswith("--")
            }

        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
            export_main(["--help"])
        fit = {d for d in self.fit_actions if "." not in d} | {"ckpt_path", "help"}
        return {
            "fit": fit,
            "validate": fit,
            "evaluate": flags(evaluate_parser()),
            "study": flags(study_parser()),
            "export": set(re.findall(r"--([\w-]+)", help_text.getvalue())),
        }

    def script_flags(self, script: str) -> set[str] | None:
        path = self.repo / script
        if not path.is_file():
            return None
        return set(re.findall(r"[\"']--([\w-]+)[\"']", path.read_text()))

    @cached_property
    def every_flag(self) -> set[str]:
        """Undotted flags any ``cppo`` command or shipped script takes."""
        found = set().union(*self.command_flags.values())
        for folder in ("benchmarks", "scripts"):
            for script in (self.repo / folder).glob("*.py"):
                found |= self.script_flags(f"{folder}/{script.name}") or set()
        return found

    # ------------------------------------------------------------------ config keys
    def has_key(self, key: str) -> bool:
        """Whether ``key`` (``model.perception_loss.init_args.tau``) is a ``cppo fit`` setting."""
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            action = self.fit_actions.get(".".join(parts[:end]))
            if action is None:
                continue
            if end == len(parts):
                return True
            hint = getattr(action, "_typehint", None)
            return hint is not None and self.accepts(hint, parts[end:])
        return False

    @staticmethod
    def is_trainer_attribute(key: str) -> bool:
        """``trainer.global_step`` and the like: the Trainer's attributes, named in prose."""
        from lightning.pytorch import Trainer

        first, _, rest = key.partition(".")
        return first == "trainer" and "." not in rest and hasattr(Trainer, rest)

    def accepts(self, hint: Any, rest: list[str]) -> bool:
        """Whether a value of type ``hint`` has the nested setting ``rest``."""
        if not rest:
            return True
        if hint is Any:
            return True
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            return any(self.accepts(a, rest) for a in args if a is not type(None))
        if origin in (list, tuple, set, collections.abc.Iterable, collections.abc.Sequence):
            return bool(args) and self.accepts(args[0], rest)  # jsonargparse: the last element
        if origin is collections.abc.Callable:
            return bool(args) and self.accepts(args[-1], rest)  # the class it builds
        if hint in (dict, typing.Dict) or origin in (dict, collections.abc.Mapping):  # noqa: UP006
            return True  # a free-form mapping
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            fields = {f.name: f for f in dataclasses.fields(hint)}
            if rest[0] not in fields:
                return False
            return self.accepts(self.parameters(hint).get(rest[0], Any), rest[1:])
        if not isinstance(hint, type):
            return False
        if rest[0] == "class_path":
            return len(rest) == 1
        if rest[0] in ("init_args", "dict_kwargs"):
            rest = rest[1:]
            if not rest:
                return True
        return any(
            rest[0] in params and self.accepts(params[rest[0]], rest[1:])
            for params in (self.parameters(cls) for cls in self.candidates(hint))
        )

    @cached_property
    def _imported(self) -> bool:
        import cppo_lightning

        for module in pkgutil.walk_packages(cppo_lightning.__path__, "cppo_lightning."):
            with contextlib.suppress(ImportError):
                importlib.import_module(module.name)
        for name in ("kornia.augmentation", "lightning.pytorch.callbacks", "torch.optim"):
            importlib.import_module(name)
        return True

    def candidates(self, base: type) -> list[type]:
        """``base`` and its subclasses; for a Protocol, the package's classes that have its
        members."""
        assert self._imported
        if getattr(base, "_is_protocol", False):
            members = [m for m in vars(base) if not m.startswith("_")]
            return [
                cls
                for cls in self._package_classes
                if all(hasattr(cls, m) for m in members) and cls is not base
            ]
        found, todo = [base], [base]
        while todo:
            for sub in todo.pop().__subclasses__():
                if sub not in found:
                    found.append(sub)
                    todo.append(sub)
        return found

    @cached_property
    def _package_classes(self) -> list[type]:
        import sys

        return [
            value
            for name, module in list(sys.modules.items())
            if name.startswith("cppo_lightning")
            for value in vars(module).values()
            if isinstance(value, type) and value.__module__.startswith("cppo_lightning")
        ]

    @staticmethod
    def parameters(cls: type) -> dict[str, Any]:
        """``__init__``'s parameter names and types (a class with ``**kwargs`` also takes its
        bases' parameters, as jsonargparse follows them)."""
        found: dict[str, Any] = {}
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if init is None or klass is object:
                continue
            try:
                signature = inspect.signature(init)
            except (TypeError, ValueError):
                continue
            try:
                hints = typing.get_type_hints(init)
            except Exception:  # unresolvable annotations: names only
                hints = {}
            variadic = False
            for name, parameter in signature.parameters.items():
                if name == "self":
                    continue
                if parameter.kind is parameter.VAR_KEYWORD:
                    variadic = True
                elif parameter.kind is not parameter.VAR_POSITIONAL:
                    found.setdefault(name, hints.get(name, Any))
            if dataclasses.is_dataclass(klass):
                for field in dataclasses.fields(klass):
                    found.setdefault(field.name, hints.get(field.name, Any))
            if not variadic:
                break
        return found

    def yaml_problems(self, node: Any, prefix: str, hint: Any = None) -> list[str]:
        """Settings of a fit-config YAML block that do not exist; ``class_path`` values that do
        not import, and ``init_args`` their class does not take."""
        if not isinstance(node, dict):
            if isinstance(node, list) and prefix == "trainer.callbacks":
                return [p for item in node for p in self.yaml_problems(item, prefix, hint)]
            return []
        problems: list[str] = []
        if "class_path" in node:
            path = str(node["class_path"])
            cls = self.import_name(path)
            if cls is None:
                if path.split(".")[0] in ("cppo_lightning", "torch", "kornia", "lightning"):
                    problems.append(f"{prefix}.class_path: {path} does not import")
                return problems
            params = self.parameters(cls)
            for key, value in (node.get("init_args") or {}).items():
                if key not in params:
                    problems.append(f"{prefix}.init_args.{key}: {path} takes no {key!r}")
                else:
                    problems += self.yaml_problems(value, f"{prefix}.init_args.{key}", params[key])
            return problems
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if not prefix and key not in (*SECTIONS, "seed_everything", "ckpt_path"):
                return []  # not a fit config
            if prefix and (hint is not None and not self.accepts(hint, [str(key)])):
                problems.append(f"{name}: no such setting")
                continue
            if prefix and hint is None and not self.has_key(name):
                problems.append(f"{name}: no such setting")
                continue
            sub = hint
            if hint is None and name in self.fit_actions:
                sub = getattr(self.fit_actions[name], "_typehint", None)
            elif hint is not None:
                sub = self._field_hint(hint, str(key))
            problems += self.yaml_problems(value, name, sub)
        return problems

    def _field_hint(self, hint: Any, key: str) -> Any:
        for option in _unwrap_optional(hint):
            if isinstance(option, type):
                params = self.parameters(option)
                if key in params:
                    return params[key]
        return Any

    @staticmethod
    def import_name(name: str) -> Any:
        """The object a dotted name names, or None when it does not import."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            try:
                value: Any = importlib.import_module(".".join(parts[:end]))
            except ImportError:
                continue
            try:
                for attribute in parts[end:]:
                    value = getattr(value, attribute)
            except AttributeError:
                return None
            return value
        return None

    # ------------------------------------------------------------------ documents
    def check_file(self, path: Path) -> list[str]:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            return self.check_lines(path, yaml_comment_lines(text), text)
        return self.check_lines(path, markdown_lines(text), text)

    def check_text(self, text: str, path: Path) -> list[str]:
        """Check ``text`` as if it were the file ``path`` (its links resolve from its folder)."""
        return self.check_lines(path, markdown_lines(text), text)

    def check_lines(self, path: Path, lines: Iterator[Line], text: str) -> list[str]:
        name = path.relative_to(self.repo) if path.is_relative_to(self.repo) else path
        problems = [f"{name}:{line}: {what}" for line, what in self._problems(path, lines)]
        if path.suffix == ".md":
            problems += [f"{name}:{what}" for what in self._yaml_blocks(text)]
        return problems

    def _yaml_blocks(self, text: str) -> list[str]:
        problems = []
        for match in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            try:
                node = yaml.safe_load(match.group(1))
            except yaml.YAMLError:
                continue
            if not isinstance(node, dict) or not set(node) <= {*SECTIONS, "seed_everything"}:
                continue
            line = text[: match.start()].count("\n") + 1
            problems += [f"{line}: YAML block: {p}" for p in self.yaml_problems(node, "")]
        return problems

    def _problems(self, path: Path, lines: Iterator[Line]) -> Iterator[tuple[int, str]]:
        for line in lines:
            if _SPEC.search(line.text):
                yield line.number, "cites the team's spec: cite docs/method.md (its sections)"
            for match in _PATH.finditer(line.text):
                problem = self._path_problem(_clean(match.group(1)), match.group(2))
                if problem:
                    yield line.number, problem
            for match in _LINK.finditer(line.text):
                problem = self._link_problem(path, match.group(1))
                if problem:
                    yield line.number, problem
            yield from ((line.number, p) for p in self._flag_problems(line))
            for span in _CODE.findall(line.text):
                key = _KEY.match(span.strip())
                if key and not span.strip().startswith("--") and not _FILE_NAME.search(span):
                    dotted = key.group(1) + key.group(2)
                    if not self.has_key(dotted) and not self.is_trainer_attribute(dotted):
                        yield line.number, f"`{dotted}`: no such cppo fit setting"
            for match in _PY_NAME.finditer(line.text):
                name = match.group(1).rstrip(".")
                if self.import_name(name) is None:
                    yield line.number, f"{name}: does not import"

    def _path_problem(self, path: str, test_name: str | None) -> str | None:
        if path.rstrip("/") in FOLDERS or path.endswith("/...") or path in USER_FILES:
            return None
        for one in expand(path):
            one = one.rstrip("/")
            if not any(True for _ in self.repo.glob(one)) and not (self.repo / one).exists():
                return f"{path}: no such file or folder"
        if test_name:
            name = re.sub(r"\[.*$", "", test_name[2:])
            file = self.repo / path
            if file.is_file() and not re.search(
                rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", file.read_text(), re.M
            ):
                return f"{path}::{name}: no such test"
        return None

    def _link_problem(self, path: Path, target: str) -> str | None:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            return None
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            return f"link {target}: no such file"
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            return f"link {target}: {linked.name} has no heading with anchor #{anchor}"
        return None

    def _flag_problems(self, line: Line) -> Iterator[str]:
        """Flags of the line, each against the program it is given to: the ``cppo`` command or
        shipped script before it on its (continued) command line; in prose, any of them."""
        commands = list(_COMMAND.finditer(line.command))
        script = _SCRIPT.search(line.command)
        other = OTHER_PROGRAMS.search(line.command)
        offset = len(line.command) - len(line.text)  # where this line starts in its command
        for match in _FLAG.finditer(line.text):
            flag = match.group(1).rstrip(".-")
            at = offset + match.start()
            before = [c for c in commands if c.start() < at]
            command = before[-1].group(1) if before else None
            if (
                script
                and script.start() < at
                and (not before or before[-1].start() < script.start())
            ):
                known = self.script_flags(script.group(1))  # type: ignore[union-attr]
                if known is not None and flag not in known:
                    yield f"--{flag}: {script.group(1)} takes no such flag"  # type: ignore[union-attr]
            elif "." in flag:
                if (flag.split(".")[0] in SECTIONS or command) and not self.has_key(flag):
                    yield f"--{flag}: no such cppo fit setting"
            elif command in ("fit", "validate"):
                if flag not in self.command_flags["fit"]:
                    yield f"--{flag}: cppo {command} takes no such flag"
            elif command == "study":
                if flag not in self.command_flags["study"] | self.command_flags["fit"]:
                    yield f"--{flag}: neither cppo study nor cppo fit takes it"
            elif command is not None:
                if flag not in self.command_flags[command]:
                    yield f"--{flag}: cppo {command} takes no such flag"
            elif not other and not line.code and flag not in self.every_flag:
                # (a code line without a cppo command or a shipped script is another program's)
                yield f"--{flag}: no cppo command or shipped script takes it"


def documents(repo: Path = REPO) -> list[Path]:
    """The files the check reads: README.md, docs/*.md, configs/**/*.yaml."""
    return [
        repo / "README.md",
        *sorted((repo / "docs").glob("*.md")),
        *sorted((repo / "configs").rglob("*.yaml")),
    ]
