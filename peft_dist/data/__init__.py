"""Training data: documents from local files or the local Hugging Face datasets cache, tokenized and packed once
per source, memory-mapped by every rank (``cache``), mixtures of weighted sources (``mixture``), and the
world-size-independent batch order (``sampler``)."""
from peft_dist.data.cache import Blocks, Split, build_blocks, cache_directory
from peft_dist.data.mixture import Mixture, build_mixture, naming_source
from peft_dist.data.packing import IGNORE_INDEX
from peft_dist.data.sampler import GlobalBatchSampler, MixtureSampler
from peft_dist.data.sources import (BUILTIN_CORPORA, BUILTIN_DOCSTRINGS, BUILTIN_STDLIB, DataError, chat_template,
                                    check_block_size, check_jsonl, data_sources, docstring_documents,
                                    holds_conversations, resolve_files, stdlib_documents)

__all__ = ["BUILTIN_CORPORA", "BUILTIN_DOCSTRINGS", "BUILTIN_STDLIB", "IGNORE_INDEX", "Blocks", "DataError",
           "GlobalBatchSampler", "Mixture", "MixtureSampler", "Split", "build_blocks", "build_mixture",
           "cache_directory", "chat_template", "check_block_size", "check_jsonl", "data_sources",
           "docstring_documents", "holds_conversations", "naming_source", "resolve_files", "stdlib_documents"]
