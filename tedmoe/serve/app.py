"""``tedmoe serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine.

One thread, the engine loop, owns the scheduler and the engine: it takes new requests and
cancellations from a queue, runs one scheduler step (one forward) at a time and hands each new
token to its request's asyncio queue. The HTTP handlers never touch the engine, so a slow client
never stalls a forward, and a client that goes away has its request cancelled (its blocks freed)
in the next step. Across ranks, the loop runs on rank 0 and the engine broadcasts each forward.

Routes: ``POST /v1/completions`` (string or token-list prompt, ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``stop``, ``seed``, ``stream`` as server-sent events, usage counts),
``POST /v1/chat/completions`` (for a tokenizer with a chat template; 400 saying why otherwise),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
"""

import asyncio
import collections
import itertools
import json
import queue
import threading
import time
import uuid

from tedmoe.inference.sampling import SamplingParams
from tedmoe.inference.scheduler import Request, Scheduler
from tedmoe.serve import protocol


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.queue = Gauge("tedmoe_queue_length", "Requests waiting for admission", registry=r)
        self.running = Gauge("tedmoe_running_sequences", "Sequences admitted and not finished", registry=r)
        self.blocks_used = Gauge("tedmoe_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_total = Gauge("tedmoe_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.tokens_per_s = Gauge("tedmoe_generation_tokens_per_second", "Tokens generated per second over the "
                                  "last 10 s", registry=r)
        self.tokens = Counter("tedmoe_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("tedmoe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.requests = Counter("tedmoe_requests", "Requests finished", ["finish_reason"], registry=r)
        self.ttft = Histogram("tedmoe_time_to_first_token_seconds", "From arrival to the first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("tedmoe_time_per_output_token_seconds", "Between a request's consecutive tokens",
                              registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def tokens_made(self, n: int, now: float) -> None:
        self.tokens.inc(n)
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        span = max(1e-9, min(10.0, now - self._recent[0][0])) if len(self._recent) > 1 else 10.0
        self.tokens_per_s.set(sum(k for _, k in self._recent) / span)


class ServingLoop:
    """The engine loop (a thread) and the queues between it and the HTTP handlers."""

    def __init__(self, engine, tokenizer, policy: str = "splitfuse", token_budget: int = 512, max_seqs: int = 32):
        self.engine, self.tokenizer = engine, tokenizer
        self.scheduler = Scheduler(engine, policy, token_budget, max_seqs)
        self.metrics = Metrics()
        self.metrics.blocks_total.set(engine.cache.num_blocks)
        self._inbox: queue.Queue = queue.Queue()
        self._channels: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._last_token: dict[int, float] = {}
        self._uids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tedmoe-engine", daemon=True)
        self.error: BaseException | None = None
        self._cancelled: list[int] = []
        self.finished = 0  # requests that ended while the loop ran (done, stopped or cancelled by their client)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[int]:
        """Stop the loop; the requests in flight are cancelled. Returns their uids."""
        self._stop.set()
        self._thread.join()
        return self._cancelled

    def new_uid(self) -> int:
        return next(self._uids)

    def submit(self, request: Request) -> asyncio.Queue:
        """Hand a request to the loop; its events arrive on the returned queue: ``("token", id)``,
        then ``("done", finish_reason)`` or ``("error", message)``."""
        channel: asyncio.Queue = asyncio.Queue()
        self._channels[request.uid] = (asyncio.get_running_loop(), channel)
        self._inbox.put(("add", request))
        return channel

    def cancel(self, uid: int, reason: str = "cancelled") -> None:
        """Stop a request (no-op once it finished); ``reason`` is what the metrics count."""
        self._inbox.put(("cancel", (uid, reason)))

    # ---- the engine thread ------------------------------------------------------------------
    def _send(self, uid: int, event: tuple) -> None:
        target = self._channels.get(uid)
        if target is not None:
            loop, channel = target
            loop.call_soon_threadsafe(channel.put_nowait, event)

    def _finish(self, r: Request) -> None:
        """A request ended while the loop ran: counted in ``finished``."""
        self.finished += 1
        self._close(r)

    def _close(self, r: Request) -> None:
        """Tell ``r``'s client that it ended, and forget it."""
        self.metrics.requests.labels(r.finish_reason).inc()
        self._send(r.uid, ("done", r.finish_reason))
        self._channels.pop(r.uid, None)
        self._last_token.pop(r.uid, None)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "add":
                try:
                    self.scheduler.add(value)
                except ValueError as err:
                    self._send(value.uid, ("error", str(err)))
                    self._channels.pop(value.uid, None)
            else:
                r = self.scheduler.cancel(*value)
                if r is not None:
                    self._finish(r)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=self.scheduler.idle)
                if self.scheduler.idle:
                    continue
                result = self.scheduler.step()
                now = time.monotonic()
                for r, token in result.tokens:
                    if len(r.generated) == 1 and r.preemptions == 0:
                        self.metrics.ttft.observe(now - r.arrival)
                        self.metrics.prompt_tokens.inc(len(r.prompt))
                    elif r.uid in self._last_token:
                        self.metrics.tpot.observe(now - self._last_token[r.uid])
                    self._last_token[r.uid] = now
                    self._send(r.uid, ("token", token))
                if result.tokens:
                    self.metrics.tokens_made(len(result.tokens), now)
                for r in result.finished:
                    self._finish(r)
                self._update_gauges()
        except BaseException as err:  # the engine failed: every waiting client hears it
            self.error = err
            for uid in list(self._channels):
                self._send(uid, ("error", f"the engine failed: {err}"))
            raise
        finally:
            for r in list(self.scheduler.running) + list(self.scheduler.waiting):  # cancelled, not finished
                self.scheduler.cancel(r.uid)
                self._cancelled.append(r.uid)
                self._close(r)

    def _update_gauges(self) -> None:
        s = self.scheduler
        self.metrics.queue.set(len(s.waiting))
        self.metrics.running.set(len(s.running))
        self.metrics.blocks_used.set(self.engine.cache.num_blocks - self.engine.free_blocks)


class _Text:
    """Incremental detokenisation with stop strings: the text each new token adds, the part of it
    that can be sent now, and whether a stop string ended it (holding back an incomplete UTF-8
    character and, before it, the last ``hold`` characters, which could still begin a stop string).

    A token costs the decode of a few tokens, not of the whole output so far: of the tokens whose
    text is not final yet (``fresh``: it ends in an incomplete character, a multi-byte character
    split over byte tokens or BPE pieces), after up to ``CONTEXT`` final tokens as left context, so
    that a tokenizer whose text for a token depends on the token before (a leading space dropped at
    the start, say) gives the text that decoding everything gives. The fresh tokens' text is the
    decode of context + fresh minus the decode of the context."""

    CONTEXT = 4  # final tokens decoded before the fresh ones
    CHAR = 4  # the most tokens one character can take (its UTF-8 bytes)
    FRESH = 8  # fresh tokens beyond which all but the last CHAR are final (a run of invalid bytes)

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.context: list[int] = []
        self.fresh: list[int] = []
        self.text = ""  # the fresh tokens' text
        self.skip = 0  # its first characters that were sent already
        self.pending = ""  # final text not sent yet (it comes before ``text``)
        self.stopped = False

    def add(self, token: int) -> str:
        self.fresh.append(token)
        self.text = self._decode(self.fresh)
        if not self.text.endswith("\ufffd"):
            self._settle(len(self.fresh), self.text)
        elif len(self.fresh) > self.FRESH:
            head = self._decode(self.fresh[:-self.CHAR])
            if self.text.startswith(head):
                self._settle(len(self.fresh) - self.CHAR, head)
        unsent = self.pending + self.text[self.skip:]
        for s in self.stops:
            at = unsent.find(s)
            if at >= 0:
                self.stopped = True
                return self._send(unsent, at)
        end = len(unsent)
        while end > 0 and unsent[end - 1] == "\ufffd":  # an incomplete character
            end -= 1
        safe = end - self.hold
        while safe > 0 and unsent[safe - 1] == "\ufffd":
            safe -= 1
        return self._send(unsent, max(safe, 0))

    def flush(self) -> str:
        return "" if self.stopped else self._send(self.pending + self.text[self.skip:], None)

    def _decode(self, tokens: list[int]) -> str:
        """The text ``tokens`` add after the context."""
        before = self.tokenizer.decode(self.context) if self.context else ""
        return self.tokenizer.decode(self.context + tokens)[len(before):]

    def _settle(self, n: int, text: str) -> None:
        """The first ``n`` fresh tokens, whose text is ``text``, become final."""
        sent = min(self.skip, len(text))
        self.pending += text[sent:]
        self.skip -= sent
        self.text = self.text[len(text):]
        self.context = (self.context + self.fresh[:n])[-self.CONTEXT:]
        self.fresh = self.fresh[n:]

    def _send(self, unsent: str, n: int | None) -> str:
        """The first ``n`` characters of the unsent text (all for ``None``), now sent."""
        out = unsent[:n]
        taken = min(len(out), len(self.pending))
        self.pending = self.pending[taken:]
        self.skip += len(out) - taken
        return out


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's chat template rendered for ``messages`` (``ValueError`` when it has none)."""
    text = getattr(tokenizer, "config_text", None)
    config = json.loads(text) if text else {}
    template = config.get("chat_template")
    if not template:
        raise ValueError("this model's tokenizer has no chat template (its tokenizer_config.json carries none); "
                         "use /v1/completions with a prompt, or export the model with a tokenizer that has one")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token")}
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


def create_app(loop: ServingLoop, model_name: str):
    """The FastAPI application for ``loop``."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="tedmoe", docs_url=None, redoc_url=None)
    tok = loop.tokenizer
    eos = getattr(tok, "eos_id", None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return JSONResponse(protocol.error_body(f"{where}: {first.get('msg')}", param=where or None), status_code=400)

    def bad(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse(protocol.error_body(message), status_code=status)

    @app.get("/health")
    async def health():
        if loop.error is not None:
            return bad(f"the engine failed: {loop.error}", 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tedmoe"}]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def run(http: HTTPRequest, prompt_ids: list[int], body, max_tokens: int, chat: bool):
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        uid = loop.new_uid()
        seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**63
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        request = Request(uid=uid, prompt=prompt_ids, max_tokens=max_tokens, params=params, seed=seed,
                          stop_ids=frozenset({eos}) if eos is not None else frozenset())
        channel = loop.submit(request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uid}"
        created = int(time.time())
        text = _Text(tok, stops)
        shape = (lambda t, f, u=None: protocol.chat_completion(rid, model_name, t, f, u, created, chunk=True)) \
            if chat else (lambda t, f, u=None: protocol.completion(rid, model_name, t, f, u, created))

        async def events():
            """(text delta, finish reason or None) until the request ends; errors raise ValueError."""
            made = 0
            while True:
                kind, value = await channel.get()
                if kind == "error":
                    raise ValueError(value)
                if kind == "done":
                    yield text.flush(), value, made
                    return
                made += 1
                delta = text.add(value)
                if text.stopped:
                    loop.cancel(uid, "stop")
                    yield delta, "stop", made
                    return
                yield delta, None, made

        if body.stream:
            async def sse():
                made = 0
                try:
                    async for delta, finish, made in events():
                        if await http.is_disconnected():
                            loop.cancel(uid)
                            return
                        # one event per token, even when its text is still held back (part of a
                        # character, or maybe of a stop string), so clients can count and time tokens
                        yield f"data: {json.dumps(shape(delta, finish))}\n\n"
                        if finish:
                            break
                    yield f"data: {json.dumps(shape('', None, protocol.usage(len(prompt_ids), made)) | {'choices': []})}\n\n"
                    yield "data: [DONE]\n\n"
                except ValueError as err:
                    yield f"data: {json.dumps(protocol.error_body(str(err)))}\n\n"
                finally:
                    loop.cancel(uid)  # a no-op once finished; frees the blocks of an abandoned stream

            return StreamingResponse(sse(), media_type="text/event-stream")
        parts, finish, made = [], None, 0
        try:
            async for delta, finish, made in events():
                parts.append(delta)
                if finish:
                    break
        except ValueError as err:
            return bad(str(err))
        finally:
            loop.cancel(uid)
        use = protocol.usage(len(prompt_ids), made)
        if chat:
            return protocol.chat_completion(rid, model_name, "".join(parts), finish, use, created)
        return protocol.completion(rid, model_name, "".join(parts), finish, use, created)

    def encode(text: str) -> list[int]:
        bos = getattr(tok, "bos_id", None)
        return ([bos] if bos is not None else []) + tok.encode(text)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, http: HTTPRequest):
        prompt = body.prompt
        if body.echo:
            return bad("echo=true is not supported; the prompt is yours already")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                return bad("a list of several prompts is not supported; send one prompt per request", 400)
            prompt = prompt[0]
        ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await run(http, ids, body, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: protocol.ChatRequest, http: HTTPRequest):
        try:
            text = chat_prompt(tok, [m.model_dump() for m in body.messages])
        except ValueError as err:
            return bad(str(err))
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await run(http, tok.encode(text), body, max_tokens, chat=True)

    return app



def serve_http(loop: ServingLoop, model_name: str, host: str, port: int, ready: str = "") -> tuple[int, list[int]]:
    """Run the HTTP server until SIGINT/SIGTERM (uvicorn's handlers: in-flight requests get up to
    5 s to finish), then stop the engine loop, cancelling what is left. Prints the URL and
    ``ready`` once the socket listens. Returns (requests finished after the signal, uids cancelled)."""
    import signal
    import sys

    import uvicorn

    at_signal = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop gracefully, and do not raise the signal again afterwards
            at_signal.append(loop.finished)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[:2] if self.servers else (host, port)
                print(f"tedmoe: serving {model_name} at http://{bound[0]}:{bound[1]}/v1 {ready}".rstrip(),
                      file=sys.stderr, flush=True)

    loop.start()
    try:
        server = _Server(uvicorn.Config(create_app(loop, model_name), host=host, port=port, log_level="warning",
                                        access_log=False, timeout_graceful_shutdown=5))
        server.run()
    finally:
        cancelled = loop.stop()
    return loop.finished - (at_signal[0] if at_signal else loop.finished), cancelled
