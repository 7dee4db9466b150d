"""Structured output on a diffusion canvas: JSON Schema, json_object, regex, choices, Lark grammars and tool calls,
compiled by llguidance against the checkpoint's tokenizer.json (core: numpy and llguidance, no torch/mlx).

    spec = StructuredSpec.from_openai(body)            # or StructuredSpec.json_schema(schema) / .regex / .choices ...
    grammar = compile(spec, tokenizer, vocab_size, eos_token_ids)      # cached by spec
    row = grammar.new_row()                            # one per request; the protocol is in grammar.py
    first_bad, allowed = row.scan(canvas, accepted)    # every pass
    tokens, fallback = row.repair(canvas, topk)        # when the canvas stops; then row.commit(tokens)
    content, tool_calls = parse_tool_calls(text, spec) # tool_call specs: the reply as OpenAI tool_calls

Why llguidance. A canvas needs, per pass and per row, the longest valid prefix of up to C accepted tokens from the
committed state, then one mask at the first bad position, without touching the committed state. Measured with
`python bench/bench_structured.py --engines` (2-core CPU; a nested JSON Schema and a valid 256-token canvas; walk =
checking all 256 tokens from the committed state; mask = one token mask, median; vocabularies: the random model's
320 byte tokens / byte-level BPEs of 4000 and 9197 tokens trained on English text):

| engine | walk 256 tokens | mask | state copy | rollback | grammars | reads tokenizer.json |
| --- | --- | --- | --- | --- | --- | --- |
| llguidance 1.9.1 | 0.02 ms (one call) | 2 / 2 / 2 us | 0.6 us | any depth | Lark + %json | yes |
| xgrammar 0.2.9 | 0.12 / 0.14 / 0.36 ms (per token) | 2 / 4 / 9 us | 1.7 us | any depth | EBNF, tags | private API |
| outlines-core 0.2.14 | 0.3 / 16 / 38 ms (per token) | 2 / 6 / 14 us | - | 32 tokens | regex only | no |

llguidance walks a whole canvas in one call and says how far it is valid (`validate_tokens`), which is exactly the
scan; it reads any `tokenizers` tokenizer.json (BPE, Unigram, WordPiece: token bytes come from the Rust library, not
from guessing the vocab's encoding); its JSON Schema compiler covers nested objects, arrays, enums, numeric bounds,
required, additionalProperties, $ref, anyOf, patterns and formats, and names a keyword it cannot enforce (`not`)
instead of ignoring it. xgrammar would also fit (and ships Gemma 4's native tool-call syntax as a structural tag), but
its canvas walk is one Python call per token (16 rows x 0.36 ms = 6 ms of host time per pass at a 9k vocab, against
0.3 ms) and it has no public way to read a bare tokenizer.json. outlines-core has no grammars and a 32-token
rollback window.

Tool calls are one JSON object `{"name": <a declared function>, "arguments": {...its parameters}}` (see spec.py):
the tiny checkpoints' chat templates have no tool-call syntax, and Gemma 4's native one
(`<|tool_call>call:name{key:<|"|>text<|"|>}<tool_call|>`) is not JSON, which llguidance's schema compiler cannot
write without a hand-written schema compiler.
"""

from .grammar import Grammar, RowConstraint, compile
from .spec import StructuredSpec, parse_tool_calls, spec_from_arguments, spec_from_flags, tool_call_schema

__all__ = ["Grammar", "RowConstraint", "StructuredSpec", "compile", "parse_tool_calls", "spec_from_arguments",
           "spec_from_flags", "tool_call_schema"]
