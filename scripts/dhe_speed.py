"""Side-by-side speed of DHE against the full table, and of this DHE against the implementation before the
speed work (read from git), in one process: hashing, an NCF-MLP training step, inference latency.

    python scripts/dhe_speed.py [--threads N] [--min-run-time S]

Timings use torch.utils.benchmark (median of blocked runs); ratios are of medians measured in this run.
"""

from __future__ import annotations

import argparse
import subprocess
import types

import torch
import torch.utils.benchmark as benchmark
from embbench_plugins.models.ncf import MLP

from embbench import Budget, FeatureEmbeddings, FeatureSpec, TableTraining, build_embedding
from embbench.optimizers import make_optimizers
from embbench.registry import create_scheme

#: the commit before the speed work: its hashing and dhe are "before"
BEFORE_COMMIT = "616fc32"
NUM_IDS, DIM, TRAIN_BATCH, INFERENCE_BATCH = 4000, 32, 1024, 4096


def module_from_git(path: str, name: str, namespace: dict | None = None) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(name)
    exec(compile(source, f"{BEFORE_COMMIT}:{path}", "exec"), module.__dict__)
    module.__dict__.update(namespace or {})  # globals are looked up at call time
    return module


def embeddings(feature: FeatureSpec, seed: int) -> dict[str, torch.nn.Module]:
    old_hashing = module_from_git("embbench/hashing.py", "old_hashing")
    old_dhe = module_from_git("plugins/schemes/dhe.py", "old_dhe", {"HashFamily": old_hashing.HashFamily})
    quarter = Budget.parse("1/4").resolve(feature.num_ids, feature.dim)
    full_bytes = Budget.parse("1").resolve(feature.num_ids, feature.dim)
    full, _ = build_embedding(create_scheme("full"), "full", feature, full_bytes, seed)
    before, before_plan = build_embedding(old_dhe.DeepHashEmbedding(), "dhe", feature, quarter, seed)
    after, after_plan = build_embedding(create_scheme("dhe"), "dhe", feature, quarter, seed)
    assert before_plan.params["width"] == after_plan.params["width"]
    return {"full": full, "dhe before": before, "dhe after": after}


def time_it(statement: str, label: str, description: str, threads: int, min_run_time: float, **globals_):
    timer = benchmark.Timer(statement, globals=globals_, label=label, sub_label=description, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    results: dict[tuple[str, str], float] = {}

    def record(statement: str, label: str, description: str, **globals_):
        measurement = time_it(statement, label, description, args.threads, args.min_run_time, **globals_)
        results[(label, description)] = measurement.median
        print(f"{label:34s} {description:26s} median {measurement.median * 1e3:9.3f} ms  "
              f"(IQR {measurement.iqr * 1e3:.3f}, {len(measurement.times)} blocks)", flush=True)

    old_hashing = module_from_git("embbench/hashing.py", "old_hashing")
    from embbench import HashFamily

    hash_ids = torch.randint(0, 10**6, (10240,), generator=torch.Generator().manual_seed(0))
    old_family, new_family = old_hashing.HashFamily(1024, 10**6, seed=0), HashFamily(1024, 10**6, seed=0)
    assert torch.equal(old_family(hash_ids), new_family(hash_ids))
    for description, family in (("before", old_family), ("after", new_family)):
        record("family(ids)", "hash 10240 IDs x 1024", description, family=family, ids=hash_ids)

    feature = FeatureSpec.from_vocabulary("id", NUM_IDS, DIM)
    generator = torch.Generator().manual_seed(1)
    users = torch.randint(0, NUM_IDS, (TRAIN_BATCH,), generator=generator)
    items = torch.randint(0, NUM_IDS, (TRAIN_BATCH,), generator=generator)
    labels = torch.randint(0, 2, (TRAIN_BATCH,), generator=generator).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    user_embeddings, item_embeddings = embeddings(feature, seed=0), embeddings(feature, seed=1)
    for name in user_embeddings:
        # as the runner trains it: tables row-sparse Adam in one collection, everything else Adam
        tables = TableTraining("torch", "adam", 1e-3)
        pair = FeatureEmbeddings({"user": user_embeddings[name], "item": item_embeddings[name]}, tables)
        model = MLP(pair, DIM).train()
        optimizer = make_optimizers(model, 1e-3)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            loss_fn(model(users, items), labels).backward()
            optimizer.step()

        step()
        record("step()", "NCF-MLP train step, batch 1024", name, step=step)

    inference_ids = torch.randint(0, NUM_IDS, (INFERENCE_BATCH,), generator=generator)
    mixed_ids = inference_ids.clone()
    mixed_ids[::10] += 10**9  # 10% never seen in training
    for name, module in item_embeddings.items():
        module.eval()
        with torch.no_grad():
            torch.testing.assert_close(module(inference_ids), module(inference_ids))
        record("with torch.no_grad(): module(ids)", "inference, batch 4096", name, module=module, ids=inference_ids)
    frozen = item_embeddings["dhe after"].freeze(torch.as_tensor(feature.ids))
    for description, ids in (("dhe after, cached", inference_ids), ("dhe after, cached, 10% new", mixed_ids)):
        record("with torch.no_grad(): module(ids)", "inference, batch 4096", description, module=frozen, ids=ids)

    print()
    train, infer = "NCF-MLP train step, batch 1024", "inference, batch 4096"
    hash_label = "hash 10240 IDs x 1024"
    print(f"hashing speed-up (before/after): {results[(hash_label, 'before')] / results[(hash_label, 'after')]:.1f}x")
    for name in ("dhe before", "dhe after"):
        print(f"train step {name} / full: {results[(train, name)] / results[(train, 'full')]:.2f}x")
    for name in ("dhe before", "dhe after", "dhe after, cached", "dhe after, cached, 10% new"):
        print(f"inference {name} / full: {results[(infer, name)] / results[(infer, 'full')]:.2f}x")


if __name__ == "__main__":
    main()
