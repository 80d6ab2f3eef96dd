"""`dhe`: width solved from the budget, size formula, encodings of the paper (Kang et al., KDD 2021)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embbench import Budget, FeatureSpec, build_embedding
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)


def build(name: str, budget: str = "1/4", seed: int = 0, feature: FeatureSpec = FEATURE, **params):
    budget = "1" if name == "full" else budget
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    return build_embedding(create_scheme(name, **params), name, feature, budget_bytes, seed)


def test_dhe_width_is_the_largest_that_fits():
    dhe = create_scheme("dhe")
    budget_bytes = Budget.parse("1/2").resolve(FEATURE.num_ids, FEATURE.dim)
    plan = dhe.plan(FEATURE, budget_bytes)
    width = plan.params["width"]
    assert dhe.size_bytes(width, FEATURE.dim) <= budget_bytes < dhe.size_bytes(width + 1, FEATURE.dim)


def test_dhe_size_formula_counts_bn_buffers_and_hash_seed():
    # k=4 hashes, width 3, 2 hidden layers, d=2: Linear 4->3, BN(3), Linear 3->3, BN(3), Linear 3->2.
    dhe = create_scheme("dhe", num_hashes=4, hidden_layers=2, width=3)
    linear = (4 * 3 + 3) + (3 * 3 + 3) + (3 * 2 + 2)
    batch_norm = 2 * (4 * 3 * 4 + 8)
    assert dhe.size_bytes(3, 2) == linear * 4 + batch_norm + 8


def test_dhe_encodings_of_a_million_ids_are_distinct_and_in_range():
    module, _ = build("dhe", "1/2")
    encoder = module.encoder
    keys, low, high = [], 1.0, -1.0
    for chunk in torch.arange(1_000_000, dtype=torch.int64).split(32768):
        code = encoder(chunk)
        low, high = min(low, code.min().item()), max(high, code.max().item())
        keys.append(code[:, :4].clone())
    assert -1.0 <= low and high <= 1.0
    # Rows that differ in their first four coordinates differ; four 1e6-bucket hashes all agree by chance
    # for a pair with probability 1e-24, so distinct prefixes prove distinct encodings.
    assert torch.cat(keys).unique(dim=0).shape[0] == 1_000_000


def test_dhe_gaussian_encoding_is_standard_normal_like():
    module, _ = build("dhe", "1/2", encoding="gaussian")
    code = module.encoder(torch.arange(20000))
    assert abs(code.mean().item()) < 0.02 and abs(code.std().item() - 1) < 0.02


@pytest.mark.parametrize("params, message", [
    ({"num_hashes": 0}, "num_hashes must be in"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"encoding": "gaussian", "num_hashes": 5}, "must be even"),
])
def test_dhe_rejects_bad_hyper_parameters(params, message):
    from embbench.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        create_scheme("dhe", **params)


# --- Algorithm 1, the paper's variants, and the inference speed-ups -----------------------------------------

from embbench import MERSENNE_PRIME, state_size_bytes  # noqa: E402

SMALL = FeatureSpec.from_vocabulary("item", 300, 8)
ENCODING_NAMES = ["uniform", "gaussian", "identity", "binary", "random-fourier"]
ARCHITECTURE_NAMES = ["equal", "pyramid", "inverted-pyramid", "residual", "densenet"]


def test_uniform_encoding_is_algorithm_1_of_the_paper():
    module, _ = build("dhe", "1/2")
    family = module.encoder.hash
    a, b, m = family.a.tolist(), family.b.tolist(), 10**6
    ids = [0, 1, 4999, 123_456_789, -7, 2**63 - 1]
    code = module.encoder(torch.tensor(ids))
    for row, x in enumerate(ids):
        # Algorithm 1: h(x) = ((a x + b) mod p) mod m, then E'(x) = 2 h / (m - 1) - 1.
        expected = [2 * (((a_j * (x % MERSENNE_PRIME) + b_j) % MERSENNE_PRIME) % m) / (m - 1) - 1
                    for a_j, b_j in zip(a, b, strict=True)]
        torch.testing.assert_close(code[row], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


def test_uniform_encoding_equals_the_int64_formula_bit_for_bit():
    module, _ = build("dhe", "1/2")
    ids = torch.randint(-(2**63), 2**63 - 1, (600,), generator=torch.Generator().manual_seed(0))
    reference = module.encoder.hash.hash_int64(ids).to(torch.float32) * (2.0 / (10**6 - 1)) - 1.0
    assert torch.equal(module.encoder(ids), reference)


@pytest.mark.parametrize("encoding", ENCODING_NAMES)
@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_every_encoding_and_architecture_keeps_the_contract(encoding, architecture):
    params = {"encoding": encoding, "architecture": architecture, "num_hashes": 32, "hidden_layers": 3}
    budget = Budget.parse("1/2").resolve(SMALL.num_ids, SMALL.dim)
    scheme = create_scheme("dhe", **params)
    module, plan = build_embedding(scheme, "dhe", SMALL, budget, seed=3)
    assert state_size_bytes(module) == plan.size_bytes <= budget
    twin, _ = build_embedding(create_scheme("dhe", **params), "dhe", SMALL, budget, seed=3)
    ids = torch.tensor([0, 1, 299, 300, -1, 2**63 - 1, -(2**63)])
    module.train()
    out = module(torch.arange(64))
    assert out.shape == (64, SMALL.dim) and out.dtype == torch.float32
    out.pow(2).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    module.eval()
    twin.eval()
    other, _ = build_embedding(create_scheme("dhe", **params), "dhe", SMALL, budget, seed=4)
    other.eval()
    twin.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert torch.isfinite(module(ids)).all()
        assert torch.equal(module(ids), twin(ids))
        assert not torch.equal(module(ids), other(ids))


def shapes_size(shapes, norm_widths):
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in shapes) * 4 + sum(16 * w + 8 for w in norm_widths)


@pytest.mark.parametrize("architecture, shapes, norm_widths", [
    # k=4 hashes, width 4, 3 hidden layers, d=2.
    ("equal", [(4, 4), (4, 4), (4, 4), (4, 2)], [4, 4, 4]),
    ("pyramid", [(4, 4), (4, 2), (2, 1), (1, 2)], [4, 2, 1]),
    ("inverted-pyramid", [(4, 1), (1, 2), (2, 4), (4, 2)], [1, 2, 4]),
    ("residual", [(4, 4), (4, 4), (4, 4), (4, 2)], [4, 4, 4]),
    ("densenet", [(4, 4), (4, 4), (8, 4), (12, 2)], [4, 4, 4]),
])
def test_size_formula_of_each_architecture_by_hand(architecture, shapes, norm_widths):
    dhe = create_scheme("dhe", num_hashes=4, hidden_layers=3, width=4, architecture=architecture)
    assert dhe.size_bytes(4, 2) == shapes_size(shapes, norm_widths) + 8  # + the hash seed
    feature = FeatureSpec.from_vocabulary("item", 50, 2)
    module, plan = build_embedding(dhe, "dhe", feature, 10**6, seed=0)
    assert plan.size_bytes == state_size_bytes(module) == shapes_size(shapes, norm_widths) + 8


@pytest.mark.parametrize("encoding, encoding_dim, seed_bytes", [
    ("identity", 1, 0), ("binary", 9, 0), ("random-fourier", 4, 8), ("gaussian", 4, 8),
])
def test_size_formula_of_each_encoding_by_hand(encoding, encoding_dim, seed_bytes):
    # 300 IDs 0..299: the largest is 299, 9 bits. No batch norm, width 3, 1 hidden layer, d=8.
    dhe = create_scheme("dhe", num_hashes=4, hidden_layers=1, width=3, batch_norm=False, encoding=encoding)
    module, plan = build_embedding(dhe, "dhe", SMALL, 10**6, seed=0)
    expected = ((encoding_dim * 3 + 3) + (3 * 8 + 8)) * 4 + seed_bytes
    assert plan.size_bytes == state_size_bytes(module) == expected
    assert module.encoder(torch.arange(5)).shape == (5, encoding_dim)


def test_identity_and_binary_encode_the_id_itself():
    identity, _ = build("dhe", feature=SMALL, encoding="identity", width=4)
    binary, _ = build("dhe", feature=SMALL, encoding="binary", width=4)
    ids = torch.tensor([0, 5, 299])
    torch.testing.assert_close(identity.encoder(ids)[:, 0], torch.tensor([-1.0, 5 / 299 * 2 - 1, 1.0]))
    assert binary.encoder(ids)[1].tolist() == [1.0, -1.0, 1.0] + [-1.0] * 6  # 5 = 0b101, least bit first


def test_random_fourier_frequencies_are_regenerated_not_stored():
    module, _ = build("dhe", feature=SMALL, encoding="random-fourier", num_hashes=16)
    assert "encoder.frequencies" not in module.state_dict() and "encoder.fourier_seed" in module.state_dict()
    code = module.encoder(torch.arange(10))
    assert code.shape == (10, 16) and code.abs().max() <= 1.0


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_eval_mode_folds_batch_norm_with_the_same_outputs(architecture):
    module, _ = build("dhe", feature=SMALL, architecture=architecture, num_hashes=64)
    module.train()
    for _ in range(3):  # move the running statistics away from their initial values
        module(torch.randint(0, 300, (128,)))
    module.eval()
    ids = torch.arange(-5, 300)
    with torch.no_grad():
        folded = module(ids)
        code, decoder = module.encoder(ids), module.decoder
        inputs, outputs = code, []
        for layer, linear in enumerate(decoder.hidden):  # the unfolded computation, layer by layer
            hidden = decoder.activation(decoder.norms[layer](linear(inputs)))
            if architecture == "residual" and layer > 0:
                hidden = hidden + inputs
            outputs.append(hidden)
            inputs = torch.cat(outputs, dim=1) if architecture == "densenet" else hidden
        torch.testing.assert_close(folded, decoder.output(inputs), rtol=1e-5, atol=1e-5)


def test_inference_cache_is_exact_uncounted_and_dropped_by_training():
    module, plan = build("dhe", feature=SMALL, cache_known_ids=True, num_hashes=64)
    size = state_size_bytes(module)
    module.eval()
    ids = torch.tensor([3, 299, 10**12, 3, -1])  # two IDs never seen in training
    with torch.no_grad():
        expected = module.decoder(module.encoder(ids))
        cached = module(ids)  # fills the cache with the 300 training IDs
    assert module.cached_ids.numel() == 300
    torch.testing.assert_close(cached, expected)
    assert state_size_bytes(module) == size == plan.size_bytes
    assert not any(key.startswith("cached") or key == "known_ids" for key in module.state_dict())
    module.train()
    assert module.cached_ids.numel() == 0
    module(torch.arange(64)).sum().backward()  # trains without the cache


def test_freeze_caches_given_ids_and_computes_others_on_the_fly():
    module, _ = build("dhe", feature=SMALL, num_hashes=64)
    module.eval()
    ids = torch.tensor([7, 8, 10**9])
    with torch.no_grad():
        expected = module(ids)
        module.freeze(torch.tensor([7, 8]))
        torch.testing.assert_close(module(ids), expected)
    assert module.cached_ids.tolist() == [7, 8]
    module.load_state_dict(module.state_dict())
    assert module.cached_ids.numel() == 0


@pytest.mark.parametrize("params, message", [
    ({"architecture": "wide"}, "architecture must be one of"),
    ({"encoding": "one-hot"}, "encoding must be one of"),
    ({"encoding": "random-fourier", "num_hashes": 7}, "must be even"),
    ({"fourier_scale": 0}, "fourier_scale must be"),
])
def test_dhe_rejects_bad_variant_parameters(params, message):
    from embbench.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        create_scheme("dhe", **params)


# --- Side-feature enhanced encoding (the DHE paper's Table 9) ------------------------------------------------

def side_feature(num_ids: int = 300, genres: int = 5) -> FeatureSpec:
    ids = np.arange(10, 10 + num_ids, dtype=np.int64)
    side = (np.random.default_rng(0).random((num_ids, genres)) < 0.3).astype(np.float32)
    return FeatureSpec("item", ids, np.ones(num_ids, dtype=np.int64), 8, side)


def test_side_features_widen_the_first_layer_and_count_exactly():
    feature = side_feature()
    budget = Budget.parse("1/2").resolve(feature.num_ids, feature.dim)
    scheme = create_scheme("dhe", num_hashes=32, hidden_layers=2, side_features=True)
    module, plan = build_embedding(scheme, "dhe", feature, budget, seed=0)
    assert plan.params["side_dim"] == 5
    assert module.decoder.hidden[0].in_features == 32 + 5
    # side features are input data, not state: the size is the decoder's (with 37 inputs) and the seed
    assert state_size_bytes(module) == plan.size_bytes == scheme.size_bytes(plan.params["width"], 8, 37)


def test_side_features_change_the_embedding_and_unseen_ids_get_zeros():
    feature = side_feature()
    budget = Budget.parse("1/2").resolve(feature.num_ids, feature.dim)
    module, _ = build_embedding(create_scheme("dhe", num_hashes=32, side_features=True), "dhe", feature, budget, 0)
    module.eval()
    ids = torch.tensor([10, 11, 10_000])
    assert torch.equal(module.side(ids)[:2], torch.as_tensor(feature.side[:2]))
    assert not module.side(ids)[2].any()
    with torch.no_grad():
        before = module(ids)
        module.side.values[0] = 1 - module.side.values[0]  # flip the genres of ID 10
        after = module(ids)
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1:], after[1:])


def test_side_features_are_ignored_for_a_feature_without_them():
    budget = Budget.parse("1/2").resolve(SMALL.num_ids, SMALL.dim)
    module, plan = build_embedding(create_scheme("dhe", num_hashes=32, side_features=True), "dhe", SMALL, budget, 0)
    assert plan.params["side_dim"] == 0 and module.side is None
