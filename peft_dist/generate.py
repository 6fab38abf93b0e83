"""Generate text with a trained adapter on a fresh base:

    python -m peft_dist.generate runs/tiny-lora/adapter --prompt "def main(" --max-new-tokens 40
"""
from __future__ import annotations

import argparse
import sys

from deepspeed.accelerator import get_accelerator

from peft_dist.inference import load_for_inference
from peft_dist.model import generate_ids
from peft_dist.train.checkpoint import CheckpointError


def generate(adapter_dir: str, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
             force: bool = False) -> str:
    """The prompt and its continuation, on this machine's accelerator (DeepSpeed's choice: a GPU if there
    is one, else the CPU)."""
    model, tokenizer = load_for_inference(adapter_dir, force)
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
    args = parser.parse_args()
    try:
        print(generate(args.adapter_dir, args.prompt, args.max_new_tokens, args.temperature, args.force))
    except CheckpointError as err:
        print(f"peft-dist generate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
