"""prism-hf: PRISM and Ouroboros speculative decoding inside Hugging Face `generate()`."""

from transformers import AutoConfig, AutoModel

from .configuration_prism import PrismConfig
from .cpu_linear import (
    FastCpuLinear,
    disable_fast_cpu_linears,
    enable_fast_cpu_linears,
    few_rows_kernel_available,
    quantize_cpu_linears_int8,
)
from .generation_hooks import grouped_query_attention_on_cpu, install_generation_hooks
from .generation_ouroboros import (
    Ouroboros,
    OuroborosCandidateGenerator,
    OuroborosStats,
    PooledPrismCandidateGenerator,
    ReducedVocabularyHead,
)
from .generation_prism import PrismCandidateGenerator, SpeculationStats
from .hub import push_draft
from .modeling_prism import CopyIndex, PrismDraftModel, PrismDraftOutput
from .phrase_pool import PhrasePool
from .reference_models import load_reference_model, resolve_dtype
from .training.pipeline import DraftTrainingArguments, train_draft

__version__ = "0.1.0"

AutoConfig.register(PrismConfig.model_type, PrismConfig, exist_ok=True)
AutoModel.register(PrismConfig, PrismDraftModel, exist_ok=True)
# `save_pretrained` then copies our code next to the weights and writes `auto_map`, so the checkpoint loads with
# `trust_remote_code=True` where prism_hf is not installed.
PrismConfig.register_for_auto_class()
PrismDraftModel.register_for_auto_class("AutoModel")
install_generation_hooks()

__all__ = [
    "CopyIndex",
    "DraftTrainingArguments",
    "FastCpuLinear",
    "Ouroboros",
    "OuroborosCandidateGenerator",
    "OuroborosStats",
    "PhrasePool",
    "PooledPrismCandidateGenerator",
    "PrismCandidateGenerator",
    "PrismConfig",
    "PrismDraftModel",
    "PrismDraftOutput",
    "ReducedVocabularyHead",
    "SpeculationStats",
    "__version__",
    "disable_fast_cpu_linears",
    "enable_fast_cpu_linears",
    "few_rows_kernel_available",
    "grouped_query_attention_on_cpu",
    "load_reference_model",
    "push_draft",
    "quantize_cpu_linears_int8",
    "resolve_dtype",
    "train_draft",
]
