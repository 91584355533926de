"""Fleet distribution: fetches on many nodes share the model's bytes, so the origin sends it
about once.

Peers are a transport under the one download engine (:mod:`weightship.fetch.download`), not a
second engine: the engine cuts each file into chunks as always, and asks the swarm for each
chunk (:class:`~weightship.fetch.exchange.ChunkExchange`). The swarm takes it from a peer that
has it, waits for a peer that is fetching it from the origin, or has it fetched from the origin
by the one node it falls to (the origin's chunks are split between the nodes). The journal,
resume, stall detection, the inline sha256 and the check against the trust anchor are the
engine's, unchanged.

- :mod:`.protocol`: the two GETs peers speak, and the checks of what a peer says;
- :mod:`.board`: what this node shares (files registered by their trusted sha256) and its events;
- :mod:`.server`: the peer server (stdlib threads, ``sendfile``);
- :mod:`.mesh`: what this node knows of its peers (long polls, liveness, bans);
- :mod:`.exchange`: one file's chunks: from whom, digests and provenance, repair after a mismatch;
- :mod:`.node`: a fetch's place in the swarm, and serving after the fetch (``--seed-for``).

docs/fleet.md says why this design, and what was measured.
"""

from weightship.swarm.node import SwarmNode

__all__ = ["SwarmNode"]
