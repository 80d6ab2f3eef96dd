"""Quantisation-aware training: every embedding value is a step times a b-bit integer, in training and evaluation;
the learned step gets LSQ's gradient and moves; the state holds only codes and fp16 steps, and restoring it
gives the same embeddings; int4 codes take half the bytes of int8's; exact sizes; the shadow inside a model's
table collection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from collection_checks import (
    assert_one_pool_call_per_store,
    assert_same_embeddings_in_collection,
    assert_sgd_step_matches_dense,
    backend_params,
    collection_of,
    kernel_params,
)
from embbench_plugins.schemes.qat import QuantizationAwareTraining, lsq_initial_step, pack_codes, unpack_codes

from embbench import Budget, ConfigError, FeatureSpec, VocabularyIndex, build_embedding, state_size_bytes
from embbench.registry import create_scheme

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 16)
VARIANTS = [(8, "learned", "table"), (4, "learned", "table"), (8, "learned", "row"), (4, "learned", "row"),
            (8, "fixed", "table"), (4, "fixed", "table")]
INT16_VARIANTS = [(16, "learned", "table"), (16, "learned", "row"), (16, "fixed", "table")]


def budget_of(budget: str, feature: FeatureSpec = FEATURE) -> int:
    return Budget.parse(budget).resolve(feature.num_ids, feature.dim)


def build(budget: str = "1/4", feature: FeatureSpec = FEATURE, seed: int = 0, **params):
    return build_embedding(create_scheme("qat", **params), "qat", feature, budget_of(budget, feature), seed)


def train(module, steps: int = 30, scale: float = 0.5, learning_rate: float = 0.01) -> None:
    """Adam on every parameter towards random targets of std ``scale`` (far outside the initial range, so that
    values clip and the steps must grow)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    ids = torch.arange(0, FEATURE.num_ids, 3)
    targets = torch.randn(len(ids), FEATURE.dim, generator=torch.Generator().manual_seed(5)) * scale
    for _ in range(steps):
        optimizer.zero_grad()
        (module(ids) - targets).pow(2).mean().backward()
        optimizer.step()


def assert_step_times_codes(module, embeddings: torch.Tensor, ids: torch.Tensor, bits: int) -> None:
    steps = module.row_steps()
    rows = module.rows(ids).clamp(max=module.num_rows - 1)
    codes = embeddings / steps[rows].unsqueeze(1)
    assert torch.equal(codes, codes.round()), "an embedding value is not its row's step times an integer"
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(steps, steps.half().float()), "a step is not an fp16 number"


# the defining property: step x integer codes, always


@pytest.mark.parametrize(("bits", "step", "step_per"), VARIANTS)
@pytest.mark.parametrize("budget", ["1/4", "1/64"])
def test_every_embedding_value_is_its_rows_step_times_a_b_bit_integer_in_training_and_evaluation(
    budget, bits, step, step_per
):
    module, plan = build(budget, bits=bits, step=step, step_per=step_per)
    train(module)
    ids = torch.arange(-5, FEATURE.num_ids + 5)
    for training in (True, False):
        module.train(training)
        with torch.no_grad():
            embeddings = module(ids)
        assert_step_times_codes(module, embeddings, ids, bits)
    # trained towards values far outside the initial range, the codes use at least half of the range
    assert module.row_codes().abs().max() >= 2 ** (bits - 2)


@pytest.mark.parametrize(("bits", "step", "step_per"), INT16_VARIANTS)
def test_int16_values_are_a_step_times_an_integer_beyond_the_int8_range(bits, step, step_per):
    module, _ = build("1/64", bits=bits, step=step, step_per=step_per)
    train(module)
    ids = torch.arange(-5, FEATURE.num_ids + 5)
    with torch.no_grad():
        assert_step_times_codes(module, module(ids), ids, bits)
    codes = module.row_codes()
    assert codes.dtype == torch.int16 and codes.abs().max() > 127


def test_evaluation_reads_the_quantised_rows_not_the_shadow():
    module, _ = build()
    train(module, steps=5)
    ids = torch.arange(100)
    module.eval()
    with torch.no_grad():
        embeddings = module(ids)
        shadow = module.table.weight[module.rows(ids)]
    assert not torch.equal(embeddings, shadow)
    torch.testing.assert_close(embeddings, shadow, rtol=0, atol=float(module.row_steps().max()) / 2 + 1e-9)


# the learned step


@pytest.mark.parametrize("step_per", ["table", "row"])
def test_the_learned_step_starts_at_lsqs_initialisation_and_grows_when_values_clip(step_per):
    module, plan = build(bits=4, step_per=step_per)
    initial = lsq_initial_step(4)
    assert plan.params["initial_step"] == initial == pytest.approx(2 * 0.01 * math.sqrt(2 / math.pi) / math.sqrt(7),
                                                                   rel=1e-3)
    assert torch.equal(module.row_steps(), torch.full((module.num_rows,), initial))
    train(module)
    trained = module.row_steps()[torch.arange(0, FEATURE.num_ids, 3)]
    assert (trained > 1.2 * initial).all()  # targets of std 0.5 lie far outside the initial range of about ±0.04
    if step_per == "row":
        assert module.row_steps()[1] == initial  # a row never read keeps its step


@pytest.mark.parametrize("step_per", ["table", "row"])
def test_a_higher_step_rate_moves_the_step_faster_under_adam(step_per):
    grown = []
    for rate in (1.0, 10.0):
        module, _ = build(bits=4, step_per=step_per, step_rate=rate)
        train(module, steps=10)
        grown.append(module.row_steps()[0].item() / lsq_initial_step(4))
    assert 1 < grown[0] < math.exp(10 * 0.01 * 1.01)  # Adam: theta moves at most about lr per update
    assert grown[1] > grown[0] ** 5


@pytest.mark.parametrize(("step_per", "rate"), [("row", 1.0), ("table", 1.0), ("row", 10.0)])
def test_the_step_gets_lsqs_gradient_scaled_by_one_over_sqrt_n_qp_and_divided_by_rate_times_step(step_per, rate):
    module, _ = build(bits=8, step_per=step_per, step_rate=rate)
    step = module.row_steps()[0].item()
    values = torch.zeros(FEATURE.dim)
    values[0], values[1], values[2] = 2.3 * step, -1000 * step, 1000 * step  # inside, clipped low, clipped high
    with torch.no_grad():
        module.table.weight[0] = values
    module(torch.tensor([0])).sum().backward()  # one ID: the values sharing a step are its d, either way
    # d(embedding)/ds: round(v/s) - v/s inside, the clipped code outside; LSQ's scale 1/sqrt(d * 127)
    local = (2 - 2.3) + (-128) + 127
    expected = local / math.sqrt(FEATURE.dim * 127) / (rate * step)
    theta = module.log_steps.weight.grad[0, 0] if step_per == "row" else module.log_step.grad[0]
    assert theta.item() == pytest.approx(expected, rel=1e-4)
    # the rows: straight through inside the range, nothing where clipped
    assert module.table.weight.grad[0, :3].tolist() == [1.0, 0.0, 0.0]


def test_a_fixed_step_is_one_fp16_buffer_and_not_trained():
    module, plan = build(step="fixed", initial_step=0.01)
    assert [name for name, _ in module.named_parameters()] == ["table.weight"]
    assert module.steps.dtype == torch.float16 and module.steps.shape == (1,)
    assert module.steps.item() == pytest.approx(0.01, rel=1e-3)
    train(module, steps=3)
    assert module.steps.item() == pytest.approx(0.01, rel=1e-3)


# the state: codes and fp16 steps only, restored exactly


@pytest.mark.parametrize(("bits", "step", "step_per"), VARIANTS + INT16_VARIANTS)
@pytest.mark.parametrize("budget", ["1/4", "1/64"])
def test_the_state_holds_codes_and_steps_and_restoring_it_gives_the_same_embeddings(budget, bits, step, step_per):
    params = {"bits": bits, "step": step, "step_per": step_per}
    module, plan = build(budget, **params)
    train(module)
    state = module.state_dict()
    assert not any(tensor.dtype == torch.float32 for tensor in state.values()), "the fp32 shadow was saved"
    assert state["codes"].dtype == {16: torch.int16, 8: torch.int8, 4: torch.uint8}[bits]
    assert state["steps"].dtype == torch.float16
    assert state["steps"].numel() == (module.num_rows if step_per == "row" else 1)
    assert state_size_bytes(module) == plan.size_bytes
    other, _ = build(budget, seed=7, **params)
    ids = torch.arange(-5, FEATURE.num_ids + 5)
    with torch.no_grad():
        assert not torch.equal(other(ids), module(ids))
        other.load_state_dict(copy.deepcopy(state))
        torch.testing.assert_close(other(ids), module(ids), rtol=0, atol=0)
        assert torch.equal(other.row_codes(), module.row_codes())
    # and again: restoring a restored module changes nothing
    again, _ = build(budget, seed=9, **params)
    again.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(ids), module(ids), rtol=0, atol=0)


@pytest.mark.parametrize("step_per", ["table", "row"])
def test_inside_a_models_collection_the_collection_saves_the_shadow_and_restores_it_exactly(step_per):
    module, _ = build(step_per=step_per)
    train(module, steps=5)
    embeddings = collection_of({"item": module}, "torch", "adam")
    state = copy.deepcopy(embeddings.state_dict())
    assert not any(key.endswith("codes") for key in state)  # the module holds no rows there
    before = embeddings.embed("item", torch.arange(FEATURE.num_ids))
    with torch.no_grad():
        embeddings.tables.weight(embeddings.tables.table_keys[0]).add_(0.5)
    embeddings.load_state_dict(state)
    torch.testing.assert_close(embeddings.embed("item", torch.arange(FEATURE.num_ids)), before, rtol=0, atol=0)


@pytest.mark.parametrize("step_per", ["table", "row"])
def test_codes_load_into_a_module_whose_rows_a_collection_holds(step_per):
    module, _ = build(bits=4, step_per=step_per)
    train(module, steps=5)
    embeddings = collection_of({"item": build(bits=4, step_per=step_per, seed=3)[0]}, "torch", "adam")
    embeddings["item"].load_state_dict(module.state_dict())
    ids = torch.arange(FEATURE.num_ids)
    with torch.no_grad():
        torch.testing.assert_close(embeddings.embed("item", ids), module(ids), rtol=0, atol=0)


@pytest.mark.parametrize("count", [1, 2, 31, 32])
def test_int4_codes_pack_two_per_byte_and_unpack_to_the_same_codes(count):
    codes = (torch.arange(count) % 16 - 8).to(torch.int8).reshape(count, 1)
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 1) // 2
    assert torch.equal(unpack_codes(packed, count, 1, 4), codes)


# sizes


@pytest.mark.parametrize(("step", "step_per"), [("learned", "table"), ("learned", "row"), ("fixed", "table")])
def test_int4_codes_take_half_the_bytes_of_int8_codes(step, step_per):
    int8, plan8 = build(bits=8, step=step, step_per=step_per)
    int4, plan4 = build(bits=4, step=step, step_per=step_per)
    assert plan8.params["rows"] == plan4.params["rows"] == FEATURE.num_ids
    assert int4.state_dict()["codes"].numel() * 2 == int8.state_dict()["codes"].numel() == FEATURE.num_ids * 16
    assert plan8.size_bytes - plan4.size_bytes == FEATURE.num_ids * 16 // 2


@pytest.mark.parametrize(("bits", "step", "step_per"), VARIANTS)
def test_a_row_per_training_id_through_the_dictionary_where_the_quantised_table_fits(bits, step, step_per):
    module, plan = build("1/4", bits=bits, step=step, step_per=step_per)
    n, d = FEATURE.num_ids, FEATURE.dim
    steps = n * 2 if step_per == "row" else 2
    assert plan.params["mapping"] == "dictionary" and plan.unseen == "dedicated"
    assert plan.size_bytes == state_size_bytes(module) == n * d * bits // 8 + steps + VocabularyIndex.size_bytes(
        FEATURE.ids
    )
    ids = torch.tensor([5000, -1, 2**63 - 1, -(2**63)])
    with torch.no_grad():
        assert torch.equal(module(ids), torch.zeros(4, d))  # unseen IDs share the zero embedding (no row)
    assert module.index_tuples(ids).flatten().tolist() == [n] * 4


@pytest.mark.parametrize(("bits", "step", "step_per"), VARIANTS)
def test_below_the_quantised_table_ids_are_hashed_into_the_rows_the_budget_holds(bits, step, step_per):
    module, plan = build("1/64", bits=bits, step=step, step_per=step_per)
    rows, d = plan.params["rows"], FEATURE.dim
    steps = rows * 2 if step_per == "row" else 2
    assert plan.params["mapping"] == "hash" and plan.unseen == "collided" and rows < FEATURE.num_ids
    assert plan.size_bytes == state_size_bytes(module) == math.ceil(rows * d * bits / 8) + steps + 8
    assert plan.budget_bytes - plan.size_bytes < d * bits // 8 + (2 if step_per == "row" else 0)  # no row more fits


def test_with_the_width_given_above_its_quantised_table_the_rest_of_the_budget_stays_unused():
    _, plan = build("1/2", bits=8)
    assert plan.params["mapping"] == "dictionary" and plan.size_bytes < 0.6 * plan.budget_bytes
    assert not create_scheme("qat", bits=8).fills_budget and create_scheme("qat").fills_budget


BIG = FeatureSpec.from_vocabulary("item", 200_000, 32)


@pytest.mark.parametrize(("budget", "bits", "mapping"), [
    ("1/2", 16, "dictionary"), ("1/3", 8, "dictionary"), ("1/4", 8, "dictionary"), ("1/6", 4, "dictionary"),
    ("1/8", 4, "dictionary"), ("1/16", 8, "hash"), ("1/64", 8, "hash"),
])
def test_auto_takes_the_widest_codes_whose_per_id_table_fits_else_int8_hashed_rows(budget, bits, mapping):
    module, plan = build(budget, BIG)
    assert (plan.params["bits"], plan.params["mapping"]) == (bits, mapping)
    assert plan.size_bytes == state_size_bytes(module)
    # a row per ID at the narrower width rather than hashed rows at a wider one: between the widths' table
    # sizes (1/2, 1/4, 1/8 of fp32) the budget is not filled, at them and from 1/16 down it is
    assert plan.size_bytes >= (0.9 if budget in ("1/2", "1/4", "1/8", "1/16", "1/64") else 0.5) * plan.budget_bytes
    wider = [w for w in (16, 8, 4) if w > bits]
    for width in wider:  # no wider per-ID table fits
        per_id = BIG.num_ids * BIG.dim * width // 8 + 2 + VocabularyIndex.size_bytes(BIG.ids)
        assert per_id > plan.budget_bytes
    assert plan.params["initial_step"] == lsq_initial_step(bits)


def test_given_rows_are_hashed_and_fix_the_size():
    sizes = {build(budget, rows=300, step_per="row")[1].size_bytes for budget in ("1/2", "1/64")}
    assert sizes == {300 * 16 + 300 * 2 + 8}


# errors


def test_a_budget_below_one_hashed_row_raises_budget_too_small_naming_the_minimum():
    with pytest.raises(ConfigError, match=r"minimum of scheme 'qat'.*one hashed row"):
        create_scheme("qat").plan(FEATURE, 16 + 2 + 8 - 1)


@pytest.mark.parametrize(("params", "message"), [
    ({"bits": 2}, "'bits' of scheme 'qat' must be one of 'auto', 16, 8, 4"),
    ({"step": "adaptive"}, "'step' of scheme 'qat' must be one of 'learned', 'fixed'"),
    ({"initial_step": 0.0}, r"initial_step must be in \[2\^-14, 2\^10\]"),
    ({"rows": 0}, "rows must be in"),
    ({"step_per": "column"}, "'step_per' of scheme 'qat' must be one of 'table', 'row'"),
    ({"step": "fixed", "step_per": "row"}, "step_per='row' needs step='learned'"),
    ({"step_rate": 0.0}, r"step_rate must be in \[0.01, 1000\]"),
])
def test_hyper_parameters_out_of_range_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        create_scheme("qat", **params)


@pytest.mark.parametrize(("params", "message"), [
    ({"bits": 2}, "bits must be 16, 8, 4"),
    ({"step": "adaptive"}, "step must be one of learned, fixed"),
    ({"step_per": "column"}, "step_per must be one of table, row"),
])
def test_the_class_itself_rejects_what_its_annotations_do_not_allow(params, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**params)


# inside a collection

BATCHES = [torch.randint(-50, 6000, (256,), generator=torch.Generator().manual_seed(0)),
           torch.tensor([0, 1, 4999, 5000, -1, -(2**62), 2**62, 2**62 - 1, 2**63 - 1, -(2**63)])]


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
@pytest.mark.parametrize(("budget", "step", "step_per"), [
    ("1/4", "learned", "table"), ("1/4", "learned", "row"), ("1/64", "learned", "row"), ("1/4", "fixed", "table"),
])
def test_embeds_the_same_inside_a_collection(budget, step, step_per, backend, optimizer):
    module, _ = build(budget, step=step, step_per=step_per)
    train(module, steps=5)
    assert_same_embeddings_in_collection(module, BATCHES, backend, optimizer)


@pytest.mark.parametrize(("backend", "optimizer"), kernel_params())
def test_a_batch_costs_one_pool_call_per_store(backend, optimizer):
    module, _ = build(step_per="row")
    assert_one_pool_call_per_store(module, BATCHES[0], backend, optimizer)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(("budget", "step_per"), [("1/4", "table"), ("1/4", "row"), ("1/64", "row")])
def test_sgd_step_through_a_collection_matches_a_dense_step(budget, step_per, backend):
    module, _ = build(budget, step_per=step_per)
    assert_sgd_step_matches_dense(module, BATCHES[0], torch.cat([torch.arange(-10, 5010), BATCHES[1]]), backend)
