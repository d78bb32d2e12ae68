"""The OpenAI-compatible server on the tiny model, driven by the official `openai` client, raw HTTP and curl."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.engine.generate.sampling import SamplingParams
from qwenbook_bridge.openai.schema import ChatRequest, OpenAIError
from qwenbook_bridge.openai.server import OpenAIServer, PortInUseError, ServeConfig

KEY = "sk-test-key"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def server(tiny):
    srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, api_key=KEY, model_name=NAME, aliases=("tiny-alias",)))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def solo(tiny, text: str, n: int, **kw) -> str:
    return generate(tiny, [{"role": "user", "content": text}], SamplingParams(max_tokens=n, greedy=True, **kw)).text


def post(server, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def assert_openai_error(body: dict, param: str | None = None) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]["message"]


def test_models_lists_the_served_name(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve("tiny-alias").id == NAME
    assert server.stats().host == "127.0.0.1"


def test_chat_completion_matches_the_notebook_chat(tiny, client):
    q = "你好，你是谁？"
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=24,
                                       temperature=0)
    assert r.choices[0].message.content == solo(tiny, q, 24)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.object == "chat.completion" and r.model == NAME
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_streamed_chat_matches_and_follows_openais_chunk_format(tiny, client):
    q = "Write a haiku about the sea."
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=30,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == solo(tiny, q, 30)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_sse_ends_with_done(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:])  # no include_usage, no usage field


def test_text_completion_endpoint(tiny, client):
    prompt = "The capital of France is"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    ids = tiny.tokenizer(prompt)["input_ids"]
    import torch

    with torch.inference_mode():
        ref = tiny.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert r.choices[0].text == tiny.tokenizer.decode(ref, skip_special_tokens=True)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    echoed = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_stop_strings_and_seeds(tiny, client):
    q = "Count to ten."
    full = solo(tiny, q, 30)
    stop = full[10:14]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=30,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=20,
                                              temperature=0.8, top_p=0.9, seed=s).choices[0].message.content
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_raw_http_and_curl_non_streaming(tiny, server):
    body = {"model": NAME, "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0}
    status, _, reply = post(server, "/chat/completions", body)
    assert status == 200
    ref = generate(tiny, body["messages"], SamplingParams(max_tokens=10, greedy=True)).text
    assert reply["choices"][0]["message"]["content"] == ref
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["curl", "-sS", "--fail-with-body", server.url + "/chat/completions",
                          "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {KEY}",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == ref


def test_api_key_is_required_and_checked(server):
    for key in (None, "sk-wrong"):
        status, _, body = post(server, "/chat/completions", {"model": NAME, "messages": []}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert_openai_error(body)
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()
    assert err.value.status_code == 401
    assert server.stats().last_error.startswith("401")


def test_bad_requests_get_openai_shaped_errors(server):
    status, _, body = post(server, "/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert status == 400 and "not valid JSON" in assert_openai_error(body)
    ok_messages = [{"role": "user", "content": "hi"}]
    status, _, body = post(server, "/chat/completions", {"model": "gpt-4", "messages": ok_messages})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "gpt-4" in assert_openai_error(body)
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": ok_messages, "n": 2}, "n"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
        ({"messages": ok_messages, "temperature": "hot"}, "temperature"),
        ({"messages": ok_messages, "max_tokens": 0}, "max_tokens"),
        ({"messages": ok_messages, "stop": 5}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content"),
    ]
    for extra, param in cases:
        status, _, body = post(server, "/chat/completions", {"model": NAME, **extra})
        assert status == 400, extra
        assert_openai_error(body, param)
    status, _, body = post(server, "/completions", {"model": NAME, "prompt": ""})
    assert status == 400 and assert_openai_error(body, "prompt")
    with httpx.Client() as c:
        missing = c.get(server.url + "/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and "/v1/chat/completions" in assert_openai_error(missing.json())


def test_a_role_the_template_cannot_render_is_a_400(tiny, server):
    from qwenbook_bridge.openai.routes import OpenAIApi

    strict = copy.deepcopy(tiny.tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}"
                            "{{ raise_exception('Conversations must start with a user message') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    api = OpenAIApi(server.scheduler, strict, None, NAME)
    with pytest.raises(OpenAIError) as err:
        api.chat_prompt(ChatRequest(messages=[{"role": "assistant", "content": "hi"}]))
    assert err.value.status == 400 and "must start with a user message" in err.value.message


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400_naming_both(tiny, server):
    context = server.scheduler.context_length
    prompt = [tiny.tokenizer.convert_tokens_to_ids("hello")] * (context - 4)
    status, _, body = post(server, "/completions", {"model": NAME, "prompt": prompt, "max_tokens": 500,
                                                    "temperature": 0})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    message = assert_openai_error(body, "prompt")
    assert (f"maximum context length is {context} tokens" in message
            and f"you requested {context - 4 + 500} tokens ({context - 4} in the prompt, 500 in the completion)"
            in message), message
    # What fits is served whole: the last 4 places of the context.
    status, _, body = post(server, "/completions", {"model": NAME, "prompt": prompt, "max_tokens": 4,
                                                    "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 4 and "warning" not in body
    status, _, body = post(server, "/completions", {"model": NAME, "prompt": prompt * 2, "max_tokens": 5})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"resulted in {2 * (context - 4)} tokens" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=context)
    chat_message = err.value.body["message"]
    assert f"maximum context length is {context} tokens" in chat_message and "in the messages" in chat_message
    assert f"{context} in the completion" in chat_message


def test_32_concurrent_streams_each_match_their_solo_reply(tiny, server):
    questions = [f"Question {i}: {'为什么天空是蓝色的？' if i % 2 else 'tell me about rivers'} {'!' * (i % 5)}"
                 for i in range(32)]
    lengths = [8 + (i * 7) % 33 for i in range(32)]
    expected = [solo(tiny, q, n) for q, n in zip(questions, lengths)]
    barrier = threading.Barrier(32)

    def run(i: int) -> tuple[str, str | None]:
        c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)
        barrier.wait()
        stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": questions[i]}],
                                           max_tokens=lengths[i], temperature=0, stream=True)
        parts, finish = [], None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    assert [r[0] for r in results] == expected
    assert all(r[1] == "length" for r in results)
    assert server.scheduler.stats().peak_batch_size > 1


def test_a_client_that_leaves_mid_stream_stops_its_generation(tiny, server):
    budget = server.scheduler.context_length - 200
    before = server.scheduler.stats().tokens_generated
    body = {"model": NAME, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": budget,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    # The other client carries on while the first one's generation winds down.
    q = "Are you still there?"
    other = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": q}], max_tokens=20, temperature=0)
    assert other.choices[0].message.content == solo(tiny, q, 20)
    deadline = time.monotonic() + 120
    while server.stats().requests_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats().requests_active == 0
    # Had the abandoned request run to its end it would have produced `budget` tokens on its own.
    assert server.scheduler.stats().tokens_generated - before < budget


def test_stop_frees_the_port_and_keeps_the_model(tiny):
    srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, model_name=NAME))
    srv.start()
    port = srv.port
    status, _, _ = post(srv, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                        key=None)
    assert status == 200
    srv.stop()
    assert not srv.running
    with socket.socket() as s:  # as any server binds (SO_REUSEADDR): only a live listener would refuse it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    again = OpenAIServer.for_loaded(tiny, ServeConfig(port=port, model_name=NAME))
    with again:
        assert again.port == port
        status, _, body = post(again, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 6, "temperature": 0}, key=None)
        assert status == 200 and body["choices"][0]["message"]["content"] == solo(tiny, "hi", 6)
    assert solo(tiny, "hi", 6)  # the model is still loaded and usable in-process


def test_a_port_in_use_is_a_clear_error(tiny):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=port, model_name=NAME))
        with pytest.raises(PortInUseError, match=f"port {port}"):
            srv.start()
        assert not srv.running and not srv.scheduler.running


def test_stats_count_requests_and_tokens(server, client):
    before = server.stats()
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=7,
                                   temperature=0)
    after = server.stats()
    assert after.requests_total == before.requests_total + 1
    assert after.tokens_generated == before.tokens_generated + 7
    assert after.running and after.url == server.url and after.requests_active == 0
    assert json.loads(json.dumps(after.to_dict()))["model_name"] == NAME


def test_serve_cli_serves_until_interrupted(tiny_model_dir):
    import signal
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "qwenbook_bridge.openai.cli", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--name", "cli-model", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "Serving cli-model at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        models = openai.OpenAI(base_url=url, api_key="k", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["cli-model"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
