"""House keeping (issue 32): results name files by their place in the repository, never by a path of the machine
that measured them; no two modules of invemb import each other; ONNX Runtime profiles go to a named folder."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from invemb.paths import checkout_root, display_command, display_path

ROOT = checkout_root()
MACHINE_PREFIXES = [str(ROOT), str(ROOT.parent) + "/", str(Path.home()) + "/"]  # the checkout, beside it, home


def machine_paths(text: str) -> list[str]:
    return [p for p in MACHINE_PREFIXES if p in text]


# ------------------------------------------------------------------------------------------- paths in results
def test_display_path_names_files_by_their_place_in_the_repository(tmp_path):
    assert display_path(ROOT / "models/invemb-minilm-s768") == "models/invemb-minilm-s768"
    assert display_path("models/invemb-minilm-s768") == "models/invemb-minilm-s768"  # as typed in the checkout
    assert display_path(tmp_path / "financial-news-headlines") == "financial-news-headlines"  # data outside: its name
    assert display_path("shipped") == "shipped" or not Path("shipped").exists()
    cmd = display_command([sys.executable, str(ROOT / "train/run.py"), "--data", str(tmp_path / "headlines"),
                           f"--out={ROOT / 'runs/x'}", f"deepspeed_config={ROOT / 'train/ds_config/zero2.json'}",
                           "--note", "a relative/path stays"])
    assert cmd.startswith(("python ", ".venv/bin/python ", "python3"))
    assert "train/run.py --data headlines --out=runs/x deepspeed_config=train/ds_config/zero2.json" in cmd
    assert "'a relative/path stays'" in cmd and not machine_paths(cmd) and str(tmp_path) not in cmd


def test_validate_report_names_no_machine_path(tmp_path):
    """export/validate.py's printed report (results/validate_export.txt) for a command given absolute paths."""
    from invemb.export.validate import Row, render_report
    argv = ["--checkpoint", str(ROOT / "models/invemb-minilm-s768"), "--onnx", str(tmp_path / "onnx"),
            "--data", str(tmp_path / "financial-news-headlines"), "-n", "2"]
    rows = [Row("encoder", "batch=1 sequence=1", "4.29e-06", "0.0001", True)]
    details = {"vector_max_abs_diff": 1e-6, "torch_exact_match": 0.5, "torch": ["a", "b"], "ort": ["a", "c"]}
    text = render_report(rows, details, argv)
    assert text.splitlines()[0] == ("# python export/validate.py --checkpoint models/invemb-minilm-s768 --onnx onnx "
                                    "--data financial-news-headlines -n 2")
    assert "differs: torch 'b'" in text and "OK: 1/1 checks passed" in text
    assert not machine_paths(text) and str(tmp_path) not in text


def test_committed_results_and_models_name_no_machine_path():
    found = []
    for folder in ("results", "models"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".md", ".json", ".txt", ".yaml") and f.is_file():
                found += [f"{f.relative_to(ROOT)}: {p}" for p in machine_paths(f.read_text(errors="replace"))]
    assert not found, found


# ------------------------------------------------------------------------------------------- import circles
def runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def module_imports(root: Path, package: str = "invemb") -> dict[str, set[str]]:
    """{module: the package's modules it imports when run}, function-level (lazy) imports included."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / package).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    parts = mod.split(".")[:len(mod.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_no_two_modules_import_each_other():
    graph = module_imports(ROOT)
    assert graph["invemb.export.exporter"] >= {"invemb.export.optimize", "invemb.export.placement"}
    assert "invemb.export.exporter" not in graph["invemb.export.optimize"]  # graphs -> optimise -> place
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check sees one
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n")
    assert [a.name for n in runtime_nodes(typed) if isinstance(n, ast.Import) for a in n.names] == ["y"]


# ------------------------------------------------------------------------------------------- ORT profiles
def test_ort_profiles_go_to_the_named_folder(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from invemb.ort import make_session
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "relu.onnx"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INVEMB_ORT_PROFILE", str(tmp_path / "runs/profile"))
    session = make_session(tmp_path / "relu.onnx", threads=1)
    session.run(None, {"x": np.ones(2, np.float32)})
    session.end_profiling()
    assert len(list((tmp_path / "runs/profile").glob("onnxruntime_profile_*.json"))) == 1
    assert not list(tmp_path.glob("onnxruntime_profile_*.json"))  # never in the working directory
