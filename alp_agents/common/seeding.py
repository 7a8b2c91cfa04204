"""One way to derive a seed from a run's seed and a position (step, rank, mini-batch, ...).

Seeds made by arithmetic with magic primes collide (``seed * p + step`` equals another run's
``seed' * p + step'``) and differ from file to file; a hash of the labelled parts does not.
"""

from __future__ import annotations

import hashlib


def derive_seed(purpose: str, *parts: int | str, bits: int = 62) -> int:
    """A ``bits``-bit seed determined by ``purpose`` and ``parts``, independent across them.

    ``purpose`` names what the seed is for ("noise", "problems", ...), so two uses of the same
    numbers never share a random stream.

    >>> derive_seed("noise", 0, 3) == derive_seed("noise", 0, 3)
    True
    >>> derive_seed("noise", 0, 3) != derive_seed("sampling", 0, 3)
    True
    >>> 0 <= derive_seed("x", 1, bits=31) < 2**31
    True
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    key = ":".join(["alp-agents", purpose, *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> (64 - bits)
