"""Generate text with a trained adapter on a fresh base (``--compare-base``: the base alone first, same prompt):

    python -m peft_dist.generate runs/tiny-lora/adapter --prompt "def main(" --max-new-tokens 40
    python -m peft_dist.generate runs/tiny-lora/adapter --prompt "Return the" --compare-base
"""
from __future__ import annotations

import argparse
import sys

from deepspeed.accelerator import get_accelerator

from peft_dist.config.schema import ConfigError
from peft_dist.inference import load_for_inference
from peft_dist.model import generate_ids
from peft_dist.train.checkpoint import CheckpointError


def generate(adapter_dir: str, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
             force: bool = False, adapted: bool = True) -> str:
    """The prompt and its continuation by the adapted model (``adapted=False``: by its base alone), on this
    machine's accelerator (DeepSpeed's choice: a GPU if there is one, else the CPU)."""
    model, tokenizer = load_for_inference(adapter_dir, force, adapted)
    model.to(get_accelerator().current_device_name())
    prompt_ids, new_ids = generate_ids(model, tokenizer, prompt, max_new_tokens, temperature)
    return tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="an adapter checkpoint directory (e.g. runs/tiny-lora/adapter)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--force", action="store_true", help="load onto a base whose weights differ from the "
                        "ones the adapter was trained on (same architecture and config)")
    parser.add_argument("--compare-base", action="store_true",
                        help="print the base's own continuation of the prompt first, then the adapted model's")
    args = parser.parse_args()
    settings = (args.adapter_dir, args.prompt, args.max_new_tokens, args.temperature, args.force)
    try:
        if args.compare_base:
            print(f"--- base\n{generate(*settings, adapted=False)}\n--- adapted")
        print(generate(*settings))
    except (CheckpointError, ConfigError) as err:  # ConfigError: e.g. a damaged shipped base
        print(f"peft-dist generate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
