"""What the rows of a data set mean (their layout), checked one by one and brought to the columns the
tokenizer reads: ``text``; ``prompt`` and ``response``; or ``messages`` (a list of ``{role, content}``).

Layouts: ``text`` (plain documents), ``pair`` (``data.prompt_field`` / ``data.response_field``), ``chat``
(``{"messages": [{"role", "content"}]}``), ``sharegpt`` (``{"conversations": [{"from", "value"}]}``,
``human`` -> user, ``gpt`` -> assistant) and ``alpaca`` (``instruction`` / optional ``input`` / ``output``,
rendered with the Stanford Alpaca prompt). ``data.columns`` renames the fields of the last three.
"""
from __future__ import annotations

from peft_dist.config.schema import DataConfig

LAYOUTS = ("chat", "sharegpt", "alpaca")  # the layouts data.format names; text and pair follow the fields
CONVERSATIONS = ("chat", "sharegpt")  # layouts rendered with a chat template
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
LAYOUT_FIELDS = {"chat": ["messages"], "sharegpt": ["conversations"], "alpaca": ["instruction", "output"]}

# The prompts of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), so that a model
# tuned here is prompted exactly like the published Alpaca models.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def column(cfg: DataConfig, name: str) -> str:
    """The data's name for the standard field ``name`` (``data.columns`` maps standard name -> data name)."""
    return cfg.columns.get(name, name)


def detect_layout(cfg: DataConfig, fields: list[str]) -> str:
    """``data.format`` when it names a layout, else the first layout whose fields the first row has."""
    if cfg.format in LAYOUTS:
        return cfg.format
    if cfg.prompt_field:
        return "pair"
    for layout, names in LAYOUT_FIELDS.items():
        if all(column(cfg, n) in fields for n in names):
            return layout
    return "text"


def required_fields(cfg: DataConfig, layout: str) -> list[str]:
    """The data's field names a row of ``layout`` must carry."""
    if layout == "pair":
        return [cfg.prompt_field, cfg.response_field]
    if layout == "text":
        return [cfg.text_field]
    return [column(cfg, n) for n in LAYOUT_FIELDS[layout]]


def _has_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_turns(turns: object, role_key: str, content_key: str, roles: dict) -> str | None:
    if not isinstance(turns, list) or not turns:
        return "empty conversation: it needs a list of at least one turn"
    for number, turn in enumerate(turns, start=1):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if role not in roles:
            return f"turn {number}: unknown role {role!r}; use {', '.join(roles)}"
        if not _has_text(turn.get(content_key)):
            return f"turn {number} ({role}) has no {content_key!r} text"
    return None


def check_record(cfg: DataConfig, layout: str, record: dict) -> str | None:
    """What is wrong with one row of ``layout`` (its required fields present), or None."""
    if layout == "chat":
        return _check_turns(record[column(cfg, "messages")], "role", "content", {r: r for r in ROLES})
    if layout == "sharegpt":
        return _check_turns(record[column(cfg, "conversations")], "from", "value", SHAREGPT_ROLES)
    if layout == "alpaca":
        for name in ("instruction", "output"):
            if not _has_text(record[column(cfg, name)]):
                return f"{column(cfg, name)!r} is empty or not text"
        extra = record.get(column(cfg, "input"))
        if extra is not None and not isinstance(extra, str):
            return f"{column(cfg, 'input')!r} is not text"
    return None


def standard_columns(rows: dict[str, list], cfg: DataConfig, layout: str) -> dict[str, list]:
    """A batch of rows as the tokenizer reads them (a ``Dataset.map(batched=True)`` function)."""
    if layout == "text":
        return {"text": rows[cfg.text_field]}
    if layout == "pair":
        return {"prompt": rows[cfg.prompt_field], "response": rows[cfg.response_field]}
    if layout == "chat":
        return {"messages": [[{"role": t["role"], "content": t["content"]} for t in conversation]
                             for conversation in rows[column(cfg, "messages")]]}
    if layout == "sharegpt":
        return {"messages": [[{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in conversation]
                             for conversation in rows[column(cfg, "conversations")]]}
    inputs = rows.get(column(cfg, "input")) or [None] * len(rows[column(cfg, "instruction")])
    prompts = [ALPACA_PROMPT.format(instruction=i, input=x) if x and x.strip() else
               ALPACA_PROMPT_NO_INPUT.format(instruction=i) for i, x in zip(rows[column(cfg, "instruction")], inputs)]
    return {"prompt": prompts, "response": rows[column(cfg, "output")]}
