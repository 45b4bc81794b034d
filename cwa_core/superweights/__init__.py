"""Super weights (Yu et al. 2024, arXiv:2411.07191): detection by activation spikes, the
causal test, ranks under a metric, and the published coordinates.

A super weight is one entry ``W[row, col]`` of an MLP down projection that turns a massive
input activation (channel ``col``) into a massive output activation (channel ``row``) on a few
tokens; the model depends on that activation. Detection needs forward passes only: the output's
largest |value| gives the row and its token t; the column is read at that same token t (the
paper's Y[t, row] ~ X[t, col] W[row, col]), as the input channel whose term W[row, k] x[t, k]
makes most of the spike; zero the weight and look again.

Convention everywhere: row = output channel, col = input channel, as in ``nn.Linear.weight``
(out, in). GPT-2's ``Conv1D`` stores its weight (in, out); it is translated on the way in and
out, so a coordinate means the same thing for every family.
"""
from .causal import CausalTest, causal_test
from .detection import detect_super_weights
from .plumbing import ZERO, down_proj_shapes
from .ranks import CandidateRanks, RankSinks, RankTable
from .records import (CONVENTION, Candidate, Coordinate, Detection, LayerTrace, StudyLabels, StudyRequest,
                      SuperWeightOptions)
from .registry import (PUBLISHED, REPORTED_BY, STATUSES, known_super_weights, match_published,
                       published_coordinates, registry_entries)
from .study import add_ranks, super_weight_study, super_weights_report

__all__ = [
    "CONVENTION", "PUBLISHED", "REPORTED_BY", "STATUSES", "ZERO",
    "Candidate", "CandidateRanks", "CausalTest", "Coordinate", "Detection", "LayerTrace", "RankSinks", "RankTable",
    "StudyLabels", "StudyRequest", "SuperWeightOptions",
    "add_ranks", "causal_test", "detect_super_weights", "down_proj_shapes", "known_super_weights",
    "match_published", "published_coordinates", "registry_entries", "super_weight_study", "super_weights_report",
]
