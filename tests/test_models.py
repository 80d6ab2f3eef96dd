"""Models: scoring every catalogue item at once (interact_all, used by full-ranking evaluation) equals scoring
each user-item pair, whatever the chunking."""

from __future__ import annotations

import pytest
import torch

from embbench import registry


# MLP scores in chunks of pairs: its default; fewer pairs than catalogue items; several users at once.
@pytest.mark.parametrize("name,pairs_per_chunk", [("gmf", None), ("mlp", None), ("mlp", 7), ("mlp", 50)])
def test_interact_all_equals_pairwise_interact(name, pairs_per_chunk, monkeypatch):
    model_class = registry.get_model_class(name)
    if pairs_per_chunk is not None:
        monkeypatch.setattr(model_class, "PAIRS_PER_CHUNK", pairs_per_chunk)
    torch.manual_seed(0)
    model = model_class({"user": torch.nn.Embedding(1, 8), "item": torch.nn.Embedding(1, 8)}, 8).eval()
    users, items = torch.randn(5, 8), torch.randn(23, 8)
    with torch.no_grad():
        every = model.interact_all(users, items)
        pairwise = torch.stack([model.interact(user.expand(len(items), -1), items) for user in users])
    assert every.shape == (5, 23)
    torch.testing.assert_close(every, pairwise, rtol=1e-5, atol=1e-6)
