"""A compiled constraint (`Grammar`) and its per-request state (`RowConstraint`), on llguidance's matcher.

The protocol the engine calls, per request, on host numpy arrays (C = canvas length, V = vocab size):

    scan(canvas int[C], accepted bool[C]) -> (first_bad, allowed bool[V] | None)   every pass; state unchanged
    repair(canvas int[C], candidates int[C, K]) -> (tokens int[C], fallback)       when the canvas has stopped
    commit(tokens int[C]) -> bool                                                   after repair; True: it ends
    accepted() -> bool

Eos: an eos id is allowed exactly where the grammar accepts (the text so far is complete), and it is the only token
allowed where the grammar can only stop; after the first eos the rest of a canvas is filled with the first eos id
(the engine pads after eos). An accepting grammar that could continue (a regex `\\d+` after "12") lets the model
choose between eos and more text; nothing is cut at the first accepting position.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from ..errors import InputError
from .spec import StructuredSpec, _thaw, lark_source, locate, quoted_names

_LOCK = threading.Lock()
_TOKENIZERS: dict = {}     # id(tokenizer) -> (tokenizer, vocab_size, eos ids, LLTokenizer)
_GRAMMARS: dict = {}       # (spec, id(tokenizer), vocab_size, eos ids) -> Grammar
_MAX_GRAMMARS = 256


def compile(spec: StructuredSpec, tokenizer, vocab_size: int, eos_token_ids) -> "Grammar":
    """Compile `spec` against a tokenizer (a dgemma Tokenizer, a `tokenizers.Tokenizer` or tokenizer.json text) for a
    model with `vocab_size` logits. Compiled grammars are cached by (spec, tokenizer, vocab size, eos ids). A spec the
    engine cannot compile raises InputError naming the part it rejects."""
    if not isinstance(spec, StructuredSpec):
        raise TypeError(f"compile: expected a StructuredSpec, got {type(spec).__name__}")
    eos = tuple(int(e) for e in (eos_token_ids if hasattr(eos_token_ids, "__iter__") else [eos_token_ids]))
    if not eos:
        raise InputError("structured output needs the model's eos token id (generation_config / config.json)")
    key = (spec, id(tokenizer), int(vocab_size), eos)
    with _LOCK:
        grammar = _GRAMMARS.get(key)
    if grammar is None:
        grammar = Grammar(spec, _ll_tokenizer(tokenizer, int(vocab_size), eos), int(vocab_size), eos)
        with _LOCK:
            if len(_GRAMMARS) >= _MAX_GRAMMARS:
                _GRAMMARS.pop(next(iter(_GRAMMARS)))
            _GRAMMARS[key] = grammar
    return grammar


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise InputError("structured output needs the llguidance grammar engine: "
                         "pip install 'dgemma[structured]'") from None
    return llguidance


def _ll_tokenizer(tokenizer, vocab_size: int, eos: tuple):
    """llguidance's view of the tokenizer (token bytes, a token trie), built once per tokenizer (about 1 s at a
    262k vocab)."""
    llguidance = _llguidance()
    with _LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1:3] == (vocab_size, eos):
        return hit[3]
    text = _tokenizer_json(tokenizer)
    try:
        ll = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos))
    except Exception as e:  # llguidance raises ValueError / RuntimeError with its own message
        raise InputError(f"structured output: llguidance cannot read this tokenizer ({e})") from None
    with _LOCK:
        _TOKENIZERS[id(tokenizer)] = (tokenizer, vocab_size, eos, ll)
    return ll


def _tokenizer_json(tokenizer) -> str:
    if isinstance(tokenizer, str):
        return tokenizer
    inner = getattr(tokenizer, "_tok", tokenizer)     # dgemma.tokenizer.Tokenizer wraps a tokenizers.Tokenizer
    if hasattr(inner, "to_str"):
        return inner.to_str()
    raise TypeError(f"compile: cannot read a tokenizer of type {type(tokenizer).__name__}")


class Grammar:
    """A spec compiled against one tokenizer; `new_row()` gives each request its own state (a copy of a fresh matcher:
    microseconds, so a row costs nothing to start)."""

    def __init__(self, spec: StructuredSpec, ll_tokenizer, vocab_size: int, eos: tuple):
        llguidance = _llguidance()

        self.spec, self.vocab_size, self.eos_token_ids = spec, vocab_size, eos
        self._eos = np.zeros(vocab_size, dtype=bool)
        self._eos[[e for e in eos if 0 <= e < vocab_size]] = True
        try:
            # a grammar may be Lark or GBNF (llama.cpp's and vLLM's EBNF); llguidance converts GBNF to Lark
            source = llguidance.grammar_from("grammar", spec.value) if spec.kind == "grammar" else \
                llguidance.LLMatcher.grammar_from_lark(lark_source(spec))
        except ValueError as e:
            raise InputError(f"{_part(spec)}: {e}") from None
        matcher = llguidance.LLMatcher(ll_tokenizer, source, log_level=0)
        if matcher.is_error():
            raise InputError(_rejection(spec, matcher.get_error()))
        self._fresh = matcher
        if not self.allowed(matcher).any():
            raise InputError(f"{_part(spec)}: no token of this tokenizer can start it")

    def new_row(self) -> "RowConstraint":
        return RowConstraint(self)

    def allowed(self, matcher) -> np.ndarray:
        """bool[V]: the tokens `matcher` allows next, eos ids exactly where it accepts."""
        if matcher.is_stopped():
            return self._eos.copy()
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        mask[self._eos] = matcher.is_accepting()
        return mask


class RowConstraint:
    """One request's grammar state: the matcher after the committed blocks, never changed except by `commit`."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self._matcher = grammar._fresh.deep_copy()
        self._done = False

    def scan(self, canvas, accepted) -> tuple[int, np.ndarray | None]:
        """Walk the accepted prefix of `canvas` (up to the first unaccepted position, which is still noise) from the
        committed state. Returns (first_bad, allowed): the first accepted position whose token the grammar rejects and
        the tokens allowed there, or (C, None) when the walked prefix is a valid continuation. An eos where the
        grammar accepts ends the walk with no violation. Does not change the committed state."""
        canvas = np.asarray(canvas)
        size = len(canvas)
        if self._done:
            return size, None
        unaccepted = np.flatnonzero(~np.asarray(accepted, dtype=bool))
        walk = int(unaccepted[0]) if len(unaccepted) else size
        tokens = canvas[:walk].tolist()
        end = self._first_eos(tokens)
        valid = self._matcher.validate_tokens(tokens[:end]) if end else 0
        if valid == end and (end == walk or self._accepts_after(tokens[:end])):
            return size, None
        matcher = self._matcher.deep_copy()
        matcher.consume_tokens(tokens[:valid])
        return valid, self.grammar.allowed(matcher)

    def repair(self, canvas, candidates) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Make a stopped canvas a valid continuation, left to right: keep canvas[i] where the grammar allows it,
        else take the first allowed id of candidates[i] (that position's top-K, best first); eos is forced where the
        grammar can only stop, and every position after an eos is eos. When none of the K is allowed at a position,
        repair stops there and returns (tokens, [(pos, allowed)]): tokens before pos are repaired, the rest as given.
        The engine sets tokens[pos] to the masked argmax of the full logits and calls repair again with that canvas
        (a kept token is never changed, so each call makes progress). Returns (tokens, []) when the canvas is
        complete. Does not change the committed state."""
        tokens = np.array(canvas, copy=True)
        candidates = np.asarray(candidates)
        first_eos = self.grammar.eos_token_ids[0]
        if self._done:
            tokens[:] = first_eos
            return tokens, []
        matcher = self._matcher.deep_copy()
        ids = tokens.tolist()
        i = 0
        while i < len(ids):
            if matcher.is_stopped():
                break
            end = self._first_eos(ids, i)
            run = matcher.validate_tokens(ids[i:end]) if end > i else 0
            matcher.consume_tokens(ids[i:i + run])
            i += run
            if i == len(ids) or matcher.is_stopped():
                break
            allowed = self.grammar.allowed(matcher)
            if self._is_eos(ids[i]) and allowed[ids[i]]:
                break                                        # the model's own eos where the text is complete
            pick = next((int(c) for c in candidates[i] if 0 <= c < len(allowed) and allowed[c]), None)
            if pick is None:
                tokens[:i] = ids[:i]
                return tokens, [(i, allowed)]
            ids[i] = pick
            if self._is_eos(pick):
                break
            matcher.consume_token(pick)
            i += 1
        if i < len(ids):                                     # the grammar has ended: eos here, eos after
            if not self._is_eos(ids[i]):
                ids[i] = first_eos
            ids[i + 1:] = [first_eos] * (len(ids) - i - 1)
        tokens[:] = ids
        return tokens, []

    def commit(self, tokens) -> bool:
        """Advance the committed state over a repaired canvas. True when the sequence ends here: the canvas holds an
        eos where the grammar accepts, or the grammar can take nothing more (the engine ends the row as at eos).
        A canvas that breaks the grammar raises ValueError (repair was skipped)."""
        if self._done:
            return True
        ids = np.asarray(tokens).tolist()
        end = self._first_eos(ids)
        valid = self._matcher.validate_tokens(ids[:end]) if end else 0
        if valid != end:
            raise ValueError(f"commit: token {ids[valid]} at position {valid} breaks the grammar (repair first)")
        self._matcher.consume_tokens(ids[:end])
        if end < len(ids):
            if not self._matcher.is_accepting():
                raise ValueError(f"commit: eos at position {end} before the grammar accepts (repair first)")
            self._done = True
        elif self._matcher.is_stopped():
            self._done = True
        return self._done

    def accepted(self) -> bool:
        """True once the sequence has ended (see commit)."""
        return self._done

    def copy(self) -> "RowConstraint":
        """An independent copy of this state (microseconds): one per canvas when a request denoises several side by
        side (attempts), or a checkpoint to go back to."""
        twin = RowConstraint.__new__(RowConstraint)
        twin.grammar, twin._matcher, twin._done = self.grammar, self._matcher.deep_copy(), self._done
        return twin

    def allowed_now(self) -> np.ndarray:
        """bool[V]: the tokens allowed at the first position of the next canvas."""
        return self.grammar.allowed(self._matcher)

    def _is_eos(self, token: int) -> bool:
        return token in self.grammar.eos_token_ids

    def _first_eos(self, ids: list, start: int = 0) -> int:
        eos = self.grammar.eos_token_ids
        return next((j for j in range(start, len(ids)) if ids[j] in eos), len(ids))

    def _accepts_after(self, prefix: list) -> bool:
        matcher = self._matcher.deep_copy()
        matcher.consume_tokens(prefix)
        return matcher.is_accepting()


def _part(spec: StructuredSpec) -> str:
    return {"json_schema": "json_schema", "json_object": "json_object", "regex": "regex", "choices": "choices",
            "grammar": "grammar", "tool_call": "tools"}[spec.kind]


def _rejection(spec: StructuredSpec, message: str) -> str:
    """The InputError text for a grammar llguidance refuses, naming where in the schema the refused keyword is."""
    lines = [line.strip() for line in message.strip().splitlines()] or ["rejected"]
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0])
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    first = f"{first} ({detail})" if detail else first
    names = quoted_names(first)
    if spec.kind == "json_schema" and names:
        where = locate(spec.schema(), names)
        if where:
            return f"json_schema at {where}: {first}"
    if spec.kind == "tool_call" and names:
        for name, params in spec.value:
            where = locate(_thaw(params), names)
            if where:
                return f"tools[{name}].parameters at {where or '/'}: {first}"
    return f"{_part(spec)}: {first}" if spec.kind != "grammar" else f"grammar: {' / '.join(lines)}"
