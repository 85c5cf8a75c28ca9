"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    quickstart = next(b for b in blocks if "def make_model" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(quickstart, "README quickstart", "exec"), {})
    assert (tmp_path / "mlp.safetensors").is_file()
