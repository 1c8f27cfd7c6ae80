"""Flax NNX models of SPCL: ResNet encoders and the projection, prototype, metric and linear heads."""
from spcl_jax.models.heads import LinearHead, MetricLearner, ProjectionHead, PrototypeClassifier
from spcl_jax.models.param_groups import is_norm_or_bias
from spcl_jax.models.resnet import (DTYPES, MODELS, REMAT, STEM_CHOICES, Architecture, ResNet, build_encoder,
                                   feature_dim, total_stride)

__all__ = [
    "Architecture",
    "LinearHead",
    "MetricLearner",
    "ProjectionHead",
    "PrototypeClassifier",
    "ResNet",
    "build_encoder",
    "DTYPES",
    "MODELS",
    "REMAT",
    "STEM_CHOICES",
    "feature_dim",
    "is_norm_or_bias",
    "total_stride",
]
