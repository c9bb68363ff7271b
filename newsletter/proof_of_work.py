"""Hashcash-style proof of work for the signup form, checked here and solved by its script.

The form carries a signed ticket; its script looks for a decimal number `answer` such that
sha256("TICKET:ANSWER") starts with [web] signup_pow_bits zero bits, and posts it. Checking costs
one hash; finding costs 2**bits hashes on average, which is nothing for one person and real money
for someone posting by the thousand. The ticket is signed and good for one post (signup.py), so an
answer cannot be forged or used twice.
"""

from __future__ import annotations

import hashlib
import itertools

# Decimal digits only, at most this long: a longer answer is not ours (the script counts up from 0).
MAX_ANSWER_CHARS = 20


def leading_zero_bits(digest: bytes) -> int:
    """How many zero bits a digest starts with."""
    bits = 0
    for byte in digest:
        if byte:
            return bits + 8 - byte.bit_length()
        bits += 8
    return bits


def is_solved(ticket: str, answer: str, bits: int) -> bool:
    """Whether `answer` (decimal digits) makes sha256("ticket:answer") start with `bits` zeros."""
    if not answer or len(answer) > MAX_ANSWER_CHARS or not answer.isascii() or not answer.isdigit():
        return False
    digest = hashlib.sha256(f"{ticket}:{answer}".encode()).digest()
    return leading_zero_bits(digest) >= bits


def solve(ticket: str, bits: int) -> str:
    """The smallest answer for a ticket, as the page's script finds it (tests, benchmarks)."""
    for n in itertools.count():
        if is_solved(ticket, str(n), bits):
            return str(n)
    raise AssertionError("unreachable")  # pragma: no cover
