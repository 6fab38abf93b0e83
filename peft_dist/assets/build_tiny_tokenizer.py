"""How ``tiny_tokenizer/`` was made (run once; the result is shipped so runs need no network).

    python peft_dist/assets/build_tiny_tokenizer.py

A 512-token byte-level BPE trained on the first 200 standard-library modules of this Python, with a minimal
chat template (``<|role|>``, a newline, the content, EOS) so that conversation data trains on the builtin
model. The template goes into tokenizer_config.json (not chat_template.jinja) to keep the assets two files.
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peft_dist.data import stdlib_documents

EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def main(directory: Path = Path(__file__).parent / "tiny_tokenizer") -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(stdlib_documents(200), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(directory, save_jinja_files=False)


if __name__ == "__main__":
    main()
