"""Entry point: ``deepspeed launcher/train.py``, ``torchrun ... launcher/train.py``, ``srun python
launcher/train.py`` or plain ``python launcher/train.py``, each with ``--config FILE --set a.b=value``.

With no ``--config`` it runs the embedded default: LoRA on the small pretrained Llama shipped with the
package (int8), adapted to this Python's standard-library docstrings, on CPU, tracked in a local MLflow
store. The config is validated before any process group starts.
"""
from __future__ import annotations

import argparse
import os
import sys

# Tokenizers would otherwise warn (and disable themselves) in every forked data or launcher process.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="peft-dist: adapters on a ZeRO-3 sharded 8-bit base")
    parser.add_argument("--config", help="YAML run config (see configs/); default: the embedded small CPU run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import yaml

    from peft_dist.config import ConfigError, config_to_dict
    from peft_dist.data import DataError
    from peft_dist.train.checkpoint import CheckpointError
    from peft_dist.train.config import load_config
    from peft_dist.train.trainer import PREEMPTED_EXIT_CODE, TrainingAborted, train

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"peft-dist: error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        print(f"peft-dist: aborted: {err}", file=sys.stderr)
        return 3
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def cli() -> None:
    """Console entry point: exits without interpreter finalization (see ``exit_process``)."""
    from peft_dist.distributed.env import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
