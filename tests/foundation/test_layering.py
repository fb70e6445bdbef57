"""The layering of docs/DESIGN.md: layers know nothing of training; kernels import nothing from the repo."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_PACKAGES = {"pretrain", "based_layers", "kernels", "data_pipeline", "launch", "tools", "bench", "tests"}
FORBIDDEN = {
    "based_layers": REPO_PACKAGES - {"based_layers", "kernels"} | {"torch.distributed"},
    "kernels": REPO_PACKAGES - {"kernels"},
    "data_pipeline": {"based_layers", "kernels", "pretrain", "launch", "tools"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            for forbidden in FORBIDDEN[package]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)
