"""Fetching models: sources registered by kind and URI scheme, and the engine they share."""

from weightship.fetch.base import FetchPlan, FetchRequest, PlannedFile, Sink, Source
from weightship.fetch.engine import FetchResult, build_request, fetch, make_sources

__all__ = [
    "FetchPlan", "FetchRequest", "FetchResult", "PlannedFile", "Sink", "Source",
    "build_request", "fetch", "make_sources",
]
