"""The import graph of ``peft_dist`` is one-directional (docs/ARCHITECTURE.md): each module imports only
from its own layer or the layers below, adapter math imports nothing distributed or quantized, and no
import hides inside a function to dodge a cycle."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "peft_dist"
# Lowest first. A module belongs to the first (longest) prefix that names it.
LAYERS = [
    ["peft_dist.config", "peft_dist.__init__"],
    ["peft_dist.model", "peft_dist.targets", "peft_dist.data"],
    ["peft_dist.distributed.env", "peft_dist.distributed.zero3", "peft_dist.distributed.memory"],
    ["peft_dist.quant"],
    ["peft_dist.adapters"],
    ["peft_dist.distributed"],  # adapter-aware ZeRO-3 code: importance, the AdaLoRA schedule, hooks
    ["peft_dist.tracking"],
    ["peft_dist.train"],
    ["peft_dist.inference"],
    ["peft_dist.export", "peft_dist.generate", "peft_dist.plan", "peft_dist.assets"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer(module: str) -> int:
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return max(matches)[1]


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported peft_dist module, inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft_dist"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(n if (PACKAGE.parent / n.replace(".", "/")).with_suffix(".py").exists()
                       or (PACKAGE.parent / n.replace(".", "/")).is_dir() else node.module, id(node) in inner)
                      for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in inner) for a in node.names if a.name.startswith("peft_dist")]
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_go_down_the_layers(path):
    module = module_name(path)
    for imported, in_function in imports(path):
        assert not in_function, f"{module} imports {imported} inside a function; import it at the top"
        if imported != "peft_dist":
            assert layer(imported) <= layer(module), f"{module} (layer {layer(module)}) imports {imported} " \
                                                     f"(layer {layer(imported)}), a layer above it"


def test_adapter_math_knows_nothing_of_zero3_or_quantization():
    for path in (PACKAGE / "adapters").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert not name.startswith(("peft_dist.distributed", "peft_dist.quant", "deepspeed",
                                            "bitsandbytes")), f"{path.name} imports {name}"
