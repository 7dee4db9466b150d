"""dgemma serve: the OpenAI-compatible server, its batching engine and the live canvas view, on a tiny random model.

Servers run in-process on a free loopback port (uvicorn in a thread) and are driven with the official `openai` client.
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
pytest.importorskip("starlette")
pytest.importorskip("torch")

import dgemma  # noqa: E402
from dgemma.random_model import write_random_checkpoint  # noqa: E402
from dgemma.server import ServerThread, _ApiError, _Service, batcher_for, vllm_command  # noqa: E402

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


def reference(model, prompt, seed, max_tokens, steps=STEPS, **kw):
    return model.generate(prompt, seed=seed, max_new_tokens=max_tokens, max_denoising_steps=steps, **kw)


# -- basics ---------------------------------------------------------------------------------------------------------
def test_models_and_chat_match_library(model, exact_server):
    c = client(exact_server)
    ids = [m.id for m in c.models.list().data]
    assert ids == [NAME]
    msgs = [{"role": "user", "content": "Say something."}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, seed=3,
                                  extra_body={"max_denoising_steps": STEPS})
    ref = reference(model, msgs, 3, 40)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("stop" if ref.stats.finish_reason == "eos" else "length")
    assert r.usage.completion_tokens == ref.stats.generated_tokens
    assert r.usage.prompt_tokens == ref.stats.prompt_tokens
    extra = r.usage.model_extra
    assert extra["tokens_per_forward"] == pytest.approx(ref.stats.tokens_per_forward)
    assert extra["decoder_passes"] == ref.stats.decoder_passes
    # another seed gives another answer (the seed reaches the sampler)
    other = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, seed=4,
                                      extra_body={"max_denoising_steps": STEPS})
    assert other.choices[0].message.content != r.choices[0].message.content


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

    # legacy completions, token-id prompt, streaming and not
    prompt_ids = model.encode_prompt("Complete this")
    ref = reference(model, prompt_ids, 5, 50)
    r = c.completions.create(model=NAME, prompt=prompt_ids, max_tokens=50, seed=5,
                             extra_body={"max_denoising_steps": STEPS})
    assert r.choices[0].text == ref.text
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
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stop=stop, stream=True, **kw))
    assert streamed == cut


# -- batching ----------------------------------------------------------------------------------------------------------
def _jobs(n):
    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "a much longer prompt " * 4, "x", "hello there"]
    return [dict(prompt=words[i % len(words)] + f" #{i}", seed=1000 + 7 * i, max_tokens=(20, 40, 64, 90)[i % 4])
            for i in range(n)]


@pytest.mark.slow
def test_concurrent_requests_identical_to_solo_runs(model, exact_server):
    """32 requests at once, different prompts, lengths and seeds: each answer equals the request run alone (the
    library's Model.generate), nothing lost, duplicated or swapped, and they really ran together."""
    jobs = _jobs(32)
    refs = [reference(model, j["prompt"], j["seed"], j["max_tokens"]) for j in jobs]
    assert len({r.text for r in refs}) == len(refs)  # distinct answers: a swap would be visible
    before = health(exact_server)
    barrier = threading.Barrier(len(jobs), timeout=WAIT)
    c = client(exact_server)

    def call(j):
        barrier.wait()
        return c.completions.create(model=NAME, prompt=j["prompt"], max_tokens=j["max_tokens"], seed=j["seed"],
                                    extra_body={"max_denoising_steps": STEPS})

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs, timeout=3 * WAIT))
    for j, ref, r in zip(jobs, refs, results):
        assert r.choices[0].text == ref.text, j
        assert r.usage.completion_tokens == ref.stats.generated_tokens
        assert r.usage.model_extra["decoder_passes"] == ref.stats.decoder_passes
    assert len({r.id for r in results}) == len(results)
    after = health(exact_server)
    assert after["completed"] - before["completed"] == len(jobs)
    assert after["max_batch_seen"] >= 8  # they were denoised side by side, not one after another
    assert after["active"] == 0 and after["waiting"] == 0


def test_merged_batch_pass_matches_solo_passes(model):
    """The merged state (left-padded caches) with per-row RoPE gives each row the logits it has alone, up to float
    rounding; without the per-row positions the rows with shorter caches would be far off."""
    import torch

    be = model.backend
    b = batcher_for(be)
    assert b.merges
    ids = [model.encode_prompt(p) for p in ["hi", "a somewhat longer prompt here", "z" * 45]]
    states = [be.prefill(np.array([x]), None) for x in ids]
    be.commit(states[0], np.arange(32, 64)[None])  # a row that has committed a canvas already
    lengths = [int(s.length) for s in states]
    C, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, V, (3, C), generator=g)
    probs = torch.softmax(torch.randn(3, C, V, generator=g), -1)
    alone = torch.cat([be.denoise(s, canvas[r:r + 1], self_conditioning_probs=probs[r:r + 1])
                       for r, s in enumerate(states)])
    batched = b.denoise(states, lengths, canvas, probs)
    assert (batched - alone).abs().max().item() < 1e-3
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))
    # control: the same merged state read at the padded length (what a plain denoise would do) is clearly wrong
    merged = b._merge(states, lengths)
    plain = be.denoise(merged, canvas, self_conditioning_probs=probs)
    assert (plain[:2] - alone[:2]).abs().max().item() > 1e-2


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
        # which rows draw a pad depends on how the requests were merged: seen once in about six runs)
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
        wait_until(lambda: health(srv)["cancelled"] >= 1 and health(srv)["active"] == 0, "the stream's slot to free")
        # a non-streaming client that gives up frees its slot too
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
        wait_until(lambda: health(srv)["cancelled"] >= 2 and health(srv)["active"] == 0, "the request's slot to free")
        # the single slot serves the next client
        r = client(srv).completions.create(model=NAME, prompt="next", max_tokens=32, seed=1,
                                            extra_body={"max_denoising_steps": STEPS})
        assert r.choices[0].text == reference(model, "next", 1, 32).text


# -- errors ----------------------------------------------------------------------------------------------------------
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
    for bad in ({"temperature": "hot"}, {"seed": 1.5}, {"max_tokens": True}, {"stop": 5}, {"n": 0},
                {"entropy_bound": -1}, {"max_denoising_steps": "many"}, {"messages": "hi"}, {"stream": "yes"},
                {"messages": [{"role": "user", "content": 7}]}, {"ignore_eos": "no"}, {"temperature": 9}):
        payload = {"model": NAME, "messages": msgs, **bad}
        status, body = post("/v1/chat/completions", json.dumps(payload).encode())
        assert status in (400, 422), bad
        assert set(body["error"]) >= {"message", "type", "param", "code"}, bad
    status, body = post("/v1/completions", json.dumps({"model": NAME, "prompt": [1, 10 ** 6]}).encode())
    assert status == 400  # a token id outside the vocabulary
    status, body = post("/v1/completions", json.dumps({"model": NAME}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    r = httpx.get(url + "/v1/nothing-here", timeout=WAIT)
    assert r.status_code == 404 and "error" in r.json()
    # still serving, and nothing left behind
    ok = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, seed=2,
                                   extra_body={"max_denoising_steps": STEPS})
    assert ok.choices[0].message.content == reference(model, msgs, 2, 16).text
    h = health(exact_server)
    assert h["active"] == 0 and h["waiting"] == 0


def test_temperature_maps_onto_the_schedule(model):
    svc = _Service(model, engine=None, name=NAME)
    d = model.sampler_defaults
    s = svc.settings({"temperature": 0.4})
    assert (s.t_max, s.t_min) == pytest.approx((0.4, d.t_min * 0.4 / d.t_max))
    s = svc.settings({"temperature": 0})
    assert s.t_max == pytest.approx(0.01) and 0 < s.t_min < s.t_max
    s = svc.settings({"temperature": 1.0, "t_min": 0.3})
    assert (s.t_max, s.t_min) == pytest.approx((1.0, 0.3))
    s = svc.settings({"max_tokens": 7, "entropy_bound": 0.5, "confidence_threshold": 0.1, "ignore_eos": True})
    assert (s.max_new_tokens, s.entropy_bound, s.confidence_threshold, s.eos_token_ids) == (7, 0.5, 0.1, ())
    with pytest.raises(_ApiError):
        svc.settings({"t_min": 0.9, "t_max": 0.5})


# -- drafts and the live view -------------------------------------------------------------------------------------
def test_draft_canvases_stream_as_extra_events(model, exact_server):
    body = {"model": NAME, "prompt": "drafts", "max_tokens": 40, "seed": 9, "stream": True, "dgemma_drafts": True,
            "max_denoising_steps": STEPS}
    events, texts = [], []
    with httpx.Client(timeout=WAIT) as h, h.stream("POST", exact_server.url + "/v1/completions", json=body) as resp:
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                if kind == "dgemma.draft":
                    events.append(data)
                else:
                    texts.append(data["choices"][0]["text"])
                kind = None
    C = model.config.canvas_length
    assert [(e["block"], e["step"]) for e in events] == [(b, s) for b in range(2) for s in range(1, STEPS + 1)]
    assert all(len(e["token_ids"]) == C and len(e["accepted"]) == C for e in events)
    assert "".join(texts) == reference(model, "drafts", 9, 40).text
    # the last draft of the first canvas is the committed canvas
    ref = reference(model, "drafts", 9, 40)
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
    assert res.exit_code == 0 and "--max-batch" in res.output and "--print-vllm-command" in res.output


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
