"""Copy the model's source (based_layers + the plain-PyTorch kernel references) into an export folder.

The exported folder must load with stock `transformers` only, so it cannot import this repository.
Instead of a hand-written copy of the model, the exporter bundles the very files the native model runs:
every module reachable from `based_layers.model` by imports, flattened into one folder (Hugging Face's
dynamic-module loader copies only files named by `from .name import ...` in the same folder), with the
imports rewritten to relative ones:

- `based_layers.mixers.attention` -> `based_layers_mixers_attention.py`;
- a kernel module file `kernels.<op>.<mod>` (reference.py, _common.py ...) -> `kernels_<op>_<mod>.py`;
- a kernel package `kernels.<op>` (whose `__init__` also reaches the Triton code) -> a generated shim
  `kernels_<op>.py` in which each public function `f` imported by the model is the reference `f_reference`
  with the `backend=` argument dropped. The exported model is therefore plain PyTorch on any device.

A model import that cannot be bundled (a new repository package, a kernel function without a reference)
is an error at export time, naming the file and the import.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_MODULES = ("based_layers.model", "based_layers.config")
BUNDLED_PACKAGES = ("based_layers", "kernels")
REPO_PACKAGES = ("based_layers", "kernels", "pretrain", "data_pipeline", "launch", "tools", "bench", "tests")


class BundleError(RuntimeError):
    """The model source cannot be bundled for export; the message names the file and the import."""


@dataclass
class _Module:
    name: str
    path: Path | None
    is_package: bool
    imports: list[tuple[int, str, list[str]]] = field(default_factory=list)


def flat_name(module: str) -> str:
    """The file stem of `module` inside the export folder (`based_layers.mixers` -> `based_layers_mixers`)."""
    if module == "based_layers":
        return "based_layers_init"
    return module.replace(".", "_")


def _module_path(module: str) -> tuple[Path, bool]:
    base = REPO_ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    raise BundleError(f"cannot bundle {module}: no file {base}.py or {base}/__init__.py")


def _is_kernel_package(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "kernels" and len(parts) == 2 and _module_path(module)[1]


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _scan(module: str) -> _Module:
    path, is_package = _module_path(module)
    info = _Module(module, path, is_package)
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in REPO_PACKAGES:
                    raise BundleError(f"{path}:{node.lineno}: `import {alias.name}` cannot be bundled; "
                                      f"use `from {alias.name} import ...`")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            top = target.split(".")[0]
            if top in REPO_PACKAGES:
                if top not in BUNDLED_PACKAGES:
                    raise BundleError(f"{path}:{node.lineno}: the model imports {target}, which is not part of "
                                      "the model (only based_layers and kernels are bundled)")
                info.imports.append((node.lineno, target, [a.name for a in node.names]))
    return info


def collect_modules(entries: tuple[str, ...] = ENTRY_MODULES) -> dict[str, _Module]:
    """Every repository module the entry modules reach through imports (kernel packages not followed)."""
    found: dict[str, _Module] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        if _is_kernel_package(name):
            found[name] = _Module(name, None, True)
            continue
        info = _scan(name)
        found[name] = info
        for _, target, names in info.imports:
            submodules = [f"{target}.{n}" for n in names if _is_submodule(f"{target}.{n}")]
            todo.extend(submodules or [target])
            if submodules and len(submodules) < len(names):
                todo.append(target)
    return found


def _is_submodule(module: str) -> bool:
    try:
        _module_path(module)
    except BundleError:
        return False
    return True


def _kernel_shim(package: str, requested: set[str]) -> tuple[str, str]:
    """Source of the shim for `kernels.<op>` exposing `requested` from its reference module."""
    reference = f"{package}.reference"
    ref_path, _ = _module_path(reference)
    defined = _top_level_names(ast.parse(ref_path.read_text()))
    header = [f'"""Generated by tools/hf/bundle.py: {package} with every function on its plain-PyTorch reference."""',
              ""]
    body = ["", "", "def _reference_only(fn):", "    def call(*args, backend=None, **kwargs):",
            "        return fn(*args, **kwargs)", "", "    call.__name__ = fn.__name__", "    return call", ""]
    # one `from .module import name` line per name: the form transformers' loader follows to copy files
    source = flat_name(reference)
    for name in sorted(requested):
        if name in defined:
            header.append(f"from .{source} import {name}  # noqa: F401")
        elif f"{name}_reference" in defined:
            header.append(f"from .{source} import {name}_reference")
            body.append(f"{name} = _reference_only({name}_reference)")
        else:
            raise BundleError(f"cannot bundle {package}.{name}: {ref_path} defines neither {name} nor "
                              f"{name}_reference (the exported model runs the plain-PyTorch references only)")
    lines = header + body
    return reference, "\n".join(lines) + "\n"


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


_FROM_RE = re.compile(r"^(\s*)from\s+(\.*[\w.]*)\s+import\b")


def _rewrite(info: _Module) -> str:
    """The source of `info` with its repository imports made relative to the flat export folder."""
    lines = info.path.read_text().splitlines(keepends=True)
    targets = {lineno: target for lineno, target, _ in info.imports}
    for lineno, target in targets.items():
        line = lines[lineno - 1]
        match = _FROM_RE.match(line)
        if match is None:
            raise BundleError(f"{info.path}:{lineno}: cannot rewrite this import (expected `from X import ...` "
                              "on one line start)")
        lines[lineno - 1] = f"{match.group(1)}from .{flat_name(target)} import" + line[match.end():]
    return "".join(lines)


def _header(module: str) -> str:
    return f"# Bundled by tools/hf/bundle.py from {module} (imports rewritten to this folder).\n"


def bundle_sources(out_dir: Path, entries: tuple[str, ...] = ENTRY_MODULES) -> dict[str, str]:
    """Write the flattened model source into `out_dir`; returns {file name: sha256 of its content}."""
    modules = collect_modules(entries)
    files: dict[str, str] = {}
    requested: dict[str, set[str]] = {}
    for info in modules.values():
        for _, target, names in info.imports:
            if _is_kernel_package(target):
                requested.setdefault(target, set()).update(names)
    extra: list[str] = []
    for package, names in requested.items():
        reference, shim = _kernel_shim(package, names)
        files[f"{flat_name(package)}.py"] = shim
        if reference not in modules:
            extra.append(reference)
    for name in extra:
        for sub_name, sub in collect_modules((name,)).items():
            modules.setdefault(sub_name, sub)
    for name, info in modules.items():
        if info.path is None:
            continue
        for _, target, _names in info.imports:
            if _is_kernel_package(target) and f"{flat_name(target)}.py" not in files:
                raise BundleError(f"{info.path}: imports the kernel package {target}, which has no shim")
        files[f"{flat_name(name)}.py"] = _header(name) + _rewrite(info)
    for file_name, text in files.items():
        _check_no_absolute_repo_imports(file_name, text)
        (out_dir / file_name).write_text(text)
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())}


def _check_no_absolute_repo_imports(file_name: str, text: str) -> None:
    for node in ast.walk(ast.parse(text, file_name)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in REPO_PACKAGES:
            raise BundleError(f"bundled {file_name}:{node.lineno} still imports {node.module}")
