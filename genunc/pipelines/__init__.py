"""User-facing pipelines: generate samples together with their uncertainty scores."""

from genunc.pipelines.image import ImageUncertaintyOutput, ImageUncertaintyPipeline

__all__ = ["ImageUncertaintyOutput", "ImageUncertaintyPipeline"]
