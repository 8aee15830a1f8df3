"""Verifiable tasks with exact checkers, for measuring whether uncertainty finds wrong answers."""

from genunc.tasks.arithmetic import ArithmeticTask

__all__ = ["ArithmeticTask"]
