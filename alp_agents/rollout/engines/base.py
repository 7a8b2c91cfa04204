"""The inference-engine contract: sampling parameters, samples, the protocol, stop-string cuts.

Log-prob convention (the learner, `alp_agents.learner.logprobs.token_logprobs`, uses the same):
``Sample.logprobs[i]`` is ``log_softmax(logits / temperature)[token_ids[i]]``, the log-prob of
the sampled token under the temperature-scaled distribution BEFORE top-p / top-k truncation,
computed in float32 from the engine's own logits (its own weights and dtype). With the training
defaults (temperature 1, top_p 1, top_k 0) this is the plain model distribution. Temperature 0
means greedy decoding and reports ``log_softmax(logits)`` (temperature 1).

Stop strings are matched on the decoded text of the NEW tokens only (never the prompt), and the
cut is made on token ids: a sample keeps every token up to and including the one that completed
the first stop string (`stop_cut`). A token that runs past the stop string (``"```\\n\\n"``) is
kept whole, because it is what was sampled; nothing is re-tokenised.

A stop string can be made conditional: with ``SamplingParams.stop_condition`` set, a completed
stop string ends the sample only if ``stop_condition(new_ids_so_far)`` is True; otherwise the
engine keeps sampling the same row in the same call (HFEngine: same KV cache, no new prefill).
The agent loop passes the env's own completion rule here (``response_is_complete``), so a bare
``"```\\n"`` fence that is not the end of a turn does not end the generate call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "eos", "length"]


@dataclass
class SamplingParams:
    """How to sample one batch.

    Args:
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus truncation (1.0 = off). Changes what is sampled, not the reported log-prob.
        top_k: keep the k most likely tokens (0 = off).
        max_tokens: at most this many new tokens per prompt.
        stop: stop strings, matched on the decoded new text; the cut is on token ids.
        seed: seeds the engine's sampling RNG for this call (None = nondeterministic).
        stop_token_ids: token ids that end a sample (finish_reason ``"eos"``), in addition to the
            engine's EOS ids; the agent loop passes the chat template's end-of-turn token here.
        stop_condition: None (every stop string ends the sample), or a predicate on the new
            token ids sampled so far in this call: a stop string completed by the newest token
            ends the sample only if ``stop_condition(ids)`` is True; otherwise sampling goes on
            (the stop is "deferred") until a later stop string is accepted, an EOS / stop token
            id, or ``max_tokens`` (finish_reason ``"length"``). It is evaluated only when a stop
            string completes, so it may be moderately expensive (e.g. decode and parse the turn).
            Stop token ids are never conditional. May differ per prompt.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_condition: Callable[[Sequence[int]], bool] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            raise TypeError("SamplingParams.stop is a list of strings, got a single string")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain an empty string")
        if self.stop_condition is not None and not callable(self.stop_condition):
            raise TypeError(
                "SamplingParams.stop_condition must be None or a callable on token ids, "
                f"got {type(self.stop_condition).__name__}"
            )

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (``sampling.replace(max_tokens=16)``)."""
        values = {**self.__dict__, **changes}
        values["stop"] = list(values["stop"])
        values["stop_token_ids"] = list(values["stop_token_ids"])
        return SamplingParams(**values)


@dataclass
class Sample:
    """What the engine sampled for one prompt.

    ``token_ids`` are the new ids verbatim (including a sampled EOS / end-of-turn token);
    ``logprobs[i]`` belongs to ``token_ids[i]`` (module docstring for the convention);
    ``finish_reason``: ``"eos"`` (an EOS / stop token id was sampled, it is the last id),
    ``"stop"`` (a stop string completed; ``stop_string`` says which) or ``"length"``
    (``max_tokens`` reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop_string: str | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Sample has {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs"
            )


@runtime_checkable
class InferenceEngine(Protocol):
    """Batched sampling from token ids; every engine speaks only token ids.

    The contract is what the agent loop does: ``generate`` gets one `SamplingParams` PER
    PROMPT (a sequence as long as ``prompts``), because every episode has its own remaining
    budget, stop strings and ``stop_condition``. An engine written to this signature runs
    `alp_agents.rollout.run_episodes` as it is. The built-in engines also take a single
    `SamplingParams` for every prompt as a shorthand for direct calls (`per_request`
    expands it); callers that must work with any engine pass the sequence.

    >>> from alp_agents.rollout.engines import HFEngine, SamplingParams   # doctest: +SKIP
    >>> engine = HFEngine("smollm2-135m-instruct")                # doctest: +SKIP
    >>> [s] = engine.generate([[1, 4093, 198]], [SamplingParams(max_tokens=8)])  # doctest: +SKIP
    >>> len(s.token_ids) == len(s.logprobs)                       # doctest: +SKIP
    True
    """

    def generate(
        self, prompts: list[list[int]], sampling: Sequence[SamplingParams]
    ) -> list[Sample]:
        """One `Sample` per prompt, in order; ``sampling[i]`` applies to ``prompts[i]``."""
        ...

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Copy the trainer's weights into the engine's own copy (no restart)."""
        ...


def per_request(
    sampling: SamplingParams | Sequence[SamplingParams], n: int
) -> list[SamplingParams]:
    """One `SamplingParams` per prompt: a sequence is checked against ``n``, a single one is
    repeated (the built-in engines' shorthand for direct calls)."""
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    per_prompt = list(sampling)
    if len(per_prompt) != n:
        raise ValueError(f"{len(per_prompt)} SamplingParams for {n} prompts")
    return per_prompt


def stop_cut(
    token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stops: Sequence[str]
) -> tuple[int, str | None]:
    """The shortest token prefix whose decoded text contains a stop string.

    Returns ``(n, stop)``: keep ``token_ids[:n]``; ``stop`` is the stop string that completed
    first (``(len(token_ids), None)`` when none occurs). Prefix containment is monotone in
    ``n``, so a binary search needs O(log n) decodes.

    >>> text = {(): "", (1,): "a", (1, 2): "a`", (1, 2, 3): "a```", (1, 2, 3, 4): "a```\\nb"}
    >>> stop_cut([1, 2, 3, 4], lambda ids: text[tuple(ids)], ["```"])
    (3, '```')
    """
    if not stops:
        return len(token_ids), None

    def first_stop(n: int) -> str | None:
        text = decode(token_ids[:n])
        hits = [(text.find(s), s) for s in stops if s in text]
        return min(hits)[1] if hits else None

    if first_stop(len(token_ids)) is None:
        return len(token_ids), None
    lo, hi = 1, len(token_ids)  # invariant: prefix hi contains a stop
    while lo < hi:
        mid = (lo + hi) // 2
        if first_stop(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return hi, first_stop(hi)


def completed_stop(
    tail: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    stops: Sequence[str],
    text: str | None = None,
) -> str | None:
    """The stop string that the LAST token of ``tail`` completed (None if it completed none).

    ``tail`` is the end of a sample (`stop_window` tokens are enough); ``text`` its decoded text
    when the caller has it already. A stop string already present without that last token (one
    that was deferred by a ``stop_condition``) does not count again; a new occurrence of it
    does. When the token completed several stop strings, the one whose new occurrence starts
    first is named (as `stop_cut` does).

    >>> text = {(1,): "```", (1, 2): "```\\n", (1, 2, 3): "```\\nx"}
    >>> decode = lambda ids: text.get(tuple(ids), "")
    >>> completed_stop([1, 2], decode, ["```\\n"]), completed_stop([1, 2, 3], decode, ["```\\n"])
    ('```\\n', None)
    """
    if text is None:
        text = decode(tail)
    if not any(s in text for s in stops):
        return None
    before = decode(tail[:-1])
    best: tuple[int, str] | None = None
    for stop in stops:
        starts = _occurrences(text, stop)
        seen = len(_occurrences(before, stop))
        if len(starts) > seen and (best is None or starts[seen] < best[0]):
            best = (starts[seen], stop)
    return None if best is None else best[1]


def conditional_stop_cut(
    token_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    stops: Sequence[str],
    condition: Callable[[Sequence[int]], bool] | None,
    start: int = 0,
) -> tuple[int, str | None]:
    """Replay the engine's stop rule over finished token ids, with a ``stop_condition``.

    The shortest prefix ``token_ids[:n]`` with ``n > start`` whose last token completes a stop
    string that ``condition`` accepts (any stop when ``condition`` is None). Returns
    ``(n, stop)``, or ``(len(token_ids), None)`` when there is none. Exactly what `HFEngine`
    decides token by token, for engines that can only stop on plain stop strings (VLLMEngine
    samples on without stop strings, then cuts here). O(len) decodes of `stop_window` tokens.
    """
    window = stop_window(stops)
    ids = list(token_ids)
    if not stops:
        return len(ids), None
    for n in range(start + 1, len(ids) + 1):
        stop = completed_stop(ids[max(0, n - window) : n], decode, stops)
        if stop is not None and (condition is None or condition(ids[:n])):
            return n, stop
    return len(ids), None


def _occurrences(text: str, sub: str) -> list[int]:
    """Start index of every (possibly overlapping) occurrence of ``sub`` in ``text``."""
    found, i = [], text.find(sub)
    while i >= 0:
        found.append(i)
        i = text.find(sub, i + 1)
    return found


def stop_window(stops: Sequence[str]) -> int:
    """How many trailing tokens to decode to see a stop string completed by the newest token.

    Every token decodes to at least one byte, so a stop string of ``c`` characters (at most
    ``4c`` UTF-8 bytes) spans at most ``4c`` tokens; one more covers a token that starts
    mid-character.
    """
    return 4 * max((len(s) for s in stops), default=0) + 1
