"""The OpenAI request and response bodies that `dgemma serve` speaks, as pydantic models.

Requests are validated strictly (a string is not a number, `true` is not an integer) and unknown fields are ignored,
as OpenAI-compatible servers do (clients send `top_p`, `user`, ...). `null` means "not given" for every field. A body
that fails validation becomes ONE OpenAI-style error (`ApiError`, HTTP 400) whose `param` names the field.

dgemma's extras in a request: the sampler knobs (max_denoising_steps, entropy_bound, confidence_threshold,
stability_threshold, t_min, t_max), ignore_eos, dgemma_drafts (stream every denoising pass as `event: dgemma.draft`),
checker-driven sampling with the checkpoint task's checker (attempts, max_retries, stop_when_valid) and speed.
In a response's usage: tokens_per_forward, decoder_passes and canvases.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from ..config import SamplerSettings
from ..errors import DgemmaError

MAX_N = 16              # choices (n) and prompts per request
MAX_STOP = 16           # stop strings per request
MAX_ATTEMPTS = 64       # parallel attempts per choice (the shipped Sudoku model solves with 8 to 64)
MAX_RETRIES = 16
MIN_TEMPERATURE = 0.01  # temperature 0 is taken as this: the sampler has no exact greedy mode
SPEEDS = ("exact", "fast")


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


# ======================================================================================================================
# Requests
# ======================================================================================================================
def _field(what: str, **constraints: Any):
    """An optional field; `what` is how error messages describe a valid value."""
    return Field(None, description=what, **constraints)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: Optional[bool] = _field("a boolean")


IMAGE_PARTS = ("image_url", "image")


class ContentPart(_Body):
    type: str = Field(description="a content part type")
    text: Optional[str] = _field("a string")


class ChatMessage(_Body):
    role: str = Field(description="a string")
    content: Union[str, list[ContentPart], None] = _field("a string or a list of text parts")

    def plain(self, index: int) -> dict:
        """The message for the chat template: text parts joined into one string; other fields (name, tool_calls,
        tool_call_id) passed on as sent. A message with image parts keeps its parts (`image_parts`)."""
        content = self.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            for j, p in enumerate(content):
                if p.type not in ("text", *IMAGE_PARTS) or (p.type == "text" and p.text is None):
                    raise ApiError(400, f"messages[{index}].content[{j}]: a part is text or an image "
                                        f"(type {', '.join(repr(t) for t in ('text', *IMAGE_PARTS))})",
                                   param="messages")
            if self.image_parts():
                content = [p.model_dump(exclude_none=True) for p in content]
            else:
                content = "\n".join(p.text for p in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content}

    def image_parts(self) -> list[ContentPart]:
        return [p for p in self.content if p.type in IMAGE_PARTS] if isinstance(self.content, list) else []


class _Generation(_Body):
    """The fields chat and legacy completions share."""

    model: Optional[str] = _field("a string")
    max_tokens: Optional[int] = _field("a positive integer", ge=1)
    max_completion_tokens: Optional[int] = _field("a positive integer", ge=1)
    temperature: Optional[float] = _field("a number between 0 and 2", ge=0, le=2, allow_inf_nan=False)
    seed: Optional[int] = _field("an integer")
    n: Optional[int] = _field(f"an integer between 1 and {MAX_N}", ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = _field(f"a string or a list of at most {MAX_STOP} strings",
                                               max_length=MAX_STOP)
    stream: Optional[bool] = _field("a boolean")
    stream_options: Optional[StreamOptions] = _field("an object")
    logprobs: Union[bool, int, None] = _field("a boolean or an integer")
    tools: Optional[list[dict[str, Any]]] = _field("a list of tool objects")
    tool_choice: Union[str, dict[str, Any], None] = _field("a string or an object")
    response_format: Optional[dict[str, Any]] = _field("an object")
    # dgemma's sampler knobs
    max_denoising_steps: Optional[int] = _field("an integer >= 1", ge=1)
    entropy_bound: Optional[float] = _field("a number > 0", gt=0, allow_inf_nan=False)
    confidence_threshold: Optional[float] = _field("a number > 0", gt=0, allow_inf_nan=False)
    t_min: Optional[float] = _field("a number > 0", gt=0, allow_inf_nan=False)
    t_max: Optional[float] = _field("a number > 0", gt=0, allow_inf_nan=False)
    stability_threshold: Optional[int] = _field("an integer >= 0", ge=0)
    ignore_eos: Optional[bool] = _field("a boolean")
    dgemma_drafts: Optional[bool] = _field("a boolean")
    # checker-driven sampling (the checkpoint's task checker) and the speed policy
    attempts: Optional[int] = _field(f"an integer between 1 and {MAX_ATTEMPTS}", ge=1, le=MAX_ATTEMPTS)
    max_retries: Optional[int] = _field(f"an integer between 0 and {MAX_RETRIES}", ge=0, le=MAX_RETRIES)
    stop_when_valid: Optional[bool] = _field("a boolean")
    speed: Optional[Literal["exact", "fast"]] = _field("'exact' or 'fast'")

    # -- what the engine needs ---------------------------------------------------------------------------------------
    def settings(self, defaults: SamplerSettings) -> SamplerSettings:
        """The sampler settings: the model's defaults with this request's overrides. Temperature maps onto the
        schedule: t_max becomes `temperature` and t_min scales by the same ratio (0.8 -> 0.4 becomes T -> T/2);
        explicit t_min / t_max win."""
        over: dict[str, Any] = {"max_new_tokens": self.max_completion_tokens or self.max_tokens}
        if self.temperature is not None:
            t = max(self.temperature, MIN_TEMPERATURE)
            over["t_max"] = t
            over["t_min"] = defaults.t_min * t / defaults.t_max
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold", "max_denoising_steps",
                     "stability_threshold"):
            if getattr(self, name) is not None:
                over[name] = getattr(self, name)
        if self.ignore_eos:
            over["eos_token_ids"] = ()
        try:
            return defaults.updated(**over)
        except DgemmaError as e:
            raise ApiError(400, str(e)) from None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def wants_checker(self) -> bool:
        return (self.attempts or 1) > 1 or bool(self.max_retries) or bool(self.stop_when_valid)

    def check_supported(self) -> None:
        """What dgemma cannot do (yet) is refused by name rather than ignored."""
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported by dgemma serve", param="logprobs")
        if self.dgemma_drafts and not self.stream:
            raise ApiError(400, "'dgemma_drafts' needs 'stream': true", param="dgemma_drafts")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(description="a non-empty list of messages", min_length=1)


TokenIds = list[int]


class CompletionRequest(_Generation):
    prompt: Union[str, TokenIds, list[Union[str, TokenIds]]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists")

    def prompts(self) -> list[Union[str, TokenIds]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            items = [p]
        else:
            items = list(p)
        if not items or any(len(x) == 0 for x in items):
            raise ApiError(400, "'prompt' is empty", param="prompt")
        if len(items) > MAX_N:
            raise ApiError(400, f"at most {MAX_N} prompts per request", param="prompt")
        return items


def validation_error(errors: list[dict], model: type[BaseModel]) -> ApiError:
    """ONE clear message for pydantic's errors (a union field fails once per alternative): the first field that
    failed, what it must be, and what it got."""
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    loc = list(first.get("loc", ()))
    if not loc:
        return ApiError(400, "the request body must be a JSON object")
    name = str(loc[0])
    if kind == "missing" and len(loc) == 1:
        return ApiError(400, f"'{name}' is required", param=name)
    where, what = _describe(model, loc)
    got = first.get("input")
    shown = repr(got) if len(repr(got)) <= 60 else f"a {type(got).__name__}"
    if what is None:
        return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=name)
    if kind == "missing":
        return ApiError(400, f"{where} is required ({what})", param=name)
    return ApiError(400, f"{where} must be {what}, got {shown}", param=name)


def _describe(model: type[BaseModel], loc: list) -> tuple[str, str | None]:
    """Where a nested error sits ("messages[0].content") and the innermost field's description, walking the models
    along pydantic's location (its union-branch labels such as 'str' are skipped)."""
    where, what, current = str(loc[0]), None, model
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
            continue
        fields = current.model_fields if current is not None else {}
        if part not in fields:
            continue
        if part != loc[0]:
            where += f".{part}"
        what = fields[part].description
        current = _nested_model(fields[part].annotation)
    return (f"'{where}'" if where == loc[0] else where), what


def _nested_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside Optional[...], list[...] or a union, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def parse_request(model: type[_Generation], raw: bytes) -> _Generation:
    """The validated request from a raw JSON body, or ApiError(400)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False), model) from None


# ======================================================================================================================
# Responses
# ======================================================================================================================
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # dgemma's extras (GenerationStats' definitions, over all choices of the request)
    tokens_per_forward: float = 0.0
    decoder_passes: int = 0
    canvases: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    @model_serializer
    def _present_only(self) -> dict:  # OpenAI's deltas carry only what changed ({} with the finish reason)
        return {k: v for k, v in (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
                if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Optional[str] = None
    logprobs: None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str = ""
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Optional[Usage] = None


class DraftPayload(BaseModel):
    """`event: dgemma.draft`: the argmax canvas of one choice after one denoising pass."""

    id: str
    index: int
    block: int
    step: int
    max_steps: int
    token_ids: list[int]
    accepted: list[bool]
    pieces: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dgemma"
    max_model_len: int
    canvas_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    object: Literal["error"] = "error"
