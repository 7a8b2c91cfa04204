"""Three-valued answer grading: correct | wrong | unverifiable.

``grade(response, reference)`` extracts the model's final answer (the content of the LAST
``\\boxed{...}``; optionally the last plain number, GSM8K style) and compares it with the
reference using math-verify + sympy. The comparison runs in a warm pool of verifier processes
(:class:`VerifierPool`) with a hard timeout, because sympy can hang on adversarial answers and
math-verify's own ``signal.alarm`` timeout does not work outside the main thread (rollouts
grade from threads).

The rule that matters for training: a grade is ``wrong`` only when we decided it is wrong (no
answer at all, an answer that is not maths, or math-verify said "not equal"). A verifier
timeout or crash, or a reference that does not parse, is ``unverifiable``: the caller decides
(the trainer masks it, evaluation reports it), nothing is silently scored 0.

    >>> import envs
    >>> envs.grade("so the answer is \\\\boxed{\\\\frac{1}{2}}", "0.5").status
    'correct'
    >>> envs.grade("I think 7", "7").status          # no box: no answer
    'wrong'
    >>> envs.grade("I think 7", "7", extract="boxed_or_number").status
    'correct'
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

GradeStatus = Literal["correct", "wrong", "unverifiable"]
Extraction = Literal["boxed", "boxed_or_number", "raw"]
EXTRACTIONS: tuple[str, ...] = ("boxed", "boxed_or_number", "raw")

DEFAULT_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one response.

    Attributes:
        status: ``correct``, ``wrong`` or ``unverifiable`` (could not decide: never a 0 reward
            to train on without looking).
        extracted: the answer taken from the response (None when there was none).
        reference: the reference answer.
        detail: why (``"exact match"``, ``"math-verify"``, ``"no \\\\boxed{} answer"``,
            ``"verifier timed out after 5.0 s"``...).
        score: credit in [0, 1]. Left out it is 1.0 for ``correct`` and 0.0 otherwise, the
            binary reward of the authors' release, so every shipped grader keeps that reward; a
            grader that gives partial credit (3 of 4 parts right: ``Grade("wrong", ...,
            score=0.75)``) sets it. ``status`` stays what evaluation counts as accuracy. An
            ``unverifiable`` grade must score 0.0: nobody knows, and the learner drops it.

    >>> Grade("correct", "7", "7").score, Grade("wrong", "6", "7").score
    (1.0, 0.0)
    >>> Grade("wrong", "6, 7", "6, 7, 8", "2 of 3 parts", score=2 / 3).reward
    0.6666666666666666
    """

    status: GradeStatus
    extracted: str | None
    reference: str
    detail: str = ""
    score: float | None = None

    def __post_init__(self) -> None:
        if self.status not in ("correct", "wrong", "unverifiable"):
            raise ValueError(
                f"Grade status must be correct, wrong or unverifiable, got {self.status!r}"
            )
        score = default_score(self.status) if self.score is None else self.score
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise TypeError(f"Grade score must be a float in [0, 1], got {score!r}")
        if not 0.0 <= score <= 1.0:  # also rejects NaN
            raise ValueError(f"Grade score must be in [0, 1], got {score!r}")
        if self.status == "unverifiable" and score != 0.0:
            raise ValueError(f"an unverifiable Grade scores 0.0, got score={score!r}")
        object.__setattr__(self, "score", float(score))

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    @property
    def reward(self) -> float:
        """The outcome reward: ``score`` (1.0 iff correct unless the grader gave partial credit;
        docs/environments.md)."""
        assert self.score is not None  # set by __post_init__
        return self.score

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "extracted": self.extracted,
            "reference": self.reference,
            "detail": self.detail,
            "score": self.score,
        }


def default_score(status: str) -> float:
    """The score of a grade that sets none: 1.0 iff correct (the paper's binary reward)."""
    return 1.0 if status == "correct" else 0.0


# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``); None if none.

    Braces are matched, so nested LaTeX survives:

    >>> extract_boxed(r"first \\boxed{1}, then \\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    >>> extract_boxed("no box") is None
    True
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        content = text[start + 1 : i].strip()
                        return content if content else None
            continue  # unbalanced (cut off): try an earlier box
        word = re.match(r"[^\s$]+", text[start:])  # "\boxed 5$"
        if word:
            return word.group(0)
    return None


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed (GSM8K style).

    >>> extract_last_number("She pays $1,234.50 in total.")
    '1234.50'
    """
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def extract_answer(text: str, extract: Extraction = "boxed") -> str | None:
    """The final answer in ``text`` according to ``extract`` (see :func:`grade`)."""
    if extract == "raw":
        return text.strip() or None
    if extract not in EXTRACTIONS:
        raise ValueError(f"extract must be one of {EXTRACTIONS}, got {extract!r}")
    boxed = extract_boxed(text)
    if boxed is not None or extract == "boxed":
        return boxed
    return extract_last_number(text)


def _balanced(text: str) -> bool:
    """True when the braces of ``text`` (ignoring escaped ``\\{``) are balanced."""
    depth = 0
    for char in re.sub(r"\\[{}]", "", text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _canonical(answer: str) -> str:
    """Cheap normal form for the exact-match fast path (spaces, $, \\left/\\right, \\! dropped)."""
    answer = re.sub(r"\\left|\\right|\\!|\\,|\\;|\$|\s", "", answer)
    return answer.replace("dfrac", "frac").replace("tfrac", "frac").rstrip(".")


# ----------------------------------------------------------------------------- verifier pool


class _VerifierProcess:
    """One ``python -m envs._verifier_worker`` child and its line protocol."""

    def __init__(self) -> None:
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "envs._verifier_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._buffer = ""
        self.ready = False

    def _readline(self, timeout_s: float) -> str | None:
        """One line from the child, or None on timeout or death."""
        deadline = time.monotonic() + timeout_s
        stdout = self.process.stdout
        fd = stdout.fileno()
        while "\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk.decode("utf-8", errors="replace")
        line, self._buffer = self._buffer.split("\n", 1)
        return line

    def wait_ready(self) -> bool:
        if not self.ready:
            line = self._readline(WORKER_START_TIMEOUT_S)
            self.ready = bool(line) and json.loads(line).get("ready", False)
        return self.ready

    def ask(self, pred: str, gold: str, timeout_s: float) -> dict | None:
        try:
            self.process.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._readline(timeout_s)
        if line is None:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class VerifierPool:
    """A thread-safe pool of warm verifier processes with a hard per-call timeout.

    Processes start lazily (the first grade pays ~1-2 s of imports) and are kept warm; a call
    that times out kills its process and a fresh one replaces it on the next call. Results of
    decided comparisons are cached (rollout groups repeat the same answers).
    """

    def __init__(self, size: int | None = None, cache_size: int = 100_000) -> None:
        self.size = max(1, size or min(4, os.cpu_count() or 1))
        self._idle: queue.Queue[_VerifierProcess | None] = queue.Queue()
        for _ in range(self.size):
            self._idle.put(None)  # a slot whose process is not started yet
        self._cache: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._live: set[_VerifierProcess] = set()
        self._closed = False

    def verify(self, pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
        """``{"status": ..., "detail": ...}`` for ``pred`` against ``gold``."""
        key = (pred, gold)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if self._closed:
            raise RuntimeError("this VerifierPool is closed")
        worker = self._idle.get()
        try:
            if worker is None or worker.process.poll() is not None:
                worker = self._spawn(worker)
            if not worker.wait_ready():
                self._discard(worker)
                worker = None
                return {"status": "unverifiable", "detail": "verifier process failed to start"}
            reply = worker.ask(pred, gold, timeout_s)
            if reply is None:
                self._discard(worker)
                worker = None
                return {
                    "status": "unverifiable",
                    "detail": f"verifier timed out after {timeout_s:g} s",
                }
        finally:
            self._idle.put(worker)
        if reply.get("status") in ("correct", "wrong"):
            with self._lock:
                self._cache[key] = reply
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return reply

    def _spawn(self, old: _VerifierProcess | None) -> _VerifierProcess:
        if old is not None:
            self._discard(old)
        worker = _VerifierProcess()
        with self._lock:
            self._live.add(worker)
        return worker

    def _discard(self, worker: _VerifierProcess) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)

    def warm_up(self) -> None:
        """Start every process now (in parallel) instead of on first use."""
        workers = [self._idle.get() for _ in range(self.size)]
        try:
            workers = [
                w if w is not None and w.process.poll() is None else self._spawn(w) for w in workers
            ]
            for w in workers:
                w.wait_ready()
        finally:
            for w in workers:
                self._idle.put(w)

    def close(self) -> None:
        """Kill every verifier process (also done at interpreter exit)."""
        self._closed = True
        with self._lock:
            live = list(self._live)
            self._live.clear()
        for worker in live:
            worker.kill()


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool used by :func:`grade` (created on first use, closed at exit)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool._closed:
            _default_pool = VerifierPool()
            atexit.register(_default_pool.close)
        return _default_pool


def grade(
    response_text: str,
    reference: str,
    *,
    extract: Extraction = "boxed",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: VerifierPool | None = None,
) -> Grade:
    """Grade a model response against a reference answer.

    Args:
        response_text: the model's text (or several turns joined); the LAST box counts.
        reference: the reference answer (LaTeX or plain).
        extract: ``"boxed"`` (default: the last ``\\boxed{}``; none -> wrong), ``"boxed_or_number"``
            (fall back to the last plain number, GSM8K style), or ``"raw"`` (the whole text is
            the answer, e.g. an answer extracted elsewhere).
        timeout_s: hard limit for the verifier; exceeded -> ``unverifiable``.
        pool: a :class:`VerifierPool` (default: the shared process-wide one).

    Returns:
        A :class:`Grade`. Thread-safe; cheap for exact matches (no process round trip).
    """
    reference = str(reference).strip()
    if not reference or not _balanced(reference):
        return Grade(
            "unverifiable", None, reference, "reference answer is empty or has unbalanced braces"
        )
    extracted = extract_answer(response_text, extract)
    if extracted is None:
        what = "\\boxed{} answer" if extract == "boxed" else "answer"
        return Grade("wrong", None, reference, f"no {what} found")
    if _canonical(extracted) == _canonical(reference):
        return Grade("correct", extracted, reference, "exact match")
    reply = (pool or default_pool()).verify(extracted, reference, timeout_s)
    return Grade(reply["status"], extracted, reference, reply.get("detail", ""))
