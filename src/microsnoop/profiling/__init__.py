"""Profiling: aggregate, normalise and sphere tables of ``Metadata_*`` + feature columns (pycytominer's
layout and argument names: ``strata``, ``samples``, ``features``, ``operation``)."""
from .aggregate import aggregate
from .normalize import normalize
from .pipeline import ProfileSettings, profile_frame, run_profile
from .sphere import sphere
from .table import feature_columns, read_embeddings, write_profiles

__all__ = ["ProfileSettings", "aggregate", "feature_columns", "normalize", "profile_frame", "read_embeddings",
           "run_profile", "sphere", "write_profiles"]
