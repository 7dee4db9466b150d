"""What a request asks the output to be: a `StructuredSpec`, read from the Python API or an OpenAI / vLLM body, and the
llguidance grammar text it compiles to. Tool calls: the spec for `tools` + `tool_choice` and the parser that turns
the generated text back into OpenAI `tool_calls`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

KINDS = ("json_schema", "json_object", "regex", "choices", "grammar", "tool_call")

# JSON is written the way json.dumps writes it by default, so whitespace is never a free choice of the canvas (a
# denoiser left free to choose whitespace can fill a canvas with it).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredSpec:
    """One output constraint. `value` is the schema (frozen: see `schema()`) for json_schema, the pattern for regex, a
    tuple of strings for choices, Lark text (llguidance's CFG syntax,
    https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md) or GBNF (llama.cpp's) for grammar, and a
    tuple of (name, parameters schema) for tool_call. `strict` is OpenAI's flag, kept for the record: strict or not,
    every keyword of a schema is enforced, and one the engine cannot enforce (`not`, say) is an error rather than
    silently ignored, so an output never breaks the schema it was asked for. `tool_choice` (tool_call): "auto" (text
    or one call), "required" (one call of any declared function) or a function name (one call of that function)."""

    kind: str
    value: Any = None
    strict: bool = True
    name: str | None = None
    tool_choice: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"structured output: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")

    # -- constructors -----------------------------------------------------------------------------------------------

    @classmethod
    def json_schema(cls, schema: dict | str, strict: bool = True, name: str | None = None) -> "StructuredSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InputError(f"json_schema: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise InputError(f"json_schema: must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", _freeze(schema), strict=bool(strict), name=name)

    @classmethod
    def json_object(cls) -> "StructuredSpec":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "StructuredSpec":
        if not isinstance(pattern, str) or not pattern:
            raise InputError("regex: must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choices(cls, options) -> "StructuredSpec":
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise InputError("choices: must be a non-empty list of non-empty strings")
        return cls("choices", tuple(options))

    @classmethod
    def grammar(cls, lark: str) -> "StructuredSpec":
        if not isinstance(lark, str) or not lark.strip():
            raise InputError("grammar: must be a non-empty string (Lark or GBNF syntax)")
        return cls("grammar", lark)

    @classmethod
    def tool_call(cls, tools, tool_choice="auto", strict: bool = False) -> "StructuredSpec | None":
        """`tools` as OpenAI sends them ([{"type": "function", "function": {"name", "parameters"}}]); None when
        tool_choice is "none" (no constraint)."""
        functions = _read_tools(tools)
        choice = _read_tool_choice(tool_choice, [name for name, _ in functions])
        if choice == "none":
            return None
        if choice not in ("auto", "required"):
            functions = tuple(f for f in functions if f[0] == choice)
        return cls("tool_call", functions, strict=strict, tool_choice=choice)

    @classmethod
    def from_openai(cls, body: dict) -> "StructuredSpec | None":
        """The constraint an OpenAI / vLLM request body asks for, or None. Reads `response_format`
        (text | json_object | json_schema), vLLM's `guided_json` / `guided_regex` / `guided_choice` /
        `guided_grammar`, the newer `structured_outputs: {json | regex | choice | grammar}`, and `tools` +
        `tool_choice`. More than one of these in one body is an error (vLLM refuses it too)."""
        if not isinstance(body, dict):
            raise InputError("request body: must be a JSON object")
        found = [spec for spec in (_from_response_format(body.get("response_format")), *_from_vllm(body))
                 if spec is not None]
        if body.get("tools"):
            tools = cls.tool_call(body["tools"], body.get("tool_choice", "auto"))
            if tools is not None and tools.tool_choice != "auto":
                found.append(tools)
            elif tools is not None and not found:
                found.append(tools)   # "auto" with a response format: the format wins, as it does in vLLM
        if len(found) > 1:
            raise InputError(f"structured output: the body asks for {len(found)} constraints at once "
                             f"({', '.join(s.kind for s in found)}); send one")
        return found[0] if found else None

    # -- what the engine compiles -----------------------------------------------------------------------------------

    def schema(self) -> dict | bool | None:
        """The JSON Schema the output must validate against (json_schema, json_object, a forced tool call)."""
        if self.kind == "json_schema":
            return _thaw(self.value)
        if self.kind == "json_object":
            return {"type": "object"}
        if self.kind == "tool_call":
            return tool_call_schema(self.value)
        return None


def spec_from_arguments(response_format=None, regex: str | None = None, choices=None,
                        grammar: str | None = None) -> StructuredSpec | None:
    """The spec for `model.generate(response_format=..., regex=..., choices=..., grammar=...)` and the CLI flags
    (at most one of them). `response_format` may be a StructuredSpec, an OpenAI response_format object
    ({"type": "json_object"} / {"type": "json_schema", "json_schema": {...}}), a bare JSON Schema (dict or JSON
    text), or a pydantic model class (its model_json_schema())."""
    given = [name for name, value in (("response_format", response_format), ("regex", regex), ("choices", choices),
                                      ("grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise InputError(f"structured output: give one of response_format, regex, choices, grammar "
                         f"(got {', '.join(given)})")
    if regex is not None:
        return StructuredSpec.regex(regex)
    if choices is not None:
        return StructuredSpec.choices(list(choices) if not isinstance(choices, str) else choices)
    if grammar is not None:
        return StructuredSpec.grammar(grammar)
    fmt = response_format
    if fmt is None or isinstance(fmt, StructuredSpec):
        return fmt
    if hasattr(fmt, "model_json_schema"):
        return StructuredSpec.json_schema(fmt.model_json_schema(), name=getattr(fmt, "__name__", None))
    if isinstance(fmt, str):
        return StructuredSpec.json_schema(fmt)
    if isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object", "json_schema") and \
            (fmt["type"] != "json_schema" or "json_schema" in fmt):
        return _from_response_format(fmt)
    return StructuredSpec.json_schema(fmt)


def spec_from_flags(json_schema: str | None = None, regex: str | None = None, choices=(),
                    grammar: str | None = None) -> tuple[StructuredSpec | None, str | None]:
    """(spec, the flag that gave it) for `dgemma generate --json-schema FILE | --regex R | --choice C ... |
    --grammar FILE`; a file that cannot be read or parsed is an InputError naming the flag and the file."""
    choices = tuple(choices or ())
    given = [flag for flag, value in (("--json-schema", json_schema), ("--regex", regex),
                                      ("--choice", choices or None), ("--grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)}: give one structured-output flag")
    if not given:
        return None, None
    flag = given[0]
    try:
        if json_schema is not None:
            return StructuredSpec.json_schema(_read_flag_file(flag, json_schema)), f"{flag} {json_schema}"
        if grammar is not None:
            return StructuredSpec.grammar(_read_flag_file(flag, grammar)), f"{flag} {grammar}"
        if regex is not None:
            return StructuredSpec.regex(regex), flag
        return StructuredSpec.choices(list(choices)), flag
    except InputError as e:
        what = f"{flag} {json_schema if json_schema is not None else grammar}" if flag in ("--json-schema",
                                                                                          "--grammar") else flag
        raise InputError(f"{what}: {str(e).split(': ', 1)[-1]}") from None


def _read_flag_file(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not UTF-8 text") from None


def tool_call_schema(functions) -> dict:
    """The call object: {"name": <a declared function>, "arguments": <its parameters>} (one function: no anyOf)."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _thaw(params)},
              "required": ["name", "arguments"], "additionalProperties": False} for name, params in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parse_tool_calls(text: str, spec: StructuredSpec) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated reply under a tool_call spec. A reply that is one call object of a
    declared function becomes one OpenAI tool call ({"id", "type": "function", "function": {"name", "arguments"}},
    arguments as a JSON string, as OpenAI sends them) and no content; any other reply is content and no calls."""
    names = {name for name, _ in spec.value} if spec.kind == "tool_call" else set()
    stripped = text.strip()
    try:
        call = json.loads(stripped) if stripped.startswith("{") else None
    except json.JSONDecodeError:
        call = None
    if (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)
            and set(call) == {"name", "arguments"}):
        return None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
    return text, []


def lark_source(spec: StructuredSpec) -> str:
    """The grammar handed to llguidance, in its Lark dialect (JSON via its %json schema compiler)."""
    if spec.kind in ("json_schema", "json_object"):
        return _lark_json(spec.schema())
    if spec.kind == "regex":
        return "start: " + _lark_regex(spec.value)
    if spec.kind == "choices":
        return "start: " + " | ".join(json.dumps(option) for option in spec.value)
    if spec.kind == "grammar":
        return spec.value
    call = _lark_json(tool_call_schema(spec.value), rule="tool_call")
    if spec.tool_choice == "auto":   # free text, or a reply that is exactly one call object
        return call.replace("start: tool_call", "start: tool_call | TEXT") + "\nTEXT: /[^{](.|\\n)*/\n"
    return call


# -- reading request bodies -----------------------------------------------------------------------------------------

def _from_response_format(fmt) -> StructuredSpec | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InputError("response_format: must be an object with a 'type' (text, json_object or json_schema)")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec.json_object()
    if kind == "json_schema":
        block = fmt.get("json_schema")
        if not isinstance(block, dict) or "schema" not in block:
            raise InputError("response_format.json_schema: must be an object with 'name' and 'schema'")
        spec = StructuredSpec.json_schema(block["schema"], strict=bool(block.get("strict", False)),
                                          name=block.get("name"))
        return spec
    raise InputError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")


def _from_vllm(body: dict) -> list[StructuredSpec]:
    makers = {"json": lambda v: StructuredSpec.json_schema(v, strict=False) if v not in ({}, True)
              else StructuredSpec.json_object(),
              "regex": StructuredSpec.regex, "choice": StructuredSpec.choices, "grammar": StructuredSpec.grammar}
    specs = []
    for key, make in makers.items():
        if body.get(f"guided_{key}") is not None:
            specs.append(_named(f"guided_{key}", make, body[f"guided_{key}"]))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise InputError("structured_outputs: must be an object with one of json, regex, choice, grammar")
        unknown = sorted(set(outputs) - set(makers) - {"json_object", "disable_any_whitespace", "whitespace_pattern"})
        if unknown:
            raise InputError(f"structured_outputs: unknown field(s) {', '.join(unknown)} "
                             "(json, json_object, regex, choice, grammar)")
        if outputs.get("json_object"):
            specs.append(StructuredSpec.json_object())
        for key, make in makers.items():
            if outputs.get(key) is not None:
                specs.append(_named(f"structured_outputs.{key}", make, outputs[key]))
    return specs


def _named(field_name: str, make, value) -> StructuredSpec:
    """Build a spec, naming the request field in the error when its value is wrong."""
    try:
        return make(value)
    except InputError as e:
        raise InputError(f"{field_name}: {str(e).split(': ', 1)[-1]}") from None


def _read_tools(tools) -> tuple:
    if not isinstance(tools, list) or not tools:
        raise InputError("tools: must be a non-empty list of {'type': 'function', 'function': {...}}")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"tools[{i}]: must be {{'type': 'function', 'function': {{'name': ..., "
                             "'parameters': {...}}}}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InputError(f"tools[{i}].function.parameters: must be a JSON Schema object")
        functions.append((fn["name"], _freeze(params)))
    names = [name for name, _ in functions]
    if len(set(names)) != len(names):
        raise InputError(f"tools: function names repeat ({', '.join(sorted(names))})")
    return tuple(functions)


def _read_tool_choice(choice, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice
        raise InputError(f"tool_choice: {choice!r} is not auto, none, required or {{'type': 'function', ...}}")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InputError("tool_choice: must be auto, none, required or {'type': 'function', 'function': {'name'}}")
    if name not in names:
        raise InputError(f"tool_choice.function.name: {name!r} is not a declared tool ({', '.join(names)})")
    return name


# -- grammar text -----------------------------------------------------------------------------------------------------

def _lark_json(schema, rule: str = "start") -> str:
    schema = schema if isinstance(schema, bool) else dict(schema, **{"x-guidance": JSON_OPTIONS})
    return f"{rule}: %json {json.dumps(schema)}\n" if rule == "start" else \
        f"start: {rule}\n{rule}: %json {json.dumps(schema)}\n"


def _lark_regex(pattern: str) -> str:
    # A full match is meant (as in vLLM's guided_regex); anchors are implied, so drop explicit ones.
    body = pattern[1:] if pattern.startswith("^") else pattern
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
    return "/" + body.replace("/", "\\/") + "/"


def _freeze(value):
    """A hashable copy of a JSON value (specs are cache keys)."""
    if isinstance(value, dict):
        return ("__dict__", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    return value


def locate(schema, names: list[str], path: str = "") -> str | None:
    """The JSON pointer of the first place in `schema` that uses one of `names` as a key or a type name."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in names or (key == "type" and (value in names or (isinstance(value, list)
                                                                        and set(value) & set(names)))):
                return f"{path}/{key}"
        for key, value in schema.items():
            found = locate(value, names, f"{path}/{key}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found = locate(value, names, f"{path}/{i}")
            if found:
                return found
    return None


def quoted_names(message: str) -> list[str]:
    """Names an llguidance error message quotes ('Unimplemented keys: ["not"]', 'Invalid type: strin')."""
    names = re.findall(r'"([^"]+)"', message)
    match = re.search(r"Invalid type: (\S+)", message)
    return names + ([match.group(1)] if match else [])
