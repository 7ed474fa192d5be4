"""The README's "Your own model" snippets run exactly as written, each in a fresh namespace, in a process
started without x64 (as a user's would be), and do what their comments say."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp
    out = []
    for code in json.load(sys.stdin):
        ns = {}
        exec(compile(code, "README.md", "exec"), ns)
        row = {k: [list(ns[k].shape), str(ns[k].dtype), bool(jnp.isfinite(ns[k]).all())]
               for k in ("vg", "ig", "rec") if k in ns}
        if "mask" in ns:
            row["mask"] = bool(ns["mask"].all())
            row["distance"] = float(jnp.max(jnp.abs(ns["rec"] - __import__("jaxrecover").explain(
                __import__("jaxrecover").VG(), ns["net"], ns["params"], ns["x"], jnp.zeros(4, jnp.int32)))))
        out.append(row)
    print(json.dumps(out))
''')


def _snippets():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_your_own_model_snippets_run_as_written():
    import json

    snippets = _snippets()
    assert len(snippets) == 4, "the section shows a Linen MLP, a Linen CNN, an NNX module and a plain function"
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    r = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(snippets), capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    mlp, cnn, nnx_row, fn = json.loads(r.stdout.strip().splitlines()[-1])
    assert mlp["vg"] == [[4, 28, 28, 1], "float32", True]
    assert cnn["ig"] == [[2, 32, 32, 3], "float32", True]
    assert nnx_row["rec"] == [[4, 28, 28, 1], "float32", True] and nnx_row["mask"]
    assert nnx_row["distance"] < 1e-4  # VG from IG answers of the NNX module's service (float32 round-off)
    assert fn["vg"] == [[4, 28, 28, 1], "float32", True]
