"""The model core knows no network: importing it pulls in neither grpc nor redis."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_core_imports_no_network_stack():
    code = ("import sys, llama4, llama4.engine, llama4.model, llama4.kv_cache, llama4.tokenizer, llama4.store, "
            "llama4.convert, kernels; bad = sorted({'grpc', 'redis'} & set(sys.modules)); "
            "assert not bad, f'model core imported {bad}'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_plumbing_knows_no_model_math():
    """The cluster plumbing may read the dtype table, nothing else of the model core."""
    for path in (ROOT / "plumbing").glob("*.py"):
        imports = [line for line in path.read_text().splitlines() if line.startswith(("from llama4", "import llama4"))]
        for line in imports:
            module, _, names = line.partition(" import ")
            assert module == "from llama4.dtypes", (path, line)
            assert {n.strip() for n in names.split(",")} <= {"DTYPE_NAMES", "dtype_name", "torch_dtype"}, (path, line)
