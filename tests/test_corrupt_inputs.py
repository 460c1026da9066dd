"""Real checkpoints broken in the ways files break (truncated, flipped header bytes, a wrong
header length, garbage or NaN in the data, nonsense config values): every command answers with
a result or one clear error line, never an internal error (an exception we did not expect)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from quantscope.app.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "real"
SOURCES = ["autoawq-gemm-w4g128", "gptqmodel-gptq-w4g128-actorder", "llmcompressor-w4a16"]
HOWS = ["trunc_data", "trunc_header", "flip_header", "bad_len", "huge_len", "flip_data", "nan_data", "config",
        "config_garbage"]


def _mutate(folder: Path, how: str, rng: random.Random) -> None:
    st = min(folder.glob("*.safetensors"))
    b = bytearray(st.read_bytes())
    n = int.from_bytes(b[:8], "little")
    if how == "trunc_data":
        b = b[:8 + n + rng.randrange(0, len(b) - 8 - n)]
    elif how == "trunc_header":
        b = b[:rng.randrange(0, 8 + n)]
    elif how == "flip_header":
        for _ in range(3):
            b[rng.randrange(8, 8 + n)] = rng.randrange(32, 127)
    elif how == "bad_len":
        b[:8] = (n + rng.choice([-40, -3, 5, 40])).to_bytes(8, "little")
    elif how == "huge_len":
        b[:8] = (1 << 62).to_bytes(8, "little")
    elif how == "flip_data":
        for _ in range(200):
            b[rng.randrange(8 + n, len(b))] = rng.randrange(256)
    elif how == "nan_data":
        for _ in range(50):
            i = rng.randrange(8 + n, len(b) - 2) & ~1
            b[i:i + 2] = b"\xc0\x7f"
    elif how == "config":
        c = json.loads((folder / "config.json").read_text())
        q = c.get("quantization_config") or {}
        for key in rng.sample(sorted(q), min(2, len(q))):
            q[key] = rng.choice([None, 0, -1, 3, 7, "abc", [1], {"a": 1}, 1e30])
        (folder / "config.json").write_text(json.dumps(c))
    elif how == "config_garbage":
        (folder / "config.json").write_text("{not json")
    st.write_bytes(bytes(b))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_every_command_answers_corrupt_checkpoints_cleanly(source, real_fixtures, tmp_path, capsys):
    rng = random.Random(source)
    ref = real_fixtures / "base-bf16"
    seen = set()
    for how in HOWS:
        folder = tmp_path / how
        shutil.copytree(FIXTURES / source, folder)
        for p in folder.iterdir():
            p.chmod(0o644)
        _mutate(folder, how, rng)
        for argv in (["info", str(folder)], ["doctor", str(folder)],
                     ["compare", "--reference", str(ref), str(folder), "--engine", "numpy"],
                     ["dequant", str(folder), "model.layers.0.mlp.down_proj", "-o", str(tmp_path / "o.npy")]):
            rc = main(argv)
            seen.add(rc)
            out, err = capsys.readouterr()
            assert rc in (0, 1, 2) and "internal error" not in err, (how, argv[0], rc, err)
            if rc == 2 and argv[0] == "doctor":  # "cannot open": the report says why
                assert err == "" and out.startswith("quantscope doctor:") and "error(s)" in out, (how, out)
            elif rc == 2:  # one line naming the file
                lines = err.strip().splitlines()
                assert len(lines) == 1 and str(folder) in lines[0], (how, argv[0], err)
    assert {0, 1, 2} <= seen  # the damage is read (errors, findings) and some of it is harmless
