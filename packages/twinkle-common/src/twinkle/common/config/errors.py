"""The one exception a config mistake may raise, and the key paths it points at.

A deploy file is edited by hand, often on a remote box; the error has to name the exact key
(``applications[1].args.device_mesh.dp_size``) and its line, never a traceback from the YAML parser or
the validator. Paths are dotted keys with ``[i]`` for list items, the spelling users see in their YAML.
"""

from __future__ import annotations

import re
from typing import Iterable, Union

PathPart = Union[str, int]
Path = tuple[PathPart, ...]

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_PATH_TOKEN = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def format_path(parts: Iterable[PathPart]) -> str:
    """``("applications", 1, "args")`` -> ``applications[1].args``; odd keys are quoted: ``resources["a.b"]``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += "[" + _quote(part) + "]"
    return text


def parse_path(text: str) -> Path:
    """The inverse of :func:`format_path` (used to find the YAML line of a path named in an error)."""
    parts: list[PathPart] = []
    position = 0
    while position < len(text):
        match = _PATH_TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"not a config key path: {text!r}")
        name, index, quoted = match.groups()
        if name is not None:
            parts.append(name)
        elif index is not None:
            parts.append(int(index))
        else:
            parts.append(_unquote(quoted))
        position = match.end()
    return tuple(parts)


def join_path(base: str, relative: str) -> str:
    """Join two dotted paths: ``join_path("applications[0]", "args.model_id")``."""
    if not base:
        return relative
    if not relative:
        return base
    return base + relative if relative.startswith("[") else f"{base}.{relative}"


def _quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


class ConfigError(ValueError):
    """A mistake in a server config, located by key path and (when loaded from YAML) line.

    ``str(err)`` reads ``server.yaml:42: applications[1].args.device_mesh.dp_size: expected int, got str "two"``.
    When several mistakes were found, ``errors`` lists them all (this one first) and ``str`` shows one per line.

    It derives from ``ValueError`` so that msgspec, which only wraps ``ValueError``/``TypeError`` raised in a
    ``__post_init__``, reports checks made there at the path of the struct being built; the loader then
    recovers this object (``ValidationError.__cause__``) and prefixes that path.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        line: int | None = None,
        source: str | None = None,
        errors: list[ConfigError] | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.source = source
        self._others: list[ConfigError] = list(errors[1:]) if errors else []
        super().__init__(self._describe())

    @property
    def errors(self) -> list[ConfigError]:
        """Every mistake found, this one first."""
        return [self, *self._others]

    @classmethod
    def collect(cls, errors: list[ConfigError]) -> ConfigError:
        """One exception that reports ``errors`` (non-empty), the first as its own path and line."""
        first = errors[0]
        return cls(first.message, path=first.path, line=first.line, source=first.source, errors=errors)

    def relocated(self, *, prefix: str = "", line: int | None = None, source: str | None = None) -> ConfigError:
        """A copy whose path is under ``prefix`` (and with ``line``/``source`` filled in when given)."""
        return ConfigError(
            self.message,
            path=join_path(prefix, self.path),
            line=line if line is not None else self.line,
            source=source if source is not None else self.source,
        )

    def _describe(self) -> str:
        location = ":".join(str(part) for part in (self.source, self.line) if part is not None)
        pieces = [piece for piece in (location, self.path, self.message) if piece]
        return ": ".join(pieces)

    def __str__(self) -> str:
        return "\n".join(error._describe() for error in self.errors)

    def __reduce__(self):  # keep path/line/source when pickled across processes (Ray)
        return (_rebuild_config_error, (self.message, self.path, self.line, self.source, self._others))


def _rebuild_config_error(message, path, line, source, others) -> ConfigError:
    first = ConfigError(message, path=path, line=line, source=source)
    return ConfigError.collect([first, *others]) if others else first
