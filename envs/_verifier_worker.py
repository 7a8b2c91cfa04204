"""The verifier process: math-verify + sympy, one request per line on stdin, one reply on stdout.

Started by :class:`envs.grading.VerifierPool` as ``python -m envs._verifier_worker``. It runs
math-verify in its own main thread with math-verify's signal timeouts disabled; the parent
enforces the time limit by killing this process (sympy can hang on inputs like ``9^{9^{9^9}}``,
and math-verify's ``signal.alarm`` does not work in the rollout's threads anyway).

Request: ``{"pred": str, "gold": str}``. Reply: ``{"status": "correct"|"wrong"|"unverifiable",
"detail": str}``. The first line written is ``{"ready": true}`` once the imports are done.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def _verify(pred: str, gold: str) -> dict:
    from math_verify import parse, verify

    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None, raise_on_error=True)
    except Exception as exc:  # noqa: BLE001 - any verifier crash means "could not decide"
        return {"status": "unverifiable", "detail": f"reference did not parse: {exc!r}"[:300]}
    if not gold_parsed:
        return {"status": "unverifiable", "detail": "reference did not parse"}
    try:
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None, raise_on_error=True)
    except Exception as exc:  # noqa: BLE001
        return {"status": "unverifiable", "detail": f"answer parser crashed: {exc!r}"[:300]}
    if not pred_parsed:
        return {"status": "wrong", "detail": "answer is not a parsable math expression"}
    try:
        same = verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)
    except Exception as exc:  # noqa: BLE001
        return {"status": "unverifiable", "detail": f"verifier crashed: {exc!r}"[:300]}
    return {"status": "correct" if same else "wrong", "detail": "math-verify"}


def main() -> None:
    # Keep the protocol channel clean: anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout = sys.stderr
    logging.disable(logging.WARNING)  # math-verify warns that its own timeout is disabled
    import math_verify  # noqa: F401 - warm the imports before saying ready
    import sympy  # noqa: F401

    _verify("1", "1")
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = _verify(str(request["pred"]), str(request["gold"]))
        except Exception as exc:  # noqa: BLE001 - a bad request must not kill the worker
            reply = {"status": "unverifiable", "detail": f"bad request: {exc!r}"[:300]}
        channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
