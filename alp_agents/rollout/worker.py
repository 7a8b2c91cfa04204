"""EngineWorker: one background thread that owns an inference engine, for asynchronous rollouts.

The trainer hands the worker jobs (a rollout of one step's problems, a held-out evaluation) and
weight snapshots, each tagged with a policy version (the number of optimiser updates behind the
weights). The worker runs its jobs one at a time, in the order they were submitted, and before a
job it loads the snapshot that came with it, so a job runs on exactly the version it was
submitted for. That makes an asynchronous run as reproducible as a synchronous one: which
weights generate which batch is fixed by the order of the calls, never by thread timing.

Only the worker thread touches the engine while the worker is open (engines are not
thread-safe: HFEngine's KV cache, vLLM's scheduler); the trainer reaches it through `call`.
The engine contract is the one of `InferenceEngine`: ``generate`` and ``update_weights``, both
called on the worker thread, so `VLLMEngine` fits as `HFEngine` does.

Why a thread and not a process: the engine, the environments and the sandbox pool already live
in this process, the weights move as a reference to a snapshot (no pickling, no shared-memory
copy), and torch releases the GIL in its kernels. On a CPU both threads would otherwise each
start a full OpenMP team and oversubscribe the cores; the worker therefore runs with its own
intra-op thread count (``threads``; torch's count is per calling thread), and the trainer is
expected to give its own thread the rest (`split_cpu_threads`).

Stopping: `close` cancels the jobs not started and tells the running one to stop at its next
``generate`` call (`RolloutCancelled`), then joins the thread, so Ctrl-C never leaves a thread
behind; a job that must not be cut short is waited for with `Job.result` first.

Example::

    worker = EngineWorker(engine, version=0)
    job = worker.submit(lambda eng, version: run_episodes(..., eng, ..., policy_version=version),
                        version=0)
    ...                                     # the trainer updates meanwhile
    worker.push_weights(1, model.state_dict())
    trajectories = job.result()
    worker.close()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from alp_agents.rollout.engines.base import InferenceEngine, Sample, SamplingParams

T = TypeVar("T")


class RolloutCancelled(RuntimeError):
    """A job was stopped by `EngineWorker.close` or `Job.cancel` before it finished."""


def split_cpu_threads(total: int) -> tuple[int, int]:
    """``(trainer, worker)`` intra-op thread counts out of ``total`` for a CPU run.

    The update gets the larger half (its matmuls scale with threads; decoding is
    memory-bound). With one thread in all both get one: the two threads then share a core.

    >>> split_cpu_threads(2), split_cpu_threads(8), split_cpu_threads(1)
    ((1, 1), (4, 4), (1, 1))
    """
    worker = max(1, total // 2)
    return max(1, total - worker), worker


def snapshot(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict: the trainer goes on updating its own tensors."""
    return {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}


class _CancellableEngine:
    """The worker's engine as a job sees it: ``generate`` refuses once the job is cancelled."""

    def __init__(self, engine: InferenceEngine, cancelled: threading.Event) -> None:
        self._engine = engine
        self._cancelled = cancelled

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[Sample]:
        if self._cancelled.is_set():
            raise RolloutCancelled("the engine worker was stopped")
        return self._engine.generate(prompts, sampling)

    def update_weights(self, model_or_state_dict: Any) -> None:
        self._engine.update_weights(model_or_state_dict)

    def __getattr__(self, name: str) -> Any:  # dtype, tokenizer, stats, ...
        return getattr(self._engine, name)


@dataclass
class Job(Generic[T]):
    """A submitted job: its policy version and its future result."""

    version: int
    future: Future[T]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def result(self, timeout: float | None = None) -> T:
        """Wait for the job; re-raises what it raised (`RolloutCancelled` if it was stopped)."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        """Stop it: one not started yet only loads the weights it carries (later jobs count on
        them) and ends; a running one stops at its next ``generate`` call."""
        self.cancelled.set()


class EngineWorker:
    """Runs jobs on an engine in a background thread, in submission order (module docstring).

    Args:
        engine: any `InferenceEngine`; from now until `close` only the worker thread uses it.
        version: the policy version of the weights the engine holds now.
        threads: torch intra-op threads of the worker thread (None: torch's default).
    """

    def __init__(
        self, engine: InferenceEngine, version: int = 0, threads: int | None = None
    ) -> None:
        self.engine = engine
        self.engine_version = int(version)  # what the engine holds (changed on the worker)
        self._sent_version = int(version)  # newest version attached to a job
        self._latest: tuple[int, dict[str, torch.Tensor]] | None = None
        self._jobs: list[Job[Any]] = []
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="alp-engine-worker",
            initializer=_set_threads,
            initargs=(threads,),
        )

    @property
    def latest_version(self) -> int:
        """The newest version pushed (or the one the worker started with)."""
        return self._latest[0] if self._latest is not None else self._sent_version

    def push_weights(self, version: int, state: Mapping[str, Any]) -> None:
        """Make ``version`` (a copy of ``state`` is taken now) the weights of the next job.

        Versions only move forward; a version pushed twice before a job is sent replaces the
        earlier snapshot.
        """
        if version < self.latest_version:
            raise ValueError(f"weights version {version} is older than {self.latest_version}")
        self._latest = (int(version), snapshot(state))

    def submit(self, fn: Callable[[InferenceEngine, int], T], version: int) -> Job[T]:
        """Queue ``fn(engine, version)`` to run after every job submitted before it.

        ``version`` must be the newest pushed (or the starting) version: the job runs on
        exactly those weights, loaded into the engine right before it if it is the first job
        of that version.
        """
        if self._closed:
            raise RuntimeError("the engine worker is closed")
        if version != self.latest_version:
            raise ValueError(
                f"a job of version {version}, but the newest weights are version "
                f"{self.latest_version}: push_weights first"
            )
        weights = None
        if self._latest is not None:
            weights, self._latest = self._latest[1], None
            self._sent_version = version
        cancelled = threading.Event()
        future = self._executor.submit(self._run, fn, version, weights, cancelled)
        job: Job[T] = Job(version, future, cancelled)
        self._jobs = [j for j in self._jobs if not j.done()] + [job]
        return job

    def call(self, fn: Callable[[InferenceEngine, int], T], version: int) -> T:
        """`submit` and wait: e.g. a held-out evaluation with the current weights."""
        return self.submit(fn, version).result()

    def _run(
        self,
        fn: Callable[[InferenceEngine, int], T],
        version: int,
        weights: dict[str, torch.Tensor] | None,
        cancelled: threading.Event,
    ) -> T:
        if weights is not None:
            self.engine.update_weights(weights)
            self.engine_version = version
        if cancelled.is_set():
            raise RolloutCancelled("the job was cancelled before it started")
        return fn(_CancellableEngine(self.engine, cancelled), version)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop: pending jobs are dropped, a running one stops at its next generate call, and
        the thread is joined. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for job in self._jobs:
            job.cancel()
            job.future.cancel()  # not started: never runs
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EngineWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(int(threads))
