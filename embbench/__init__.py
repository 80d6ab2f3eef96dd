"""embbench: a benchmark suite for memory-efficient embedding schemes.

This module is the public face: everything a plugin (built-in or third-party) of any kind (scheme, dataset,
model, task) imports, as ``from embbench import ...``. The contract checks for schemes live in
:mod:`embbench.testing`, imported on its own (it is meant for test suites). docs/plugins.md walks through
writing each kind of plugin.
"""

from embbench.bags import BAG_MODES, BagIndex, Bags, BagSource, embed_bags
from embbench.collection import FeatureEmbeddings, TableTraining
from embbench.ctr import SPLITS, CTRData, CTRDataset, CTRFrame, hash_strings
from embbench.data import (
    SPLIT_PROTOCOLS,
    Dataset,
    Split,
    SplitProtocol,
    content_sha256,
    download_archive,
    features_of,
    find_file,
    integer_ids,
    prepare_split,
    read_table,
)
from embbench.errors import BudgetTooSmall, ConfigError, DataNotFound, Diverged, EmbbenchError, PluginError
from embbench.hashing import MERSENNE_PRIME, HashFamily
from embbench.metrics import RankingAccumulator, classification_metrics, require_finite_scores
from embbench.models import CTRModel, RecModel
from embbench.registry import (
    create_dataset,
    create_model,
    create_scheme,
    create_task,
    list_datasets,
    list_models,
    list_schemes,
    list_tasks,
)
from embbench.schemes import (
    FLOAT_BYTES,
    ID_BYTES,
    SHARE_MODES,
    UNSEEN_KINDS,
    Budget,
    FeatureSpec,
    Scheme,
    SchemePlan,
    build_embedding,
    build_features,
    distinct_plans,
    full_table_bytes,
    largest_fitting,
    modules_size_bytes,
    state_size_bytes,
)
from embbench.tables import (
    DEFAULT_INIT_STD,
    INIT_KINDS,
    EmbeddingTable,
    Lookup,
    TableBackedEmbedding,
    TableInit,
    initialise_tables,
)
from embbench.tasks import METRIC_COLUMNS, Task, TaskData, pool_batch
from embbench.training import EpochRows, PlainStep, TrainConfig, TrainResult, TrainStep
from embbench.vocabulary import VocabularyIndex, lookup_sorted

__version__ = "0.2.0"

# Grouped by the kind of plugin that needs them; within a group, constants, then classes, then functions,
# each sorted.
__all__ = [
    # schemes: the API every scheme implements, and its size accounting
    "FLOAT_BYTES",
    "ID_BYTES",
    "SHARE_MODES",
    "UNSEEN_KINDS",
    "Budget",
    "FeatureSpec",
    "Scheme",
    "SchemePlan",
    "build_embedding",
    "build_features",
    "distinct_plans",
    "full_table_bytes",
    "largest_fitting",
    "modules_size_bytes",
    "state_size_bytes",
    # schemes: building blocks of scheme modules (tables looked up in a model's one collection, hashing, vocabularies)
    "DEFAULT_INIT_STD",
    "INIT_KINDS",
    "MERSENNE_PRIME",
    "EmbeddingTable",
    "HashFamily",
    "Lookup",
    "TableBackedEmbedding",
    "TableInit",
    "VocabularyIndex",
    "initialise_tables",
    "lookup_sorted",
    # bags: multivalent features (a set of IDs per example) embedded by pooling, through any scheme
    "BAG_MODES",
    "BagIndex",
    "BagSource",
    "Bags",
    "embed_bags",
    # datasets: user-item interactions and their splits (leave-last-out, global-temporal), click-through data,
    # file and ID helpers
    "SPLITS",
    "SPLIT_PROTOCOLS",
    "CTRData",
    "CTRDataset",
    "CTRFrame",
    "Dataset",
    "Split",
    "SplitProtocol",
    "content_sha256",
    "download_archive",
    "features_of",
    "find_file",
    "hash_strings",
    "integer_ids",
    "prepare_split",
    "read_table",
    # models: the model APIs and the collection that looks up every feature's tables at once
    "CTRModel",
    "FeatureEmbeddings",
    "RecModel",
    "TableTraining",
    # tasks: the task API, training configuration and step, metrics, batches of IDs
    "METRIC_COLUMNS",
    "EpochRows",
    "PlainStep",
    "RankingAccumulator",
    "Task",
    "TaskData",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "classification_metrics",
    "require_finite_scores",
    "pool_batch",
    # errors: one-line user-facing errors (exit status 2 on the command line)
    "BudgetTooSmall",
    "ConfigError",
    "DataNotFound",
    "Diverged",
    "EmbbenchError",
    "PluginError",
    # registry: find and create registered plugins of every kind
    "create_dataset",
    "create_model",
    "create_scheme",
    "create_task",
    "list_datasets",
    "list_models",
    "list_schemes",
    "list_tasks",
]
