"""The structured-output protocol (dgemma.structured) on simulated canvases, pure numpy: random and adversarial tokens,
several canvases per sequence, repair with fallbacks; every finished output is checked with `jsonschema` / `re` /
list membership, never with the code under test."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from dgemma.errors import InputError
from dgemma.random_model import build_tokenizer_json
from dgemma.structured import StructuredSpec, compile, parse_tool_calls, spec_from_arguments

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["age"], "additionalProperties": False},
    {"type": "object", "properties": {"t": {"type": "number", "minimum": -1.5, "maximum": 2.25}}, "required": ["t"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "admin": {"type": "boolean"}},
                 "required": ["id", "admin"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 20}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "number"}, "minItems": 2,
                                                "maxItems": 2}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
                                      "unit": {"const": "m"}},
     "required": ["level", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"enum": [1, 2, 3]}}, "required": ["c"],
              "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 3,
                                                                                "maximum": 4}},
     "required": ["kind"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"x": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"type": "string", "maxLength": 3}]}},
     "required": ["x"], "additionalProperties": False},
    # A date by pattern, not `"format": "date"`: llguidance writes RFC 3339 full-dates, year 0000 included, which
    # jsonschema's format checker (Python's datetime, years 1-9999) rejects; see test_formats_compile.
    {"type": "object", "properties": {"when": {"type": "string",
                                               "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"}},
     "required": ["when"], "additionalProperties": False},
    {"$defs": {"leaf": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 3}},
                        "required": ["v"], "additionalProperties": False}},
     "type": "object", "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100},
                                      "currency": {"enum": ["EUR", "USD"]}, "in_stock": {"type": "boolean"}},
     "required": ["price", "currency", "in_stock"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "minLength": 2, "maxLength": 4}},
     "required": ["id"], "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 5}},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100,
                                                                                   "maximum": 599},
                                      "detail": {"type": "object", "properties": {"msg": {"type": "string",
                                                                                          "maxLength": 10}},
                                                 "required": ["msg"], "additionalProperties": False}},
     "required": ["status", "code", "detail"], "additionalProperties": False},
    {"type": "object", "minProperties": 1, "maxProperties": 2,
     "additionalProperties": {"type": "boolean"}},
    {"type": "integer", "minimum": -50, "maximum": 50},
]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"#[0-9a-f]{6}",
           r"(0|[1-9][0-9]{0,2})(\.[0-9]{1,2})?", r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}"]
GRAMMARS = ['start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/', 'root ::= "Answer: " ("yes" | "no")']
GRAMMAR_TEXTS = [r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", r"Answer: (yes|no)"]   # what each grammar's language is, as a regex
CHOICES = [["yes", "no"], ["red", "green", "blue", "green tea"], ["1", "10", "100"], ["Paris", "London", "Berlin"]]


def byte_tokenizer():
    """The random default model's tokenizer: every byte a token, 264 ids in a 320-logit vocab, eos 1."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(build_tokenizer_json()), 320, [1]


def trained_bpe_tokenizer(vocab_size: int = 1500):
    """A byte-level BPE trained on English text (the Python docs' topics that ship with CPython)."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    return tok, tok.get_vocab_size() + 7, [tok.token_to_id("<eos>")]


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def tokenizer(request):
    return byte_tokenizer() if request.param == "bytes" else trained_bpe_tokenizer()


class SimulatedDenoiser:
    """What the engine does with a row, with a random "model": passes accept a growing random subset of positions
    with random (adversarial: specials, eos, out-of-tokenizer ids) or masked tokens; scan re-noises the first bad
    position and masks it next pass; a stopped canvas is repaired (top-K candidates, masked-argmax fallbacks) and
    committed. The model favours closing tokens so that sequences end within a few canvases."""

    def __init__(self, tok, vocab_size: int, eos: list[int], seed: int):
        self.rng = np.random.default_rng(seed)
        self.vocab_size, self.eos = vocab_size, eos
        ids = [tok.token_to_id(t) for t in ['"', "}", "]"]] + eos
        self.closers = [i for i in ids if i is not None]
        self.digits = [i for i in (tok.token_to_id(t) for t in "015") if i is not None]

    def masked_choice(self, allowed: np.ndarray) -> int:
        ids = np.flatnonzero(allowed)
        assert len(ids), "a grammar allowed no token"
        for preferred in ([c for c in self.closers if allowed[c]], [d for d in self.digits if allowed[d]]):
            if preferred and self.rng.random() < 0.8:
                return int(self.rng.choice(preferred))
        return int(self.rng.choice(ids))

    def candidates(self, size: int, k: int = 8) -> np.ndarray:
        """Top-K ids per position: random, or (most often) closing tokens first, then a digit, then random."""
        top = self.rng.integers(0, self.vocab_size, (size, k))
        for i in np.flatnonzero(self.rng.random(size) < 0.7):
            closing = list(self.rng.permutation(self.closers)) + [self.rng.choice(self.digits)]
            top[i, :len(closing)] = closing[:k]
        return top

    def canvas(self, row, size: int, passes: int = 6) -> np.ndarray:
        canvas = self.rng.integers(0, self.vocab_size, size)
        masked: tuple[int, np.ndarray] | None = None
        for p in range(passes):
            accepted = self.rng.random(size) < (p + 1) / passes
            proposal = self.rng.integers(0, self.vocab_size, size)
            canvas = np.where(accepted, proposal, canvas)
            if masked is not None:                        # last pass's first bad position, masked on the device
                canvas[masked[0]] = self.masked_choice(masked[1])
                accepted[masked[0]] = True
            first_bad, allowed = row.scan(canvas, accepted)
            assert 0 <= first_bad <= size
            masked = None if allowed is None else (first_bad, allowed)
            if allowed is not None:
                assert allowed.shape == (self.vocab_size,) and allowed.dtype == bool
                assert not allowed[canvas[first_bad]]
                canvas[first_bad:] = self.rng.integers(0, self.vocab_size, size - first_bad)
        top = self.candidates(size)
        while True:
            tokens, fallback = row.repair(canvas, top)
            if not fallback:
                return tokens
            pos, allowed = fallback[0]
            assert not any(allowed[c] for c in top[pos])
            canvas = tokens.copy()
            canvas[pos] = self.masked_choice(allowed)

    def generate(self, row, tok, size: int, max_canvases: int = 60) -> str:
        ids: list[int] = []
        for _ in range(max_canvases):
            tokens = self.canvas(row, size)
            done = row.commit(tokens)
            cut = next((i for i, t in enumerate(tokens) if t in self.eos), size)
            ids.extend(int(t) for t in tokens[:cut])
            if done:
                assert row.accepted()
                return tok.decode(ids)
        raise AssertionError(f"no end after {max_canvases} canvases: {tok.decode(ids)!r}")


def broken(text: str, spec: StructuredSpec) -> str | None:
    """Why `text` breaks `spec`, judged by jsonschema / re / the choice list; None when it is valid."""
    if spec.kind in ("json_schema", "json_object"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not JSON ({e})"
        try:
            jsonschema.validate(value, spec.schema(), format_checker=jsonschema.FormatChecker())
        except jsonschema.ValidationError as e:
            return f"breaks the schema ({e.message})"
        return None
    if spec.kind == "regex":
        return None if re.fullmatch(spec.value, text) else "does not match"
    if spec.kind == "choices":
        return None if text in spec.value else "not a choice"
    if spec.kind == "grammar":
        return None if re.fullmatch(GRAMMAR_TEXTS[GRAMMARS.index(spec.value)], text) else "not in the grammar"
    raise AssertionError(spec.kind)


ALL_SPECS = ([StructuredSpec.json_schema(s) for s in SCHEMAS] + [StructuredSpec.json_object()]
             + [StructuredSpec.regex(r) for r in REGEXES] + [StructuredSpec.choices(c) for c in CHOICES]
             + [StructuredSpec.grammar(g) for g in GRAMMARS])


def test_every_output_is_valid(tokenizer):
    tok, vocab_size, eos = tokenizer
    failures, outputs = [], 0
    for n, spec in enumerate(ALL_SPECS):
        grammar = compile(spec, tok, vocab_size, eos)
        for seed, size in ((n, 8), (n + 100, 16), (n + 200, 32)):
            text = SimulatedDenoiser(tok, vocab_size, eos, seed).generate(grammar.new_row(), tok, size)
            outputs += 1
            why = broken(text, spec)
            if why:
                failures.append(f"{spec.kind} {spec.value!r:.60} canvas {size} seed {seed}: {text!r}: {why}")
    assert len(ALL_SPECS) >= 30 and outputs == 3 * len(ALL_SPECS)
    assert not failures, "\n".join(failures)


def test_the_validity_check_can_fail():
    """The judge above is independent and strict: it flags outputs that break the schema."""
    spec = StructuredSpec.json_schema(SCHEMAS[1])
    assert broken('{"age": 121}', spec) and broken('{"age": 3, "x": 1}', spec) and broken('{"age": 3', spec)
    assert broken("{}", spec) and broken('{"age": 3}', spec) is None
    assert broken("12-3456", StructuredSpec.regex(REGEXES[0])) and broken("nope", StructuredSpec.choices(["yes"]))


def test_a_canvas_of_256(tokenizer):
    tok, vocab_size, eos = tokenizer
    for n, spec in enumerate(ALL_SPECS[:6]):
        row = compile(spec, tok, vocab_size, eos).new_row()
        assert broken(SimulatedDenoiser(tok, vocab_size, eos, n).generate(row, tok, 256), spec) is None


def test_scan_finds_the_first_bad_position_and_keeps_the_committed_state():
    tok, vocab_size, eos = byte_tokenizer()
    row = compile(StructuredSpec.json_schema(SCHEMAS[1]), tok, vocab_size, eos).new_row()
    ids = np.array(tok.encode('{"age": 42}', add_special_tokens=False).ids + eos * 5)
    everywhere = np.ones(len(ids), dtype=bool)
    assert row.scan(ids, everywhere) == (len(ids), None)
    bad = ids.copy()
    bad[9] = tok.token_to_id("x")                         # {"age": 4x
    first_bad, allowed = row.scan(bad, everywhere)
    assert first_bad == 9 and allowed[tok.token_to_id("2")] and allowed[tok.token_to_id("}")]
    assert not allowed[tok.token_to_id("x")] and not allowed[eos[0]]
    unaccepted = everywhere.copy()
    unaccepted[5] = False                                  # a position still noise ends the walk there
    assert row.scan(bad, unaccepted) == (len(ids), None)
    early_eos = ids.copy()
    early_eos[3] = eos[0]
    assert row.scan(early_eos, everywhere)[0] == 3        # eos before the object is complete
    assert row.commit(ids) and row.accepted()              # the scans changed nothing


def test_repair_forces_eos_when_the_grammar_can_only_stop():
    tok, vocab_size, eos = byte_tokenizer()
    row = compile(StructuredSpec.choices(["yes", "no"]), tok, vocab_size, eos).new_row()
    ids = np.array(tok.encode("nothing", add_special_tokens=False).ids)
    tokens, fallback = row.repair(ids, np.zeros((len(ids), 1), dtype=np.int64))
    assert fallback == [] and tok.decode(tokens[:2].tolist()) == "no" and (tokens[2:] == eos[0]).all()
    assert row.commit(tokens) and row.accepted()


def test_an_accepting_grammar_that_can_continue_lets_the_model_choose():
    tok, vocab_size, eos = byte_tokenizer()
    grammar = compile(StructuredSpec.regex(r"[0-9]+"), tok, vocab_size, eos)
    ids = np.array(tok.encode("12345", add_special_tokens=False).ids + eos)
    tokens, _ = grammar.new_row().repair(ids, ids[:, None])
    assert tok.decode(tokens[:5].tolist()) == "12345" and tokens[5] == eos[0]
    row = grammar.new_row()
    assert row.commit(ids[:3]) is False and not row.accepted()     # "123" so far: the next canvas may continue
    assert row.allowed_now()[eos[0]] and row.allowed_now()[tok.token_to_id("7")]


def test_commit_refuses_an_unrepaired_canvas():
    tok, vocab_size, eos = byte_tokenizer()
    row = compile(StructuredSpec.regex(r"[0-9]+"), tok, vocab_size, eos).new_row()
    with pytest.raises(ValueError, match="position 1"):
        row.commit(np.array(tok.encode("1x", add_special_tokens=False).ids))
    with pytest.raises(ValueError, match="eos at position 0"):
        row.commit(np.array(eos))


@pytest.mark.parametrize("schema, part", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "json_schema at /properties/a/not"),
    ({"type": "object", "properties": {"b": {"type": "strin"}}}, "json_schema at /properties/b/type"),
    ({"type": "array", "items": {"$ref": "#/$defs/missing"}}, "json_schema"),
])
def test_a_schema_the_engine_cannot_compile_names_the_part(schema, part):
    tok, vocab_size, eos = byte_tokenizer()
    with pytest.raises(InputError) as e:
        compile(StructuredSpec.json_schema(schema), tok, vocab_size, eos)
    assert str(e.value).startswith(part), str(e.value)


@pytest.mark.parametrize("spec, part", [
    (lambda: StructuredSpec.regex("[0-9"), "regex: invalid regex"),
    (lambda: StructuredSpec.grammar("start: foo"), "grammar:"),
    (lambda: StructuredSpec.choices([]), "choices:"),
    (lambda: StructuredSpec.json_schema("{not json"), "json_schema: not valid JSON"),
    (lambda: StructuredSpec.from_openai({"response_format": {"type": "xml"}}), "response_format.type"),
    (lambda: StructuredSpec.from_openai({"guided_regex": ""}), "guided_regex:"),
    (lambda: StructuredSpec.from_openai({"guided_regex": "a", "guided_choice": ["a"]}), "structured output: the body"),
    (lambda: StructuredSpec.from_openai({"tools": [{"type": "function", "function": {"name": "f"}}],
                                         "tool_choice": {"type": "function", "function": {"name": "g"}}}),
     "tool_choice.function.name"),
    (lambda: StructuredSpec.from_openai({"structured_outputs": {"xml": "x"}}), "structured_outputs: unknown"),
])
def test_bad_specs_name_the_part(spec, part):
    tok, vocab_size, eos = byte_tokenizer()
    with pytest.raises(InputError) as e:
        compile(spec(), tok, vocab_size, eos)
    assert str(e.value).startswith(part), str(e.value)


def test_from_openai_reads_every_form():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    read = StructuredSpec.from_openai
    assert read({}) is None and read({"response_format": {"type": "text"}}) is None
    assert read({"response_format": {"type": "json_object"}}).kind == "json_object"
    spec = read({"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "n", "schema": schema, "strict": True}}})
    assert (spec.kind, spec.schema(), spec.strict, spec.name) == ("json_schema", schema, True, "n")
    assert read({"guided_json": schema}).schema() == schema
    assert read({"guided_json": json.dumps(schema)}).schema() == schema
    assert read({"guided_regex": "a+"}).value == "a+"
    assert read({"guided_choice": ["x", "y"]}).value == ("x", "y")
    assert read({"guided_grammar": 'start: "a"'}).kind == "grammar"
    assert read({"structured_outputs": {"json": schema}}).schema() == schema
    assert read({"structured_outputs": {"choice": ["x"]}}).kind == "choices"
    assert read({"structured_outputs": {"regex": "b"}}).value == "b"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert read({"tools": tools, "tool_choice": "none"}) is None
    assert read({"tools": tools}).tool_choice == "auto"
    assert read({"tools": tools, "tool_choice": "required"}).tool_choice == "required"
    named = read({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert named.tool_choice == "f" and [name for name, _ in named.value] == ["f"]
    assert read({"tools": tools, "response_format": {"type": "json_object"}}).kind == "json_object"


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_calls_are_constrained_and_parsed(tokenizer, choice):
    tok, vocab_size, eos = tokenizer
    spec = StructuredSpec.from_openai({"tools": TOOLS, "tool_choice": choice})
    grammar = compile(spec, tok, vocab_size, eos)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names = set()
    for seed in range(6):
        text = SimulatedDenoiser(tok, vocab_size, eos, seed).generate(grammar.new_row(), tok, 16)
        content, calls = parse_tool_calls(text, spec)
        assert content is None and len(calls) == 1, text
        function = calls[0]["function"]
        jsonschema.validate(json.loads(function["arguments"]), params[function["name"]])
        assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
        names.add(function["name"])
    assert names <= ({"add"} if isinstance(choice, dict) else set(params))


def test_auto_tool_choice_allows_text_or_a_call():
    tok, vocab_size, eos = byte_tokenizer()
    spec = StructuredSpec.from_openai({"tools": TOOLS})
    row = compile(spec, tok, vocab_size, eos).new_row()
    text_reply = np.array(tok.encode("Sunny today.", add_special_tokens=False).ids + eos)
    assert row.scan(text_reply, np.ones(len(text_reply), dtype=bool))[0] == len(text_reply)
    assert parse_tool_calls("Sunny today.", spec) == ("Sunny today.", [])
    call = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    content, calls = parse_tool_calls(call, spec)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert parse_tool_calls('{"name": "nope", "arguments": {}}', spec)[1] == []


def test_grammars_are_cached_by_spec():
    tok, vocab_size, eos = byte_tokenizer()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = compile(StructuredSpec.json_schema(schema), tok, vocab_size, eos)
    assert compile(StructuredSpec.json_schema(dict(schema)), tok, vocab_size, eos) is first
    assert compile(StructuredSpec.regex("a+"), tok, vocab_size, eos) is not first


def test_the_core_stays_free_of_frameworks():
    import subprocess
    import sys

    code = ("import sys, dgemma.structured as s; s.compile(s.StructuredSpec.regex('a+'), "
            "__import__('dgemma.random_model', fromlist=['x']).build_tokenizer_json(), 320, [1]); "
            "assert 'torch' not in sys.modules and 'mlx' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_copy_is_independent():
    tok, vocab_size, eos = byte_tokenizer()
    row = compile(StructuredSpec.choices(["ab", "cd"]), tok, vocab_size, eos).new_row()
    twin = row.copy()
    assert row.commit(np.array(tok.encode("ab", add_special_tokens=False).ids + eos))
    assert not twin.accepted() and twin.commit(np.array(tok.encode("cd", add_special_tokens=False).ids + eos))


def test_generate_arguments():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert spec_from_arguments() is None
    assert spec_from_arguments(response_format=schema).schema() == schema
    assert spec_from_arguments(response_format=json.dumps(schema)).schema() == schema
    assert spec_from_arguments(response_format={"type": "json_object"}).kind == "json_object"
    assert spec_from_arguments(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
                               ).schema() == schema
    assert spec_from_arguments(response_format={"type": "string"}).schema() == {"type": "string"}  # a bare schema
    assert spec_from_arguments(regex="a+").value == "a+" and spec_from_arguments(choices=["x"]).value == ("x",)
    spec = StructuredSpec.regex("b")
    assert spec_from_arguments(response_format=spec) is spec
    with pytest.raises(InputError, match="give one of"):
        spec_from_arguments(regex="a", choices=["a"])

    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    assert spec_from_arguments(response_format=Point).schema()["required"] == ["x", "y"]


def test_cli_flags(tmp_path):
    from dgemma.structured import spec_from_flags

    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    assert spec_from_flags() == (None, None)
    spec, flag = spec_from_flags(json_schema=str(schema))
    assert spec.schema() == {"type": "object"} and flag == f"--json-schema {schema}"
    assert spec_from_flags(choices=["a", "b"])[0].value == ("a", "b") and spec_from_flags(regex="x")[1] == "--regex"
    (tmp_path / "broken.json").write_text("{nope")
    for kwargs, message in ((dict(json_schema=str(tmp_path / "missing.json")), "--json-schema .*missing.json: No such"),
                            (dict(json_schema=str(tmp_path / "broken.json")), "--json-schema .*broken.json: not valid"),
                            (dict(regex="a", choices=["b"]), "--regex and --choice"),
                            (dict(choices=[""]), "--choice: must be")):
        with pytest.raises(InputError, match=message):
            spec_from_flags(**kwargs)


# == end to end: Model.generate / generate_batch / stream through the engine, on both backends ======================

# Every spec whose outputs have a bounded length (a random model left free inside an open-ended string or an unbounded
# set of keys can write until max_new_tokens): 17 schemas, the regexes, choices and grammars.
BOUNDED_SCHEMAS = (1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 21)
E2E_SPECS = ([StructuredSpec.json_schema(SCHEMAS[i]) for i in BOUNDED_SCHEMAS]
             + [StructuredSpec.regex(r) for r in REGEXES] + [StructuredSpec.choices(c) for c in CHOICES]
             + [StructuredSpec.grammar(g) for g in GRAMMARS])
FAST = dict(max_new_tokens=160, max_denoising_steps=4)


def _checkpoint_with_tokenizer(ckpt_dir, name: str, tokenizer_json: str, seed: int):
    """A random DiffusionGemma saved by transformers (tests/reference.py: vocab 384, eos 1, canvas 16) with a
    tokenizer.json beside it."""
    from reference import make_checkpoint

    path = ckpt_dir / name
    if not (path / "config.json").exists():
        make_checkpoint(path, canvas_length=16, scale=0.5, seed=seed)
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


@pytest.fixture(scope="module", params=["cuda", "mlx"])
def e2e_models(request, ckpt_dir):
    pytest.importorskip("torch" if request.param == "cuda" else "mlx.core")
    import dgemma

    bpe, _, _ = trained_bpe_tokenizer(384)
    assert bpe.token_to_id("<eos>") == 1 and bpe.get_vocab_size() <= 384
    return [dgemma.load(_checkpoint_with_tokenizer(ckpt_dir, "structured-bytes", build_tokenizer_json(), 3),
                        backend=request.param),
            dgemma.load(_checkpoint_with_tokenizer(ckpt_dir, "structured-bpe", bpe.to_str(), 4),
                        backend=request.param)]


@pytest.mark.slow
def test_generated_outputs_always_validate(e2e_models):
    """Every bounded spec, two seeds each, on both tokenizers: 100% of the outputs parse and validate."""
    assert len(E2E_SPECS) >= 25
    failures, outputs = [], 0
    for model in e2e_models:
        for n, spec in enumerate(E2E_SPECS):
            for seed in (n, n + 50):
                out = model.generate("Give me JSON.", response_format=spec, seed=seed, **FAST)
                outputs += 1
                why = broken(out.text, spec)
                if why or out.stats.finish_reason != "eos":
                    failures.append(f"{spec.kind} {spec.value!r:.50} seed {seed}: {out.text!r} "
                                    f"({out.stats.finish_reason}): {why}")
    assert outputs == 4 * len(E2E_SPECS)
    assert not failures, "\n".join(failures)


def test_one_schema_end_to_end(e2e_models):
    """The fast tier's check on each backend: one nested schema, both tokenizers, a few canvases."""
    schema = SCHEMAS[5]
    for model in e2e_models:
        out = model.generate("Give me JSON.", response_format=schema, seed=0, **FAST)
        jsonschema.validate(json.loads(out.text), schema)
        assert out.stats.finish_reason == "eos" and out.stats.canvases > 1


@pytest.mark.slow
def test_every_face_of_the_api(e2e_models):
    model = e2e_models[0]
    schema = SCHEMAS[5]
    outs = model.generate_batch(["one", "two", "three"], response_format=schema, seeds=[1, 2, 3], **FAST)
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)
    assert broken(model.generate("x", regex=REGEXES[3], seed=4, **FAST).text, StructuredSpec.regex(REGEXES[3])) is None
    assert model.generate("x", choices=CHOICES[0], seed=5, **FAST).text in CHOICES[0]
    chunks = list(model.stream("x", response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                                         "schema": schema}},
                               seed=6, **FAST))
    assert len(chunks) > 1 and chunks[-1].finished           # several canvases, each committed valid
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), schema)
    with pytest.raises(InputError, match="json_schema at /properties/a/not"):
        model.generate("x", response_format={"type": "object", "properties": {"a": {"not": {}}}}, **FAST)
    with pytest.raises(InputError, match="give one of"):
        model.generate("x", regex="a", choices=["a"], **FAST)


@pytest.mark.slow
def test_tool_call_through_the_engine(e2e_models):
    model = e2e_models[1]
    spec = StructuredSpec.from_openai({"tools": TOOLS, "tool_choice": "required"})
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        content, calls = parse_tool_calls(model.generate("Call a tool.", response_format=spec, seed=seed,
                                                         **FAST).text, spec)
        assert content is None and len(calls) == 1
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), params[calls[0]["function"]["name"]])


# == dgemma generate --json-schema / --regex / --choice / --grammar ==================================================

def _cli(*args):
    from click.testing import CliRunner

    from dgemma.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_structured_output(random_default, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS[5]))
    base = ["generate", "--model", str(random_default), "--max-new-tokens", "128", "--steps", "3", "--no-stats"]
    r = _cli(*base, "--prompt", "a", "--prompt", "b", "--seed", "1", "--json-schema", str(schema_file))
    assert r.exit_code == 0, r.stderr
    texts = r.stdout.splitlines()
    assert len(texts) == 2
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[5])
    r = _cli(*base, "--prompt", "a", "--seed", "2", "--json-schema", str(schema_file), "--stream")
    assert r.exit_code == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), SCHEMAS[5])
    r = _cli(*base, "--prompt", "a", "--seed", "3", "--regex", REGEXES[0])
    assert r.exit_code == 0 and re.fullmatch(REGEXES[0], r.stdout.strip()), r.output
    r = _cli(*base, "--prompt", "a", "--seed", "4", "--choice", "yes", "--choice", "no")
    assert r.exit_code == 0 and r.stdout.strip() in ("yes", "no"), r.output


def test_cli_structured_output_errors(random_default, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"not": {"type": "string"}}}}')
    base = ["generate", "--model", str(random_default), "--prompt", "x", "--max-new-tokens", "16"]
    _one_line_error(_cli(*base, "--json-schema", str(bad)), f"--json-schema {bad}", "json_schema at /properties/a/not",
                    "Unimplemented keys")
    _one_line_error(_cli(*base, "--json-schema", str(tmp_path / "none.json")), "none.json", "No such file")
    _one_line_error(_cli(*base, "--regex", "[0-9"), "--regex", "unclosed character class")
    _one_line_error(_cli(*base, "--regex", "a", "--choice", "b"), "--regex and --choice")
    from dgemma.tasks.sudoku.task import held_out_puzzles

    puzzle = held_out_puzzles("55", 1)[0][0]
    _one_line_error(_cli("generate", "--prompt", puzzle, "--choice", "x"), "--choice", "sudoku model")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_the_shipped_text_model(backend):
    """The trained text model (dgemma/assets/text, where installed): outputs parse and validate, several seeds."""
    pytest.importorskip("torch" if backend == "cuda" else "mlx.core")
    import dgemma
    from dgemma.assets import text_model_path

    if text_model_path() is None:
        pytest.skip("this dgemma ships no text model")
    model = dgemma.load(text_model_path(), backend=backend)
    failures = []
    for n, spec in enumerate([StructuredSpec.json_schema(SCHEMAS[i]) for i in (1, 5, 16)]
                             + [StructuredSpec.regex(REGEXES[0]), StructuredSpec.choices(CHOICES[3])]):
        for seed in (n, n + 10):
            out = model.generate("Answer in JSON.", response_format=spec, seed=seed, max_new_tokens=192,
                                 max_denoising_steps=8)
            why = broken(out.text, spec)
            if why or out.stats.finish_reason != "eos":
                failures.append(f"{spec.kind} seed {seed}: {out.text!r} ({out.stats.finish_reason}): {why}")
    assert not failures, "\n".join(failures)


def test_formats_compile():
    """String formats are enforced by llguidance's own patterns (RFC 3339 dates and times, emails, uuids...)."""
    tok, vocab_size, eos = byte_tokenizer()
    for fmt, good, bad in (("date", "2024-02-29", "2024-13-01"), ("uuid", "123e4567-e89b-12d3-a456-426614174000",
                                                                  "123e4567")):
        row = compile(StructuredSpec.json_schema({"type": "string", "format": fmt}), tok, vocab_size, eos).new_row()
        for text, valid in ((good, True), (bad, False)):
            ids = np.array(tok.encode(json.dumps(text), add_special_tokens=False).ids + eos)
            assert (row.scan(ids, np.ones(len(ids), dtype=bool))[0] == len(ids)) is valid, (fmt, text)
