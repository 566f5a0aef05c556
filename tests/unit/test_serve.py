"""``tedmoe serve`` through the official ``openai`` client, unchanged: completions (text and token
prompts, streaming, stop strings, seeds), chat with and without a template, models, health,
metrics and bad requests, over real HTTP on loopback. Greedy answers are held to recomputing
generation; concurrent requests each get their own answer."""

import asyncio
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tedmoe.data.tokenizer import ByteTokenizer  # noqa: E402
from tedmoe.inference.engine import InferenceEngine  # noqa: E402
from tedmoe.inference.generate import generate  # noqa: E402
from tedmoe.inference.sampling import SamplingParams  # noqa: E402
from tedmoe.inference.scheduler import Request, StepResult  # noqa: E402
from tedmoe.serve.app import ServingLoop, _Text, create_app  # noqa: E402
from tests.unit.test_inference_engine import build, model_config  # noqa: E402

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


class Server:
    """The app on a free loopback port, in a thread (uvicorn installs no signal handlers there)."""

    def __init__(self, tokenizer, policy="splitfuse"):
        self.model = build(model_config(vocab_size=256, max_seq_len=128))
        self.tokenizer = tokenizer
        self.loop = ServingLoop(InferenceEngine(self.model, block_size=8, num_blocks=200), tokenizer, policy,
                                token_budget=64, max_seqs=8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.loop, "tiny"), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.loop.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def greedy(self, prompt_ids, n):
        return self.tokenizer.decode(generate(self.model, prompt_ids, n, greedy=True)[len(prompt_ids):])

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        return self.loop.stop()


@pytest.fixture(scope="module")
def server():
    s = Server(ByteTokenizer())
    yield s
    s.close()


def test_completions_equal_recomputed_greedy_generation(server):
    out = server.client.completions.create(model="tiny", prompt="def main(", max_tokens=24, temperature=0)
    assert out.choices[0].text == server.greedy(list(b"def main("), 24)
    assert out.choices[0].finish_reason == "length" and out.model == "tiny"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (9, 24, 33)
    ids = [100, 101, 102, 32]
    out = server.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert out.choices[0].text == server.greedy(ids, 10)


def test_streaming_gives_the_same_text_in_pieces(server):
    stream = server.client.completions.create(model="tiny", prompt="import ", max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == server.greedy(list(b"import "), 20)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3  # it did stream
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_stop_strings_and_seeds(server):
    full = server.greedy(list(b"x = "), 30)
    stop = full[8:10]
    assert stop and full.find(stop) >= 0
    out = server.client.completions.create(model="tiny", prompt="x = ", max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"
    kw = {"model": "tiny", "prompt": "for i in", "max_tokens": 16, "temperature": 1.2, "top_p": 0.9}
    a = server.client.completions.create(seed=5, **kw).choices[0].text
    b = server.client.completions.create(seed=5, **kw).choices[0].text
    c = server.client.completions.create(seed=6, **kw).choices[0].text
    assert a == b and a != c


def test_concurrent_requests_each_get_their_own_answer(server):
    prompts = [f"def f{i}(x):" * (1 + i % 3) for i in range(10)]

    def ask(p):
        return server.client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [server.greedy(list(p.encode()), 12) for p in prompts]


def test_models_health_metrics(server):
    assert [m.id for m in server.client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("tedmoe_queue_length", "tedmoe_running_sequences", "tedmoe_kv_blocks_used",
                 "tedmoe_generation_tokens_per_second", "tedmoe_time_to_first_token_seconds_bucket",
                 "tedmoe_time_per_output_token_seconds_bucket", "tedmoe_generation_tokens_total"):
        assert name in text, name
    assert 'tedmoe_requests_total{finish_reason="length"}' in text


@pytest.mark.parametrize("kw,message", [
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": [1, 999]}, "token ids outside the model's vocabulary of 256"),
    ({"prompt": "x" * 200}, "the prompt has 200 tokens; the model takes at most 128"),
    ({"top_p": 0}, "top_p: Input should be greater than 0"),
    ({"prompt": ["a", "b"]}, "a list of several prompts is not supported"),
])
def test_bad_requests_are_400_with_a_message(server, kw, message):
    with pytest.raises(openai.BadRequestError) as err:
        server.client.completions.create(**{"model": "tiny", "prompt": "hi", "max_tokens": 4, **kw})
    assert message in err.value.body["message"] if isinstance(err.value.body, dict) else message in str(err.value)


def test_chat_needs_a_template(server):
    with pytest.raises(openai.BadRequestError, match="this model's tokenizer has no chat template"):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_chat_with_a_template():
    tok = ByteTokenizer()
    tok.config_text = json.dumps({"chat_template": TEMPLATE})
    s = Server(tok)
    try:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        out = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        prompt = "<system>be brief\n<user>hi\n<assistant>"
        assert out.choices[0].message.content == s.greedy(list(prompt.encode()), 12)
        assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(prompt)
        stream = s.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content
    finally:
        assert s.close() == []


def test_the_loop_counts_finished_requests_and_cancels_the_rest_at_stop():
    """One request ends by its length and one is cancelled by its client: both finished. One still
    generating when the loop stops is cancelled, not finished; the metrics count every reason."""
    model = build(model_config(vocab_size=256, max_seq_len=128))
    loop = ServingLoop(InferenceEngine(model, block_size=8, num_blocks=200), ByteTokenizer(), token_budget=64)
    paused, step = threading.Event(), loop.scheduler.step
    loop.scheduler.step = lambda: StepResult([], [], 0, 0) if paused.is_set() else step()

    async def run():
        def submit(max_tokens):
            r = Request(uid=loop.new_uid(), prompt=[1, 2, 3], max_tokens=max_tokens,
                        params=SamplingParams(temperature=0.0))
            return r.uid, loop.submit(r)

        async def until_done(channel):
            while (event := await channel.get())[0] == "token":
                pass
            return event

        _, short = submit(2)
        assert await until_done(short) == ("done", "length")
        uid, dropped = submit(120)
        assert (await dropped.get())[0] == "token"
        loop.cancel(uid)
        assert await until_done(dropped) == ("done", "cancelled")
        uid, left = submit(120)
        assert (await left.get())[0] == "token"
        paused.set()  # no more forwards: it is still generating when the loop stops
        assert await asyncio.to_thread(loop.stop) == [uid]
        assert await until_done(left) == ("done", "cancelled")

    loop.start()
    asyncio.run(run())
    assert loop.finished == 2
    count = loop.metrics.registry.get_sample_value
    assert [count("tedmoe_requests_total", {"finish_reason": r}) for r in ("length", "cancelled")] == [1, 2]


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, counting the tokens each ``decode`` is given."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return super().decode(ids)


def stream_text(tokenizer, ids, stops=()):
    """``_Text``'s pieces for ``ids`` (up to a stop string), the flush last; and whether it stopped."""
    text = _Text(tokenizer, list(stops))
    pieces = []
    for i in ids:
        pieces.append(text.add(i))
        if text.stopped:
            break
    return pieces + [text.flush()], text.stopped


def test_incremental_text_decodes_a_bounded_window_per_token():
    """A long output with 2-, 3- and 4-byte characters split over byte tokens: the pieces add up to
    the full decode, never show half a character, and each token decodes a few tokens whatever the
    length so far."""
    tok = CountingTokenizer()
    rng = random.Random(0)
    ids = list("".join(rng.choice("ab c\né€日🎉") for _ in range(2500)).encode())
    assert len(ids) > 4000
    text, per_token, pieces = _Text(tok, []), [], []
    for i in ids:
        before = tok.decoded
        pieces.append(text.add(i))
        per_token.append(tok.decoded - before)
    pieces.append(text.flush())
    assert "".join(pieces) == ByteTokenizer().decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(p != "" for p in pieces) > 1500  # it streamed: a piece per complete character
    assert max(per_token) <= 2 * _Text.CONTEXT + 4  # the context, then it and a 4-byte character


def test_incremental_text_stops_where_decoding_every_prefix_would():
    """Random outputs (valid UTF-8 and stray bytes) with stop strings that span tokens and
    characters: the text sent is the full decode up to the first stop string to appear, even when
    the token after its first character is the first byte of its next one."""
    tok = ByteTokenizer()

    def expected(ids, stops):
        for k in range(1, len(ids) + 1):
            text = tok.decode(ids[:k])
            for s in stops:
                if s in text:
                    return text[:text.find(s)], True
        return tok.decode(ids), False

    pieces, stopped = stream_text(tok, list("x€日y".encode()), ["€日"])
    assert ("".join(pieces), stopped) == ("x", True)
    rng = random.Random(1)
    for trial in range(600):
        if trial % 2:
            ids = [rng.choice([0x41, 0x80, 0xac, 0xe2, 0x82, 0xf0, 0x9f, 0xff, 0xc3, 0xa9]) for _ in range(40)]
        else:
            ids = list("".join(rng.choice("ab cé€日🎉") for _ in range(30)).encode())
        stops = rng.choice([[], ["b c"], ["€日", "a"], ["🎉"], ["A€", "é€"], ["\n"]])
        pieces, stopped = stream_text(tok, ids, stops)
        assert ("".join(pieces), stopped) == expected(ids, stops), (ids, stops)
