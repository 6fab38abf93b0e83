"""Training data: documents from local files, tokenized and packed once per corpus, memory-mapped by every
rank (``cache``), and the world-size-independent batch order (``sampler``)."""
from peft_dist.data.cache import Blocks, Split, build_blocks
from peft_dist.data.packing import IGNORE_INDEX
from peft_dist.data.sampler import GlobalBatchSampler
from peft_dist.data.sources import (BUILTIN_STDLIB, DataError, chat_template, check_block_size, check_jsonl,
                                    data_sources, holds_conversations, resolve_files, stdlib_documents)

__all__ = ["BUILTIN_STDLIB", "IGNORE_INDEX", "Blocks", "DataError", "GlobalBatchSampler", "Split", "build_blocks",
           "chat_template", "check_block_size", "check_jsonl", "data_sources", "holds_conversations",
           "resolve_files", "stdlib_documents"]
