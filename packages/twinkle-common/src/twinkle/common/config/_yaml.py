"""Loading a server config from YAML with errors that point at the key and line, and dumping it back.

The pipeline, and why each step exists:

1. ``yaml.compose`` gives nodes that know their line; we build plain data from them ourselves, recording
   the line of every key path and rejecting duplicate keys (PyYAML silently keeps the last one).
2. ``args`` is validated by the struct of its application's ``import_path``. msgspec picks a struct from a
   union only by a tag *inside* the object, so the application's ``import_path`` is copied into ``args``
   (it is the args structs' tag field); an empty ``args:`` becomes ``{}`` and an empty ``deployments:`` is
   dropped, both meaning "defaults".
3. Every unknown key is found in one walk over the schema (msgspec stops at the first), with a
   "did you mean" suggestion.
4. ``msgspec.convert`` types, bounds and the structs' own checks; its ``$.applications[1].args…`` path is
   turned into ours, its message into the YAML vocabulary, and the line looked up.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any, Literal

import msgspec
import msgspec.inspect as mi
import yaml

from twinkle.common.config.errors import ConfigError, Path, format_path, join_path, parse_path
from twinkle.common.config.schema import ARGS_BY_IMPORT_PATH, ServerConfig, plain_data

_TAG_FIELD = "import_path"
_SCHEMA = mi.type_info(ServerConfig)


# ------------------------------------------------------------------------------------------- public API


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read and validate a YAML server config file; :class:`ConfigError` names the file, line and key."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read the config file: {error.strerror or error}", source=source) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"the config file is not UTF-8 text ({error.reason})", source=source) from None
    return load_config_text(text, source=source)


def load_config_text(text: str, source: str = "<string>") -> ServerConfig:
    """Validate a YAML server config given as text; ``source`` names it in error messages."""
    document = _YamlDocument.parse(text, source)
    data = document.data
    if data is None:
        raise ConfigError("the config is empty; it needs at least an applications: list", line=1, source=source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of keys such as applications:, got {_yaml_kind(data)}",
            line=document.line_of(()),
            source=source,
        )
    problems = _prepare_applications(data)
    problems += _unknown_keys(data, _SCHEMA, ())
    if problems:
        raise document.locate(problems)
    try:
        return msgspec.convert(data, ServerConfig)
    except msgspec.ValidationError as error:
        raise document.locate(_translate(error, data)) from None


def dump_config(cfg: ServerConfig, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The normalized config (defaults filled, aliases resolved, ranks as lists) as YAML or JSON.

    Keys that are not set (None) are left out. Loading the output gives back an equal config.
    """
    data = plain_data(cfg)
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(data), indent=2).decode() + "\n"
    if fmt == "yaml":
        return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True, width=120)
    raise ValueError(f'fmt must be "yaml" or "json", got {fmt!r}')


# ----------------------------------------------------------------------------- YAML with line numbers


class _YamlDocument:
    """Plain data built from a YAML text, plus the 1-based line of every key path in it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.data: Any = None
        self._lines: dict[Path, int] = {}
        self._problems: list[ConfigError] = []

    @classmethod
    def parse(cls, text: str, source: str) -> _YamlDocument:
        document = cls(source)
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                document._lines[()] = root.start_mark.line + 1
                document.data = document._build(loader, root, (), set())
        except yaml.MarkedYAMLError as error:
            raise document._syntax_error(error) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML: {error}", source=source) from None
        finally:
            loader.dispose()
        if document._problems:
            raise document.locate(document._problems)
        return document

    def line_of(self, parts: Path) -> int | None:
        """The line of ``parts``, or of its nearest ancestor present in the file (a missing key's mapping)."""
        for length in range(len(parts), -1, -1):
            line = self._lines.get(tuple(parts[:length]))
            if line is not None:
                return line
        return None

    def locate(self, problems: list[ConfigError]) -> ConfigError:
        """One :class:`ConfigError` for ``problems``, each with this file's name and its line, in file order."""
        located = []
        for problem in problems:
            try:
                line = self.line_of(parse_path(problem.path))
            except ValueError:
                line = None
            located.append(problem.relocated(line=line, source=self.source))
        located.sort(key=lambda problem: problem.line or 0)
        return ConfigError.collect(located)

    def _syntax_error(self, error: yaml.MarkedYAMLError) -> ConfigError:
        mark = error.problem_mark or error.context_mark
        detail = ": ".join(part for part in (error.context, error.problem) if part) or str(error)
        opened = error.context_mark
        if opened is not None and mark is not None and opened.line != mark.line:
            detail += f" (the construct began on line {opened.line + 1})"
        return ConfigError(f"invalid YAML: {detail}", line=mark.line + 1 if mark else None, source=self.source)

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, parts: Path, active: set[int]) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_object(node)
        if id(node) in active:
            message = "an alias refers to its own anchor (recursive YAML)"
            self._problems.append(ConfigError(message, path=format_path(parts)))
            return None
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self._lines.setdefault((*parts, index), item.start_mark.line + 1)
                items.append(self._build(loader, item, (*parts, index), active))
            return items
        return self._build_mapping(loader, node, parts, active)

    def _build_mapping(self, loader: yaml.SafeLoader, node: yaml.MappingNode, parts: Path, active: set[int]) -> dict:
        self._check_duplicate_keys(loader, node, parts)
        loader.flatten_mapping(node)  # resolves "<<: *anchor" merge keys; explicit keys come last and win
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._problems.append(ConfigError("mapping keys must be plain scalars", path=format_path(parts)))
                continue
            key = loader.construct_object(key_node)
            self._lines[(*parts, key)] = key_node.start_mark.line + 1
            mapping[key] = self._build(loader, value_node, (*parts, key), active)
        return mapping

    def _check_duplicate_keys(self, loader: yaml.SafeLoader, node: yaml.MappingNode, parts: Path) -> None:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                message = f"duplicate key (first given on line {first_lines[key]})"
                error = ConfigError(message, path=format_path((*parts, key)))
                self._problems.append(error.relocated(line=line))
            else:
                first_lines[key] = line


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


class _ConfigDumper(yaml.SafeDumper):
    """Writes lists of scalars in flow style (``ranks: [0, 1]``), as people write them."""


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    flow = bool(value) and all(not isinstance(item, (dict, list)) for item in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_ConfigDumper.add_representer(list, _represent_list)


# --------------------------------------------------------------------------- step 2: args by import_path


def _prepare_applications(data: dict) -> list[ConfigError]:
    """Copy each application's ``import_path`` into its ``args`` (the union tag).

    Also turns an empty ``deployments:`` into "omitted"; an empty ``args:`` becomes ``{}`` here.
    """
    applications = data.get("applications")
    if not isinstance(applications, list):
        return []
    problems: list[ConfigError] = []
    choices = list(ARGS_BY_IMPORT_PATH)
    for index, application in enumerate(applications):
        at = f"applications[{index}]"
        if not isinstance(application, dict):
            continue
        if application.get("deployments", []) is None:
            del application["deployments"]
        if "import_path" not in application:
            problems.append(ConfigError(f"is required: one of {', '.join(choices)}", path=f"{at}.import_path"))
            continue
        import_path = application["import_path"]
        if import_path not in ARGS_BY_IMPORT_PATH:
            problems.append(ConfigError(_not_a_choice(import_path, choices), path=f"{at}.import_path"))
            continue
        args = application.get("args")
        if args is None:
            application["args"] = {_TAG_FIELD: import_path}
        elif isinstance(args, dict):
            if _TAG_FIELD in args:
                message = "unknown key; import_path belongs to the application, not to its args"
                problems.append(ConfigError(message, path=f"{at}.args.{_TAG_FIELD}"))
                continue
            args[_TAG_FIELD] = import_path
    return problems


# ------------------------------------------------------------------------------- step 3: unknown keys


def _unknown_keys(value: Any, schema: mi.Type, parts: Path) -> list[ConfigError]:
    """Every key of ``value`` that ``schema`` does not know, anywhere below ``parts``."""
    schema = _resolve(schema, value)
    problems: list[ConfigError] = []
    if isinstance(schema, mi.StructType) and isinstance(value, dict):
        fields = {spec.encode_name: spec for spec in schema.fields}
        for key, item in value.items():
            if key in fields:
                problems += _unknown_keys(item, fields[key].type, (*parts, key))
            elif key != schema.tag_field:
                problems.append(ConfigError(_unknown_key_message(key, list(fields)), path=format_path((*parts, key))))
    elif isinstance(schema, mi.DictType) and isinstance(value, dict):
        for key, item in value.items():
            problems += _unknown_keys(item, schema.value_type, (*parts, key))
    elif isinstance(schema, (mi.ListType, mi.VarTupleType)) and isinstance(value, list):
        for index, item in enumerate(value):
            problems += _unknown_keys(item, schema.item_type, (*parts, index))
    return problems


def _resolve(schema: mi.Type, value: Any) -> mi.Type | None:
    """The member of a union (and the type under metadata) that ``value`` is meant to be."""
    while isinstance(schema, mi.Metadata):
        schema = schema.type
    if not isinstance(schema, mi.UnionType):
        return schema
    members = [_resolve(member, value) for member in schema.types]
    if isinstance(value, dict):
        structs = [member for member in members if isinstance(member, mi.StructType)]
        tagged = [member for member in structs if member.tag_field and value.get(member.tag_field) == member.tag]
        if tagged or len(structs) == 1:
            return (tagged or structs)[0]
        return next((member for member in members if isinstance(member, mi.DictType)), None)
    if isinstance(value, list):
        return next((member for member in members if isinstance(member, (mi.ListType, mi.VarTupleType))), None)
    return next((member for member in members if isinstance(member, mi.LiteralType)), None)


def _schema_at(data: Any, parts: Path) -> mi.Type | None:
    """The schema type of the value at ``parts`` (following ``data`` to pick union members)."""
    schema: mi.Type | None = _SCHEMA
    value = data
    for part in parts:
        schema = _resolve(schema, value)
        if isinstance(schema, mi.StructType):
            spec = next((spec for spec in schema.fields if spec.encode_name == part), None)
            schema = spec.type if spec else None
        elif isinstance(schema, mi.DictType):
            schema = schema.value_type
        elif isinstance(schema, (mi.ListType, mi.VarTupleType)):
            schema = schema.item_type
        else:
            return None
        value = _child(value, part)
    return _resolve(schema, value) if schema is not None else None


def _child(value: Any, part: Any) -> Any:
    if isinstance(value, dict):
        return value.get(part)
    if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
        return value[part]
    return None


def _unknown_key_message(key: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f'unknown key "{key}" (did you mean "{close[0]}"?)'
    return f'unknown key "{key}"; allowed here: {", ".join(known)}'


def _not_a_choice(value: Any, choices: list[str]) -> str:
    shown = json.dumps(value) if isinstance(value, str) else _describe_value(value)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6) if isinstance(value, str) else []
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"must be one of {', '.join(choices)}, got {shown}{hint}"


# ------------------------------------------------------------------------- step 4: msgspec's verdicts

_AT_KEY = re.compile(r"^(?P<message>.*) - at `key` in `(?P<path>\$[^`]*)`$", re.S)
_AT = re.compile(r"^(?P<message>.*) - at `(?P<path>\$[^`]*)`$", re.S)
_EXPECTED_GOT = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`$")
_EXPECTED_BOUND = re.compile(r"^Expected `(?P<expected>[^`]+)` (?P<bound>.+)$")
_BAD_CHOICE = re.compile(r"^Invalid (?:enum )?value ")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<key>[^`]+)`$")
_DOLLAR_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")


def _translate(error: msgspec.ValidationError, data: dict) -> list[ConfigError]:
    """msgspec's error as our :class:`ConfigError` (several when a struct check collected several)."""
    text = str(error)
    at_key = _AT_KEY.match(text)
    match = at_key or _AT.match(text)
    message, dollar_path = (match["message"], match["path"]) if match else (text, "$")
    parts = _parse_dollar_path(dollar_path, data)
    base = format_path(parts)
    cause = error.__cause__
    if isinstance(cause, ConfigError):  # raised by a struct's own check, path relative to that struct
        return [problem.relocated(prefix=base) for problem in cause.errors]
    if at_key:
        key = _first_key_not_str(_value_at(data, parts))
        return [ConfigError(f"keys here must be strings, got {_describe_value(key)}", path=format_path((*parts, key)))]
    return [_friendly(message, parts, data)]


def _parse_dollar_path(dollar_path: str, data: Any) -> Path:
    """``$.applications[1].env[...]`` -> ``("applications", 1, "env", <the offending key>)``."""
    parts: list[Any] = []
    for match in _DOLLAR_TOKEN.finditer(dollar_path[1:]):
        name, index = match.groups()
        if name is not None:
            parts.append(name)
        elif index is not None:
            parts.append(int(index))
        else:  # a dict value; msgspec does not say which key, so find the first one that does not fit
            parts.append(_first_misfit_key(data, tuple(parts)))
    return tuple(parts)


def _first_misfit_key(data: Any, parts: Path) -> Any:
    mapping = _value_at(data, parts)
    schema = _schema_at(data, parts)
    value_schema = schema.value_type if isinstance(schema, mi.DictType) else None
    if not isinstance(mapping, dict) or not mapping:
        return "..."
    for key, value in mapping.items():
        if value_schema is None or not _fits(value, value_schema):
            return key
    return next(iter(mapping))


def _fits(value: Any, schema: mi.Type) -> bool:
    """A shallow check of a dict value against its schema, enough to spot which entry msgspec rejected."""
    while isinstance(schema, mi.Metadata):
        schema = schema.type
    if isinstance(schema, mi.UnionType):
        return any(_fits(value, member) for member in schema.types)
    if isinstance(schema, mi.StrType):
        return isinstance(value, str)
    if isinstance(schema, mi.BoolType):
        return isinstance(value, bool)
    if isinstance(schema, (mi.IntType, mi.FloatType)):
        kinds = (int,) if isinstance(schema, mi.IntType) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        return _within_bounds(value, schema)
    if isinstance(schema, mi.DictType):
        return isinstance(value, dict) and all(_fits(item, schema.value_type) for item in value.values())
    if isinstance(schema, mi.NoneType):
        return value is None
    return True


def _within_bounds(value: float, schema: mi.IntType | mi.FloatType) -> bool:
    return not (
        (schema.ge is not None and value < schema.ge)
        or (schema.gt is not None and value <= schema.gt)
        or (schema.le is not None and value > schema.le)
        or (schema.lt is not None and value >= schema.lt)
    )


def _first_key_not_str(mapping: Any) -> Any:
    if isinstance(mapping, dict):
        return next((key for key in mapping if not isinstance(key, str)), "...")
    return "..."


def _value_at(data: Any, parts: Path) -> Any:
    value = data
    for part in parts:
        value = _child(value, part)
    return value


def _friendly(message: str, parts: Path, data: dict) -> ConfigError:
    """msgspec's wording in the vocabulary of a YAML file, with the offending value shown."""
    value = _value_at(data, parts)
    path = format_path(parts)
    if match := _EXPECTED_GOT.match(message):
        hint = _quote_hint(parts, value)
        return ConfigError(
            f"expected {_yaml_type(match['expected'])}, got {_describe_value(value)}{hint}", path=path
        )
    if match := _EXPECTED_BOUND.match(message):
        expected = f"{_yaml_type(match['expected'])} {match['bound']}"
        return ConfigError(f"expected {expected}, got {_describe_value(value)}", path=path)
    if _BAD_CHOICE.match(message):
        schema = _schema_at(data, parts)
        if isinstance(schema, mi.LiteralType):
            return ConfigError(_not_a_choice(value, [str(choice) for choice in schema.values]), path=path)
    if match := _UNKNOWN_FIELD.match(message):
        schema = _schema_at(data, parts)
        known = [spec.encode_name for spec in schema.fields] if isinstance(schema, mi.StructType) else []
        return ConfigError(_unknown_key_message(match["key"], known), path=join_path(path, match["key"]))
    if match := _MISSING_FIELD.match(message):
        return ConfigError("is required", path=join_path(path, match["key"]))
    return ConfigError(message[:1].lower() + message[1:], path=path)


def _yaml_type(msgspec_type: str) -> str:
    names = {"object": "mapping", "array": "list", "null": "null"}
    return " or ".join(names.get(name, name) for name in msgspec_type.split(" | "))


def _describe_value(value: Any) -> str:
    """``str "two"``, ``int -2``, ``null``, ``mapping``: the type and, for scalars, the value."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return _yaml_kind(value)
    return f"{_yaml_kind(value)} {json.dumps(value, default=str, ensure_ascii=False)}"


def _quote_hint(parts: Path, value: Any) -> str:
    if len(parts) >= 2 and parts[-2] == "env_vars" and isinstance(value, (int, float, bool)):
        return f' (environment variables are strings: quote it, "{json.dumps(value)}")'
    return ""
