"""The OpenAI completions API, as far as tedmoe serves it: request bodies (checked by pydantic,
with tedmoe's ``top_k`` as an extension), response objects and the error body."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field


class _Sampling(BaseModel):
    """What completions and chat requests share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(rid: str, model: str, text: str, finish: str | None, use: dict | None = None,
               created: int | None = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        body["usage"] = use
    return body


def chat_completion(rid: str, model: str, text: str, finish: str | None, use: dict | None = None,
                    created: int | None = None, chunk: bool = False) -> dict:
    message = {"role": "assistant", "content": text}
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         **({"delta": message} if chunk else {"message": message})}]}
    if use is not None:
        body["usage"] = use
    return body
