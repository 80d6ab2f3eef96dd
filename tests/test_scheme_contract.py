"""The contract every registered scheme keeps, built-in or third-party (the checks of embbench.testing): it loads
and is named as registered, get_params from its constructor, shapes, determinism, unseen and extreme IDs, exact
size accounting at budgets 1 ... 1/1000, budget use, gradients, index tuples, epoch hooks, and the same
embeddings through a model's table collection as standalone."""

from __future__ import annotations

from embbench.registry import list_plugins
from embbench.testing import parametrize_with_checks

# Broken plugins too: each fails its own cases (naming its error), and only those.
REGISTERED = [info.name for info in list_plugins("schemes")]


@parametrize_with_checks(REGISTERED)
def test_scheme_keeps_the_contract(scheme, check):
    check()
