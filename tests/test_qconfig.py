"""Config parsing and per-layer resolution, with the rule that produced each setting."""

from quantscope.backend.qconfig import parse_configs


def mlx_cfg(q):
    return parse_configs({"config.json": {"quantization": q, "quantization_config": q}})


def test_mlx_global_and_mirror_note():
    c = mlx_cfg({"group_size": 64, "bits": 4, "mode": "affine"})
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert (c.kind, e.bits, e.group_size, e.mode, e.quantized) == ("mlx", 4, 64, "affine", None)
    assert "global 4 bit / 64" in e.source
    assert any("identical mirror" in n for n in c.notes)


def test_mlx_per_layer_override_false_and_mode_defaults():
    c = mlx_cfg({"group_size": 32, "bits": 3,
                 "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6, "mode": "affine"},
                 "model.layers.0.mlp.gate": {"bits": 8},
                 "model.layers.1.mlp.up_proj": {"mode": "mxfp4"},
                 "model.layers.3.mlp.gate": False})
    e = c.effective("model.layers.0.mlp.down_proj")
    assert (e.bits, e.group_size, e.quantized) == (6, 64, True)
    assert e.source == "per-layer override `model.layers.0.mlp.down_proj`"
    # A missing group_size falls back to the MODE's default (64 for affine), not the global 32.
    e = c.effective("model.layers.0.mlp.gate")
    assert (e.bits, e.group_size) == (8, 64)
    assert "group_size: affine default" in e.source
    e = c.effective("model.layers.1.mlp.up_proj")
    assert (e.bits, e.group_size, e.mode) == (4, 32, "mxfp4")
    e = c.effective("model.layers.3.mlp.gate")
    assert e.quantized is False and "false" in e.source
    assert c.notes[0].startswith('no "mode"')


def vlm_cfg(q):
    return parse_configs({"config.json": {"quantization": q, "text_config": {"hidden_size": 8},
                                          "vision_config": {"hidden_size": 8}}})


def test_mlx_language_model_prefix_rules():
    # a multimodal model's loaders map the `language_model.` prefixes
    c = vlm_cfg({"group_size": 64, "bits": 4, "mode": "affine",
                 "model.layers.2.mlp.down_proj": {"group_size": 64, "bits": 8}})
    e = c.effective("language_model.model.layers.2.mlp.down_proj")
    assert e.bits == 8 and "`language_model.` prefix stripped" in e.source
    c = vlm_cfg({"group_size": 64, "bits": 4, "language_model.model.layers.2.mlp.down_proj": {"bits": 6}})
    e = c.effective("model.layers.2.mlp.down_proj")
    assert e.bits == 6 and "prefix added" in e.source
    # a text model's (mlx-lm) looks a key up by the module path alone: another is ignored (it
    # decoded a 4-bit/64 layer of a Llama as 6 bit)
    c = mlx_cfg({"group_size": 64, "bits": 4, "language_model.model.layers.2.mlp.down_proj": {"bits": 6}})
    e = c.effective("model.layers.2.mlp.down_proj")
    assert (e.bits, e.group_size) == (4, 64) and e.source.startswith("global")


def test_a_quantization_config_without_quant_method_is_read_by_its_keys():
    # GPTQModel's block without quant_method was taken for MLX's (both have bits and group_size)
    q = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    c = parse_configs({"config.json": {"quantization_config": q}})
    assert c.kind == "gptq" and any("no quant_method; read as gptq" in n for n in c.notes)
    c = parse_configs({"config.json": {"quantization_config": {"bits": 4, "group_size": 128, "zero_point": True,
                                                               "version": "gemm"}}})
    assert c.kind == "awq"
    c = parse_configs({"config.json": {"quantization_config": {"bits": 4, "group_size": 64}}})
    assert c.kind == "mlx"


def test_mlx_native_per_tensor_matching_order():
    q = {"per_tensor": {"model.layers.0.mlp.down_proj.weight": {"bits": 8, "group_size": 32},
                        "model.layers.1.mlp.down_proj": {"bits": 6},
                        "language_model.model.layers.2.mlp.up_proj": {"bits": 2}}}
    c = parse_configs({"quantization_config.json": q})
    assert c.kind == "mlx-native"
    e = c.effective("model.layers.0.mlp.down_proj")
    assert (e.bits, e.group_size) == (8, 32) and "exact tensor name" in e.source
    e = c.effective("model.layers.1.mlp.down_proj")
    assert (e.bits, e.group_size) == (6, 64) and "without .weight" in e.source
    e = c.effective("model.layers.2.mlp.up_proj")
    assert e.bits == 2 and "prefix added" in e.source
    e = c.effective("model.layers.5.mlp.up_proj")
    assert (e.bits, e.group_size) == (4, 64) and e.source == "default 4 bit / 64"


def test_gptq_config_versions_dynamic_and_missing_keys():
    c = parse_configs({"quantize_config.json": {"bits": 4, "group_size": 128, "desc_act": True}})
    assert c.kind == "gptq"
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert e.settings["version"] == 1 and e.settings["sym"] is True and e.settings["desc_act"] is True
    assert any("R4" in n and "sym" in n for n in c.notes)
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "checkpoint_format": "gptq_v2",
        "dynamic": {r"-:.*lm_head": {}, r"+:.*down_proj": {"bits": 8, "group_size": 32}}}}})
    e = c.effective("model.layers.3.mlp.down_proj")
    assert (e.bits, e.group_size, e.settings["version"]) == (8, 32, 2)
    assert "dynamic override" in e.source
    assert c.effective("lm_head").quantized is False
    # GPTQModel's dynamic_get matches with re.match, from the start of the module's name: a
    # pattern without its leading ".*" names no layer of "model.layers.…" (re.search found one)
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128,
        "dynamic": {r"-:mlp\.down_proj": {}, r"+:mlp\.up_proj": {"bits": 8}, r"+:model\.layers\.1\.": {"bits": 2}}}}})
    assert c.effective("model.layers.0.mlp.down_proj").quantized is not False
    assert c.effective("model.layers.0.mlp.up_proj").bits == 4
    assert c.effective("model.layers.1.mlp.up_proj").bits == 2
    c = parse_configs({"quant_config.json": {"wbits": 3, "q_group_size": 64, "desc_act": False}})
    assert c.kind == "gptq" and c.globals["bits"] == 3 and c.globals["group_size"] == 64


def test_awq_configs_both_key_styles():
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM",
        "modules_to_not_convert": ["visual"]}}})
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert (c.kind, e.bits, e.group_size, e.settings["version"]) == ("awq", 4, 128, "gemm")
    assert c.effective("visual.blocks.0.attn").quantized is False
    c = parse_configs({"quant_config.json": {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMV"}})
    assert c.kind == "awq" and c.globals["group_size"] == 64 and c.globals["version"] == "gemv"
    assert any("w_bit" in n for n in c.notes)


def test_compressed_tensors_targets_and_ignore():
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.19.0",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}},
          "ignore": ["lm_head", "re:.*mlp.gate$"]}
    c = parse_configs({"config.json": {"quantization_config": qc}})
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert (e.bits, e.group_size, e.settings["symmetric"], e.settings["format"]) == (4, 128, True, "pack-quantized")
    assert "config_groups.group_0" in e.source
    assert c.effective("lm_head").quantized is False
    assert c.effective("model.layers.0.mlp.gate").quantized is False


def test_fp8_and_bnb_configs():
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}}})
    assert c.effective("model.layers.0.mlp.up_proj").settings["weight_block_size"] == [128, 128]
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "llm_int8_skip_modules": ["lm_head"]}}})
    assert c.effective("model.layers.0.mlp.up_proj").bits == 4
    assert c.effective("lm_head").quantized is False


def test_no_config():
    c = parse_configs({})
    assert c.kind is None and c.effective("x").source == "no quantization config"


def test_numbers_written_as_strings_are_read_as_numbers_with_a_note():
    # "bits": "4" made a 4-bit GPTQ file contradict its own 4-bit zero points ("4" != 4)
    c = parse_configs({"config.json": {"quantization_config": {"quant_method": "gptq", "bits": "4",
                                                               "group_size": "128", "sym": True}}})
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert (e.bits, e.group_size) == (4, 128)
    assert any('bits is the string "4", read as 4' in n for n in c.notes)


def test_whole_floats_are_read_as_integers_and_unusable_values_dropped():
    # 128.0 reached the numba kernels as a float (a typing error dump, exit 3); 0 bits divided by zero
    c = parse_configs({"config.json": {"quantization_config": {"quant_method": "gptq", "bits": 4.0,
                                                               "group_size": 128.0, "sym": True}}})
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert (e.bits, e.group_size) == (4, 128) and type(e.bits) is int and type(e.group_size) is int
    assert [u for _, u in c.bad_values] == [True, True] and any("is 128.0, read as 128" in n for n in c.notes)
    c = mlx_cfg({"group_size": 64.0, "bits": 0, "model.layers.0.mlp.gate": {"group_size": 32.0, "bits": "x"}})
    assert c.globals["bits"] is None and c.globals["group_size"] == 64
    e = c.effective("model.layers.0.mlp.gate")
    assert e.group_size == 32 and type(e.group_size) is int and e.bits != "x"
    assert sorted(u for _, u in c.bad_values) == [False, False, True, True]
    for bad in (4.5, -2, True, "four", 1e30):
        c = parse_configs({"config.json": {"quantization_config": {"quant_method": "awq", "bits": 4,
                                                                   "group_size": bad, "version": "gemm"}}})
        assert c.globals["group_size"] is None and c.bad_values == [(c.notes[-1], False)], bad


def test_compressed_tensors_group_numbers_and_malformed_skip_lists():
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4.0, "group_size": 128.0,
                                                                          "type": "int", "strategy": "group"}}}}}})
    e = c.effective("model.layers.0.self_attn.q_proj")
    assert (e.bits, e.group_size) == (4, 128) and type(e.bits) is int
    c = parse_configs({"config.json": {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                               "version": "gemm", "modules_to_not_convert": [1, "lm_head"]}}})
    assert c.effective("model.layers.0.mlp.up_proj").bits == 4  # was: 'in <string>' requires string, not int
    assert c.effective("lm_head").quantized is False


def test_a_quantization_config_that_is_not_an_object_is_named():
    for bad in (["gptq"], "gptq"):
        c = parse_configs({"config.json": {"quantization_config": bad}})
        assert c.kind is None and c.bad_values and "not an object" in c.notes[-1]


def test_strings_for_flags_and_unknown_formats_are_read_and_said():
    # "sym": "false" was truthy, an unknown checkpoint_format or AWQ version passed without a word
    c = parse_configs({"config.json": {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                                               "sym": "false", "checkpoint_format": "gptq_v9"}}})
    assert c.globals["sym"] is False and c.globals["checkpoint_format"] == "gptq"
    assert len(c.odd_values) == 2 and not c.bad_values
    assert any('sym is the string "false", read as False' in n for n in c.notes)
    assert any("checkpoint_format 'gptq_v9' is none GPTQ loaders know" in n for n in c.notes)
    c = parse_configs({"config.json": {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                               "zero_point": "True", "version": "gemmx"}}})
    assert c.globals["zero_point"] is True and len(c.odd_values) == 2
    assert any("version 'gemmx' is none AutoAWQ knows" in n for n in c.notes)
    for fmt in ("gptq", "gptq_v2", "GPTQ", "marlin"):  # (known: no word)
        c = parse_configs({"config.json": {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                                                   "sym": True, "checkpoint_format": fmt}}})
        assert not c.bad_values and not c.odd_values, fmt


def test_compressed_tensors_target_precedence():
    """compressed-tensors gives a module the group of its best target: an exact name, then a
    regex, then a class name (match_targets), whatever the groups' order in the file. The first
    group in file order won: a `re:.*down_proj` 8-bit group lost to an earlier `Linear` one."""
    def group(bits, targets):
        return {"targets": targets, "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                "strategy": "group", "group_size": 128}}
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": group(4, ["Linear"]), "group_1": group(8, ["re:.*down_proj"]),
                          "group_2": group(2, ["model.layers.0.mlp.down_proj"])}}}})
    assert c.effective("model.layers.1.mlp.down_proj").bits == 8
    assert c.effective("model.layers.0.mlp.down_proj").bits == 2
    assert c.effective("model.layers.0.mlp.up_proj").bits == 4
    assert "group_1" in c.effective("model.layers.1.mlp.down_proj").source
    # within a kind, targets in alphabetical order (compressed-tensors sorts them), not the file's;
    # a class target names the module's own class: Linear for a projection, Embedding for a table
    c = parse_configs({"config.json": {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"a": group(3, ["re:.*mlp.*"]), "b": group(8, ["re:.*down_proj"]),
                          "c": group(6, ["Embedding"]), "d": group(4, ["Linear"])}}}})
    assert c.effective("model.layers.1.mlp.down_proj").bits == 8  # "re:.*down_proj" < "re:.*mlp.*"
    assert c.effective("model.layers.1.mlp.up_proj").bits == 3
    assert c.effective("model.layers.1.self_attn.q_proj").bits == 4  # Linear, not the first class listed
    assert c.effective("model.embed_tokens").bits == 6
    assert "class_target" not in c.effective("model.layers.1.self_attn.q_proj").settings


def test_modelopt_config_json_ignore_and_hf_quant_config_exclude_modules():
    """ModelOpt writes `ignore` into config.json's quantization_config and `exclude_modules` into
    hf_quant_config.json: both leave layers unquantized (config.json's was not read)."""
    q = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head", "*.mlp.gate"]}
    c = parse_configs({"config.json": {"quantization_config": q}})
    assert c.effective("lm_head").quantized is False and c.effective("model.layers.3.mlp.gate").quantized is False
    e = c.effective("model.layers.3.mlp.down_proj")
    assert (e.quantized, e.bits, e.group_size) == (None, 4, 16)
    c = parse_configs({"config.json": {}, "hf_quant_config.json": {"quantization": {
        "quant_algo": "FP8", "exclude_modules": ["model.layers.0.*"]}}})
    assert c.kind == "modelopt" and c.effective("model.layers.0.mlp.up_proj").quantized is False
    assert c.effective("model.layers.1.mlp.up_proj").bits == 8
