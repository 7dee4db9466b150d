"""The public Python API: `dgemma.load(path, backend=...)` and the `Model` it returns."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend, backend_class
from .checkpoint import Checkpoint
from .config import ModelConfig, SamplerSettings
from .errors import InputError
from .engine import CanvasEvent, Engine, FailedEvent, Request, RequestResult, attempt_seed
from .tasks import check_prompt as check_task_prompt
from .vision import ImagePrompt, ModelImages, has_images

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int          # up to (not including) eos, within max_new_tokens
    canvases: int
    decoder_passes: int
    steps_per_canvas: list[int]
    tokens_per_forward: float      # non-pad generated tokens / decoder passes, as the reference defines it
    finish_reason: str             # "eos" or "length"
    seconds: float
    retries: int = 0               # constraint-driven re-denoising rounds (checker / max_retries)
    attempts: int = 1              # parallel attempts at this request (each pass denoised that many canvases)
    chosen: bool = True            # with `groups`: whether this row's canvas is the one its group kept
    cached_tokens: int = 0         # prompt tokens reused from a prompt cache (the server's)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    raw_token_ids: list[int] = field(repr=False, default_factory=list)  # every canvas, pads included


@dataclass
class CanvasChunk:
    """One committed canvas of a streamed generation."""

    index: int
    text: str                 # the text this canvas adds
    token_ids: list[int]      # the tokens this canvas adds (eos and pads removed)
    steps: int
    finished: bool


class Logits:
    """Float32 logits [B, C, V] that stay on the backend's device; `numpy.asarray(logits)` copies them to the host."""

    def __init__(self, native):
        self.native = native

    @property
    def shape(self):
        return tuple(self.native.shape)

    def __array__(self, dtype=None, copy=None):
        x = self.native
        if hasattr(x, "detach"):  # torch, possibly on a GPU
            x = x.detach().float().cpu().numpy()
        a = np.asarray(x)
        return a.astype(dtype) if dtype is not None else a


def _native(x):
    return x.native if isinstance(x, Logits) else x


class Model:
    """A loaded DiffusionGemma checkpoint on one backend."""

    def __init__(self, backend: Backend, checkpoint: Checkpoint, tokenizer=None):
        self.backend = backend
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = tokenizer
        self.sampler_defaults: SamplerSettings = checkpoint.sampler_defaults

    # -- low-level interface (public) ---------------------------------------------------------------------------
    def prefill(self, token_ids, attention_mask=None):
        """Encode prompts ([T] or left-padded [B, T] token ids) into a new state (the KV cache)."""
        return self.backend.prefill(token_ids, attention_mask)

    def denoise(self, state, canvas_ids, self_conditioning_logits=None) -> Logits:
        """One decoder pass over the canvas; float32 logits for every canvas position."""
        return Logits(self.backend.denoise(state, canvas_ids, _native(self_conditioning_logits)))

    def commit(self, state, canvas_ids) -> None:
        """Append a finished canvas to the state through the encoder."""
        self.backend.commit(state, canvas_ids)

    # -- prompts ----------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        check_task_prompt(self.checkpoint, prompt)  # a task model refuses what is not its task (text to Sudoku)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("the prompt is empty")
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer: pass token ids")
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        seq = list(prompt)
        if not seq:
            raise InputError("the prompt is empty")
        if all(isinstance(m, dict) for m in seq):
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer: pass token ids")
            return self._images().encode(seq).token_ids if has_images(seq) else self.tokenizer.encode_chat(seq)
        if all(isinstance(t, (int, np.integer)) for t in seq):
            return [int(t) for t in seq]
        raise InputError("a prompt is a string, a list of chat messages, or a list of token ids")

    def _images(self) -> ModelImages:
        if getattr(self, "_model_images", None) is None:
            self._model_images = ModelImages(self.checkpoint, self.tokenizer)
        return self._model_images

    def _encode_images(self, prompt: Prompt, chat: bool | None) -> ImagePrompt:
        """A prompt's token ids and, for chat messages with image parts, its preprocessed images (in order)."""
        if has_images(prompt):
            return self._images().encode(list(prompt))
        return ImagePrompt(self.encode_prompt(prompt, chat), [])

    def encode_with_images(self, prompt: Prompt, chat: bool | None = None) -> tuple[list[int], dict]:
        """A prompt's token ids and the engine Request fields its images need ({"input_embeds", "image_blocks"};
        {} without images): Request(ids, settings, **fields). Image errors are InputErrors naming the image."""
        encoded = self._encode_images(prompt, chat)
        if not encoded.images:
            return encoded.token_ids, {}
        return encoded.token_ids, self._images().request_inputs(self.backend, [encoded])[0]

    def settings(self, **overrides: Any) -> SamplerSettings:
        return self.sampler_defaults.updated(**overrides)

    # -- generation -------------------------------------------------------------------------------------------------
    def engine(self, **options) -> Engine:
        """A batch engine over this model (Engine(max_batch=, batching=, prompt_cache=)); the server keeps one."""
        return Engine(self.backend, **options)

    def generate(self, prompt: Prompt, *, seed: int | None = None, chat: bool | None = None, noise=None,
                 checker=None, max_retries: int = 0, attempts: int = 1, stop_when_valid: bool = False,
                 renoise: bool = True, on_step=None, on_canvas=None, response_format=None, regex: str | None = None,
                 choices: Sequence[str] | None = None, grammar: str | None = None, speed: str = "exact", fast=None,
                 **sampler: Any) -> Generation:
        """Generate for one prompt (text, chat messages or token ids). Sampler overrides: max_new_tokens,
        max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold,
        eos_token_ids, pad_token_id. `checker(row, canvas_tokens) -> bool mask` turns on constraint-aware sampling
        (violating tokens are re-noised; a finished canvas that still violates is re-denoised up to `max_retries`
        times); `on_step(block, step, argmax, accepted)` sees every denoising pass (device arrays [attempts, C]).
        `attempts=K` denoises K canvases of the prompt side by side, each with its own noise, in one batch; the
        first that passes the checker is kept (else the one the checker flags least). `stop_when_valid` ends a canvas
        as soon as it passes the checker (for a checker that verifies a whole answer). `renoise=False` keeps the
        checker off the canvas while it is denoised (it then only judges finished canvases). `on_canvas(chunk)` sees
        each committed canvas as a CanvasChunk (what `stream` yields). Structured output (one of):
        `response_format` (a JSON Schema dict or text, a pydantic model class, OpenAI's {"type": "json_object"} /
        {"type": "json_schema", ...}, or a dgemma.structured.StructuredSpec), `regex`, `choices` (a list of strings)
        or `grammar` (Lark or GBNF): every canvas is kept a valid continuation and the text ends where the grammar
        accepts (see dgemma.structured)."""
        return self.generate_batch([prompt], seeds=None if seed is None else [seed], chat=chat,
                                   noises=None if noise is None else [noise], checker=checker,
                                   max_retries=max_retries, attempts=attempts, stop_when_valid=stop_when_valid,
                                   renoise=renoise, on_step=on_step, on_canvas=on_canvas,
                                   response_format=response_format, regex=regex, choices=choices, grammar=grammar,
                                   speed=speed, fast=fast, **sampler)[0]

    def generate_batch(self, prompts: Sequence[Prompt], *, seeds: Sequence[int] | None = None,
                       chat: bool | None = None, noises=None, checker=None, max_retries: int = 0, attempts: int = 1,
                       stop_when_valid: bool = False, renoise: bool = True, groups: Sequence[int] | None = None,
                       on_step=None, on_canvas=None, response_format=None, regex: str | None = None,
                       choices: Sequence[str] | None = None, grammar: str | None = None, speed: str = "exact",
                       fast=None, **sampler: Any) -> list[Generation]:
        """Generate for several prompts in one batch (left-padded); each row has its own seed. `checker`,
        `max_retries`, `attempts` and `stop_when_valid` as in `generate` (the checker's row is the prompt's index).
        `groups` (one id per prompt, instead of `attempts`) makes prompts with the same id parallel attempts at one
        request that may be encoded differently (Sudoku's symmetric views); every prompt gets its Generation, and
        `stats.chosen` marks the one its group kept. Structured output (`response_format`, `regex`, `choices`,
        `grammar`) as in `generate`, each prompt with its own grammar state."""
        requests, order = self._requests(prompts, seeds, chat, noises, sampler, attempts, groups, checker=checker,
                                         max_retries=max_retries, stop_when_valid=stop_when_valid, renoise=renoise,
                                         on_step=on_step, speed=speed, fast=fast,
                                         structured=dict(response_format=response_format, regex=regex,
                                                         choices=choices, grammar=grammar))
        engine = Engine(self.backend)
        handles = engine.submit_group(requests)
        chunks = {h.id: _Chunker(self.tokenizer, requests[0].settings) for h in handles}
        for ev in engine.run(handles):
            if on_canvas is not None and isinstance(ev, CanvasEvent):
                on_canvas(chunks[ev.handle.id].add(ev))
        _raise_failure(handles)
        results = [None] * sum(len(m) for m in order)
        for handle, members in zip(handles, order):
            res = handle.result
            for i, r in zip(members, res.views if res.views else [res]):
                results[i] = r
        _pad_to_batch(results, self.config.canvas_length, requests[0].settings.pad_token_id)
        return [self._generation(r) for r in results]

    def stream(self, prompt: Prompt, *, seed: int | None = None, chat: bool | None = None, noise=None,
               checker=None, max_retries: int = 0, attempts: int = 1, stop_when_valid: bool = False,
               renoise: bool = True, on_step=None, response_format=None, regex: str | None = None,
               choices: Sequence[str] | None = None, grammar: str | None = None, speed: str = "exact", fast=None,
               **sampler: Any) -> Iterator[CanvasChunk]:
        """Yield each committed canvas of one prompt's generation as it is finished (structured output as in
        `generate`: every chunk is a valid continuation of the text before it)."""
        requests, _ = self._requests([prompt], None if seed is None else [seed], chat,
                                     None if noise is None else [noise], sampler, attempts, None, checker=checker,
                                     max_retries=max_retries, stop_when_valid=stop_when_valid, renoise=renoise,
                                     on_step=on_step, speed=speed, fast=fast,
                                     structured=dict(response_format=response_format, regex=regex,
                                                     choices=choices, grammar=grammar))
        engine = Engine(self.backend)
        handle = engine.submit(requests[0])
        chunker = _Chunker(self.tokenizer, requests[0].settings)
        for ev in engine.run([handle]):
            if isinstance(ev, FailedEvent):
                raise ev.error
            if isinstance(ev, CanvasEvent):
                yield chunker.add(ev)

    def _requests(self, prompts, seeds, chat, noises, sampler, attempts, groups, **options):
        """The engine requests of one call, and which prompts each one answers."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InputError("prompts must be a list")
        if not isinstance(attempts, int) or attempts < 1:
            raise InputError(f"attempts must be a whole number >= 1 (got {attempts!r})")
        if groups is not None and attempts != 1:
            raise InputError("give either attempts or groups, not both")
        settings = self.settings(**sampler)
        grammar = self._grammar(options.pop("structured", None), settings)
        encoded = [self._encode_images(p, chat) for p in prompts]
        ids = [e.token_ids for e in encoded]
        images = self._images().request_inputs(self.backend, encoded) if any(e.images for e in encoded) else None
        if images is not None and groups is not None:
            raise InputError("groups (parallel views) do not take images")
        if seeds is not None and len(seeds) != len(ids):
            raise InputError(f"{len(seeds)} seeds for {len(ids)} prompts")
        if noises is not None and attempts > 1:
            raise InputError("give seeds, not noise sources, with attempts > 1 (each attempt draws its own noise)")
        if groups is not None and len(groups) != len(ids):
            raise InputError(f"{len(groups)} group ids for {len(ids)} prompts")
        if groups is not None and options.get("checker") is None:
            raise InputError("parallel attempts and stop_when_valid need a checker to tell a right canvas")
        seeds = list(seeds) if seeds is not None else [secrets.randbits(63) for _ in ids]
        if groups is None:
            reqs = [Request(p, settings, seed=seeds[i], noise=None if noises is None else noises[i],
                            attempts=attempts, checker_rows=[i] * attempts, constraint=_new_row(grammar),
                            **(images[i] if images is not None else {}), **options)
                    for i, p in enumerate(ids)]
            return reqs, [[i] for i in range(len(ids))]
        members: dict = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        reqs = []
        for g, idx in members.items():
            rows_noise = [noises[i] if noises is not None else self.backend.row_noise(attempt_seed(seeds[i], 0))
                          for i in idx]
            reqs.append(Request(ids[idx[0]], settings, noise=rows_noise, views=[ids[i] for i in idx],
                                checker_rows=idx, constraint=_new_row(grammar), **options))
        return reqs, list(members.values())

    def _grammar(self, structured: dict | None, settings: SamplerSettings):
        """The compiled grammar of generate(response_format=, regex=, choices=, grammar=), or None."""
        if not structured or all(v is None for v in structured.values()):
            return None
        from .structured import compile as compile_grammar
        from .structured import spec_from_arguments

        spec = spec_from_arguments(**structured)
        if spec is None:
            return None
        if self.tokenizer is None:
            raise InputError("structured output needs the model's tokenizer (tokenizer.json)")
        return compile_grammar(spec, self.tokenizer, self.config.vocab_size, settings.eos_token_ids)

    def _generation(self, r: RequestResult) -> Generation:
        stats = GenerationStats(
            prompt_tokens=r.prompt_tokens, generated_tokens=len(r.token_ids), canvases=len(r.steps_per_canvas),
            decoder_passes=r.decoder_passes, steps_per_canvas=r.steps_per_canvas,
            tokens_per_forward=r.tokens_per_forward, finish_reason=r.finish_reason, seconds=r.seconds,
            retries=r.retries, attempts=r.attempts, chosen=r.chosen, cached_tokens=r.cached_tokens)
        text = self.tokenizer.decode(r.token_ids) if self.tokenizer is not None else ""
        return Generation(text, r.token_ids, stats, r.raw_token_ids)


class _Chunker:
    """Turns a request's committed canvases into CanvasChunks: the tokens and the text each one adds."""

    def __init__(self, tokenizer, settings: SamplerSettings):
        self.tokenizer, self.settings = tokenizer, settings
        self.raw: list[int] = []
        self.produced, self.text = 0, ""

    def add(self, ev: CanvasEvent) -> CanvasChunk:
        s = self.settings
        self.raw.extend(int(t) for t in ev.tokens)
        toks = _visible(ev.tokens.tolist(), s)[: max(0, s.max_new_tokens - self.produced)]
        self.produced += len(toks)
        piece = ""
        if self.tokenizer is not None:
            full = self.tokenizer.decode(_visible(self.raw, s)[: s.max_new_tokens])
            piece, self.text = full[len(self.text):], full
        return CanvasChunk(ev.block, piece, toks, ev.steps, ev.finished)


def _pad_to_batch(results: list[RequestResult], canvas: int, pad_id) -> None:
    """Raw tokens as the reference returns a batch: a row that finished early carries pad canvases until the last
    row's end."""
    if pad_id is None:
        return
    longest = max(len(r.raw_token_ids) for r in results)
    for r in results:
        r.raw_token_ids = r.raw_token_ids + [pad_id] * (longest - len(r.raw_token_ids))


def _new_row(grammar):
    """A request's own grammar state (one per request: rows of its attempts share it, as only one is committed)."""
    return None if grammar is None else grammar.new_row()


def _raise_failure(handles) -> None:
    for h in handles:
        if h.error is not None:
            raise h.error


def _visible(tokens: list[int], settings: SamplerSettings) -> list[int]:
    """Generated tokens up to the first eos (exclusive), without pads."""
    eos = set(settings.eos_token_ids)
    out = []
    for t in tokens:
        if t in eos:
            break
        if settings.pad_token_id is not None and t == settings.pad_token_id:
            continue
        out.append(t)
    return out


def load(path: str | os.PathLike | Checkpoint | None = None, backend: str = "cuda", *, dtype: str | None = None,
         device: str | None = None, progress: bool = False) -> Model:
    """Load a DiffusionGemma checkpoint (local folder, hub id or an opened Checkpoint; None = the model shipped with
    dgemma) on a backend ("cuda" = PyTorch, also on CPU; "mlx" = Apple MLX)."""
    if path is None:
        from .assets import default_model_path

        path = default_model_path()
    cls = backend_class(backend)
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
    be = cls(ckpt, dtype=dtype, device=device, progress=progress)
    tok = ckpt.tokenizer() if (ckpt.path / "tokenizer.json").exists() else None
    return Model(be, ckpt, tok)
