"""Which tail a loop's draws re-run: one question both sampling loops ask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genunc.errors import GenuncError

if TYPE_CHECKING:
    from genunc.posterior.draws import Tail


def shared_tail(*users: Any) -> "Tail | None":
    """The tail that tail draws (or a tail variance estimator) re-run, None for head draws;
    every one of `users` that is given must come from the same posterior."""
    tails = {id(t): t for u in users if (t := getattr(u, "tail", None)) is not None}
    kinds = {getattr(u, "tail", None) is None for u in users if u is not None}
    if len(tails) > 1 or len(kinds) > 1:
        raise GenuncError("the draws a loop is given must come from one posterior (the same "
                          "head, or the same tail)")
    return next(iter(tails.values()), None)
