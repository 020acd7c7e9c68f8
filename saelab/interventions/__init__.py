"""Interventions: SAEs spliced into the model, feature and site edits, generation with edits."""

from saelab.interventions.edits import FeatureEdit, Frame, PatchEdit, SteerEdit, steer_feature
from saelab.interventions.generate import Generation, Sample, SparseFeatures, generate
from saelab.interventions.splice import Splice, splice
from saelab.interventions.strength import DEFAULT_STRENGTH, activation_value, site_norm

__all__ = ["FeatureEdit", "Frame", "PatchEdit", "SteerEdit", "steer_feature", "Generation",
           "Sample", "SparseFeatures", "generate", "Splice", "splice", "DEFAULT_STRENGTH", "activation_value", "site_norm"]
