"""`openseek serve` end to end: a real server process on loopback, driven by the official `openai` client.

Expected values come from the offline engine (`LLM.generate`) on the same folder, from the chat format written out
by hand (reference §7), and from transformers for prompt logprobs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import torch

from conftest import build_tiny_folder, first_new_substring
from openseek import LLM, LLMEngine, SamplingParams
from server_util import KEY, Server
from tokenizers_util import BOS

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

NO_EOS = {"ignore_eos": True}  # vLLM's extension: lengths independent of the random model's EOS draws
MAX_MODEL_LEN = 1024  # the main server's context
PROMPTS = ["The quick brown fox", "Hello, how are you", "def forward(self, x):", "你好，世界", "Numbers 0123"]


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_folder(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def folder(model):
    return model[0]


@pytest.fixture(scope="module")
def offline(folder):
    return LLM(folder)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    srv = Server(folder, tmp_path_factory.mktemp("logs") / "server.log", "--max-model-len", str(MAX_MODEL_LEN),
                 "--max-waiting", "64")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def guarded(folder, tmp_path_factory):
    """A key, one sequence at a time, a one-slot waiting queue, and prices."""
    srv = Server(folder, tmp_path_factory.mktemp("logs") / "guarded.log", "--api-key", KEY, "--max-num-seqs", "1",
                 "--max-waiting", "1", "--price-input", "1.5", "--price-output", "6")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def offline_text(llm: LLM, prompt, **kw) -> tuple[str, str]:
    o = llm.generate(prompt, SamplingParams(**kw))[0].outputs[0]
    return o.text, o.finish_reason


def stream_text(chunks, chat: bool = False) -> tuple[str, str | None, object]:
    text, reason, usage = "", None, None
    for c in chunks:
        usage = c.usage or usage
        for ch in c.choices:
            text += (ch.delta.content or "") if chat else ch.text
            reason = ch.finish_reason or reason
    return text, reason, usage


def error_of(e: "openai.APIStatusError") -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- generation -------------------------------------------------------------------------------------------------
def test_models_lists_the_served_name(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]


def test_greedy_completion_streamed_equals_unstreamed_equals_offline(server, offline):
    client = server.client()
    for prompt in PROMPTS[:3] + [[5, 6, 7, 8, 9]]:
        want, reason = offline_text(offline, prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt},
                                    temperature=0, max_tokens=12)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, reason)
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        text, stream_reason, usage = stream_text(chunks)
        assert (text, stream_reason) == (want, reason)
        assert usage.model_dump(exclude_none=True) == r.usage.model_dump(exclude_none=True)
        assert "cost" not in r.usage.model_dump()  # no prices configured


def test_batched_prompts_and_n_give_one_choice_each_in_order(server, offline):
    ids = [[10, 11, 12], [20, 21, 22, 23]]
    r = server.client().completions.create(model="tiny", prompt=ids, n=2, max_tokens=5, temperature=0,
                                           extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [offline_text(offline, {"prompt_token_ids": p}, temperature=0, max_tokens=5, ignore_eos=True)[0]
            for p in ids]
    assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 20)  # each prompt counted once


def test_chat_renders_the_v2_template_and_matches_offline(server, offline):
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    rendered = f"{BOS}Be terse.\n\nUser: Hello\nthere\n\nAssistant:"  # reference §7, parts joined by \n
    ids = offline.tokenizer.encode(rendered, add_special_tokens=False)
    assert ids.count(offline.tokenizer.bos_token_id) == 1
    want, reason = offline_text(offline, {"prompt_token_ids": ids}, temperature=0, max_tokens=10)
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, reason)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert stream_text(chunks, chat=True)[:2] == (want, reason)


def test_seeded_sampling_reproduces_and_n_uses_seed_plus_i(server, offline):
    client = server.client()
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, top_p=0.95, seed=7, extra_body=NO_EOS)
    r1, r2 = client.completions.create(n=2, **kw), client.completions.create(n=2, **kw)
    assert [c.text for c in r1.choices] == [c.text for c in r2.choices]
    for j, c in enumerate(r1.choices):
        assert c.text == offline_text(offline, PROMPTS[0], temperature=1.0, top_p=0.95, seed=7 + j, max_tokens=12,
                                      ignore_eos=True)[0]
    assert r1.choices[0].text != r1.choices[1].text


def test_stop_string_ends_and_trims_the_completion(server, offline):
    client = server.client()
    for prompt in PROMPTS:
        free = offline_text(offline, prompt, temperature=0, max_tokens=30, ignore_eos=True)[0]
        if (k := first_new_substring(free)) is not None:
            break
    assert k is not None, "the random model produced no usable stop string"
    kw = dict(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[free[k:k + 2], "never"],
              extra_body=NO_EOS)
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (free[:k], "stop")
    assert stream_text(client.completions.create(stream=True, **kw))[:2] == (free[:k], "stop")


def test_chat_logprobs_match_offline_and_list_the_top_tokens(server, offline):
    messages = [{"role": "user", "content": "Hi"}]
    ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                                      ignore_eos=True))[0].outputs[0]
    r = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                                logprobs=True, top_logprobs=3, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids) == 4
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == r.choices[0].message.content
    for tok, item, lp in zip(want.token_ids, content, want.logprobs):
        assert item.logprob == pytest.approx(lp[tok], abs=1e-5)
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops == pytest.approx(sorted(lp.values(), reverse=True)[:3], abs=1e-5)
        assert item.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy: the sampled token is the most likely


def test_echo_logprobs_score_the_prompt_like_transformers(server, model, offline):
    """lm-evaluation-harness loglikelihood: echo=True, max_tokens 0 or 1, logprobs=1, prompt as token ids."""
    ref = model[1]
    ids = [ref.config.bos_token_id, 40, 41, 42, 43, 44, 45, 46, 47]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].log_softmax(-1)  # row i predicts token i + 1
    client = server.client()
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny", prompt=ids, echo=True, max_tokens=max_tokens, logprobs=1,
                                      temperature=0)
        c = r.choices[0]
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and r.usage.completion_tokens == max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
            top = max(lp.top_logprobs[i].values())
            assert top == pytest.approx(want[i - 1].max().item(), abs=1e-4)
        assert c.text.startswith(offline.tokenizer.decode(ids))
    chunks = list(client.completions.create(model="tiny", prompt=ids, echo=True, max_tokens=3, logprobs=0,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.tokens) == len(ids) + 1


def test_lm_eval_loglikelihood_batch_scores_like_the_offline_engine(server, model, offline):
    """lm-eval 0.4's local-completions payload, batched: one context (longer than a cache block, so the second
    send meets the prefix cache) and three continuations; its parse, sum(token_logprobs[ctxlen:-1]) and the greedy
    check against top_logprobs, must give the offline engine's prompt logprobs."""
    context = [model[1].config.bos_token_id, *range(40, 60)]  # 21 tokens: a full block of 16 is cached after the first send
    prompts = [context + cont for cont in ([70], [71, 72], [73, 74, 75])]
    want = offline.generate([{"prompt_token_ids": ids} for ids in prompts],
                            SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    payload = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/completions", json=payload, timeout=60)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == [0, 1, 2]
        for ids, out, c in zip(prompts, want, choices):
            lp = c["logprobs"]
            assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
            expected = [e[t] for t, e in zip(ids[1:], out.prompt_logprobs[1:])]
            assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-5)
            scored, tops = lp["token_logprobs"][len(context):-1], lp["top_logprobs"][len(context):-1]
            assert sum(scored) == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-4)
            greedy = all(out.prompt_logprobs[p][ids[p]] == max(out.prompt_logprobs[p].values())
                         for p in range(len(context), len(ids)))
            assert all(t == max(top.values()) for t, top in zip(scored, tops)) == greedy


# ---- load -------------------------------------------------------------------------------------------------------
def test_64_concurrent_streams_get_offline_tokens_and_free_the_cache(server, offline):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(64)]
    want = [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in
            offline.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]

    async def one(client, prompt):
        chunks = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS)
        text, usage = "", None
        async for c in chunks:
            text += "".join(ch.text for ch in c.choices)
            usage = c.usage or usage
        return text, usage.completion_tokens

    async def run():
        client = server.async_client()
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(run()) == want
    assert server.wait_idle() == {"openseek_num_requests_waiting": 0, "openseek_num_requests_running": 0,
                                  "openseek_kv_cache_usage": 0}


def test_200_streams_closed_early_leak_no_blocks(server):
    async def one(client, sem, i):
        async with sem:
            chunks = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"{PROMPTS[i % 5]} {i}"}], max_tokens=900,
                stream=True, extra_body=NO_EOS)
            got = 0
            async for _ in chunks:
                got += 1
                if got == 2 + i % 3:  # the role chunk, then one to three tokens
                    break
            await chunks.close()

    async def run():
        sem = asyncio.Semaphore(32)
        async with server.async_client() as client:
            await asyncio.gather(*(one(client, sem, i) for i in range(200)))

    before = server.counter("openseek_generation_tokens_total")
    asyncio.run(run())
    # unaborted, the 200 x 900 tokens would take minutes and hold blocks long after the streams closed
    assert server.wait_idle(timeout=5) == {"openseek_num_requests_waiting": 0, "openseek_num_requests_running": 0,
                                  "openseek_kv_cache_usage": 0}
    assert server.counter("openseek_generation_tokens_total") - before < 200 * 100
    text = httpx.get(f"{server.url}/metrics").text
    assert 'openseek_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "openseek_time_to_first_token_seconds_count" in text


# ---- client errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, words", [
    ('{"model": "tiny", "prompt": "hi",', None, "not valid JSON"),
    ('[1, 2]', None, "dictionary"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": "many"}', "max_tokens", "integer"),
    ('{"model": "tiny", "prompt": "hi", "temperature": -1}', "temperature", "temperature=-1.0 is invalid"),
    ('{"model": "tiny", "prompt": "hi", "top_p": 2}', "top_p", "top_p=2.0 is invalid"),
    (json.dumps({"model": "tiny", "prompt": [5] * MAX_MODEL_LEN}), "prompt", "max_model_len"),
    ('{"model": "tiny", "prompt": [1000000]}', "prompt", "outside the vocabulary"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 0}', "max_tokens", "echo"),
    ('{"model": "tiny", "prompt": ["a", "b"], "n": 100}', "n", "at most 64"),
], ids=["malformed-json", "not-an-object", "wrong-type", "temperature", "top-p", "too-long", "out-of-vocab",
        "max-tokens-0", "too-many-sequences"])
def test_bad_completion_requests_get_400_naming_the_problem(server, body, param, words):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud800"]}', "stop.0"),
    ("/v1/completions", '{"prompt": "hi", "model": "\\ud800"}', "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content.0.text"),
], ids=["prompt", "prompt-list", "stop", "model", "content", "content-part"])
def test_a_lone_surrogate_is_400_naming_its_field(server, route, body, param):
    """JSON's "\\ud800" parses to a str that UTF-8 cannot encode: the tokenizer raised TypeError, a 500."""
    r = httpx.post(f"{server.url}{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"], err


def test_prompt_longer_than_the_context_is_400_with_the_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny",
                                                messages=[{"role": "user", "content": "fox " * MAX_MODEL_LEN}])
    assert "max_model_len" in error_of(e.value)["message"]


def test_unknown_model_and_unknown_route_get_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="gpt-5", prompt="hi")
    err = error_of(e.value)
    assert err["code"] == "model_not_found" and "gpt-5" in err["message"]
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_full_waiting_queue_answers_429(guarded):
    async def one(client):
        try:
            await client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=100,
                                            extra_body=NO_EOS)
            return 200
        except openai.RateLimitError as e:
            assert "waiting queue is full" in error_of(e)["message"]
            return 429

    async def run():
        async with guarded.async_client() as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    codes = asyncio.run(run())
    assert 200 in codes and 429 in codes, codes
    assert guarded.wait_idle() == {"openseek_num_requests_waiting": 0, "openseek_num_requests_running": 0,
                                   "openseek_kv_cache_usage": 0}


def test_api_key_is_required_on_every_route_but_health(guarded):
    for key in ("wrong-key", None):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{guarded.url}/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        for path in ("/v1/models", "/metrics", "/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{guarded.url}{path}", headers=headers).status_code == 401, path
    for path in ("/v1/models", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{guarded.url}{path}", headers={"authorization": f"Bearer {KEY}"}).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong-key").models.list()
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_client_that_hangs_up_on_an_unstreamed_request_is_aborted(guarded):
    # 3000 tokens take several seconds to generate: idle within 3 s means the request was aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{guarded.url}/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"model": "tiny", "prompt": "The quick", "max_tokens": 3000, "ignore_eos": True})
    assert guarded.wait_idle(timeout=3) == {"openseek_num_requests_waiting": 0, "openseek_num_requests_running": 0,
                                            "openseek_kv_cache_usage": 0}


def test_usage_carries_cost_at_the_configured_prices(guarded):
    r = guarded.client().completions.create(model="tiny", prompt="Hello", max_tokens=3, extra_body=NO_EOS)
    u = r.usage.model_dump()
    cin, cout = u["prompt_tokens"] * 1.5 / 1e6, u["completion_tokens"] * 6 / 1e6
    assert u["cost"] == {"input": pytest.approx(cin), "output": pytest.approx(cout),
                         "total": pytest.approx(cin + cout), "currency": "USD"}


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(folder):
    from openseek.server.async_engine import AsyncEngine, EngineFailed

    llm = LLMEngine.from_pretrained(folder)
    engine, real_step, calls = AsyncEngine(llm), llm.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    llm.step = flaky_step
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def run():
        q = await engine.add([("a", {"prompt_token_ids": [5, 6, 7]}, params)])
        assert not (await q.get()).finished  # step 1 went through
        failure = await q.get()
        assert isinstance(failure, EngineFailed) and "boom" in str(failure)
        q = await engine.add([("b", {"prompt_token_ids": [5, 6, 7]}, params)])
        return [await q.get() for _ in range(3)]

    engine.start()
    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert [o.finished for o in outs] == [False, False, True] and outs[-1].finish_reason == "length"
    assert llm.pool.num_free == llm.pool.num_blocks


# ---- shutdown ---------------------------------------------------------------------------------------------------
def test_sigterm_refuses_new_requests_and_drains_in_flight(folder, tmp_path):
    srv = Server(folder, tmp_path / "drain.log")
    try:
        chunks = iter(srv.client().completions.create(model="tiny", prompt="The quick", max_tokens=600, stream=True,
                                                      temperature=0, extra_body=NO_EOS))
        got = [next(chunks)]
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(f"{srv.url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        got += list(chunks)
        assert sum(len(c.choices) for c in got) == 600 and got[-1].choices[0].finish_reason == "length"
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.stop()


def test_openapi_schema_declares_the_statuses_the_server_answers(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        declared = schema["paths"][path]["post"]["responses"]
        assert "422" not in declared and {"200", "400", "413", "429", "500"} <= declared.keys(), declared.keys()
        assert "text/event-stream" in declared["200"]["content"]
        r = httpx.post(f"{server.url}{path}", json={"model": "tiny", "max_tokens": "many"})
        assert str(r.status_code) in declared, r.status_code
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_tokenize_and_detokenize_agree_with_the_offline_tokenizer(server, offline):
    tok = offline.llm_engine.tokenizer
    text = "def add(a, b):\n    return a + b  # é"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert r == {"count": len(tok.encode(text)), "max_model_len": MAX_MODEL_LEN, "tokens": tok.encode(text)}
    bare = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi there"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    want = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    assert chat["tokens"] == want
    # the chat route counts the same prompt tokens
    usage = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage
    assert usage.prompt_tokens == chat["count"]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": bare["tokens"]}).json()
    assert back == {"prompt": tok.decode(bare["tokens"], skip_special_tokens=False)} and back["prompt"] == text


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a\ud800"}, "prompt"),
    ("/detokenize", {"tokens": [0, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenize_and_detokenize_name_bad_input(server, route, body, param):
    r = httpx.post(f"{server.url}{route}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_routes_need_the_api_key(guarded):
    for route, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(f"{guarded.url}{route}", json=body).status_code == 401
        ok = httpx.post(f"{guarded.url}{route}", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
