"""dgemma serve: the OpenAI-compatible server on the one batch engine, and the live canvas view.

Servers run in-process on a free loopback port (uvicorn in a thread) over the real `dgemma.engine.Engine` and are
driven with the official `openai` client (and raw HTTP where a test needs the bytes). Answers of `--batching exact`
are compared with the library's solo `Model.generate` runs for the same seed. Two models: a tiny random text
checkpoint, and the shipped Sudoku model (its task has a checker, so attempts / retries / stop_when_valid apply).
Every wait is bounded in time.
"""

from __future__ import annotations

import io
import json
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("torch")

import dgemma  # noqa: E402
from dgemma.random_model import write_random_checkpoint  # noqa: E402
from dgemma.serve import ServerThread, vllm_command  # noqa: E402
from dgemma.serve import schema  # noqa: E402

NAME = "dgemma-test"
STEPS = 6  # denoising steps per canvas in most requests: keeps the suite fast
WAIT = 60.0  # seconds any single wait may take


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("srv") / "model")


@pytest.fixture(scope="module")
def model(ckpt):
    return dgemma.load(ckpt, backend="cuda")


@pytest.fixture(scope="module")
def exact_server(model):
    with ServerThread(model, model_name=NAME, max_batch=32, batching="exact") as srv:
        yield srv


@pytest.fixture(scope="module")
def merged_server(model):
    with ServerThread(model, model_name=NAME, max_batch=16, batching="merged") as srv:
        yield srv


@pytest.fixture(scope="module")
def sudoku_model():
    from dgemma.assets import default_model_path

    return dgemma.load(default_model_path(), backend="cuda")


@pytest.fixture(scope="module")
def sudoku_server(sudoku_model):
    with ServerThread(sudoku_model, model_name="sudoku", max_batch=32, batching="exact") as srv:
        yield srv


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT, **kw)


def health(srv) -> dict:
    return httpx.get(srv.url + "/health", timeout=WAIT).json()


def wait_until(pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def idle(srv) -> bool:
    h = health(srv)
    return h["active"] == 0 and h["waiting"] == 0 and h["engine"]["rows"] == 0 and h["engine"]["requests"] == 0


def reference(model, prompt, seed, max_tokens, steps=STEPS, **kw):
    return model.generate(prompt, seed=seed, max_new_tokens=max_tokens, max_denoising_steps=steps, **kw)


def side_by_side(model, prompt, seeds, max_tokens, steps=STEPS) -> list[str]:
    """The texts of one prompt denoised with several seeds in one batch, as the exact-batching server runs n choices."""
    from dgemma.engine import Engine, Request

    engine = Engine(model.backend, batching="exact")
    settings = model.settings(max_new_tokens=max_tokens, max_denoising_steps=steps)
    handles = engine.submit_group([Request(list(prompt), settings, seed=s) for s in seeds])
    while engine.busy:
        engine.step()
    return [model.tokenizer.decode(h.result.token_ids) for h in handles]


def finish(ref) -> str:
    return "stop" if ref.stats.finish_reason == "eos" else "length"


# -- the request schema (no server) ---------------------------------------------------------------------------------
def test_schema_maps_temperature_and_sampler_fields(model):
    d = model.sampler_defaults

    def settings(**body):
        return schema.CompletionRequest.model_validate({"model": NAME, "prompt": "x", **body}).settings(d)

    s = settings(temperature=0.4)
    assert (s.t_max, s.t_min) == pytest.approx((0.4, d.t_min * 0.4 / d.t_max))
    s = settings(temperature=0)
    assert s.t_max == pytest.approx(0.01) and 0 < s.t_min < s.t_max
    s = settings(temperature=1.0, t_min=0.3)
    assert (s.t_max, s.t_min) == pytest.approx((1.0, 0.3))
    s = settings(max_tokens=7, entropy_bound=0.5, confidence_threshold=0.1, ignore_eos=True)
    assert (s.max_new_tokens, s.entropy_bound, s.confidence_threshold, s.eos_token_ids) == (7, 0.5, 0.1, ())
    assert settings(max_tokens=7, max_completion_tokens=9).max_new_tokens == 9
    with pytest.raises(schema.ApiError) as e:
        settings(t_min=0.9, t_max=0.5)
    assert e.value.status == 400 and "t_min" in e.value.message


def test_schema_errors_name_the_field():
    def error(body) -> schema.ApiError:
        with pytest.raises(schema.ApiError) as e:
            schema.parse_request(schema.ChatCompletionRequest, body if isinstance(body, bytes) else json.dumps(
                {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **body}).encode())
        return e.value

    e = error({"stop": 5})  # a union: one message, not one per alternative
    assert (e.status, e.param) == (400, "stop") and e.message == \
        "'stop' must be a string or a list of at most 16 strings, got 5"
    assert error({"seed": True}).message == "'seed' must be an integer, got True"
    assert error({"temperature": "hot"}).param == "temperature"
    e = error({"messages": [{"role": "user", "content": 7}]})
    assert e.param == "messages" and e.message.startswith("messages[0].content must be")
    assert error({"speed": "slow"}).message == "'speed' must be 'exact' or 'fast', got 'slow'"
    assert error({"attempts": 0}).param == "attempts"
    assert error(b"{oops").message.startswith("the request body is not valid JSON")
    assert error(b"[1]").message == "the request body must be a JSON object"
    assert error(b'{"model": "m"}').message == "'messages' is required"
    # unknown fields are ignored, as OpenAI-compatible servers do; null means "not given"
    r = schema.parse_request(schema.CompletionRequest, b'{"model": "m", "prompt": [1, 2], "top_p": 0.5, "seed": null}')
    assert r.prompts() == [[1, 2]] and r.seed is None


def test_server_speed_is_the_default_for_requests_without_one(model):
    from dgemma.serve.app import Service

    svc = Service(model, worker=None, name=NAME, speed="fast")

    def speed(**body):
        req = schema.CompletionRequest.model_validate({"model": NAME, "prompt": "x", **body})
        return svc._speed(req, svc.structured(req))

    assert speed() == {"speed": "fast"} and speed(speed="exact") == {"speed": "exact"}
    assert speed(response_format={"type": "json_object"}) == {}  # structured output runs exact


# -- basics ---------------------------------------------------------------------------------------------------------
def test_models_and_chat_match_library(model, exact_server):
    c = client(exact_server)
    assert [m.id for m in c.models.list().data] == [NAME]
    msgs = [{"role": "user", "content": "Say something."}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, seed=3,
                                  extra_body={"max_denoising_steps": STEPS})
    ref = reference(model, msgs, 3, 40)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == finish(ref)
    assert r.usage.completion_tokens == ref.stats.generated_tokens
    assert r.usage.prompt_tokens == ref.stats.prompt_tokens
    extra = r.usage.model_extra
    assert extra["tokens_per_forward"] == pytest.approx(ref.stats.tokens_per_forward)
    assert extra["decoder_passes"] == ref.stats.decoder_passes
    assert extra["canvases"] == ref.stats.canvases
    # another seed gives another answer (the seed reaches the sampler)
    other = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, seed=4,
                                      extra_body={"max_denoising_steps": STEPS})
    assert other.choices[0].message.content != r.choices[0].message.content


@pytest.mark.slow
def test_streaming_equals_non_streaming(model, exact_server):
    c = client(exact_server)
    msgs = [{"role": "user", "content": "Stream please."}]
    kw = dict(model=NAME, messages=msgs, max_tokens=70, seed=11, extra_body={"max_denoising_steps": STEPS})
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.model_extra["tokens_per_forward"] == pytest.approx(
        full.usage.model_extra["tokens_per_forward"])
    # 70 tokens = 3 canvases of 32: the text arrives in more than one piece
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2

    # legacy completions, token-id prompt, streaming and not; n choices use seed + i, denoised side by side. They
    # are compared with the same pair through the engine: the experts group a batch's tokens, so on a CPU whose GEMM
    # rounds a row differently at another batch size a random model's row alone can differ from it in a pair.
    prompt_ids = model.encode_prompt("Complete this")
    ref = reference(model, prompt_ids, 5, 50)
    r = c.completions.create(model=NAME, prompt=prompt_ids, max_tokens=50, seed=5, n=2,
                             extra_body={"max_denoising_steps": STEPS})
    assert [ch.text for ch in r.choices] == side_by_side(model, prompt_ids, [5, 6], 50)
    s = c.completions.create(model=NAME, prompt=prompt_ids, max_tokens=50, seed=5, stream=True,
                             extra_body={"max_denoising_steps": STEPS})
    assert "".join(ch.choices[0].text for ch in s) == ref.text


def test_stop_strings(model, exact_server):
    c = client(exact_server)
    kw = dict(model=NAME, prompt="stop test", max_tokens=64, seed=21, extra_body={"max_denoising_steps": STEPS})
    base = c.completions.create(**kw).choices[0].text
    stop = next(base[i:i + 2] for i in range(5, len(base) - 2) if "\ufffd" not in base[i:i + 2])
    cut = base[:base.find(stop)]
    r = c.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens <= 64
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stop=stop, stream=True, **kw))
    assert streamed == cut
    wait_until(lambda: idle(exact_server), "the stopped requests' rows to leave the engine")


# -- many clients at once --------------------------------------------------------------------------------------------
def _sudoku_jobs():
    """32 clients: 13 distinct requests (puzzle, seed, checker or not), each sent by two clients in different ways
    (plain and streaming, plain and with draft events, checker through both), and 6 clients that hang up."""
    from dgemma.sudoku_task import held_out_puzzles

    pairs = [("plain", "stream"), ("plain", "drafts"), ("checker", "checker-stream")]
    puzzles = [p for p, _ in held_out_puzzles("medium", 19)]
    jobs = []
    for i in range(13):
        for kind in pairs[i % len(pairs)]:
            jobs.append(dict(kind=kind, prompt=puzzles[i], seed=500 + 3 * i, base=i))
    jobs += [dict(kind="disconnect", prompt=puzzles[13 + i], seed=900 + i, base=None) for i in range(6)]
    order = np.random.default_rng(0).permutation(len(jobs))  # the kinds arrive interleaved
    return [jobs[i] for i in order]


CHECKER = {"attempts": 4, "max_retries": 1, "stop_when_valid": True}
SUDOKU_STEPS = 8  # the shipped model solves most medium boards in fewer; a cap keeps the slow ones short
LONG = 82 * 10  # a disconnecting client asks for ten canvases and hangs up after the first


def _sudoku_reference(model, job):
    from dgemma.sudoku_task import make_checker

    kw = dict(seed=job["seed"], max_denoising_steps=SUDOKU_STEPS)
    if job["kind"].startswith("checker"):
        return model.generate(job["prompt"], checker=make_checker([job["prompt"]]), **CHECKER, **kw)
    return model.generate(job["prompt"], **kw)


def _sse_events(resp):
    """(event name or None, data) per SSE event of a streamed response."""
    kind = None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, line[6:]
            kind = None


def _sudoku_call(srv, job, barrier):
    body = {"model": "sudoku", "prompt": job["prompt"], "seed": job["seed"], "max_denoising_steps": SUDOKU_STEPS}
    kind = job["kind"]
    if kind.startswith("checker"):
        body.update(CHECKER)
    if kind in ("stream", "drafts", "disconnect", "checker-stream"):
        body.update(stream=True, stream_options={"include_usage": True})
    if kind == "drafts":
        body["dgemma_drafts"] = True
    if kind == "disconnect":  # every canvas runs all its steps: the stream is still going when the client leaves
        body.update(max_tokens=LONG, ignore_eos=True, stability_threshold=10 ** 6, max_denoising_steps=4)
    barrier.wait()
    with httpx.Client(timeout=WAIT) as h:
        if not body.get("stream"):
            r = h.post(srv.url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            return {"id": data["id"], "text": data["choices"][0]["text"], "usage": data["usage"], "drafts": 0}
        out = {"text": "", "drafts": 0, "usage": None, "id": None}
        with h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for event, data in _sse_events(resp):
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if event == "dgemma.draft":
                    out["drafts"] += 1
                    continue
                out["id"] = obj["id"]
                if obj.get("usage"):
                    out["usage"] = obj["usage"]
                for ch in obj["choices"]:
                    out["text"] += ch["text"]
                if kind == "disconnect" and out["text"]:
                    return out  # hang up mid-stream
        return out


@pytest.mark.slow  # 13 solo references and 32 clients: several seconds
def test_32_mixed_clients_nothing_lost_and_exact(sudoku_model, sudoku_server):
    """32 clients at once on the Sudoku model: plain, streaming, checker + parallel attempts, draft streams and
    clients that hang up mid-stream. Every finished answer equals the request run alone through `Model.generate`
    (same seed, same checker), none is lost, duplicated or swapped, the requests really shared the engine, and
    every row is freed at the end."""
    jobs = _sudoku_jobs()
    assert len(jobs) == 32
    solo = {j["base"]: _sudoku_reference(sudoku_model, j) for j in jobs if j["base"] is not None}
    refs = [None if j["base"] is None else solo[j["base"]] for j in jobs]
    assert len({r.text for r in solo.values()}) >= 10  # mostly distinct answers: a swap would be visible
    before = health(sudoku_server)
    barrier = threading.Barrier(len(jobs), timeout=WAIT)
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _sudoku_call(sudoku_server, j, barrier), jobs, timeout=3 * WAIT))
    for j, ref, r in zip(jobs, refs, results):
        if ref is None:
            assert r["text"]  # the first canvas arrived before the client left
            continue
        assert r["text"] == ref.text, j
        assert r["usage"]["completion_tokens"] == ref.stats.generated_tokens, j
        assert r["usage"]["decoder_passes"] == ref.stats.decoder_passes, j
        if j["kind"] == "drafts":  # one draft event per denoising pass
            assert r["drafts"] == ref.stats.decoder_passes
    assert len({r["id"] for r in results}) == len(results)
    assert sum(r.stats.attempts > 1 for r in solo.values()) >= 4
    wait_until(lambda: idle(sudoku_server), "every row to be freed")
    after = health(sudoku_server)
    disconnects = sum(j["kind"] == "disconnect" for j in jobs)
    assert after["completed"] - before["completed"] == len(jobs) - disconnects
    assert after["cancelled"] - before["cancelled"] == disconnects
    assert after["failed"] == before["failed"]
    assert after["max_active_seen"] >= 8  # they were denoised side by side, not one after another


def test_checker_fields_need_a_task_with_a_checker(exact_server):
    c = client(exact_server)
    for field, value in (("attempts", 2), ("max_retries", 1), ("stop_when_valid", True)):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=NAME, prompt="x", max_tokens=8, extra_body={field: value})
        assert e.value.param == field and "checker" in e.value.message


def _jobs(n):
    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "a much longer prompt " * 4, "x", "hello there"]
    return [dict(prompt=words[i % len(words)] + f" #{i}", seed=1000 + 7 * i, max_tokens=(20, 40, 64, 90)[i % 4])
            for i in range(n)]


@pytest.mark.slow
def test_merged_server_batches_and_serves_everyone(model, merged_server):
    jobs = _jobs(16)
    c = client(merged_server)
    before = health(merged_server)
    barrier = threading.Barrier(len(jobs), timeout=WAIT)

    def call(j):
        barrier.wait()
        return c.completions.create(model=NAME, prompt=j["prompt"], max_tokens=j["max_tokens"], seed=j["seed"],
                                    extra_body={"max_denoising_steps": STEPS, "ignore_eos": True})

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs, timeout=3 * WAIT))
    after = health(merged_server)
    assert after["completed"] - before["completed"] == len(jobs)
    rows = after["rows_denoised"] - before["rows_denoised"]
    passes = after["decoder_passes"] - before["decoder_passes"]
    assert rows / passes > 4  # many requests per decoder pass
    for j, r in zip(jobs, results):
        # ignore_eos: the canvases hold exactly max_tokens tokens; usage counts the visible ones, and a pad token the
        # random model happens to emit is not visible (merged passes differ from solo ones by float rounding, so
        # which rows draw a pad depends on how the requests were merged)
        assert j["max_tokens"] - 3 <= r.usage.completion_tokens <= j["max_tokens"]
        canvases = -(-j["max_tokens"] // model.config.canvas_length)
        assert r.usage.model_extra["decoder_passes"] == canvases * STEPS  # a random model never stops early
    # alone on the merged server, a request is exactly the library's solo run
    j = jobs[3]
    solo = c.completions.create(model=NAME, prompt=j["prompt"], max_tokens=j["max_tokens"], seed=j["seed"],
                                extra_body={"max_denoising_steps": STEPS})
    assert solo.choices[0].text == reference(model, j["prompt"], j["seed"], j["max_tokens"]).text


def test_adaptive_stopping_is_per_request(model, exact_server):
    """A confident request (tiny temperature, stopping on confidence alone) stops its canvases early while a batch
    neighbour runs all its steps; each matches its solo run."""
    c = client(exact_server)
    easy = dict(temperature=0.0, extra_body={"max_denoising_steps": 12, "confidence_threshold": 1.0,
                                             "stability_threshold": 0})
    hard = dict(extra_body={"max_denoising_steps": 12})
    with ThreadPoolExecutor(2) as pool:
        fe = pool.submit(c.completions.create, model=NAME, prompt="easy", max_tokens=64, seed=1, **easy)
        fh = pool.submit(c.completions.create, model=NAME, prompt="hard one", max_tokens=64, seed=2, **hard)
        re_, rh = fe.result(WAIT), fh.result(WAIT)
    ref_e = model.generate("easy", seed=1, max_new_tokens=64, max_denoising_steps=12, confidence_threshold=1.0,
                           stability_threshold=0, t_max=0.01, t_min=0.005)
    assert re_.choices[0].text == ref_e.text
    assert re_.usage.model_extra["decoder_passes"] == ref_e.stats.decoder_passes < 24
    assert rh.usage.model_extra["decoder_passes"] == 24


# -- structured output -----------------------------------------------------------------------------------------------
def test_response_format_json_schema(model, exact_server):
    """OpenAI's response_format reaches the engine's grammar constraint: the reply parses and validates, and equals
    the library's solo run with the same response_format."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    shape = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
             "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": shape, "strict": True}}
    msgs = [{"role": "user", "content": "json please"}]
    r = client(exact_server).chat.completions.create(model=NAME, messages=msgs, max_tokens=64, seed=1,
                                                     response_format=fmt, extra_body={"max_denoising_steps": 4})
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), shape)
    assert r.choices[0].finish_reason == "stop"
    assert text == reference(model, msgs, 1, 64, steps=4, response_format=fmt).text


# -- images ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # builds a random vision checkpoint through transformers
def test_image_parts_as_data_urls(tmp_path_factory):
    """A chat message with an OpenAI image_url part (a data: URL) reaches the vision tower: the answer equals the
    library's solo run on the same messages; a URL the server would have to fetch is refused."""
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    import base64

    from PIL import Image
    from test_vision import _write_processor_config, make_vision_checkpoint

    path = make_vision_checkpoint(tmp_path_factory.mktemp("srv-vision") / "vision")
    _write_processor_config(path)
    vision = dgemma.load(path, backend="cuda", dtype="float32")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what is this?"}]}]
    kw = dict(max_tokens=32, seed=5, extra_body={"max_denoising_steps": 4})
    with ServerThread(vision, model_name=NAME, batching="exact") as srv:
        c = client(srv)
        r = c.chat.completions.create(model=NAME, messages=msgs, **kw)
        ref = vision.generate(msgs, seed=5, max_new_tokens=32, max_denoising_steps=4)
        assert r.choices[0].message.content == ref.text
        assert r.usage.prompt_tokens == ref.stats.prompt_tokens > 20  # the image's soft tokens are in the prompt
        for source in ("https://example.com/cat.png", "/etc/passwd"):
            bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": source}}]}]
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=NAME, messages=bad, **kw)
            assert e.value.param == "messages" and "data: URL" in e.value.message
    # --allow-remote-images: an http URL (a loopback server here) is fetched, within the size limit
    import http.server
    import threading

    import dgemma.serve.app as serve_app

    png = buf.getvalue()

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = png if self.path == "/cat.png" else png * 64
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": base + "/cat.png"}},
                                           {"type": "text", "text": "what is this?"}]}]
    try:
        with ServerThread(vision, model_name=NAME, batching="exact", allow_remote_images=True) as srv:
            r = client(srv).chat.completions.create(model=NAME, messages=remote, **kw)
            assert r.choices[0].message.content == ref.text
            limit, serve_app.REMOTE_IMAGE_BYTES = serve_app.REMOTE_IMAGE_BYTES, 2 * len(png)
            try:
                big = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": base + "/big.png"}}]}]
                with pytest.raises(openai.BadRequestError, match="over"):
                    client(srv).chat.completions.create(model=NAME, messages=big, **kw)
            finally:
                serve_app.REMOTE_IMAGE_BYTES = limit
    finally:
        files.shutdown()


# -- prompt caching --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prompt_cache_hits_give_identical_answers(model, exact_server):
    """A resent prompt and a longer prompt that starts with it reuse the encoded prefix: the answers equal the solo
    runs (which use no cache), and usage.prompt_tokens_details.cached_tokens says how many tokens were reused."""
    c = client(exact_server)
    system = "You are a careful assistant who answers in one line. " * 6
    first_turn = [{"role": "system", "content": system}, {"role": "user", "content": "First question?"}]
    kw = dict(model=NAME, max_tokens=40, seed=77, extra_body={"max_denoising_steps": STEPS})
    cold = c.chat.completions.create(messages=first_turn, **kw)
    warm = c.chat.completions.create(messages=first_turn, **kw)
    ref = reference(model, first_turn, 77, 40)
    assert cold.choices[0].message.content == warm.choices[0].message.content == ref.text
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    prompt_len = ref.stats.prompt_tokens
    assert 0 < warm.usage.prompt_tokens_details.cached_tokens <= prompt_len
    # the next turn resends the conversation: its shared prefix comes from the cache
    second_turn = first_turn + [{"role": "assistant", "content": ref.text}, {"role": "user", "content": "And then?"}]
    nxt = c.chat.completions.create(messages=second_turn, **kw)
    assert nxt.choices[0].message.content == reference(model, second_turn, 77, 40).text
    assert 0 < nxt.usage.prompt_tokens_details.cached_tokens <= prompt_len
    assert health(exact_server)["prompt_cache_mb"] > 0


def test_prompt_cache_off(model):
    with ServerThread(model, model_name=NAME, batching="exact", prompt_cache_mb=0) as srv:
        c = client(srv)
        kw = dict(model=NAME, prompt="cache me " * 20, max_tokens=32, seed=8, extra_body={"max_denoising_steps": 4})
        a, b = c.completions.create(**kw), c.completions.create(**kw)
        assert a.choices[0].text == b.choices[0].text == reference(model, kw["prompt"], 8, 32, steps=4).text
        assert a.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens_details.cached_tokens == 0


# -- disconnects ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_client_disconnect_frees_the_slot(model):
    with ServerThread(model, model_name=NAME, max_batch=1, batching="exact") as srv:
        body = {"model": NAME, "prompt": "long", "max_tokens": 32 * 100, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=WAIT) as h:
            with h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        break  # one canvas arrived; now hang up
        wait_until(lambda: health(srv)["cancelled"] >= 1 and idle(srv), "the stream's slot to free")
        # a non-streaming client that gives up frees its slot too
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
        wait_until(lambda: health(srv)["cancelled"] >= 2 and idle(srv), "the request's slot to free")
        # the single slot serves the next client
        r = client(srv).completions.create(model=NAME, prompt="next", max_tokens=32, seed=1,
                                            extra_body={"max_denoising_steps": STEPS})
        assert r.choices[0].text == reference(model, "next", 1, 32).text


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_requests_get_openai_errors(model, exact_server):
    c = client(exact_server)
    url = exact_server.url

    def post(path, content):
        r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=WAIT)
        return r.status_code, r.json()

    status, body = post("/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = post("/v1/chat/completions", b"[1, 2]")
    assert status == 400
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=msgs)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=msgs, max_tokens=-5)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="word " * 2100, max_tokens=16)  # 4096-position model
    assert e.value.code == "context_length_exceeded"
    fast = c.completions.create(model=NAME, prompt="x", max_tokens=8, extra_body={"speed": "fast"})
    assert fast.choices[0].finish_reason in ("stop", "length")  # the engine's fast mode, through the server
    for bad in ({"temperature": "hot"}, {"seed": 1.5}, {"max_tokens": True}, {"stop": 5}, {"n": 0},
                {"entropy_bound": -1}, {"max_denoising_steps": "many"}, {"messages": "hi"}, {"stream": "yes"},
                {"messages": [{"role": "user", "content": 7}]}, {"ignore_eos": "no"}, {"temperature": 9},
                {"attempts": 1000}, {"max_retries": -1}, {"stop_when_valid": 1}, {"speed": 2}, {"speed": "slow"},
                {"dgemma_drafts": True}, {"logprobs": True},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        payload = {"model": NAME, "messages": msgs, **bad}
        status, body = post("/v1/chat/completions", json.dumps(payload).encode())
        assert status == 400, bad
        assert set(body["error"]) >= {"message", "type", "param", "code"}, bad
        assert body["error"]["param"] == next(iter(bad)), (bad, body)
    status, body = post("/v1/completions", json.dumps({"model": NAME, "prompt": [1, 10 ** 6]}).encode())
    assert status == 400 and "vocabulary" in body["error"]["message"]
    status, body = post("/v1/completions", json.dumps({"model": NAME}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    r = httpx.get(url + "/v1/nothing-here", timeout=WAIT)
    assert r.status_code == 404 and "error" in r.json()
    # still serving, and nothing left behind
    ok = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, seed=2,
                                   extra_body={"max_denoising_steps": STEPS})
    assert ok.choices[0].message.content == reference(model, msgs, 2, 16).text
    assert idle(exact_server)


# -- drafts and the live view -------------------------------------------------------------------------------------
def test_draft_canvases_stream_as_extra_events(model, exact_server):
    body = {"model": NAME, "prompt": "drafts", "max_tokens": 40, "seed": 9, "stream": True, "dgemma_drafts": True,
            "max_denoising_steps": STEPS}
    events, texts = [], []
    with httpx.Client(timeout=WAIT) as h, h.stream("POST", exact_server.url + "/v1/completions", json=body) as resp:
        for kind, data in _sse_events(resp):
            if data == "[DONE]":
                continue
            if kind == "dgemma.draft":
                events.append(json.loads(data))
            else:
                texts.append(json.loads(data)["choices"][0]["text"])
    C = model.config.canvas_length
    assert [(e["block"], e["step"]) for e in events] == [(b, s) for b in range(2) for s in range(1, STEPS + 1)]
    assert all(len(e["token_ids"]) == C and len(e["accepted"]) == C and len(e["pieces"]) == C for e in events)
    assert all(e["max_steps"] == STEPS and e["index"] == 0 for e in events)
    ref = reference(model, "drafts", 9, 40)
    assert "".join(texts) == ref.text
    # the last draft of the first canvas is the committed canvas
    assert events[STEPS - 1]["token_ids"] == ref.raw_token_ids[:C]


def test_live_view_draws_the_canvas_and_returns_the_same_generation(model):
    from rich.console import Console

    from dgemma.live import generate_live

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, color_system="standard")
    got = generate_live(model, "live", seed=4, console=console, refresh_per_second=0, max_new_tokens=40,
                        max_denoising_steps=STEPS)
    ref = reference(model, "live", 4, 40)
    assert got.token_ids == ref.token_ids and got.stats.decoder_passes == ref.stats.decoder_passes
    out = buf.getvalue()
    assert "\x1b[2m" in out and "\x1b[1m" in out  # dim (re-noised) and bold (accepted) tokens
    assert f"step {STEPS}/{STEPS}" in out and "canvas 2 committed" in out


def test_cli_show_canvas_and_serve_options(ckpt, model):
    from click.testing import CliRunner

    from dgemma.cli import main

    res = CliRunner().invoke(main, ["generate", "--model", str(ckpt), "--prompt", "cli", "--seed", "4",
                                    "--max-new-tokens", "40", "--steps", str(STEPS), "--show-canvas", "--no-stats"])
    assert res.exit_code == 0, res.output
    assert reference(model, "cli", 4, 40).text in res.output
    res = CliRunner().invoke(main, ["generate", "--model", str(ckpt), "-p", "a", "-p", "b", "--show-canvas"])
    assert res.exit_code != 0 and "one prompt" in res.output
    res = CliRunner().invoke(main, ["serve", "--help"])
    assert res.exit_code == 0
    for flag in ("--max-batch", "--print-vllm-command", "--batching", "--prompt-cache-mb", "--speed"):
        assert flag in res.output
    res = CliRunner().invoke(main, ["serve", "--model", str(ckpt), "--prompt-cache-mb", "-1"])
    assert res.exit_code == 2 and "--prompt-cache-mb" in res.output


def test_port_in_use_is_one_clear_error(ckpt, exact_server):
    from dgemma.errors import InputError
    from dgemma.serve.runner import bind

    with pytest.raises(InputError, match="in use"):
        bind("127.0.0.1", exact_server.port)
    with pytest.raises(InputError, match="--port 99999"):
        bind("127.0.0.1", 99999)


def test_print_vllm_command(ckpt):
    from click.testing import CliRunner

    from dgemma.cli import main

    res = CliRunner().invoke(main, ["serve", "--model", str(ckpt), "--port", "8123", "--print-vllm-command"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("vllm "))
    argv = shlex.split(line)
    assert argv[:3] == ["vllm", "serve", str(ckpt)]
    opts = dict(zip(argv[3::2], argv[4::2]))
    assert opts["--port"] == "8123" and opts["--host"] == "127.0.0.1"
    assert opts["--max-model-len"] == "4096"  # from the checkpoint's config
    assert int(opts["--max-num-seqs"]) >= 1 and opts["--generation-config"] == "vllm"
    hub = vllm_command("google/diffusiongemma-26B-A4B-it", max_model_len=32768, max_num_seqs=8)
    assert hub[:3] == ["vllm", "serve", "google/diffusiongemma-26B-A4B-it"] and "32768" in hub and "8" in hub
