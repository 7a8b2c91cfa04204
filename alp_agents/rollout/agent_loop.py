"""run_episodes: the batched multi-turn agent loop that turns env episodes into trajectories.

All episodes of a batch run at once. Each round makes ONE ``engine.generate`` call for every
live episode, then runs their ``env.step`` calls concurrently in a thread pool (sandbox calls
and verification release the GIL), appends the observations and goes again. A single-turn
environment is the one-round case of the same loop.

One generate call per turn: an env stop string (``"```\\n"``) ends a turn only where the env's
own completion rule says the turn is over (``response_is_complete``). The loop gives the engine
that rule as ``SamplingParams.stop_condition``, so a bare fence does not end the call: the engine
samples on with its KV cache. An engine that ignores the predicate stops at every stop string;
the loop then resumes the turn in the next round, at most ``max_rounds_per_turn`` generate calls
per turn (the turn then goes to the env as it is; ``stats["capped_turns"]``).

Token-in, token-out (the invariant that keeps importance ratios honest):

* ``prompt_ids`` = the chat template applied to the env's initial messages, with the generation
  prompt (`alp_agents.rollout.chat.ChatDelta`); a tool env whose tools the template renders
  (``env.configure_tool_prompt``, asked before ``reset``) has them passed as ``tools=`` to
  every render of its episode (recorded in ``metrics["tools"]``);
* the engine is given exactly ``prompt_ids + response_ids`` so far; its sampled ids are appended
  verbatim with ``loss_mask`` 1 and its log-probs (including an end-of-turn token it sampled);
* after a turn, the template's assistant-closing tokens are appended (mask 0): all of them when
  the model stopped on a stop string or the length limit, the rest after a sampled end-of-turn
  token;
* the observation tokens are the exact delta the template adds for the env's new messages plus
  the next generation prompt, computed against a fixed base conversation (mask 0). The env gets
  the decoded TEXT of the sampled ids (for the env only; those ids are never re-encoded). A
  template that rewrites earlier assistant turns (Qwen3 drops their ``<think>`` blocks) changes
  nothing here: every turn stays as sampled, reasoning included (a one-time warning says so).

Budgets are counted in policy tokens: every turn may sample at most ``sampling.max_tokens`` and
the whole episode (prompt + response) fits in ``max_context_tokens``; each observation message's
content is cut to ``max_observation_tokens`` (head + tail with a visible marker). A turn cut by
a budget still goes to the env, so an answer in it is graded, and the episode's
``finish_reason`` is ``"length"`` (the env's own verdict is kept in ``metrics``). Environment
exceptions become ``sandbox_error`` episodes with an ``unverifiable`` grade and the traceback in
``metrics["error"]`` (the learner drops them; the failures are logged at error level).

What the env did is recorded on the trajectory as it happens: one `StepRecord` per turn with
the action text, the tool calls and their results (`ToolCallRecord`, normalised from the env's
``info["tool_results"]`` by `alp_agents.rollout.trajectory.tool_call_record`, the one place that
knows PythonToolEnv's and ToolEnv's keys), the observation messages, the step's reward with the
env's rubric values (``info["rewards"]``) and the final grade; the trajectory's ``reward`` is the
sum of its steps' rewards (the binary grade at the end for an env without a rubric). Readers
(evaluation's sample records, `alp_agents.rollout.stats.episode_stats`) take it from there.

Example::

    >>> from alp_agents import HFEngine, SamplingParams, run_episodes, load_tokenizer
    >>> import envs
    >>> tok = load_tokenizer()                                               # doctest: +SKIP
    >>> engine = HFEngine("smollm2-135m-instruct", tok)                       # doctest: +SKIP
    >>> problems = envs.load_dataset("arith", split="train")[:4]             # doctest: +SKIP
    >>> trajs = run_episodes("alp/PythonTool-v0", engine, tok, problems, group_size=4,
    ...                      sampling=SamplingParams(max_tokens=256), seed=0)  # doctest: +SKIP
    >>> len(trajs), trajs[0].finish_reason in ("answer", "max_turns", "void_turn", "length")
    ...                                                                      # doctest: +SKIP
    (16, True)
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from alp_agents.common.seeding import derive_seed
from alp_agents.reporting.console import progress_bar
from alp_agents.rollout.chat import ChatDelta, template_renders_tools
from alp_agents.rollout.engines.base import InferenceEngine, Sample, SamplingParams
from alp_agents.rollout.trajectory import StepRecord, Trajectory, grade_record, tool_call_record

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT_TOKENS = 4096
TRUNCATION_MARKER = "\n...[{n} tokens truncated]...\n"


@dataclass
class _Episode:
    """Mutable state of one live episode (becomes a `Trajectory` at the end)."""

    index: int
    group_id: int
    env: Any
    delta: ChatDelta
    problem_id: str
    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    stops: list[str]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    turn: int = 0
    turn_sampled: list[int] = field(default_factory=list)  # ids sampled so far in this turn
    reward: float = 0.0
    grade_status: str = "none"
    finish_reason: str | None = None
    num_tool_calls: int = 0
    num_void_turns: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)  # one per turn, at its first call

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def append(
        self, ids: Sequence[int], mask: int, logprobs: Sequence[float] | None = None
    ) -> None:
        self.response_ids.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.turn_index.extend([self.turn] * len(ids))

    def to_trajectory(self) -> Trajectory:
        return Trajectory(
            prompt_ids=self.prompt_ids,
            response_ids=self.response_ids,
            loss_mask=self.loss_mask,
            infer_logprobs=[float(x) for x in self.logprobs],
            turn_index=self.turn_index,
            reward=float(self.reward),
            grade_status=self.grade_status,
            finish_reason=self.finish_reason or "length",
            num_turns=len(set(self.turn_index)),
            num_tool_calls=self.num_tool_calls,
            num_void_turns=self.num_void_turns,
            group_id=self.group_id,
            problem_id=self.problem_id,
            messages=self.messages,
            metrics=self.metrics,
            steps=self.steps,
            policy_versions=self.policy_versions,
        )


def _make_env(env_id_or_factory: str | Callable[..., Any], env_kwargs: dict[str, Any]) -> Any:
    if isinstance(env_id_or_factory, str):
        import envs

        return envs.make(env_id_or_factory, **env_kwargs)
    return env_id_or_factory(**env_kwargs)


def _reset_options(problem: Any) -> dict[str, Any]:
    if isinstance(problem, str):
        return {"problem_id": problem}
    if isinstance(problem, int):
        return {"problem_index": problem}
    return {"problem": problem}  # an envs.Problem or a dict record


def truncate_observation(tokenizer: Any, content: str, budget: int | None) -> tuple[str, int]:
    """Cut ``content`` to about ``budget`` policy tokens, keeping head and tail.

    Returns ``(text, tokens_dropped)``. The marker's own tokens count against the budget.
    """
    if budget is None:
        return content, 0
    ids = tokenizer.encode(content, add_special_tokens=False)
    if len(ids) <= budget:
        return content, 0
    dropped = len(ids) - budget
    marker = TRUNCATION_MARKER.format(n=dropped)
    keep = max(0, budget - len(tokenizer.encode(marker, add_special_tokens=False)))
    head, tail = keep - keep // 2, keep // 2
    text = tokenizer.decode(ids[:head]) + marker + (tokenizer.decode(ids[-tail:]) if tail else "")
    return text, len(ids) - keep


class _Progress:
    """The rollout's progress bar: episodes done, with the running mean reward."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = progress_bar(total, desc="rollout", unit="ep", enabled=enabled)
        self.rewards: list[float] = []

    def update(self, finished: list[_Episode], live: int, round_: int, tokens_per_s: float) -> None:
        self.rewards.extend(ep.reward for ep in finished)
        self.bar.update(len(finished))
        mean = sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")
        self.bar.set_postfix(
            reward=f"{mean:.3f}", live=live, round=round_, tok_s=f"{tokens_per_s:.0f}"
        )

    def close(self) -> None:
        self.bar.close()


def run_episodes(
    env_id_or_factory: str | Callable[..., Any],
    engine: InferenceEngine,
    tokenizer: Any,
    problems: Sequence[Any],
    group_size: int,
    sampling: SamplingParams,
    env_kwargs: dict[str, Any] | None = None,
    max_turns: int | None = None,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    max_observation_tokens: int | None = None,
    progress: bool = True,
    seed: int | None = None,
    stats: dict[str, Any] | None = None,
    max_workers: int = 32,
    max_rounds_per_turn: int = 4,
    policy_version: int | Callable[[], int] = 0,
) -> list[Trajectory]:
    """Run ``len(problems) * group_size`` episodes concurrently; one trajectory per episode.

    Args:
        env_id_or_factory: a registered env id (``"alp/PythonTool-v0"``) or a callable returning
            a fresh env (called with ``**env_kwargs``). One env per episode.
        engine: any `InferenceEngine` (`HFEngine`, `VLLMEngine`).
        tokenizer: the policy's tokenizer with its chat template (decodes actions for the env,
            renders template deltas).
        problems: `envs.Problem` objects, problem-id strings or dataset indices. Episodes are
            ordered problem by problem; all ``group_size`` episodes of problems[i] get
            ``group_id = i``.
        group_size: episodes per problem (the GRPO group).
        sampling: per-turn sampling; ``max_tokens`` is the per-turn budget. The env's
            ``stop_sequences`` and the template's end-of-turn token are added to it.
        env_kwargs: keyword arguments for the env (``dataset=...``, ``split=...``).
        max_turns: forwarded to the env as ``max_turns`` when given.
        max_context_tokens: prompt + response budget per episode, in policy tokens.
        max_observation_tokens: per observation message, in policy tokens (None: the env's
            ``max_observation_tokens`` attribute if it has one, else unlimited).
        progress: show a tqdm bar with the running mean reward.
        seed: makes env resets (episode ``i`` resets with ``seed + i``) and sampling
            reproducible (None: random); round ``r``'s sampling seed is
            ``derive_seed("rollout-sampling", seed, r)``.
        stats: if given, filled with timings and counts (``generate_s``, ``env_s``,
            ``total_s``, ``rounds``, ``generated_tokens``; ``deferred_stops``: env stop strings
            the engine sampled through because the turn was not complete; ``continuations``:
            turns resumed in a later round by an engine that ignores ``stop_condition``;
            ``capped_turns``: turns ended by ``max_rounds_per_turn``).
        max_workers: threads for concurrent ``env.step`` calls.
        max_rounds_per_turn: safety net for engines that ignore ``stop_condition``: a turn gets
            at most this many generate calls, then goes to the env as it is (the turn's
            ``metrics["turns"][k]["capped"]`` is True). With `HFEngine` / `VLLMEngine` every
            turn takes one call.
        policy_version: the version of the weights the engine samples with (the number of
            optimiser updates behind them), recorded per turn in
            `Trajectory.policy_versions`; a callable is asked at every generate call, for an
            engine whose weights may change between rounds. A turn spread over several calls
            records the version of its first.

    Returns:
        Trajectories in episode order (problem-major), each validated.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not problems:
        raise ValueError("run_episodes needs at least one problem")
    if max_rounds_per_turn < 1:
        raise ValueError(f"max_rounds_per_turn must be >= 1, got {max_rounds_per_turn}")
    if sampling.stop_condition is not None:
        raise ValueError(
            "run_episodes sets SamplingParams.stop_condition itself (the env's completion rule); "
            "pass sampling without one"
        )
    t_start = time.perf_counter()
    env_kwargs = dict(env_kwargs or {})
    if max_turns is not None:
        env_kwargs["max_turns"] = max_turns
    n = len(problems) * group_size
    timing = {
        "generate_s": 0.0,
        "env_s": 0.0,
        "rounds": 0,
        "generated_tokens": 0,
        "deferred_stops": 0,
        "continuations": 0,
        "capped_turns": 0,
    }
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, n)))
    progress_bar = _Progress(n, progress)
    episodes: list[_Episode] = []
    try:
        t_env = time.perf_counter()
        renders_tools = template_renders_tools(tokenizer)
        episodes = list(
            pool.map(
                lambda i: _start_episode(
                    i, i // group_size, problems[i // group_size], env_id_or_factory, env_kwargs,
                    tokenizer, seed, renders_tools,
                ),
                range(n),
            )
        )  # fmt: skip
        timing["env_s"] += time.perf_counter() - t_env
        live = list(episodes)
        for ep in live:
            _check_budget(ep, max_context_tokens, sampling)
        finished_now = [ep for ep in live if ep.finish_reason is not None]
        live = [ep for ep in live if ep.finish_reason is None]
        progress_bar.update(finished_now, len(live), 0, 0.0)
        while live:
            timing["rounds"] += 1
            per_episode = [
                sampling.replace(
                    max_tokens=_turn_budget(ep, sampling, max_context_tokens),
                    stop=list(dict.fromkeys([*sampling.stop, *ep.stops])),
                    stop_token_ids=_stop_token_ids(ep, sampling),
                    seed=_round_seed(seed, timing["rounds"]),
                    stop_condition=_TurnComplete.for_episode(ep, sampling.stop, tokenizer),
                )
                for ep in live
            ]
            t_gen = time.perf_counter()
            version = policy_version() if callable(policy_version) else policy_version
            samples = engine.generate([ep.context for ep in live], per_episode)
            gen_s = time.perf_counter() - t_gen
            timing["generate_s"] += gen_s
            new_tokens = sum(len(s.token_ids) for s in samples)
            timing["generated_tokens"] += new_tokens
            if len(samples) != len(live):
                raise RuntimeError(
                    f"engine returned {len(samples)} samples for {len(live)} prompts"
                )

            t_env = time.perf_counter()
            stepping = []
            for ep, sample, params in zip(live, samples, per_episode, strict=True):
                if len(ep.policy_versions) <= ep.turn:
                    ep.policy_versions.append(int(version))
                if _absorb_sample(ep, sample, params, max_rounds_per_turn):
                    stepping.append(ep)
                else:  # an engine that ignores stop_condition stopped inside the turn
                    timing["continuations"] += 1
            results = list(pool.map(lambda ep: _step_env(ep, tokenizer), stepping))
            for ep, outcome in zip(stepping, results, strict=True):
                _apply_step(ep, outcome, tokenizer, max_observation_tokens, max_context_tokens)
                if ep.finish_reason is None:
                    _check_budget(ep, max_context_tokens, sampling)
            timing["env_s"] += time.perf_counter() - t_env
            finished_now = [ep for ep in live if ep.finish_reason is not None]
            live = [ep for ep in live if ep.finish_reason is None]
            progress_bar.update(finished_now, len(live), timing["rounds"], new_tokens / gen_s)
    finally:
        progress_bar.close()
        pool.shutdown(wait=True)
        for ep in episodes:
            _close_env(ep.env)

    failures = [ep for ep in episodes if "error" in ep.metrics]
    if failures:
        log.error(
            "%d of %d episodes failed inside the environment (flagged sandbox_error, excluded by "
            "the learner); first error:\n%s",
            len(failures), len(episodes), failures[0].metrics["error"],
        )  # fmt: skip
    for ep in episodes:
        timing["deferred_stops"] += ep.metrics["deferred_stops"]
        timing["capped_turns"] += sum(1 for t in ep.metrics["turns"] if t.get("capped"))
    trajectories = [ep.to_trajectory() for ep in episodes]
    for traj in trajectories:
        traj.validate()
    timing["total_s"] = time.perf_counter() - t_start
    if stats is not None:
        stats.update(timing)
    return trajectories


# ---------------------------------------------------------------------------- per-episode steps


def _round_seed(seed: int | None, round_: int) -> int | None:
    """The sampling seed of one generate round (31 bits: every engine's RNG accepts it)."""
    return None if seed is None else derive_seed("rollout-sampling", seed, round_, bits=31)


def _start_episode(
    index: int,
    group_id: int,
    problem: Any,
    env_id_or_factory: str | Callable[..., Any],
    env_kwargs: dict[str, Any],
    tokenizer: Any,
    seed: int | None,
    renders_tools: bool,
) -> _Episode:
    env = _make_env(env_id_or_factory, env_kwargs)
    base = getattr(env, "unwrapped", env)
    # A tool env decides where its schemas go for this template (envs.ToolEnv.configure_tool_prompt).
    configure = getattr(base, "configure_tool_prompt", None)
    tools = configure(renders_tools) if configure is not None else None
    _, info = env.reset(
        seed=None if seed is None else seed + index, options=_reset_options(problem)
    )
    messages = [dict(m) for m in info["messages"]]
    delta = ChatDelta(tokenizer, messages, tools=tools)
    return _Episode(
        index=index,
        group_id=group_id,
        env=env,
        delta=delta,
        problem_id=str(info.get("problem_id", getattr(problem, "id", problem))),
        messages=messages,
        prompt_ids=list(delta.prompt_ids),
        stops=list(getattr(base, "stop_sequences", []) or []),
        metrics={
            "turns": [],
            "observation_tokens_dropped": 0,
            "initial_messages": len(messages),
            "deferred_stops": 0,
            **({"tools": delta.tools} if delta.tools else {}),
        },
    )


def _stop_token_ids(ep: _Episode, sampling: SamplingParams) -> list[int]:
    ids = list(sampling.stop_token_ids)
    eot = ep.delta.end_of_turn_id
    if eot is not None and eot not in ids:
        ids.append(eot)
    return ids


def _turn_budget(ep: _Episode, sampling: SamplingParams, max_context_tokens: int) -> int:
    """Tokens this episode may still sample in its current turn (closing tokens kept free)."""
    room = max_context_tokens - len(ep.context) - len(ep.delta.closing_ids)
    return max(1, min(sampling.max_tokens - len(ep.turn_sampled), room))


def _check_budget(ep: _Episode, max_context_tokens: int, sampling: SamplingParams) -> None:
    """End the episode ("length") when no token of a new turn fits the context budget."""
    if max_context_tokens - len(ep.context) - len(ep.delta.closing_ids) < 1:
        ep.finish_reason = "length"
        ep.metrics["context_exhausted"] = True


class _TurnComplete:
    """``SamplingParams.stop_condition`` for one episode's current turn.

    Given the ids sampled so far in this generate call, True when the turn is over: a stop
    string of the caller's own (not an env stop) occurs in the turn, or the env's
    ``response_is_complete`` accepts the turn's text (decoded as ``env.step`` will get it:
    the ids of earlier rounds of the turn plus these). Every rejection is counted in the
    episode's ``metrics["deferred_stops"]``.
    """

    def __init__(
        self,
        ep: _Episode,
        complete: Callable[[str], bool],
        caller_stops: list[str],
        tokenizer: Any,
    ) -> None:
        self.ep = ep
        self.complete = complete
        self.caller_stops = caller_stops
        self.tokenizer = tokenizer
        self.prefix = list(ep.turn_sampled)

    @classmethod
    def for_episode(
        cls, ep: _Episode, caller_stops: Sequence[str], tokenizer: Any
    ) -> _TurnComplete | None:
        """None when the env has no stop strings or no ``response_is_complete``."""
        complete = getattr(getattr(ep.env, "unwrapped", ep.env), "response_is_complete", None)
        if not ep.stops or complete is None:
            return None
        own = [s for s in caller_stops if s not in ep.stops]
        return cls(ep, complete, own, tokenizer)

    def is_complete(self, ids: Sequence[int]) -> bool:
        turn = self.prefix + list(ids)
        if self.caller_stops:
            raw = self.tokenizer.decode(turn, skip_special_tokens=False)
            if any(s in raw for s in self.caller_stops):
                return True
        return bool(self.complete(self.tokenizer.decode(turn, skip_special_tokens=True)))

    def __call__(self, ids: Sequence[int]) -> bool:
        done = self.is_complete(ids)
        if not done:
            self.ep.metrics["deferred_stops"] += 1
        return done


def _absorb_sample(
    ep: _Episode, sample: Sample, params: SamplingParams, max_rounds_per_turn: int
) -> bool:
    """Append a sample verbatim (mask 1). Returns True when the turn is over and goes to the env.

    An engine that honours ``params.stop_condition`` only stops on a stop string where the turn
    is complete. One that ignores it may stop on an env stop string where the env does not
    consider the response complete (e.g. a bare opening fence): the same turn then continues in
    the next round, up to ``max_rounds_per_turn`` generate calls for the turn.
    """
    ep.append(sample.token_ids, 1, sample.logprobs)
    ep.turn_sampled.extend(sample.token_ids)
    turn_log = ep.metrics["turns"]
    if len(turn_log) <= ep.turn:
        turn_log.append({"generated": 0, "segments": 0, "finish": None})
    turn = turn_log[ep.turn]
    turn["generated"] += len(sample.token_ids)
    turn["segments"] += 1
    turn["finish"] = sample.finish_reason
    condition = params.stop_condition
    if sample.finish_reason != "stop" or not isinstance(condition, _TurnComplete):
        return True
    budget_left = params.max_tokens - len(sample.token_ids) > 0
    if not budget_left or condition.is_complete(sample.token_ids):
        return True
    if turn["segments"] >= max_rounds_per_turn:
        turn["capped"] = True  # safety net: an engine that ignores stop_condition
        return True
    return False  # e.g. a bare "```\n" fence opened: keep generating this turn


def _step_env(ep: _Episode, tokenizer: Any) -> tuple[Any, ...]:
    text = tokenizer.decode(ep.turn_sampled, skip_special_tokens=True)
    try:
        return ("ok", text, ep.env.step(text))
    except Exception as exc:  # an env or sandbox crash: infrastructure, not a wrong answer
        return ("error", text, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _apply_step(
    ep: _Episode,
    outcome: tuple[Any, ...],
    tokenizer: Any,
    max_observation_tokens: int | None,
    max_context_tokens: int,
) -> None:
    status, text, payload = outcome
    last_finish = ep.metrics["turns"][ep.turn]["finish"]
    truncated = last_finish == "length"
    ep.messages.append({"role": "assistant", "content": text})
    ep.append(ep.delta.closing_after(ep.turn_sampled), 0)
    if status == "error":
        log.warning("episode %d (%s): env.step raised %s", ep.index, ep.problem_id, payload)
        ep.metrics["error"] = payload
        ep.finish_reason, ep.grade_status = "sandbox_error", "unverifiable"
        ep.steps.append(
            StepRecord(
                turn=ep.turn, action=text, finish_reason="sandbox_error", error=payload, reward=0.0
            )
        )
        return
    _, reward, _, _, info = payload
    step = StepRecord(
        turn=ep.turn,
        action=text,
        tool_calls=[tool_call_record(r) for r in info.get("tool_results") or []],
        finish_reason=info.get("finish_reason"),
        reward=float(reward),
        rewards={str(name): float(value) for name, value in (info.get("rewards") or {}).items()},
    )
    ep.steps.append(step)
    ep.reward += float(reward)  # the return: per-turn rewards add up (0.0 until the end by default)
    ep.num_tool_calls = int(info.get("tool_calls", ep.num_tool_calls) or 0)
    grade = info.get("grade")
    if grade is not None:
        step.grade = grade_record(grade)
        ep.grade_status = step.grade.status
        ep.metrics["grade_detail"] = step.grade.detail
    env_finish = info.get("finish_reason")
    if env_finish is not None:
        ep.metrics["env_finish_reason"] = env_finish
        if truncated:
            ep.finish_reason = "length"
        else:
            ep.finish_reason = env_finish
            if env_finish == "void_turn":
                ep.num_void_turns += 1
        return
    # The episode goes on: observation delta (budgeted), then the next turn.
    new_messages = []
    budget = max_observation_tokens
    if budget is None:
        budget = getattr(getattr(ep.env, "unwrapped", ep.env), "max_observation_tokens", None)
    for message in info.get("messages", []):
        content, dropped = truncate_observation(tokenizer, str(message.get("content", "")), budget)
        ep.metrics["observation_tokens_dropped"] += dropped
        new_messages.append({**message, "content": content})
    step.observation = [dict(m) for m in new_messages]
    ep.messages.extend(new_messages)
    observation = ep.delta.observation_ids(new_messages)
    _note_history_rewrite(ep.delta, new_messages)
    if len(ep.context) + len(observation) + len(ep.delta.closing_ids) + 1 > max_context_tokens:
        # No room for the observation and one more sampled token: the episode is cut here. The
        # model's last turn is kept (and was given to the env); only template tokens are missing.
        ep.finish_reason = "length"
        ep.metrics["context_exhausted"] = True
        return
    ep.append(observation, 0)
    ep.metrics["turns"][ep.turn]["observation_tokens"] = len(observation)
    if truncated:
        ep.metrics["truncated_turns"] = ep.metrics.get("truncated_turns", 0) + 1
    ep.turn += 1
    ep.turn_sampled = []


_HISTORY_NOTED: set[tuple[str, tuple[str, ...]]] = set()
"""(chat template, observation roles) pairs already checked by `_note_history_rewrite`."""


def _note_history_rewrite(delta: ChatDelta, new_messages: Sequence[dict[str, Any]]) -> None:
    """Warn once per process, template and observation roles, when the template would rewrite
    the earlier assistant turn (Qwen3: drop its ``<think>`` block). The rollout keeps the turn as
    sampled either way; the warning is about deployment, where the stock template would not
    show the model its earlier reasoning (docs/rollout.md, "Thinking models")."""
    roles = tuple(str(m.get("role")) for m in new_messages)
    key = (str(delta.tokenizer.chat_template), roles)
    if key in _HISTORY_NOTED:
        return
    _HISTORY_NOTED.add(key)
    if delta.rewrites_history(new_messages):
        log.warning(
            "the chat template rewrites an assistant turn once %s message(s) follow it (e.g. "
            "drops its <think> block); the rollout keeps every turn as sampled, reasoning "
            "included, so training contexts hold earlier reasoning that this template would "
            "not show the model at deployment (docs/rollout.md, 'Thinking models')",
            "/".join(roles),
        )


def _close_env(env: Any) -> None:
    try:
        env.close()
    except Exception as exc:  # closing must not hide the rollout's result
        log.warning("env.close() raised %s: %s", type(exc).__name__, exc)
