"""The budget planner: memory, communication and time of a run before it is submitted.

``python -m peft_dist.plan --model gpt3-175b --nodes 16 ...`` (see ``__main__``). The analytic
model (``inventory``, ``estimate``) is checked against the real model skeleton on the meta device
(``dryrun``); ``writers`` turns a plan into the DeepSpeed config and sbatch script it assumes.
"""
