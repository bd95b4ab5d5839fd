"""The package's layout keeps its promises (docs/architecture.md): imports flow one way down the
pipeline, and no module grows past what a reader takes in at once."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the pipeline's order; a module may import its own stage, earlier stages and the utilities
STAGES = ["utilities", "game", "data", "model", "training", "inference", "evaluation", "play", "cli"]
TOP = {"__init__": "cli", "__main__": "cli", "cli": "cli"}  # the API and the command table sit on top
MAX_LINES = 560  # "about 500": at most about a tenth over (the Triton kernels and their launchers, 555, are one unit)


def package_files():
    for folder, name in ((ROOT / "worldmodel", "worldmodel"), (ROOT / "play", "worldmodel.play"),
                         (ROOT / "kernels", "worldmodel.kernels")):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([name, *parts])


def stage(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "cli"
    if parts[0] in ("play",):
        return "play"
    if parts[0] == "kernels":
        return "utilities"  # knows nothing of Doom: below the model that calls it
    if len(parts) == 1:
        return TOP.get(parts[0], "utilities")
    return parts[0]


def imports_of(path: Path, module: str):
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("worldmodel"):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "worldmodel" or base.startswith("worldmodel."):
                for a in node.names:  # `from worldmodel import kernels`: the name may be a module
                    yield node.lineno, f"{base}.{a.name}" if base in ("worldmodel", "worldmodel.play") else base


def test_the_stages_are_the_ones_documented():
    found = {p.name for p in (ROOT / "worldmodel").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == set(STAGES) - {"utilities", "play", "cli"}


def test_imports_flow_one_way_down_the_pipeline():
    order = {s: i for i, s in enumerate(STAGES)}
    wrong = []
    for path, module in package_files():
        here = stage(module)
        for line, target in imports_of(path, module):
            there = stage(target)
            if there not in order:  # `from worldmodel import Action`: a name of the public API
                there = "cli"
            if target.split(".")[1:2] in (["errors"], ["files"], ["provenance"], ["parsing"], ["device"],
                                          ["metrics"], ["progress"]):
                there = "utilities"
            if target in ("worldmodel.Action", "worldmodel.ACTION_DIM"):
                there = "game"
            if order[there] > order[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the pipeline's direction:\n" + "\n".join(wrong)


def test_no_module_is_longer_than_a_reader_takes_in():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p, _ in package_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "modules over about 500 lines:\n" + "\n".join(long)


def test_play_and_kernels_are_imported_by_their_package_names():
    """`import kernels` or `from play...` works from the repository's root by accident (the folders are
    on the path there) and would load a second copy of the module, or another distribution's."""
    import re

    bare = re.compile(r"^\s*(import (play|kernels)\b|from (play|kernels)(\.| import))", re.M)
    found = [f"{p.relative_to(ROOT)}" for folder in ("worldmodel", "play", "kernels", "tests", "benchmarks")
             for p in (ROOT / folder).rglob("*.py") if bare.search(p.read_text())]
    assert not found, "bare play/kernels imports in: " + ", ".join(found)


def test_only_the_front_end_imports_pygame():
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "worldmodel").rglob("*.py")
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                    any((a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] == "pygame"
                        for a in n.names)
                    for n in ast.walk(ast.parse(p.read_text())))]
    assert not found, "pygame imported outside play/: " + ", ".join(found)
