"""The command line: `quantscope info` output and one-line errors with exit status 2."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import read_all, write_raw, write_st
from quantscope.app.cli import main


def test_info_text_and_json(tmp_path, capsys):
    write_st(tmp_path / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight": np.zeros((4, 8), np.float16),
        "model.layers.0.mlp.up_proj.bias": np.zeros(4, np.float32)}, {"format": "pt"})
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj" in out and ".weight" in out and "F16" in out
    assert main(["info", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensor_count"] == 2
    assert data["dtypes"]["F16"] == {"bytes": 64, "params": 32, "tensors": 1}
    assert data["total_bytes"] == 64 + 16
    t = {x["name"]: x for x in data["tensors"]}
    assert t["model.layers.0.mlp.up_proj.weight"]["shape"] == [4, 8]
    assert data["files"][0]["metadata"] == {"format": "pt"}


def test_info_columns_stay_in_line_and_say_blocks_and_channels(capsys):
    """A bitsandbytes quant_state name or modelopt-nvfp4 pushed the columns out of line; an FP8
    block layer showed no block size, per-channel GPTQ "g-1"."""
    from pathlib import Path
    golden = Path(__file__).parent / "fixtures" / "golden"
    assert main(["info", str(golden / "fp8_block_aligned_bf16scale")]) == 0
    assert "fp8-block     8b 128×128" in capsys.readouterr().out
    assert main(["info", str(golden / "bnb_fp4")]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("      .")]
    assert len({ln.index(" U8 ") if " U8 " in ln else ln.index(" F32 ") for ln in rows}) == 1  # dtypes in one column


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    p = write_raw(tmp_path / "bad.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8))
    assert main(["info", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "bad.safetensors" in err[0] and "tensor 'a'" in err[0] and "Traceback" not in err[0]


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantscope", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("quantscope: error:") and "missing" in r.stderr


def test_backend_imports_without_qt():
    code = ("import sys, pkgutil, importlib, quantscope.backend as b;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(b.__path__, 'quantscope.backend.')];"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_options_before_the_command_run_the_command(tmp_path, capsys):
    # the usage line reads `quantscope [--debug] [-v] COMMAND`: "info" was opened as a path in the window
    p = tmp_path / "m.safetensors"
    write_st(p, {"w": np.zeros((4, 4), np.float32)})
    assert main(["--debug", "-v", "info", str(p)]) == 0
    assert "tensors: 1" in capsys.readouterr().out



def test_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path, capsys):
    # --debug re-raised: Python printed the traceback and exited 1, whatever the error (a script
    # checking for 2, "cannot open", saw another status only when debugging)
    assert main(["--debug", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.rstrip().splitlines()[-1].startswith("quantscope: error: ") and "missing" in err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "Traceback" not in capsys.readouterr().err

def test_outputs_are_checked_before_any_work_and_written_where_named(tmp_path, capsys, real_fixtures):
    ref = str(real_fixtures / "base-bf16")
    var = str(real_fixtures / "mlx-affine-q4-g64")
    assert main(["compare", "--reference", ref, var, "--json", str(tmp_path / "no" / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "internal" not in err[0]
    # -o is the file written, as given (np.save would have added .npy and the report named another file)
    out = tmp_path / "layer"
    assert main(["dequant", var, "model.layers.0.mlp.up_proj", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and np.load(out).shape == (1536, 384)
    # --json -: JSON on stdout, the table on stderr; the same folder twice is compared once, said so
    assert main(["compare", "--reference", ref, var, var + "/", "--json", "-"]) == 0
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert data["variants"] == [var] and len({r["variant"] for r in data["layers"]}) == 1
    assert "compared once" in cap.err and "rel_fro" in cap.err


def test_compare_layers_takes_a_pattern_and_says_when_nothing_matches(capsys, real_fixtures):
    ref = str(real_fixtures / "base-bf16")
    var = str(real_fixtures / "mlx-affine-q4-g64")
    assert main(["compare", "--reference", ref, var, "--layers", r"layers\.1\.mlp", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in data["layers"]}
    assert names == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert data["layers_pattern"] == r"layers\.1\.mlp" and data["added_layers"] == []
    for pattern, says in (("nothing_like_this", "no layer of the reference matches --layers"),
                          ("[", "is not a regular expression")):
        assert main(["compare", "--reference", ref, var, "--layers", pattern]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]


def test_a_variant_whose_every_layer_fails_to_decode_is_not_compared(tmp_path, capsys, real_fixtures):
    """compressed-tensors finds a wrong group size only when it decodes: every layer failed there,
    and compare printed an empty table and exited 0 (a GPTQ file with the same fault: exit 2)."""
    import shutil
    from pathlib import Path
    ref = str(real_fixtures / "base-bf16")
    bad = tmp_path / "ct-g64"
    shutil.copytree(Path(__file__).parent / "fixtures" / "real" / "llmcompressor-w4a16", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["compare", "--reference", ref, str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "no layer can be compared" in err[0]
    assert "cannot be decoded" in err[0] and "group_size=64" in err[0]
    # beside a good variant: the good one is compared, the bad one named, exit 2
    good = str(real_fixtures / "mlx-affine-q4-g64")
    assert main(["compare", "--reference", ref, str(bad), good, "--json", "-"]) == 2
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert {r["variant"] for r in data["layers"]} == {good}
    assert [f["variant"] for f in data["failed"]] == [str(bad)]
    # --layers: the reason names only what was asked for
    assert main(["compare", "--reference", ref, str(bad), "--layers", "q_proj"]) == 2
    err = capsys.readouterr().err
    assert "no layer matching --layers 'q_proj' can be compared" in err and "down_proj" not in err


def test_a_selection_a_partial_variant_lacks_is_said_as_such(tmp_path, capsys, real_fixtures):
    # a checkpoint of decoder layer 0 only, asked for layer 1: "is it a quantization of a
    # different model?" — it is the same model, it just does not hold those layers
    from pathlib import Path

    from safetensors.numpy import load_file
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    part = tmp_path / "layer0"
    part.mkdir()
    t = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if "layers.1." not in k}
    write_st(part / "model.safetensors", t, {"format": "pt"})
    for f in ("config.json", "quantize_config.json"):
        (part / f).write_bytes((src / f).read_bytes())
    ref = str(real_fixtures / "base-bf16")
    assert main(["compare", "--reference", ref, str(part), "--layers", r"layers\.1\.mlp"]) == 2
    err = capsys.readouterr().err
    assert "the variant stores none of them" in err and "different model" not in err and err.count("\n") == 1
    assert main(["compare", "--reference", ref, str(part), "--layers", r"layers\.0\.mlp"]) == 0
    capsys.readouterr()


def test_a_variant_that_cannot_be_opened_leaves_the_others_compared(tmp_path, capsys, real_fixtures):
    # a missing path (or a broken file) among the variants stopped the whole comparison
    ref, good = str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    missing = str(tmp_path / "nonexistent")
    assert main(["compare", "--reference", ref, missing, good, str(broken), "--json", "-"]) == 2
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert {r["variant"] for r in data["layers"]} == {good}
    assert [f["variant"] for f in data["failed"]] == [missing, str(broken)]
    err = cap.err.strip().splitlines()
    assert any(missing in ln and ln.startswith("quantscope: error:") for ln in err)
    assert any(str(broken) in ln and ln.startswith("quantscope: error:") for ln in err)
    # none opens: that one line, exit 2
    assert main(["compare", "--reference", ref, missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0]


def test_compare_to_dev_stdout_keeps_the_table_off_it(tmp_path, real_fixtures):
    """--json /dev/stdout (or --heads-csv) is stdout as "-" is: the table goes to stderr, the
    JSON read back whole (the table followed it on stdout: "Extra data")."""
    import json
    import subprocess
    import sys
    for opt in ("--json", "--heads-csv"):
        r = subprocess.run([sys.executable, "-m", "quantscope", "compare", "--reference", str(real_fixtures / "base-bf16"),
                            str(real_fixtures / "mlx-affine-q4-g64"), opt, "/dev/stdout"],
                           capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr
        assert "rel_fro" in r.stderr  # (the table)
        if opt == "--json":
            assert json.loads(r.stdout)["layers"]
        else:
            assert r.stdout.startswith("name,variant,head,") and "worst heads" not in r.stdout


def test_compare_refuses_one_file_for_both_json_and_csv(tmp_path, capsys, real_fixtures):
    out = tmp_path / "same.out"
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--json", str(out), "--csv", str(out)]) == 2
    assert "--json and --csv both name" in capsys.readouterr().err and not out.exists()
    # the per-head CSV too: not the layers' file, not stdout twice, not over another kind of file
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--csv", str(out), "--heads-csv", str(out)]) == 2
    assert "--csv and --heads-csv both name" in capsys.readouterr().err and not out.exists()
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--json", "-", "--heads-csv", "-"]) == 2
    assert "--json - and --heads-csv - cannot both write to stdout" in capsys.readouterr().err
    # /dev/stdout is stdout too (the atomic write of one replaced the other where stdout was a file)
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--csv", "-", "--heads-csv", "/dev/stdout"]) == 2
    assert "--csv - and --heads-csv /dev/stdout cannot both write to stdout" in capsys.readouterr().err
    # a per-head CSV is not replaced by the layers' CSV (both begin with "name,"), nor the other way
    heads = tmp_path / "h.csv"
    heads.write_text("name,variant,head,index\n")
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--csv", str(heads)]) == 2
    assert "is not compare's CSV" in capsys.readouterr().err and heads.read_text() == "name,variant,head,index\n"
    layers = tmp_path / "l.csv"
    layers.write_text("name,variant,scheme\n")
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--heads-csv", str(layers)]) == 2
    assert "is not compare's per-head CSV" in capsys.readouterr().err
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n1,2\n")
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--heads-csv", str(notes)]) == 2
    assert "is not compare's per-head CSV" in capsys.readouterr().err and notes.read_text() == "my,own\n1,2\n"


def test_compare_warns_of_a_file_its_own_tensors_contradict(tmp_path, capsys, real_fixtures):
    """A symmetric GPTQ file labelled gptq_v2 (its zero points are v1's constant) decodes one scale
    step off: dequant warned and exited 1, compare showed its 3x larger error silently."""
    import shutil
    from pathlib import Path
    ref = str(real_fixtures / "base-bf16")
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    bad = tmp_path / "gptq-labelled-v2"
    shutil.copytree(src, bad)
    for name in ("config.json", "quantize_config.json"):
        f = bad / name
        if f.exists():
            cfg = json.loads(f.read_text())
            (cfg.get("quantization_config", cfg))["checkpoint_format"] = "gptq_v2"
            f.write_text(json.dumps(cfg))
    assert main(["compare", "--reference", ref, str(src), str(bad), "--layers", r"layers\.0\.self_attn", "--json", "-"]) == 1
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert list(data["data_warnings"]) == [str(bad)] and "set checkpoint_format to 'gptq'" in data["data_warnings"][str(bad)]
    assert "! gptq-labelled-v2:" in cap.err or f"! {bad.name}" in cap.err
    good = {r["name"]: r["rel_fro"] for r in data["layers"] if r["variant"] == str(src)}
    off = {r["name"]: r["rel_fro"] for r in data["layers"] if r["variant"] == str(bad)}
    assert all(off[n] > 2 * good[n] for n in good)  # the misread figures, shown, with the warning
    assert main(["compare", "--reference", ref, str(src), "--layers", r"layers\.0\.self_attn"]) == 0


def test_compare_layers_explains_layers_that_are_not_compared(capsys, real_fixtures):
    from pathlib import Path
    ref = str(real_fixtures / "base-bf16")
    gptq = str(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128")
    # the reference has them; GPTQModel left them unquantized: said so, not "no layer matches"
    assert main(["compare", "--reference", ref, gptq, "--layers", "embed|lm_head"]) == 2
    err = capsys.readouterr().err
    assert "no layer matching --layers 'embed|lm_head' can be compared" in err and "stored unquantized" in err
    # norms are never compared: said so
    assert main(["compare", "--reference", ref, gptq, "--layers", "norm"]) == 2
    err = capsys.readouterr().err
    assert "only weight matrices" in err and "input_layernorm" in err


def test_no_output_is_written_into_a_checkpoint_that_was_opened(tmp_path, capsys, real_fixtures):
    """dequant -o wsrc/model.safetensors replaced the weights it had just read with an .npy, and
    compare --json into the reference's folder overwrote it: both are refused before any work."""
    import hashlib
    import shutil
    src = tmp_path / "wsrc"
    shutil.copytree(real_fixtures / "mlx-affine-q4-g64", src)
    ref = tmp_path / "wref"
    shutil.copytree(real_fixtures / "base-bf16", ref)

    def digest(folder):
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    before = digest(src), digest(ref)
    layer = "model.layers.0.mlp.up_proj"
    for argv in (["dequant", str(src), layer, "-o", str(src / "model.safetensors")],
                 ["dequant", str(src), layer, "-o", str(src / "new.npy")],
                 ["compare", "--reference", str(ref), str(src), "--json", str(ref / "model.safetensors")],
                 ["compare", "--reference", str(ref), str(src), "--csv", str(src / "config.json")],
                 ["dequant", str(src / "model.safetensors"), layer, "-o", str(src / "config.json")],
                 # a single file opened in its model folder stands for the folder
                 ["dequant", str(src / "model.safetensors"), layer, "-o", str(src / "y.npy")],
                 ["compare", "--reference", str(ref / "model.safetensors"), str(src / "model.safetensors"),
                  "--json", str(ref / "c.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "never writes into a checkpoint it opened" in err[0], err
    # through a link: a link named like a new file that points at a shard or a config
    (tmp_path / "link.npy").symlink_to(src / "model.safetensors")
    (tmp_path / "cfglink.json").symlink_to(ref / "config.json")
    for argv in (["dequant", str(src), layer, "-o", str(tmp_path / "link.npy")],
                 ["compare", "--reference", str(ref), str(src), "--json", str(tmp_path / "cfglink.json")]):
        assert main(argv) == 2, argv
        assert "never writes into a checkpoint it opened" in capsys.readouterr().err
    assert (digest(src), digest(ref)) == before
    # a lone file (no config beside it) is only itself: writing beside it is fine
    lone = tmp_path / "downloads"
    lone.mkdir()
    shutil.copy(src / "model.safetensors", lone / "model.safetensors")
    assert main(["info", str(lone / "model.safetensors")]) == 0
    capsys.readouterr()
    from quantscope.backend.checkpoint import open_checkpoint, refuse_writing_into
    ck = open_checkpoint(lone / "model.safetensors")
    refuse_writing_into(lone / "beside.npy", [ck])  # no error
    assert ck.holds(lone / "model.safetensors") and not ck.holds(lone / "beside.npy")
    # beside its config, a file stands for its folder's own entries, not all below (~/config.json)
    single = open_checkpoint(src / "model.safetensors")
    assert single.holds(src / "y.npy") and not single.holds(src / "projects" / "q.npy")
    # beside a single opened file (not one of its files): allowed
    assert main(["dequant", str(src / "model.safetensors"), layer, "-o", str(tmp_path / "x.npy")]) == 0
    capsys.readouterr()


def test_dequant_to_stdout(tmp_path, real_fixtures):
    import io
    r = subprocess.run([sys.executable, "-m", "quantscope", "dequant", str(real_fixtures / "mlx-affine-q4-g64"),
                        "model.layers.0.mlp.up_proj", "-o", "-"], capture_output=True, cwd=tmp_path, timeout=120,
                       check=False)
    assert r.returncode == 0 and not (tmp_path / "-").exists()
    assert np.load(io.BytesIO(r.stdout)).shape == (1536, 384) and b"-> -" in r.stderr
    # /dev/stdout into a pipe: the array alone (numpy's tofile needed a seekable file)
    r = subprocess.run([sys.executable, "-m", "quantscope", "dequant", str(real_fixtures / "mlx-affine-q4-g64"),
                        "model.layers.0.mlp.up_proj", "-o", "/dev/stdout"], capture_output=True, timeout=120,
                       check=False)
    assert r.returncode == 0 and np.load(io.BytesIO(r.stdout)).shape == (1536, 384)
    # a reader that stops early (| head): a quiet exit 0
    sh = (f"{sys.executable} -m quantscope dequant {real_fixtures / 'mlx-affine-q4-g64'} "
          "model.layers.0.mlp.up_proj -o - | head -c 10 > /dev/null; echo ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", sh], capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.strip() == "0" and "error" not in r.stderr, r.stderr


def test_outputs_replace_their_own_kind_of_file_only(tmp_path, capsys, real_fixtures, monkeypatch):
    """dequant -o notes.txt replaced the notes, compare --json the same; -o - wrote binary to a terminal."""
    src, layer = str(real_fixtures / "mlx-affine-q4-g64"), "model.layers.0.mlp.up_proj"
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    assert main(["dequant", src, layer, "-o", str(notes)]) == 2
    assert notes.read_text() == "precious" and "exists and is not a .npy file: not replaced" in capsys.readouterr().err
    out = tmp_path / "w.npy"
    np.save(out, np.zeros(3))
    assert main(["dequant", src, layer, "-o", str(out)]) == 0 and np.load(out).shape == (1536, 384)  # its own kind
    empty = tmp_path / "empty.npy"
    empty.touch()
    assert main(["dequant", src, layer, "-o", str(empty)]) == 0 and np.load(empty).shape == (1536, 384)
    ref = str(real_fixtures / "base-bf16")
    for flag, name in (("--json", "notes.json"), ("--csv", "notes.csv")):
        other = tmp_path / name
        other.write_text("precious")
        assert main(["compare", "--reference", ref, src, "--layers", "layers.0.mlp.up", flag, str(other)]) == 2
        assert other.read_text() == "precious"
    capsys.readouterr()
    js, cs = tmp_path / "c.json", tmp_path / "c.csv"
    for _ in range(2):  # written, then replaced by the same command
        assert main(["compare", "--reference", ref, src, "--layers", "layers.0.mlp.up", "--json", str(js),
                     "--csv", str(cs)]) == 0
    assert json.loads(js.read_text())["layers"] and cs.read_text().startswith("name,")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["dequant", src, layer, "-o", "-"]) == 2
    assert "will not write binary .npy data to a terminal" in capsys.readouterr().err


def test_doctor_reads_a_small_model_whole_and_says_what_it_checked(tmp_path, capsys, real_fixtures):
    import shutil
    import struct
    dst = tmp_path / "m"
    shutil.copytree(real_fixtures / "base-bf16", dst)
    f = dst / "model.safetensors"
    b = bytearray(f.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    t = json.loads(b[8:8 + n])["model.layers.1.mlp.down_proj.weight"]
    off = 8 + n + t["data_offsets"][0] + 2 * 300_000  # one bf16 NaN in a row a sample skips
    b[off:off + 2] = b"\xc0\x7f"
    f.write_bytes(bytes(b))
    assert main(["doctor", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "values.non-finite" in out and "every value checked" in out


def test_info_describes_compressed_tensors_config_groups(capsys):
    # a config group is the scheme itself, not a "per-layer override" of one
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    assert main(["info", str(real / "llmcompressor-w4a16-asym")]) == 0
    out = capsys.readouterr().out
    assert "config group group_0: targets ['Linear'] → 4 bit int, group 128, asymmetric" in out
    assert "override" not in out
    # bits per weight: codes, bf16 scales and 4-bit zero points, not the 16-byte weight_shape
    main(["info", "--json", str(real / "llmcompressor-w4a16")])
    q = next(x for x in json.loads(capsys.readouterr().out)["layers"] if x["name"] == "model.layers.0.self_attn.q_proj")
    assert q["bits_per_weight"] == 4 + 16 / 128  # (was 4.125868: weight_shape's 128 bits counted)


def test_info_json_says_which_gptq_layers_are_act_order(capsys):
    # settings.act_order was always null ("decided lazily", and never decided)
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    for name, want in (("gptqmodel-gptq-w4g128-actorder", True), ("gptqmodel-gptq-w4g128", False)):
        assert main(["info", str(real / name), "--json"]) == 0
        layers = [x for x in json.loads(capsys.readouterr().out)["layers"] if x["scheme"] == "gptq"]
        assert len(layers) == 14 and {x["settings"]["act_order"] for x in layers} == {want}


def test_a_pipe_or_device_is_refused_not_waited_on(tmp_path, capsys):
    """A FIFO named x.safetensors (or in a model folder) made info and doctor block forever."""
    import os
    if not hasattr(os, "mkfifo"):
        import pytest
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    for argv in (["info", str(fifo)], ["doctor", str(fifo)], ["info", str(folder)], ["info", "/dev/zero"]):
        code = main(argv)
        cap = capsys.readouterr()
        assert code == 2 and "not a regular file" in cap.err + cap.out, (argv, cap)


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, capsys, real_fixtures, monkeypatch):
    # a full disk left a truncated .npy / JSON / CSV where the old file was
    import errno
    import os

    def full(fh, *a, **k):
        fh.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "w.npy"
    out.write_bytes(b"\x93NUMPY old")  # (a .npy written before: a file of another kind is not replaced at all)
    monkeypatch.setattr(np, "save", full)
    assert main(["dequant", str(real_fixtures / "mlx-affine-q4-g64"), "model.layers.0.self_attn.q_proj",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device" in err and "previous file is kept" in err
    assert out.read_bytes() == b"\x93NUMPY old" and sorted(p.name for p in tmp_path.iterdir()) == ["w.npy"]
    monkeypatch.undo()
    # a report that fails half-way: the same
    rep = tmp_path / "r.json"
    old = '{\n "quantscope_version": "old",\n "reference": "r"}'
    rep.write_text(old)  # (an earlier one of compare's)

    def broken(obj, fh, **k):
        fh.write("{\"layers\": [")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", broken)
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64"),
                 "--json", str(rep)]) == 2
    assert rep.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.npy"]
    assert f"cannot write {rep}" in capsys.readouterr().err


def test_runs_for_a_user_who_can_write_neither_the_install_nor_a_home(tmp_path):
    # numba's cache=True raised "cannot cache function ...: no locator available" at import
    import os
    import shutil

    import pytest
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    fixture = __import__("pathlib").Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(HOME="/nonexistent", XDG_CACHE_HOME="/nonexistent/.cache")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "quantscope", "info", str(fixture)], capture_output=True, text=True, env=env, cwd="/",
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model.layers.0.self_attn.q_proj" in r.stdout


def test_info_json_is_strict_json_when_a_config_holds_nan(tmp_path, capsys):
    write_st(tmp_path / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": np.ones((8, 8), np.float32)})
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": '
                                          '{"quant_method": "hqq", "damp": NaN, "clip": Infinity}}')
    assert main(["info", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    json.loads(out, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no bare NaN/Infinity
    assert '"damp": "NaN"' in out and '"clip": "Infinity"' in out


def test_dequant_an_expert_of_a_checkpoint_that_stacks_them(tmp_path, capsys):
    # transformers' expert path on mlx-lm's switch_mlp stack: that expert's slice (was "no such layer")
    from pathlib import Path

    import mlx.core as mx
    real = Path(__file__).parent / "fixtures" / "real" / "mlxlm-qwen3moe-q4-g64"
    out = tmp_path / "e2.npy"
    assert main(["dequant", str(real), "model.layers.1.mlp.experts.2.down_proj", "-o", str(out)]) == 0
    assert "is expert 2 of model.layers.1.mlp.switch_mlp.down_proj" in capsys.readouterr().err
    t = mx.load(str(real / "model.safetensors"))
    sw = "model.layers.1.mlp.switch_mlp.down_proj"
    want = mx.dequantize(t[f"{sw}.weight"][2], t[f"{sw}.scales"][2], t[f"{sw}.biases"][2], group_size=64, bits=4)
    assert np.array_equal(np.load(out), np.array(want.astype(mx.float32)))
    assert main(["dequant", str(real), "model.layers.1.mlp.experts.9.down_proj", "-o", str(out)]) == 2
    assert "holds no expert 9" in capsys.readouterr().err


def test_a_gptq_file_labelled_with_the_other_format_version_is_decoded_but_said(tmp_path, capsys):
    # symmetric v1 zero points under checkpoint_format gptq_v2: one scale step off, exit 0 before
    import shutil
    from pathlib import Path
    src = tmp_path / "g"
    shutil.copytree(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", src)
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((src / name).read_text())
        block = cfg.get("quantization_config", cfg)
        block["checkpoint_format"] = "gptq_v2"
        (src / name).write_text(json.dumps(cfg))
    assert main(["dequant", str(src), "model.layers.0.self_attn.q_proj", "-o", str(tmp_path / "q.npy")]) == 1
    assert "the symmetric constant of checkpoint_format 'gptq'" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "dense"]) == 1
    assert "set checkpoint_format to 'gptq'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["gptq-sym", "ct-sym", "ct-version"])
def test_configs_their_zero_points_contradict_give_exit_1_as_the_doctor_finds(tmp_path, capsys, case):
    # the doctor found these (R3, R10) while dequant and compare exited 0 without a word
    import shutil
    from pathlib import Path
    src = tmp_path / "m"
    real = Path(__file__).parent / "fixtures" / "real"
    shutil.copytree(real / ("gptqmodel-gptq-w4g128-actorder" if case == "gptq-sym" else "llmcompressor-w4a16-asym"),
                    src)
    for name in ("config.json", "quantize_config.json"):
        if not (src / name).exists():
            continue
        cfg = json.loads((src / name).read_text())
        block = cfg.get("quantization_config", cfg)
        if case == "gptq-sym":
            block["sym"] = True  # its asymmetric zero points are not the constant
        elif case == "ct-sym":
            block["config_groups"]["group_0"]["weights"]["symmetric"] = True
        else:
            block["version"] = "0.9.0"  # before zero points were packed along N
        (src / name).write_text(json.dumps(cfg))
    rule = {"gptq-sym": "gptq.sym-zeros", "ct-sym": "ct.sym-zero-point", "ct-version": "ct.zero-point"}[case]
    from quantscope.backend.doctor import diagnose
    found = {f.rule for f in diagnose(src) if f.severity == "error"}
    assert rule in found
    layer = "model.layers.0.self_attn.q_proj"
    assert main(["dequant", str(src), layer, "-o", str(tmp_path / "q.npy")]) == 1
    err = capsys.readouterr().err
    assert f"warning: {src}: {layer}: " in err
    ref = Path(__file__).parents[2] / "shared" / "fixtures" / "real" / "base-bf16"
    if case == "gptq-sym":  # decoded with the stored zeros, as GPTQModel does: right, and said to be
        assert "written with the stored zero points" in err
    if ref.exists():
        assert main(["compare", "--reference", str(ref), str(src), "--layers", r"layers\.0\.self_attn\.q"]) == 1
        out = capsys.readouterr().out
        assert "!" in out
        # (it said "the figures are of a misread file" of figures equal to the asymmetric file's)
        assert ("the figures are right (decoded with the stored zero points" in out) == (case == "gptq-sym")


def test_an_output_through_a_symlink_writes_its_target(tmp_path):
    from quantscope.backend.outfile import atomic_output
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with atomic_output(link) as fh:
        fh.write("new")
    assert link.is_symlink() and target.read_text() == "new"


def test_window_without_a_display_is_one_line_exit_2(monkeypatch, capsys):
    # Qt printed its platform-plugin help and aborted the process (exit 134)
    if not sys.platform.startswith("linux"):
        pytest.skip("DISPLAY decides only on Linux")
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantscope: error: no display") and "--screenshot" in err and err.count("\n") == 1
    monkeypatch.setenv("QT_QPA_PLATFORM", "")  # set but empty: Qt's default platform, as unset
    assert main([]) == 2 and capsys.readouterr().err.startswith("quantscope: error: no display")


def test_dequant_names_the_layer_a_wrong_name_meant(tmp_path, capsys):
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    out = str(tmp_path / "o.npy")
    assert main(["dequant", str(real / "gptqmodel-gptq-w4g128"), "model.layers.0.self_attn.q_proj.qweight",
                 "-o", out]) == 2
    assert "is a tensor of the layer model.layers.0.self_attn.q_proj" in capsys.readouterr().err
    assert main(["dequant", str(real / "gptqmodel-qwen3moe-w4g64"), "model.layers.0.mlp.switch_mlp.down_proj",
                 "-o", out]) == 2
    assert "experts one by one: model.layers.0.mlp.experts.0.down_proj" in capsys.readouterr().err
    # the hint repeated the very path given ("give the module path … e.g. model.layers.0.self_attn.q_proj")
    gptq = str(real / "gptqmodel-gptq-w4g128")
    for name, said in (("model.layers.9.self_attn.q_proj", "its decoder layers are 0–1"),
                       ("model.layers.0.self_attn.q_prj", "did you mean model.layers.0.self_attn.q_proj"),
                       ("model.layers.0.mlp.down_proj.weight", "without the component suffix")):
        assert main(["dequant", gptq, name, "-o", out]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    # a split projection of a checkpoint that stores it fused: the fused layer and its row order
    from safetensors.numpy import load_file
    t = load_file(str(real / "gptqmodel-gptq-w4g128" / "model.safetensors"))
    attn = "model.layers.0.self_attn."
    for c in ("qweight", "qzeros", "scales", "g_idx"):
        parts = [t.pop(f"{attn}{p}.{c}") for p in ("q_proj", "k_proj", "v_proj")]
        t[f"{attn}qkv_proj.{c}"] = parts[0] if c == "g_idx" else np.concatenate(parts, axis=1)
    fused = tmp_path / "fused"
    fused.mkdir()
    write_st(fused / "model.safetensors", t, {"format": "pt"})
    for f in ("config.json", "quantize_config.json"):
        (fused / f).write_bytes((real / "gptqmodel-gptq-w4g128" / f).read_bytes())
    assert main(["dequant", str(fused), f"{attn}k_proj", "-o", out]) == 2
    err = capsys.readouterr().err
    assert f"fused in {attn}qkv_proj, whose rows hold q_proj, then k_proj, then v_proj" in err, err


def test_info_says_when_the_quantization_was_read_off_the_tensors(tmp_path, capsys):
    import shutil
    from pathlib import Path
    lone = tmp_path / "gptq.safetensors"
    shutil.copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128" / "model.safetensors", lone)
    assert main(["info", str(lone)]) == 0
    assert "no config gives the quantization: bits inferred from shapes: 4" in capsys.readouterr().out


# -- a command-line user's review (2026-12-06) ---------------------------------------------------

def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **qc):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"].update(qc)
    p.write_text(json.dumps(cfg))




def test_a_screenshot_that_cannot_be_written_is_refused_before_the_window_opens(tmp_path, capsys):
    assert main(["--screenshot", str(tmp_path / "nowhere" / "x.png")]) == 2
    assert f"the folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_compare_says_a_misread_config_when_no_layer_fits(tmp_path, capsys, real_fixtures):
    """An MLX model whose config says 8 bit / group 32 for 4 bit / group 64 tensors: every layer's
    shape is off. The reason shown was lm_head's bare shape mismatch, whose input width says
    nothing; now a layer whose shapes name the reading that fits."""
    src = _copy(real_fixtures / "mlx-affine-q4-g64", tmp_path / "m")
    p = src / "config.json"
    cfg = json.loads(p.read_text())
    for k in ("quantization", "quantization_config"):
        if k in cfg:
            cfg[k].update(bits=8, group_size=32)
    p.write_text(json.dumps(cfg))
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(src)]) == 2
    err = capsys.readouterr().err
    assert "as its config reads it" in err and "4 bit / group 64 give K=" in err
    assert "different model" not in err


def _drop_tensor(folder, name):
    from safetensors.numpy import load_file, save_file
    f = next(folder.glob("*.safetensors"))
    t = load_file(str(f))
    del t[name]
    save_file(t, str(f), metadata={"format": "pt"})
    idx = folder / "model.safetensors.index.json"
    if idx.exists():  # gone from the index too (else: an incomplete checkpoint, another refusal)
        data = json.loads(idx.read_text())
        data["weight_map"].pop(name, None)
        idx.write_text(json.dumps(data))


@pytest.mark.parametrize("to", ["dense", "mlx"])
def test_convert_of_a_source_with_nan_scales_exits_1_and_says_so_on_stderr(tmp_path, capsys, to):
    """NaN scales carried into the output: compare exits 1 on them, convert exited 0 with a note
    on stdout only."""
    from pathlib import Path

    from safetensors.numpy import load_file, save_file
    src = _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", tmp_path / "src")
    f = next(src.glob("*.safetensors"))
    f.chmod(0o644)
    t = load_file(str(f))
    t["model.layers.0.mlp.up_proj.scales"][0, :3] = np.nan
    save_file(t, str(f), metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", to]) == 1
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "model.layers.0.mlp.up_proj" in err, err
    assert (tmp_path / "out").is_dir()


def test_convert_to_f16_of_values_beyond_its_range_says_so_not_blaming_the_source(tmp_path, capsys, real_fixtures):
    """A finite bf16 weight of 1e6 is inf in f16: said as the output dtype's overflow (it was
    blamed on "NaN/inf values in the source", which the doctor then found clean)."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file
    src = _copy(real_fixtures / "base-bf16", tmp_path / "src")
    f = next(src.glob("*.safetensors"))
    f.chmod(0o644)
    t = {k: np.asarray(v) for k, v in load_file(str(f)).items()}
    name = "model.layers.0.mlp.down_proj.weight"
    w = t[name].copy()
    w.flat[5] = ml_dtypes.bfloat16(1e6)
    t[name] = w
    save_file(t, str(f), metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "dense", "--dtype", "f16"]) == 1
    cap = capsys.readouterr()
    assert "beyond the output's range (f16" in cap.err and "model.layers.0.mlp.down_proj" in cap.err
    assert "the source holds them" not in cap.err and "not finite in" not in cap.out


def test_convert_refuses_a_layer_that_nothing_decodes_and_writes_nothing(tmp_path, capsys, real_fixtures):
    """An unknown MLX mode, MLX codes without scales, GPTQ scales without codes: the layer was
    carried through (int32 words or stray scales in a "dense" output) with exit 0."""
    from pathlib import Path
    bogus = _copy(real_fixtures / "mlx-affine-q4-g64", tmp_path / "bogus")
    cfg = json.loads((bogus / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        if isinstance(cfg.get(key), dict):
            cfg[key]["mode"] = "bogus"
    (bogus / "config.json").write_text(json.dumps(cfg))
    noscales = _copy(real_fixtures / "mlx-affine-q4-g64", tmp_path / "noscales")
    _drop_tensor(noscales, "model.layers.0.self_attn.q_proj.scales")
    noqweight = _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", tmp_path / "noqweight")
    _drop_tensor(noqweight, "model.layers.0.self_attn.q_proj.qweight")
    for src, says in ((bogus, "unknown MLX mode 'bogus'"), (noscales, "matches no known scheme"),
                      (noqweight, "without the weights they decode")):
        for to in ("dense", "mlx"):
            out = tmp_path / f"{src.name}-{to}"
            assert main(["convert", str(src), str(out), "--to", to]) == 2
            err = capsys.readouterr().err
            assert says in err and "cannot convert" in err, err
            assert not out.exists()
    assert main(["dequant", str(bogus), "model.layers.0.self_attn.q_proj", "-o", str(tmp_path / "x.npy")]) == 2
    assert "unknown MLX mode 'bogus'" in capsys.readouterr().err  # (a Python TypeError's text before)


def test_an_empty_weight_matrix_is_said_not_an_internal_error(tmp_path, capsys, real_fixtures):
    import ml_dtypes
    from safetensors.numpy import load_file
    src = real_fixtures / "base-bf16"
    t = {k: v for k, v in load_file(str(next(src.glob("*.safetensors")))).items()}
    t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((0, 384), ml_dtypes.bfloat16)
    folder = tmp_path / "empty"
    folder.mkdir()
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    (folder / "config.json").write_text((src / "config.json").read_text())
    assert main(["compare", "--reference", str(folder), str(folder)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj: the reference layer is empty (shape 0×384)" in out
    assert main(["convert", str(folder), str(tmp_path / "mlx"), "--to", "mlx"]) == 0
    assert "kept dense (empty: 0×384)" in capsys.readouterr().out
    assert main(["doctor", str(folder)]) == 0
    assert "[values.empty]" in capsys.readouterr().out


def test_a_variant_path_that_is_not_utf8_gives_valid_csv_and_json(tmp_path, capsys, real_fixtures):
    import csv
    import os
    from pathlib import Path
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/dir\xff"))
    _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", odd)
    j, c = tmp_path / "m.json", tmp_path / "m.csv"
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(odd), "--json", str(j),
                 "--csv", str(c), "--layers", "layers.0.self_attn.q_proj"]) == 0
    capsys.readouterr()
    data = json.loads(j.read_text(encoding="utf-8"))  # (a lone surrogate "\udcff" is not strict JSON)
    assert data["variants"][0].endswith("dir\\xff") and "\udcff" not in j.read_text(encoding="utf-8")
    with c.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["variant"].endswith("dir\\xff") and float(rows[0]["rel_fro"]) > 0


@pytest.mark.parametrize("key,value", [("bits", 0), ("bits", "four"), ("group_size", -7)])
def test_a_config_value_no_loader_can_use_gives_exit_1(tmp_path, capsys, key, value):
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", tmp_path / "g")
    _edit_config(src, **{key: value})
    assert main(["dequant", str(src), "model.layers.0.self_attn.q_proj", "-o", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err
    assert "warning" in err and "which no loader can use" in err and (tmp_path / "x.npy").exists()
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "mlx"]) == 1


def test_a_config_that_cannot_be_read_gives_exit_1_with_one_warning(tmp_path, capsys):
    # not JSON: ignored, the settings taken from the tensors; dequant, compare and convert said
    # nothing and exited 0 (the conversion wrote a config.json of its quantization keys alone)
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", tmp_path / "g")
    (src / "config.json").write_text("{bits: 4")
    assert main(["dequant", str(src), "model.layers.0.self_attn.q_proj", "-o", str(tmp_path / "x.npy")]) == 1
    assert "config.json ignored" in capsys.readouterr().err and (tmp_path / "x.npy").exists()
    # to MLX: refused, mlx-lm could not load an output without the model's config
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "mlx"]) == 2
    assert "mlx-lm needs the model's config" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "dense"]) == 1
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quantscope: warning")]
    assert len(warned) == 1 and "layers (first " in warned[0] and "config.json ignored" in warned[0]


def test_convert_refuses_what_dequant_refuses_and_a_checkpoint_of_no_tensors(tmp_path, capsys):
    # a float weight beside MLX scales (dequant refused it; convert copied it, exit 0), and a
    # header of no tensors (an output of a config alone, exit 0)
    import mlx.core as mx
    from mx_util import to_np
    (tmp_path / "m").mkdir()
    wq, s, b = mx.quantize(mx.array(np.ones((8, 64), np.float32)), group_size=64, bits=4)
    t = {"model.layers.0.mlp.up_proj.weight": to_np(wq).view(np.float32), "model.layers.0.mlp.up_proj.scales": to_np(s),
         "model.layers.0.mlp.up_proj.biases": to_np(b)}
    write_st(tmp_path / "m" / "model.safetensors", t, {"format": "mlx"})
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 64, "quantization": {"bits": 4, "group_size": 64}}))
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out"), "--to", "mlx"]) == 2
    err = capsys.readouterr().err
    assert "float weight next to `.scales`" in err and not (tmp_path / "out").exists()
    (tmp_path / "e").mkdir()
    write_st(tmp_path / "e" / "model.safetensors", {}, {"format": "pt"})
    (tmp_path / "e" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    for to in ("mlx", "dense"):
        assert main(["convert", str(tmp_path / "e"), str(tmp_path / "out"), "--to", to]) == 2
        assert "stores no tensors" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_convert_refuses_a_checkpoint_whose_index_lists_a_tensor_its_shard_lacks(tmp_path, capsys, real_fixtures):
    src = _copy(real_fixtures / "base-bf16", tmp_path / "b")
    shard = next(src.glob("*.safetensors")).name
    from safetensors.numpy import load_file
    names = list(load_file(str(src / shard)))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {**dict.fromkeys(names, shard), "model.layers.9.mlp.up_proj.weight": shard}}))
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "dense"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.9.mlp.up_proj.weight" in err and "incomplete" in err and not (tmp_path / "out").exists()


def test_overwrite_refuses_a_link_it_did_not_write(tmp_path, capsys, real_fixtures):
    out, keep = tmp_path / "out", tmp_path / "keep"
    keep.mkdir()
    assert main(["convert", str(real_fixtures / "base-bf16"), str(out), "--to", "dense"]) == 0
    (out / "results").symlink_to(keep, target_is_directory=True)
    assert main(["convert", str(real_fixtures / "base-bf16"), str(out), "--to", "dense", "--overwrite"]) == 2
    assert "results" in capsys.readouterr().err and (out / "results").is_symlink()


def test_doctor_warns_of_quantized_tensors_without_a_quantization_config(tmp_path, capsys):
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", tmp_path / "g")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "quantize_config.json").unlink(missing_ok=True)
    assert main(["doctor", str(src)]) == 0
    out = capsys.readouterr().out
    assert "[config.missing] (R4)" in out and "gptq layout" in out


def test_an_all_zero_reference_layer_is_blamed_on_the_reference(tmp_path, capsys, real_fixtures):
    from pathlib import Path

    import ml_dtypes
    from safetensors.numpy import load_file
    src = real_fixtures / "base-bf16"
    t = load_file(str(next(src.glob("*.safetensors"))))
    name = "model.layers.0.self_attn.k_proj.weight"
    t[name] = np.zeros(t[name].shape, ml_dtypes.bfloat16)
    ref = tmp_path / "ref"
    ref.mkdir()
    write_st(ref / "model.safetensors", t, {"format": "pt"})
    (ref / "config.json").write_text((src / "config.json").read_text())
    var = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    assert main(["compare", "--reference", str(ref), str(var), "--layers", "layers.0.self_attn"]) == 1
    out = capsys.readouterr().out
    assert "all-zero reference layer (1)" in out and "reference: model.layers.0.self_attn.k_proj" in out
    assert "NaN/inf in the variant's decode" not in out


def test_compare_warns_of_a_config_value_no_loader_can_use_for_any_scheme(tmp_path, capsys, real_fixtures):
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "real" / "autoawq-gemm-w4g128", tmp_path / "a")
    _edit_config(src, bits="four")
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(src),
                 "--layers", "layers.0.self_attn.q_proj"]) == 1
    assert "which no loader can use" in capsys.readouterr().out


@pytest.mark.parametrize("part", ["weight_scale_inv", "weight_global_scale", "scaled_zeros"])
def test_convert_refuses_quantization_parts_without_their_weights(tmp_path, capsys, real_fixtures, part):
    from safetensors.numpy import load_file
    src = real_fixtures / "base-bf16"
    t = load_file(str(next(src.glob("*.safetensors"))))
    t[f"model.layers.0.self_attn.extra.{part}"] = np.ones((4, 4), np.float32)
    folder = tmp_path / "orphan"
    folder.mkdir()
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    (folder / "config.json").write_text((src / "config.json").read_text())
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "dense"]) == 2
    assert "model.layers.0.self_attn.extra" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["zero", "f16-as-bf16", "one-huge"])
def test_compare_flags_a_layer_that_decodes_no_closer_than_zeros(tmp_path, capsys, real_fixtures, damage):
    """Scales zeroed, F16 scales labelled BF16, one scale of 60,000: compare showed rel_fro 1.0 (or
    50,000) with exit 0 and no word; doctor only warned or found nothing."""
    import shutil
    from pathlib import Path

    import ml_dtypes
    from helpers import write_st
    from quantscope.backend.safetensors_file import SafetensorsFile
    ref = str(real_fixtures / "base-bf16")
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    bad = tmp_path / "broken"
    shutil.copytree(src, bad)
    f = SafetensorsFile(src / "model.safetensors")
    t = {n: np.array(f.read(n)) for n in f.names}
    f.close()
    name = "model.layers.0.self_attn.q_proj"
    s = t[f"{name}.scales"]
    t[f"{name}.scales"] = {"zero": np.zeros_like(s), "f16-as-bf16": s.view(np.uint16).view(ml_dtypes.bfloat16),
                           "one-huge": np.where(np.arange(s.size).reshape(s.shape) == 7, np.float16(60000), s)}[damage]
    write_st(bad / "model.safetensors", t, {"format": "pt"})
    assert main(["compare", "--reference", ref, str(bad), "--layers", r"layers\.0\.self_attn", "--json", "-"]) == 1
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert [(x["variant"], x["layer"]) for x in data["implausible"]] == [(str(bad), name)]
    assert "! implausible error (1)" in cap.err and f"broken: {name}" in cap.err
    if damage != "one-huge":  # (one odd scale among thousands: the doctor samples, compare sees it)
        assert main(["doctor", str(bad)]) == 1


def test_a_misspelt_command_is_said_as_such(capsys, tmp_path, monkeypatch):
    # `quantscope doctr x` opened "doctr" as a path in the window (headless: "no display")
    monkeypatch.chdir(tmp_path)
    assert main(["doctr", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'doctr' (did you mean 'doctor'?)" in err and "display" not in err
    if not __import__("sys").platform.startswith("linux"):
        return  # (below: the headless refusal, which only Linux has)
    (tmp_path / "doctr").mkdir()  # a folder of that name is a path to open, not a typo
    monkeypatch.setenv("QT_QPA_PLATFORM", "")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["doctr"]) == 2 and "no display" in capsys.readouterr().err


def test_compare_says_when_the_reference_is_quantized(capsys, real_fixtures):
    # the paths swapped (or a conversion verified): plausible figures, exit 0, and no word of it
    from pathlib import Path
    gptq = str(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128")
    assert main(["compare", "--reference", gptq, str(real_fixtures / "base-bf16"), "--layers", r"layers\.0\.mlp"]) == 0
    err = capsys.readouterr().err
    assert f"the reference {gptq} is quantized (gptq)" in err
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), gptq, "--layers", r"layers\.0\.mlp"]) == 0
    assert "quantized" not in capsys.readouterr().err


def test_compare_blames_a_misread_config_not_a_different_model(tmp_path, capsys, real_fixtures):
    # MLX bits/group_size swapped in config.json: the packed tensors read as [1536, 192], and
    # compare asked "is it a quantization of a different model?" while info and doctor blamed the config
    import shutil
    bad = tmp_path / "mlx-b8g32"
    shutil.copytree(real_fixtures / "mlx-affine-q4-g64", bad)
    cfg = json.loads((bad / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        if key in cfg:
            cfg[key].update(bits=8, group_size=32)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(bad), "--layers", r"layers\.0\.mlp"]) == 2
    err = capsys.readouterr().err
    assert "as its config reads it" in err and "4 bit / group 64 give K=" in err and "different model" not in err


def test_names_holding_control_characters_reach_the_terminal_escaped(tmp_path, capsys):
    # a tensor name with a newline and an escape sequence broke info's line and turned the
    # terminal red; in an error, it made the one line two
    name = "model.layers.0.mlp.up_proj.\n\x1b[31mRED"
    (tmp_path / "m").mkdir()
    write_st(tmp_path / "m" / "model.safetensors", {name: np.ones((4, 8), np.float32)}, {"format": "pt"})
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x0a\\x1b[31mRED" in out
    assert main(["dequant", str(tmp_path / "m"), "model.layers.0.mlp.up_proj.\n\x1b[31mRED", "-o",
                 str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and err.startswith("quantscope: error:")
    assert main(["doctor", str(tmp_path / "m")]) in (0, 1)
    assert "\x1b" not in capsys.readouterr().out


def test_paths_that_cannot_be_used_say_why(tmp_path, capsys):
    # a symbolic link loop and a broken link were "no such file or folder"; a file where a folder
    # of the output path is wanted was "the folder ... does not exist" or "File exists"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "c").symlink_to(tmp_path / "nowhere")
    assert main(["info", str(tmp_path / "a")]) == 2
    assert "a symbolic link loop" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "c")]) == 2
    assert "a broken symbolic link (to " in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    demo = tmp_path / "d"
    assert main(["demo", str(demo)]) == 0
    capsys.readouterr()
    assert main(["dequant", str(demo / "reference"), "model.layers.0.mlp.up_proj", "-o", str(tmp_path / "f" / "x.npy")]) == 2
    assert f"{tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err
    assert main(["convert", str(demo / "reference"), str(tmp_path / "f" / "out"), "--to", "dense"]) == 2
    assert f"{tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err



def test_the_demo_folder_opens_as_its_workspace_and_says_how(tmp_path, capsys):
    """`quantscope demo DIR` wrote a folder that `quantscope DIR` refused ("Open a reference and
    at least one variant first") and whose AWQ-smoothing file `compare DIR/*` took for a model."""
    from quantscope.app.jobs import job_load
    demo = tmp_path / "d"
    assert main(["demo", str(demo)]) == 0
    out = capsys.readouterr().out
    assert f"open it: quantscope {demo}" in out and f"compare --reference {demo / 'reference'}" in out
    assert sorted(q.name for q in demo.glob("*.safetensors")) == []  # the truth in a folder of its own
    ws = job_load([str(demo)])
    assert ws.reference is not None and Path(ws.reference.ckpt.source) == demo / "reference"
    assert sorted(ws.variants) == sorted(q.name for q in demo.iterdir() if q.is_dir() and q.name not in
                                         ("reference", "truth"))
    assert len(ws.variants) == 6 and not ws.failed


def test_a_checkpoint_format_no_loader_knows_gives_exit_1_and_a_doctor_error(tmp_path, capsys):
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128", tmp_path / "g")
    _edit_config(src, checkpoint_format="gptq_v9")
    assert main(["dequant", str(src), "model.layers.0.self_attn.q_proj", "-o", str(tmp_path / "x.npy")]) == 1
    assert "checkpoint_format 'gptq_v9' is none GPTQ loaders know" in capsys.readouterr().err
    assert main(["doctor", str(src)]) == 1
    out = capsys.readouterr().out
    assert "[config.bad-value]" in out and "gptq_v9" in out and "write it as an integer" not in out


@pytest.mark.parametrize("bs", [[128], "128", [0, 128]])
def test_a_malformed_fp8_block_size_is_one_error_line_and_no_doctor_crash(tmp_path, capsys, bs):
    # [128] and "128" were "internal error: ValueError", and [0, 128] crashed the doctor itself
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "golden" / "fp8_block_partial", tmp_path / "f")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = bs
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["dequant", str(src), "model.layers.0.mlp.down_proj", "-o", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantscope: error: ") and err.count("\n") == 1 and "internal error" not in err
    assert "model.layers.0.mlp.down_proj" in err
    assert main(["doctor", str(src)]) == 1
    assert "[fp8.block-size]" in capsys.readouterr().out


def test_a_bnb_layer_missing_a_part_is_one_error_line(tmp_path, capsys):
    # its absmax deleted: "internal error: KeyError: 'weight.absmax'" (exit 3) from dequant
    from pathlib import Path

    from safetensors.numpy import load_file
    src = _copy(Path(__file__).parent / "fixtures" / "golden" / "bnb_nf4", tmp_path / "b")
    f = next(src.glob("*.safetensors"))
    t = load_file(str(f))
    victim = next(k for k in t if k.endswith(".weight.absmax"))
    del t[victim]
    write_st(f, t, {"format": "pt"})
    layer = victim[:-len(".weight.absmax")]
    assert main(["dequant", str(src), layer, "-o", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and layer in err and "'weight.absmax' is not stored" in err


@pytest.mark.parametrize("case", ["i8_label", "cfg_int", "u8_grid"])
def test_fp8_tensors_the_config_contradicts_are_refused(tmp_path, capsys, case):
    # llm-compressor's FP8 with the weight relabelled I8 (decoded as integers: rel_fro 0.76), the
    # config's type set to int, or a channel-strategy scale replaced by U8 MX exponents (decoded
    # as MXFP8: rel_fro 10): each exit 0 with "no problems found"
    from pathlib import Path

    src = _copy(Path(__file__).parent / "fixtures" / "real" / "llmcompressor-fp8", tmp_path / "f")
    f = next(src.glob("*.safetensors"))
    t = read_all(f)[0]
    p = "model.layers.0.self_attn.q_proj"
    if case == "i8_label":
        t[f"{p}.weight"] = t[f"{p}.weight"].view(np.int8)
    elif case == "u8_grid":
        n, k = t[f"{p}.weight"].shape
        t[f"{p}.weight_scale"] = np.full((n, k // 32), 120, np.uint8)
    write_st(f, t, {"format": "pt"})
    if case == "cfg_int":
        cfg = json.loads((src / "config.json").read_text())
        for g in cfg["quantization_config"]["config_groups"].values():
            g["weights"]["type"] = "int"
        (src / "config.json").write_text(json.dumps(cfg))
    assert main(["dequant", str(src), p, "-o", str(tmp_path / "x.npy")]) == 2
    assert p in capsys.readouterr().err
    assert main(["doctor", str(src)]) == 1
    out = capsys.readouterr().out  # (the I8 one: its format, float-quantized, names another compressor)
    assert "[layer.inconsistent]" in out or "[ct.format]" in out


def test_a_compressed_tensors_actorder_layer_without_its_g_idx_is_refused(tmp_path, capsys):
    # actorder "group" saves each column's group: without weight_g_idx the columns were read in
    # plain order, wrong values with exit 0
    from pathlib import Path

    src = _copy(Path(__file__).parent / "fixtures" / "golden" / "ct016_w4a16_actorder", tmp_path / "c")
    f = src / "model.safetensors"
    t = {n: a for n, a in read_all(f)[0].items() if not n.endswith("weight_g_idx")}
    write_st(f, t, {"format": "pt"})
    layer = next(n for n in t if n.endswith(".weight_packed"))[:-len(".weight_packed")]
    assert main(["dequant", str(src), layer, "-o", str(tmp_path / "x.npy")]) == 2
    assert "actorder: 'group' but no weight_g_idx is stored" in capsys.readouterr().err


def test_an_fp8_layer_the_config_leaves_unconverted_is_said(tmp_path, capsys):
    # modules_to_not_convert naming a layer stored FP8: transformers builds a plain Linear and
    # loads the FP8 values unscaled; it was "no problems found", exit 0
    from pathlib import Path
    src = _copy(Path(__file__).parent / "fixtures" / "golden" / "fp8_block_partial", tmp_path / "f")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["model.layers.0.mlp.down_proj"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["dequant", str(src), "model.layers.0.mlp.down_proj", "-o", str(tmp_path / "x.npy")]) == 1
    assert "loaders that follow the config load the FP8 values without their scale" in capsys.readouterr().err
    assert main(["doctor", str(src)]) == 1
    assert "[layer.inconsistent]" in capsys.readouterr().out


def test_an_interrupt_is_taken_once_and_the_exit_is_not_interrupted_again():
    # Ctrl+C pressed twice (or `timeout -s INT`, which signals the process, then its group): the
    # second one hit the exit's wait for worker threads and printed a traceback
    import os
    import signal

    from quantscope.app.cli import _terminate_as_interrupt
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            _terminate_as_interrupt()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)  # (delivered at the next bytecode)
            assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored now
            time.sleep(0.05)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_compare_exits_1_on_smoothing_folded_twice(real_fixtures, capsys):
    """AutoAWQ on a CPU folds its smoothing twice: the file does not compute the reference's
    function; compare said so in a '!' line and exited 0 ("a note"), where a misread config is 1."""
    from pathlib import Path
    awq = Path(__file__).parent / "fixtures" / "real" / "autoawq-gemm-w4g128"
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(awq), "--layers",
                 r"layers\.0\.self_attn"]) == 1
    assert "power 2.0" in capsys.readouterr().out
    gptq = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(gptq), "--layers",
                 r"layers\.0\.self_attn"]) == 0


def test_compare_summarises_each_variant_and_writes_plain_csv_lines(tmp_path, capsys, real_fixtures):
    """Per variant a summary below the table (mean, median and the worst layer: it took a scan of
    every row); the table's column is named as in the JSON/CSV (sqnr_db); the CSV's lines end in
    \\n (csv's \\r\\n left \\r in awk's last field); the JSON says which quantscope wrote it."""
    import csv
    ref, var = str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64")
    out_csv, out_json = tmp_path / "c.csv", tmp_path / "c.json"
    assert main(["compare", "--reference", ref, var, "--csv", str(out_csv), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "sqnr_db" in text and "sqnr_dB" not in text
    with out_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    errs = [float(r["rel_fro"]) for r in rows]
    worst = max(rows, key=lambda r: float(r["rel_fro"]))
    line = next(ln for ln in text.splitlines() if ln.startswith("mlx-affine-q4-g64: "))
    assert f"{len(rows)} layers at 4 bit" in line and f"mean {np.mean(errs):.4f}" in line
    assert f"median {np.median(errs):.4f}" in line and f"worst {float(worst['rel_fro']):.4f} ({worst['name']})" in line
    assert b"\r" not in out_csv.read_bytes()
    from quantscope import __version__
    assert json.loads(out_json.read_text())["quantscope_version"] == __version__
    # the embeddings come first among the layers outside the decoder, the head last
    names = [r["name"] for r in rows]
    if "model.embed_tokens" in names and "lm_head" in names:
        assert names.index("model.embed_tokens") < names.index("model.layers.0.self_attn.q_proj") < names.index("lm_head")


def test_version_and_a_mistyped_command(capsys, monkeypatch):
    from quantscope import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"quantscope {__version__}"
    monkeypatch.delenv("DISPLAY", raising=False)
    # a word that is no command and no file: said so (it was "no display to open the window on")
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus': no such file or folder, and no command of that name" in err and "compare" in err


def test_json_out_replaces_only_a_json_file_compare_wrote(tmp_path, capsys, real_fixtures):
    """--json at another model's config.json (or index) replaced it: any JSON file was taken for
    one of compare's. Now only compare's own JSON is replaced."""
    ref, var = str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64")
    other = tmp_path / "config.json"
    other.write_text('{"model_type": "llama", "hidden_size": 64}')
    assert main(["compare", "--reference", ref, var, "--json", str(other)]) == 2
    assert "is not compare's JSON: not replaced" in capsys.readouterr().err
    assert json.loads(other.read_text()) == {"model_type": "llama", "hidden_size": 64}
    out = tmp_path / "c.json"
    assert main(["compare", "--reference", ref, var, "--json", str(out)]) == 0
    first = out.read_text()
    assert main(["compare", "--reference", ref, var, "--json", str(out)]) == 0  # (its own: replaced)
    assert json.loads(out.read_text())["layers"] == json.loads(first)["layers"]
    capsys.readouterr()


def test_info_lists_a_tensor_whatever_its_name(tmp_path, capsys, real_fixtures):
    # a tensor named "." (empty module and component) was a KeyError in info: exit 3
    import shutil
    src = tmp_path / "m"
    shutil.copytree(real_fixtures / "base-bf16", src)
    t, meta = read_all(src / "model.safetensors")
    t["."] = t.pop("model.norm.weight")
    write_st(src / "model.safetensors", t, meta)
    assert main(["info", str(src)]) == 0
    assert "model.layers.1.self_attn.v_proj" in capsys.readouterr().out


def test_a_name_holding_a_newline_never_splits_a_line(tmp_path, capsys, real_fixtures):
    # the "not compared" lines, the summary and dequant's line printed a folder's newline as is
    import shutil
    odd = tmp_path / "odd\nname"
    shutil.copytree(real_fixtures / "mlx-affine-q4-g64", odd)
    assert main(["compare", "--reference", str(real_fixtures / "base-bf16"), str(odd)]) == 0
    out = capsys.readouterr().out
    assert "odd\\x0aname: 16 layers" in out and not any(ln == "name" or ln.startswith("name") for ln in out.splitlines())
    assert main(["dequant", str(odd), "model.layers.0.self_attn.q_proj", "-o", str(tmp_path / "x\ny.npy")]) == 0
    assert "x\\x0ay.npy" in capsys.readouterr().out


def test_json_out_keeps_a_doctor_report_and_csv_escapes_a_carriage_return(tmp_path, capsys, real_fixtures):
    """doctor's and info's JSON begin with quantscope_version too: compare took them for its own
    and replaced them. A name holding \\r was left unquoted once lines ended in \\n: readers split
    the row there."""
    import csv
    import shutil
    ref = str(real_fixtures / "base-bf16")
    odd = tmp_path / "va\rr"
    shutil.copytree(real_fixtures / "mlx-affine-q4-g64", odd)
    rep = tmp_path / "doc.json"
    assert main(["doctor", str(odd), "--json"]) == 0
    rep.write_text(capsys.readouterr().out)
    assert main(["compare", "--reference", ref, str(odd), "--json", str(rep)]) == 2
    assert "is not compare's JSON" in capsys.readouterr().err and "findings" in json.loads(rep.read_text())
    out = tmp_path / "c.csv"
    assert main(["compare", "--reference", ref, str(odd), "--csv", str(out)]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert len({len(r) for r in rows}) == 1 and any("va\\x0dr" in r[1] for r in rows[1:])
    capsys.readouterr()
