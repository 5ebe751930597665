"""A request as a client asked for it, and the sequence the engine grows from it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama4.sampling import SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""  # the client's label: echoed and logged, never an identity
    prompt_logprobs: bool = False  # score mode: log p(token_i | tokens_<i) for the prompt
    trace_routes: bool = False  # report the expert and worker of every MoE layer for each token
    top_logprobs: int = 0  # report this many most likely tokens (and their logprobs) at each step
    images: tuple = ()  # llama4.vision.Image, in the order of their <|patch|> runs in the prompt


@dataclass
class Sequence:
    id: int  # the engine's own identity: two requests with one label never share state
    request: Request
    tokens: list[int]
    generator: torch.Generator | None
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached: int = 0  # tokens loaded from the KV tier at the last admission instead of computed
    num_preemptions: int = 0
    output_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)  # prompt positions the image features fill
    image_features: torch.Tensor | None = None  # [len(image_positions), H], computed at the first prefill
    block_salts: dict[int, bytes] = field(default_factory=dict)  # block -> digests of the images it holds
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # with finish_reason "error": what failed, for this sequence alone
    retryable: bool = False  # the error was the step's (e.g. the expert cluster), not this request's

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: str, retryable: bool = False) -> None:
        self.finish_reason, self.error, self.retryable = "error", error, retryable
