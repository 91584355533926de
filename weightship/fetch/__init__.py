"""Fetching models: sources registered by kind and URI scheme, and the engine they share."""

from weightship.fetch.base import FetchPlan, FetchRequest, PlannedFile, Sink, Source
from weightship.fetch.engine import FetchResult, build_request, fetch, make_sources
from weightship.fetch.options import FetchOptions, PeerOptions, TorrentOptions, TransferOptions

__all__ = [
    "FetchOptions", "FetchPlan", "FetchRequest", "FetchResult", "PeerOptions", "PlannedFile", "Sink",
    "Source", "TorrentOptions", "TransferOptions", "build_request", "fetch", "make_sources",
]
