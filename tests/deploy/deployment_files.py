"""Readers for the deployment files, for the tests that check them without Docker or a cluster:
Dockerfile instructions, Compose variable interpolation and the engine's console scripts."""

import dataclasses
import importlib.resources
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import jsonschema
import yaml

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPOSITORY_ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
K8S_DIR = DEPLOY / "k8s"
KUBECTL = pathlib.Path(sys.executable).parent / "kubectl"

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\})"
)


@dataclasses.dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str]:
        """Return the JSON array of CMD, ENTRYPOINT or HEALTHCHECK CMD; a shell form is an error."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text.split("CMD", 1)[1].strip()
        parsed = json.loads(text)
        assert isinstance(parsed, list), f"line {self.line}: {self.keyword} is not in exec form: {self.arguments}"
        return parsed


@dataclasses.dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(path: pathlib.Path) -> list[Stage]:
    """Split a Dockerfile into stages of instructions, joining continuation lines."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(words[0], name, []))
        elif instruction.keyword != "ARG" or stages:
            stages[-1].instructions.append(instruction)
    return stages


def pyproject() -> dict:
    return tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())


def console_scripts() -> dict[str, str]:
    return pyproject()["project"]["scripts"]


def check_command(argv: list[str]) -> None:
    """Assert that ``argv`` runs an installed console script of this project with valid arguments.

    The script's own argument parser reads the arguments, so a misspelled role fails here.
    """
    scripts = console_scripts()
    assert argv[0] in scripts, f"{argv[0]!r} is not a console script of this project ({', '.join(scripts)})"
    installed = pathlib.Path(sys.executable).parent / argv[0]
    assert installed.is_file(), f"{argv[0]} is not installed next to {sys.executable}"
    if argv[0] == "lasagne-engine":
        from lasagne_engine.client.cli import build_parser
    else:
        from lasagne_engine.stack.healthcheck import build_parser
    build_parser().parse_args(argv[1:])


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, separator, value = line.partition("=")
            assert separator, f"{ENV_EXAMPLE}: {line!r} is not NAME=value"
            values[name.strip()] = value
    return values


def interpolation_names(text: str) -> list[tuple[str, str | None]]:
    """Return (name, operator) for each ``${...}`` in ``text``, skipping ``$$`` escapes."""
    return [(match["name"], match["operator"]) for match in _INTERPOLATION.finditer(text) if match["name"]]


def interpolate(value, environment: dict[str, str]):
    """Substitute variables in every string of ``value`` as Compose does.

    Supports ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}``,
    ``${NAME?error}`` and ``$$``; a missing required variable raises ``KeyError``.
    """
    if isinstance(value, dict):
        return {key: interpolate(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environment) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, operator, argument = match["name"], match["operator"], match["argument"] or ""
        present = name in environment and (environment[name] != "" or not (operator or "").startswith(":"))
        if present:
            return environment[name]
        if operator in (":-", "-"):
            return argument
        if operator in (":?", "?"):
            raise KeyError(f"{name}: {argument}")
        return ""

    return _INTERPOLATION.sub(substitute, value)


def load_compose(environment: dict[str, str] | None = None) -> dict:
    """Load the Compose file; interpolated with ``environment`` when it is given."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return document if environment is None else interpolate(document, environment)


def compose_schema() -> dict:
    """Return the Compose specification's JSON schema, as check-jsonschema ships it."""
    resource = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(resource.read_text())


def schema_errors(instance, schema: dict) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda error: list(map(str, error.absolute_path)))
    ]


def kustomize(directory: pathlib.Path) -> list[dict]:
    """Render a kustomization with kubectl's built-in kustomize and return its documents.

    The load restrictor is off because the ConfigMaps are generated from deploy/grafana, outside
    the kustomization's folder, as the documented build command does too.
    """
    result = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(directory)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]
