"""Tokenizer (`tokenizers`) and chat template (`jinja2`, rendered the way transformers renders it)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError


class Tokenizer:
    def __init__(self, tokenizer, chat_template: str | None = None, special: dict[str, str] | None = None,
                 source: str = "tokenizer.json"):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special = special or {}
        self.source = source

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{path}: not found (the model folder needs a tokenizer.json)")
        try:
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise CheckpointError(f"{path}: could not be read ({e})") from None
        template = None
        special: dict[str, str] = {}
        tpl_file = folder / "chat_template.jinja"
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
            t = cfg.get("chat_template")
            if isinstance(t, list):  # the multi-template form: [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if x.get("name") == "default"), None)
            template = t if isinstance(t, str) else None
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                v = cfg.get(key)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    special[key] = v
        if tpl_file.exists():
            template = tpl_file.read_text(encoding="utf-8")
        return cls(tok, template, special, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        if not self.chat_template:
            raise InputError(f"{self.source}: this model has no chat template (chat_template.jinja or "
                             "tokenizer_config.json), so --chat / messages cannot be used")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra) -> list[int]:
        # The template writes the BOS text itself, so the tokenizer must not add it again.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)

    def encode_chat_with_images(self, messages: list[dict[str, Any]], soft_tokens: list[int], *, image_token: str,
                                boi_token: str, eoi_token: str, add_generation_prompt: bool = True,
                                **extra) -> list[int]:
        """Like encode_chat for messages whose image parts are {"type": "image"}: the i-th image token that the
        template writes becomes boi + image_token x soft_tokens[i] + eoi, as transformers' Gemma4Processor lays it
        out. A template that writes a different number of image tokens than there are images is an InputError."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        pieces = text.split(image_token)
        if len(pieces) - 1 != len(soft_tokens):
            raise InputError(f"chat template: the prompt has {len(soft_tokens)} image(s) but the template placed "
                             f"{len(pieces) - 1} image token(s) {image_token!r} (more images than it allows, or an "
                             "image token typed in the text)")
        out = [pieces[0]]
        for n, rest in zip(soft_tokens, pieces[1:]):
            out += [boi_token, image_token * n, eoi_token, rest]
        return self.encode("".join(out), add_special_tokens=False)


_ENV = None


def _environment():
    global _ENV
    if _ENV is None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        # Same settings as transformers' chat-template renderer, so templates written for it render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         **kwargs: Any) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except TemplateError as e:
        raise InputError(f"chat template: {e}") from None
