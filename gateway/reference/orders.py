"""Order state rules of the Automation API, as plain functions.

An order is PENDING until every signer has signed (ACCEPTED), one signer
rejects (REJECTED), the solicitor cancels (CANCELLED) or its due date passes
(EXPIRED). Only a PENDING order can change; the final states are final.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    PENDING = "PENDING"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


class SignerState(str, Enum):
    PENDING = "PENDING"
    SIGNED = "SIGNED"
    REJECTED = "REJECTED"


class Event(str, Enum):
    """The kinds of rows in the `events` table."""

    CREATED = "created"
    SIGNED = "signed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DELETED = "deleted"
    DOCUMENT_DOWNLOADED = "document_downloaded"
    USER_ANONYMIZED = "user_anonymized"


class Conflict(Exception):
    """The action is not allowed in the order's current state (HTTP 409)."""


class NoSuchSigner(Exception):
    """The signer index is outside the order's signers (HTTP 404)."""


def effective_state(stored: State, due_at: float, now: float) -> State:
    """What the order reads as now: a PENDING order past its due date is EXPIRED."""
    if stored is State.PENDING and now >= due_at:
        return State.EXPIRED
    return stored


def require_pending(state: State, action: str) -> None:
    if state is not State.PENDING:
        raise Conflict(f"cannot {action}: the order is {state.value}, not PENDING")


def after_sign(signers: list[SignerState], index: int) -> tuple[list[SignerState], State]:
    """Signer `index` signs: the new signer states and the order's new state."""
    _check_index(signers, index)
    if signers[index] is not SignerState.PENDING:
        raise Conflict(f"signer {index} has already {signers[index].value.lower()}")
    new = list(signers)
    new[index] = SignerState.SIGNED
    done = all(s is SignerState.SIGNED for s in new)
    return new, (State.ACCEPTED if done else State.PENDING)


def after_reject(signers: list[SignerState], index: int) -> tuple[list[SignerState], State]:
    """Signer `index` refuses to sign: the order is REJECTED."""
    _check_index(signers, index)
    if signers[index] is not SignerState.PENDING:
        raise Conflict(f"signer {index} has already {signers[index].value.lower()}")
    new = list(signers)
    new[index] = SignerState.REJECTED
    return new, State.REJECTED


def _check_index(signers: list[SignerState], index: int) -> None:
    if not 0 <= index < len(signers):
        raise NoSuchSigner(f"the order has {len(signers)} signer(s); there is no signer {index}")
