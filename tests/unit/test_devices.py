"""Device placement by construction. CPU tests cannot see a tensor created on the CPU meeting a CUDA
parameter, so every tensor factory in ``peft_dist`` names its device, except in code that only ever works
on the CPU (listed below with the reason) and inside ``nn.Parameter(...)`` / ``register_buffer(...)``
(a module's own tensors are created where the module is built and move with it)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "peft_dist"
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "randn", "rand", "randint", "randperm", "eye",
             "linspace", "as_tensor"}
CPU_ONLY = {
    "data": "tokenizing and batching on the host; batches are moved with .to(engine.device)",
    "plan": "planner arithmetic on the meta device or plain numbers",
    "assets": "builds the tokenizer file",
    "quant/loader.py": "makes host tensors that zero.Init then places (a quantized linear's on the quantizing "
                       "device, named)",
}


def cpu_only(path: Path) -> bool:
    relative = path.relative_to(PACKAGE).as_posix()
    return any(relative == key or relative.startswith(key + "/") for key in CPU_ONLY)


def module_state(call: ast.Call) -> bool:
    """``nn.Parameter(...)`` or ``self.register_buffer(...)``."""
    return isinstance(call.func, ast.Attribute) and call.func.attr in ("Parameter", "register_buffer")


def factories_without_device(path: Path, root: Path = PACKAGE) -> list[str]:
    tree = ast.parse(path.read_text())
    owned = {id(n) for c in ast.walk(tree) if isinstance(c, ast.Call) and module_state(c) for n in ast.walk(c)}
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and id(node) not in owned and not any(k.arg == "device" for k in node.keywords)):
            found.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}")
    return sorted(found)


def test_every_tensor_factory_names_its_device():
    missing = [f for path in sorted(PACKAGE.rglob("*.py")) if not cpu_only(path) for f in factories_without_device(path)]
    assert not missing, "pass device= (the parameter's or the engine's device):\n" + "\n".join(missing)


def test_the_check_finds_a_factory_without_a_device(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import torch\nfrom torch import nn\n\ndef f(p):\n    w = nn.Parameter(torch.ones(3))\n"
                    "    return torch.zeros(3, device=p.device) + torch.arange(3) * w\n")
    assert factories_without_device(path, tmp_path) == ["probe.py:6 torch.arange"]
