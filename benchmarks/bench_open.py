"""Opening a huge checkpoint: quantscope vs safetensors.safe_open, in the same run.

Builds once (cached under benchmarks/.cache) two sparse checkpoints of ~671 GB that cost no disk:
  * one file with 20,000 BF16 [4096, 4096] tensors,
  * a 100-shard index with 100,000 BF16 [1024, 3276] tensors in total,
then times "open and list the tensor names" for both readers and the RSS growth of ours.
quantscope's open validates every header entry (sizes, tiling) and cross-checks the index
against the shards; the safe_open baseline for the index reads the index with json (as
transformers does) and lists each shard; `safe_open_shards_only_s` leaves the index out.
Target (issue 2): ours ≤ 1.2× safe_open's time, RSS growth < 100 MB.
"""

from __future__ import annotations

import gc
import json
import struct
import sys

from _common import CACHE, emit, rss_bytes, timeit

# 20,000 × 33.5 MB = 671 GB in one file; 100,000 × 6.7 MB = 671 GB over 100 shards.
SINGLE_SHAPE = [4096, 4096]
SHARD_SHAPE = [1024, 3276]


def _write_sparse(path, names, shape) -> None:
    nbytes = shape[0] * shape[1] * 2
    header = {"__metadata__": {"format": "pt"}}
    for i, n in enumerate(names):
        header[n] = {"dtype": "BF16", "shape": shape, "data_offsets": [i * nbytes, (i + 1) * nbytes]}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb)
        fh.truncate(8 + len(hb) + len(names) * nbytes)  # a hole: no disk used


def _names(start, count):
    # 10 tensors per "layer", like an LLM's projections and norms
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "mlp.experts.0.up_proj", "mlp.experts.1.up_proj", "mlp.experts.2.up_proj"]
    return [f"model.layers.{(start + i) // 10}.{parts[(start + i) % 10]}.weight" for i in range(count)]


def build():
    single = CACHE / "open_single" / "model.safetensors"
    sharded = CACHE / "open_sharded_v2"
    if not single.exists():
        single.parent.mkdir(parents=True, exist_ok=True)
        _write_sparse(single, _names(0, 20_000), SINGLE_SHAPE)
    index = sharded / "model.safetensors.index.json"
    if not index.exists():
        sharded.mkdir(parents=True, exist_ok=True)
        wm = {}
        for s in range(100):
            fname = f"model-{s + 1:05d}-of-00100.safetensors"
            names = _names(s * 1000, 1000)
            _write_sparse(sharded / fname, names, SHARD_SHAPE)
            wm.update(dict.fromkeys(names, fname))
        total = 100_000 * SHARD_SHAPE[0] * SHARD_SHAPE[1] * 2
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return single, sharded


def main():
    from safetensors import safe_open

    from quantscope.backend.checkpoint import open_checkpoint

    single, sharded = build()
    shard_files = sorted(sharded.glob("*.safetensors"))

    def st_single():
        with safe_open(single, framework="numpy") as f:
            return list(f.keys())

    def st_shards_only():
        keys = []
        for p in shard_files:
            with safe_open(p, framework="numpy") as f:
                keys.extend(f.keys())
        return keys

    def st_sharded():
        # What a loader does for an index (transformers: json.load, then the listed shards).
        with open(sharded / "model.safetensors.index.json") as fh:
            wm = json.load(fh)["weight_map"]
        keys = []
        for name in dict.fromkeys(wm.values()):
            with safe_open(sharded / name, framework="numpy") as f:
                keys.extend(f.keys())
        return keys

    def qs(path):
        def run():
            c = open_checkpoint(path)
            names = c.names
            c.close()
            return names
        return run

    assert len(st_single()) == len(qs(single)()) == 20_000
    assert sorted(st_sharded()) == sorted(qs(sharded)())
    out = {"benchmark": "open", "python": sys.version.split()[0]}
    for label, ours, theirs, path in [("single_20k", qs(single), st_single, single),
                                      ("sharded_100x1k", qs(sharded), st_sharded, sharded)]:
        t_theirs = timeit(theirs, repeat=7)
        t_ours = timeit(ours, repeat=7)
        gc.collect()
        r0 = rss_bytes()
        held = open_checkpoint(path)
        _ = held.names
        r1 = rss_bytes()
        size = sum(f.size for f in held.files)
        del held
        out[label] = {
            "file_bytes": size,
            "tensors": len(ours()),
            "safe_open_s": t_theirs["median_s"],
            "quantscope_s": t_ours["median_s"],
            "ratio_vs_safe_open": t_ours["median_s"] / t_theirs["median_s"],
            "rss_growth_mb": (r1 - r0) / 1e6,
            **({"safe_open_shards_only_s": timeit(st_shards_only, repeat=7)["median_s"]}
               if label.startswith("sharded") else {}),
            "target_ratio": 1.2, "target_rss_mb": 100,
        }
    emit(out)


if __name__ == "__main__":
    main()
