"""Generation loops that expose per-step hooks for posterior head draws."""

from genunc.sampling.diffusers_loop import TrajectoryOutput, repeat_batch, run_trajectory

__all__ = ["TrajectoryOutput", "repeat_batch", "run_trajectory"]
