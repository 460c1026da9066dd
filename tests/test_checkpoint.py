"""Opening files, folders, indexes and HF-cache repos; grouping tensors into modules."""

import json
import os

import numpy as np
import pytest
from helpers import write_st
from quantscope.backend.checkpoint import natural_key, open_checkpoint, split_name
from quantscope.backend.errors import (
    CheckpointError,
    ShardIndexError,
    UnsafePathError,
    UnsupportedFormatError,
)


def _sharded(tmp_path, n=3):
    wm = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        t = {f"model.layers.{i}.mlp.up_proj.weight": np.full((4, 8), i, np.float32),
             f"model.layers.{i}.input_layernorm.weight": np.ones(8, np.float32)}
        write_st(tmp_path / name, t, {"format": "pt"})
        wm.update({k: name for k in t})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                       "weight_map": wm}))
    return wm


def test_index_opens_all_shards(tmp_path):
    wm = _sharded(tmp_path)
    for target in (tmp_path, tmp_path / "model.safetensors.index.json"):
        c = open_checkpoint(target)
        assert len(c.files) == 3 and sorted(c.names) == sorted(wm)
        assert c.tensor("model.layers.2.mlp.up_proj.weight")[0, 0] == 2
        assert c.info("model.layers.1.mlp.up_proj.weight").file.name == "model-00002-of-00003.safetensors"
        assert c.warnings == []


def test_folder_without_index_opens_all_and_says_so(tmp_path):
    write_st(tmp_path / "a.safetensors", {"x.weight": np.zeros(2, np.float32)})
    write_st(tmp_path / "b.safetensors", {"y.weight": np.zeros(2, np.float32)})
    c = open_checkpoint(tmp_path)
    assert sorted(c.names) == ["x.weight", "y.weight"]
    assert any("no index file: opened all 2" in n for n in c.notes)


def test_index_without_weight_map(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ShardIndexError, match="no 'weight_map'") as ei:
        open_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(ei.value)


def test_index_naming_missing_shard(tmp_path):
    _sharded(tmp_path)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(ShardIndexError, match="model-00002-of-00003.safetensors.*missing") as ei:
        open_checkpoint(tmp_path)
    assert ei.value.tensor and "layers.1" in ei.value.tensor


def test_an_index_entry_naming_a_file_that_is_no_safetensors_says_the_index_sent_it_there(tmp_path):
    # the error named only config.json's bad header: not which index entry pointed at it
    wm = _sharded(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    wm["model.layers.1.mlp.up_proj.weight"] = "config.json"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(tmp_path)
    msg = str(ei.value)
    assert "config.json" in msg and "model.safetensors.index.json" in msg and "model.layers.1.mlp.up_proj.weight" in msg


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_index_escaping_paths_refused(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    write_st(tmp_path / "outside.safetensors", {"w": np.zeros(2, np.float32)})
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(UnsafePathError, match="outside the model folder"):
        open_checkpoint(model)


def test_a_folder_of_links_to_shards_elsewhere_opens(tmp_path):
    # a model assembled with `ln -s` (transformers and mlx-lm follow such links): read where the
    # links point, said in a note; never written to, through the link or at its target
    model, store = tmp_path / "model", tmp_path / "store"
    model.mkdir()
    store.mkdir()
    write_st(store / "a.safetensors", {"w": np.arange(2, dtype=np.float32)})
    write_st(model / "model-00002.safetensors", {"v": np.ones(3, np.float32)})
    os.symlink(store / "a.safetensors", model / "model-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001.safetensors", "v": "model-00002.safetensors"}}))
    c = open_checkpoint(model)
    assert c.tensor("w").tolist() == [0, 1] and c.tensor("v").tolist() == [1, 1, 1]
    assert any(n.startswith("1 of 2 shard(s) are links to files outside the folder") and str(store) in n
               for n in c.notes)
    assert c.holds(store / "a.safetensors") and c.holds(model / "model-00001.safetensors")
    assert not c.holds(store / "out.npy")
    # the folder a linked shard lies in: `convert L store --overwrite` replaced it, the source too
    assert c.holds(store)
    from quantscope.backend.doctor import diagnose
    found = diagnose(model)
    assert not [f for f in found if f.severity != "info"]
    linked = [f for f in found if f.rule == "index.linked-shard"]  # said, as info: a copy may lose it
    assert len(linked) == 1 and str(store / "a.safetensors") in linked[0].message


def test_an_index_shard_that_is_a_pipe_is_refused_not_opened(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", model / "model.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    with pytest.raises(ShardIndexError, match="not a regular file"):
        open_checkpoint(model)
    from quantscope.backend.doctor import (
        diagnose,  # the doctor says the same, and opens nothing
    )
    found = [f for f in diagnose(model) if f.rule == "index.missing-shard"]
    assert found and "not a regular file" in found[0].message


def test_index_stray_and_inconsistent_entries_are_warned(tmp_path):
    wm = _sharded(tmp_path)
    write_st(tmp_path / "model.safetensors", {"stray": np.zeros(1, np.float32)})
    wm["model.layers.9.ghost.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    c = open_checkpoint(tmp_path)
    text = " ".join(c.warnings)
    assert "not in the index, not opened: model.safetensors" in text
    assert "absent from their shard" in text and "ghost" in text
    assert "stray" not in c


def test_a_tensor_the_index_lists_under_another_shard_is_read_where_it_is(tmp_path):
    # "absent from their shard" and convert's "incomplete (download it again)" for a tensor that
    # another shard holds: the index is wrong, the download whole
    from quantscope.backend.convert import convert
    (tmp_path / "m").mkdir()
    wm = _sharded(tmp_path / "m")
    wm["model.layers.2.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    c = open_checkpoint(tmp_path / "m")
    assert c.index_missing == [] and "absent from their shard" not in " ".join(c.warnings)
    assert "under another shard than the one holding them" in " ".join(c.warnings)
    np.testing.assert_array_equal(c.tensor("model.layers.2.mlp.up_proj.weight"), np.full((4, 8), 2, np.float32))
    convert(tmp_path / "m", tmp_path / "out", to="dense")  # (its own index is right)
    assert open_checkpoint(tmp_path / "out").tensor("model.layers.2.mlp.up_proj.weight").shape == (4, 8)


def test_pickles_are_never_opened(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsupportedFormatError, match="never unpickled"):
        open_checkpoint(tmp_path)
    with pytest.raises(UnsupportedFormatError, match="never unpickled"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    write_st(tmp_path / "model.safetensors", {"w": np.zeros(2, np.float32)})
    c = open_checkpoint(tmp_path)
    assert [p.name for p in c.unsupported] == ["pytorch_model.bin"]
    assert any("pytorch_model.bin" in n for n in c.notes)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nothing")


def test_hf_cache_repo_id(tmp_path, monkeypatch):
    # A cache laid out the way huggingface_hub writes it: snapshot files are links into blobs/.
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    commit = "a" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    write_st(repo / "blobs" / "deadbeef", {"w": np.arange(3, dtype=np.float32)})
    os.symlink("../../blobs/deadbeef", snap / "model.safetensors")
    (repo / "blobs" / "cafe").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    os.symlink("../../blobs/cafe", snap / "model.safetensors.index.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    c = open_checkpoint("acme/tiny")
    assert c.tensor("w").tolist() == [0, 1, 2]
    assert any("Hugging Face cache" in n for n in c.notes)
    from quantscope.backend.checkpoint import list_hf_cache_models
    assert [m["repo_id"] for m in list_hf_cache_models()] == ["acme/tiny"]
    with pytest.raises(CheckpointError, match="Hugging Face cache"):
        open_checkpoint("acme/absent")
    # the snapshot by its path, as `huggingface-cli download` prints it: its index's shards are
    # links into blobs/, outside the snapshot folder — refused before, as by the doctor
    assert open_checkpoint(snap).tensor("w").tolist() == [0, 1, 2]
    from quantscope.backend.doctor import diagnose
    assert not [f for f in diagnose(snap) if f.severity != "info" or f.rule == "index.linked-shard"]
    assert not any("links to files outside" in n for n in open_checkpoint(snap).notes)
    # a folder of its own whose shard links into the cache: followed, and said
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(repo / "blobs" / "deadbeef", other / "model.safetensors")
    (other / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    c = open_checkpoint(other)
    assert c.tensor("w").tolist() == [0, 1, 2] and any("links to files outside" in n for n in c.notes)


def test_split_name_and_modules(tmp_path):
    assert split_name("model.layers.0.self_attn.q_proj.qweight") == ("model.layers.0.self_attn.q_proj", "qweight")
    assert split_name("m.up.weight.quant_state.bitsandbytes__nf4") == ("m.up", "weight.quant_state.bitsandbytes__nf4")
    assert split_name("m.up.weight.nested_absmax") == ("m.up", "weight.nested_absmax")
    assert split_name("m.up.weight_scale_inv") == ("m.up", "weight_scale_inv")
    assert split_name("lonely") == ("lonely", "")
    names = ["model.layers.10.mlp.down_proj", "model.layers.2.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert sorted(names, key=natural_key) == [names[2], names[1], names[0]]
    t = {f"model.layers.{i}.self_attn.q_proj.{c}": np.zeros((2, 2), np.int32)
         for i in (10, 2) for c in ("qweight", "qzeros", "scales", "g_idx")}
    write_st(tmp_path / "m.safetensors", t)
    mods = open_checkpoint(tmp_path).modules()
    assert list(mods) == ["model.layers.2.self_attn.q_proj", "model.layers.10.self_attn.q_proj"]
    assert sorted(mods["model.layers.2.self_attn.q_proj"].tensors) == ["g_idx", "qweight", "qzeros", "scales"]


def test_real_mlx_fixture(real_fixtures):
    c = open_checkpoint(real_fixtures / "mlx-affine-q4-g64")
    m = c.modules()["model.layers.0.self_attn.q_proj"]
    assert {k: (v.dtype, v.shape) for k, v in m.tensors.items()} == {
        "weight": ("U32", (384, 48)), "scales": ("BF16", (384, 6)), "biases": ("BF16", (384, 6))}
    assert c.configs["config.json"]["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    import mlx.core as mx
    ref = mx.load(str(real_fixtures / "mlx-affine-q4-g64" / "model.safetensors"))
    w = ref["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(c.tensor("model.layers.0.self_attn.q_proj.weight"), np.array(w))


def test_nothing_is_written_into_the_opened_folder(tmp_path):
    _sharded(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    c = open_checkpoint(tmp_path)
    for n in c.names:
        c.tensor(n)
    c.close()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_index_errors_name_the_first_tensor_of_the_shard_at_fault(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_st(model / "a.safetensors", {"w": np.zeros(2, np.float32)})
    wm = {"w": "a.safetensors", "layers.0.q": "b.safetensors", "layers.0.k": "b.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ShardIndexError, match="which is missing") as exc:
        open_checkpoint(model)
    assert exc.value.tensor == "layers.0.q" and str(exc.value.file).endswith("model.safetensors.index.json")
    wm = {"w": "a.safetensors", "x": "../elsewhere.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(UnsafePathError) as exc:
        open_checkpoint(model)
    assert exc.value.tensor == "x"
