"""How ``tiny_tokenizer/`` was made (run once; the result is shipped so runs need no network).

    python peft_dist/assets/build_tiny_tokenizer.py

A 512-token byte-level BPE trained on the first 200 standard-library modules of this Python.
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peft_dist.data import stdlib_documents

EOS = "<|endoftext|>"


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(stdlib_documents(200), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(Path(__file__).parent / "tiny_tokenizer")


if __name__ == "__main__":
    main()
