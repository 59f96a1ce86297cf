"""Validation of the names users give to models, datasets, arrays and tags, and of references."""

import re
from dataclasses import dataclass

from lasagne_engine.errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_NAME_LENGTH = 128


def validate_name(name: str, *, kind: str) -> str:
    """Return ``name`` if it is a valid name for a ``kind`` (model, dataset, array, tag).

    A valid name has 1 to 128 characters from ``[A-Za-z0-9._-]`` and is neither ``.`` nor ``..``,
    so it can become one component of a storage key without escaping its prefix.

    Raises
    ------
    InvalidArgument
        If the name is empty, too long, or contains another character.
    """
    if not name:
        raise InvalidArgument(f"The {kind} name is empty; give a name of 1 to 128 characters from [A-Za-z0-9._-].")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"The {kind} name {name[:40]!r}... has {len(name)} characters; the maximum is {MAX_NAME_LENGTH}."
        )
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"Invalid {kind} name {name!r}: use 1 to 128 characters from [A-Za-z0-9._-], "
            "and not '.' or '..' alone."
        )
    return name


@dataclass(frozen=True)
class Ref:
    """A reference to a versioned object: ``name`` for the latest version, ``name@3`` for version 3."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_ref(ref: str, *, kind: str) -> Ref:
    """Parse ``name`` or ``name@version`` into a :class:`Ref`.

    Raises
    ------
    InvalidArgument
        If the name is invalid or the version is not a positive integer.
    """
    name, separator, version_text = ref.partition("@")
    validate_name(name, kind=kind)
    if not separator:
        return Ref(name)
    # isdecimal, not isdigit: digits such as '²' pass isdigit but int() rejects them.
    if not version_text.isascii() or not version_text.isdecimal() or int(version_text) < 1:
        shown = repr(ref) if len(ref) <= MAX_NAME_LENGTH + 20 else f"{ref[: MAX_NAME_LENGTH + 20]!r}..."
        raise InvalidArgument(
            f"Invalid {kind} reference {shown}: the version after '@' must be a positive integer, as in '{name}@1'."
        )
    return Ref(name, int(version_text))
