"""``bloom``: Bloom embeddings (Serrà & Karatzoglou, RecSys 2017) — k universal hashes of the raw ID pick k
rows of ONE shared table of m rows (the ID's Bloom-filter bits times the first layer's weights), summed."""

from __future__ import annotations

from embbench_plugins.schemes.multi_hashing import MultiHashing


class BloomEmbedding(MultiHashing):
    """Bloom embedding: k hashes into one shared table of m rows, the k rows summed; m solved from the budget."""

    summary = "Bloom embedding (Serrà & Karatzoglou 2017): k hashes into one shared table, summed"

    def __init__(self, num_hashes: int = 2, rows: int | None = None) -> None:
        super().__init__(num_hashes=num_hashes, rows=rows, combiner="sum", shared=True)
