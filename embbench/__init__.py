"""embbench: a benchmark suite for memory-efficient embedding schemes.

The public API that plugins (built-in or third-party) may import lives here.
"""

from embbench.errors import BudgetTooSmall, ConfigError, DataNotFound, EmbbenchError, PluginError
from embbench.hashing import MERSENNE_PRIME, HashFamily
from embbench.schemes import (
    FLOAT_BYTES,
    ID_BYTES,
    Budget,
    FeatureSpec,
    Scheme,
    SchemePlan,
    build_embedding,
    full_table_bytes,
    largest_fitting,
    mlp_size_bytes,
    state_size_bytes,
)
from embbench.tables import DEFAULT_INIT_STD, EmbeddingTable
from embbench.vocabulary import VocabularyIndex, lookup_sorted

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_INIT_STD", "FLOAT_BYTES", "ID_BYTES", "MERSENNE_PRIME", "Budget", "BudgetTooSmall",
    "ConfigError", "DataNotFound", "EmbbenchError", "EmbeddingTable", "FeatureSpec", "HashFamily",
    "PluginError", "Scheme", "SchemePlan", "VocabularyIndex", "build_embedding", "full_table_bytes",
    "largest_fitting", "mlp_size_bytes", "state_size_bytes", "lookup_sorted",
]
