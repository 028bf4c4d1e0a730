"""Saved folders carry their own code and load with trust_remote_code=True where tokenpacker is not installed."""

import ast
import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageTextToText

from tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration, export_remote_code

from .builders import IMAGE_TOKEN_ID, tiny_checkpoint_folder, tiny_config
from .remote_process import run_without_tokenpacker

REMOTE_FILES = {
    "compat_tokenpacker.py",
    "configuration_tokenpacker.py",
    "modeling_tokenpacker.py",
    "image_processing_tokenpacker.py",
    "processing_tokenpacker.py",
}


def saved_model(folder):
    """A tiny random model saved with save_pretrained, and its remote code exported."""
    model = TokenPackerForConditionalGeneration(tiny_config()).eval()
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]
    model.save_pretrained(folder)
    export_remote_code(folder)
    return model


def generate_inputs(folder):
    """A prompt with one image, saved to folder/inputs.safetensors for the other process too."""
    inputs = {
        "input_ids": torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * 36 + [9, 10]]),
        "pixel_values": torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(3)),
    }
    save_file(inputs, folder / "inputs.safetensors")
    return inputs


def test_save_pretrained_writes_weights_and_settings_only(tmp_path):
    model = TokenPackerForConditionalGeneration(tiny_config())
    model.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())


def test_export_refuses_what_is_not_a_saved_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        export_remote_code(tmp_path / "absent")
    with pytest.raises(ValueError, match="holds none of config.json, preprocessor_config.json, processor_config.json"):
        export_remote_code(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_exported_folder_holds_weights_configs_and_flat_code_only(tmp_path):
    saved_model(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors"} | REMOTE_FILES
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_tokenpacker.TokenPackerConfig",
        "AutoModel": "modeling_tokenpacker.TokenPackerModel",
        "AutoModelForImageTextToText": "modeling_tokenpacker.TokenPackerForConditionalGeneration",
    }


def test_exported_code_imports_only_transformers_torch_and_itself(tmp_path):
    saved_model(tmp_path)
    allowed = {"transformers", "torch", *sys.stdlib_module_names}  # and what transformers itself depends on:
    allowed |= {"numpy", "PIL", "huggingface_hub", "safetensors", "httpx2"}
    for name in REMOTE_FILES:
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in REMOTE_FILES, (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed, (name, node.module)
            elif isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] in allowed for alias in node.names), name


def test_exported_code_is_the_package_code_with_flat_imports(tmp_path):
    saved_model(tmp_path)
    package_source = (
        sys.modules[TokenPackerForConditionalGeneration.__module__].__loader__.get_source(
            TokenPackerForConditionalGeneration.__module__
        )
    )
    exported = (tmp_path / "modeling_tokenpacker.py").read_text()
    assert exported == package_source.replace(
        "from ..configuration.configuration_tokenpacker import", "from .configuration_tokenpacker import"
    ).replace("from ..configuration.compat_tokenpacker import", "from .compat_tokenpacker import")


def test_exported_code_detects_features_without_reading_versions(tmp_path):
    saved_model(tmp_path)
    for name in REMOTE_FILES:
        source = (tmp_path / name).read_text()
        for version_check in ("__version__", "is_transformers_version", "packaging", "importlib.metadata"):
            assert version_check not in source, (name, version_check)


def test_fresh_process_without_tokenpacker_generates_the_same_ids(tmp_path):
    folder = tmp_path / "model"
    model = saved_model(folder)
    expected = model.generate(**generate_inputs(tmp_path), max_new_tokens=8, do_sample=False)
    remote = run_without_tokenpacker(
        f"""
        import json, sys
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        ids = model.generate(**load_file("inputs.safetensors"), max_new_tokens=8, do_sample=False)
        model.save_pretrained("resaved")
        print(json.dumps({{
            "config": type(config).__module__, "model": type(model).__module__, "base": type(base).__name__,
            "tokens": config.num_image_tokens, "ids": ids.tolist(),
            "loaded": sorted(name for name in sys.modules if name.startswith("tokenpacker")),
        }}))
        """,
        tmp_path,
    )
    assert remote["config"].startswith("transformers_modules.") and remote["model"].startswith("transformers_modules.")
    assert remote["base"] == "TokenPackerModel" and remote["tokens"] == 36
    assert remote["loaded"] == []
    assert remote["ids"] == expected.tolist()
    # saving from the remote code reproduces the code defining the model (transformers copies those files)
    resaved = {name for name in REMOTE_FILES if (tmp_path / "resaved" / name).is_file()}
    assert resaved == {"compat_tokenpacker.py", "configuration_tokenpacker.py", "modeling_tokenpacker.py"}
    for name in resaved:
        assert (tmp_path / "resaved" / name).read_text() == (folder / name).read_text()


def test_the_installed_package_loads_the_folder_without_trust_remote_code(tmp_path):
    model = saved_model(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is TokenPackerForConditionalGeneration
    assert type(AutoConfig.from_pretrained(tmp_path)) is TokenPackerConfig
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_folder_code_of_another_version_is_used_where_tokenpacker_is_absent(tmp_path):
    folder = tmp_path / "model"
    model = saved_model(folder)
    with open(folder / "modeling_tokenpacker.py", "a") as code:  # as a release with different code would have
        code.write('\nTokenPackerForConditionalGeneration.code_release = "0.0.1"\n')
    config = json.loads((folder / "config.json").read_text())
    config["option_of_a_newer_release"] = True
    del config["initializer_range"]  # a field an older release did not write
    (folder / "config.json").write_text(json.dumps(config))
    expected = model.generate(**generate_inputs(tmp_path), max_new_tokens=6, do_sample=False)
    remote = run_without_tokenpacker(
        f"""
        import json
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ids = model.generate(**load_file("inputs.safetensors"), max_new_tokens=6, do_sample=False)
        print(json.dumps({{"release": model.code_release, "ids": ids.tolist()}}))
        """,
        tmp_path,
    )
    assert remote == {"release": "0.0.1", "ids": expected.tolist()}
    # With tokenpacker imported, its registered classes take precedence (transformers prefers explicitly
    # registered code), and they read the same folder.
    local = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(local) is TokenPackerForConditionalGeneration
    assert local.config.option_of_a_newer_release is True and local.config.initializer_range == 0.02


def test_an_original_llava_layout_folder_points_to_the_converter(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llava",
                "architectures": ["LlavaLlamaForCausalLM"],
                "hidden_size": 64,
                "mm_projector_type": "tokenpacker",
                "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                "scale_factor": 2,
            }
        )
    )
    for load in (TokenPackerConfig.from_pretrained, TokenPackerForConditionalGeneration.from_pretrained):
        with pytest.raises(ValueError, match="original TokenPacker checkpoint in the LLaVA folder layout.*tokenpacker-convert"):
            load(tmp_path)


CHECKPOINT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "compat_tokenpacker.py",
    "configuration_tokenpacker.py",
    "modeling_tokenpacker.py",
    "image_processing_tokenpacker.py",
    "processing_tokenpacker.py",
}


def test_model_processor_and_pipeline_load_and_answer_without_tokenpacker(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, pipeline

    (tmp_path / "checkpoint").mkdir()
    folder = tiny_checkpoint_folder(tmp_path / "checkpoint", image_aspect_ratio="slice")
    assert {path.name for path in folder.iterdir()} == CHECKPOINT_FILES
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_tokenpacker.TokenPackerProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_tokenpacker.TokenPackerImageProcessor"
    )
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == {"AutoProcessor": "processing_tokenpacker.TokenPackerProcessor"}

    image = Image.linear_gradient("L").resize((700, 400)).convert("RGB")
    image.save(tmp_path / "image.png")
    messages = [
        {"role": "user", "content": [{"type": "image", "url": str(tmp_path / "image.png")}, {"type": "text", "text": "What is it?"}]}
    ]
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt)
    expected_ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected_answer = pipeline("image-text-to-text", model=folder)(text=messages, max_new_tokens=6)

    remote = run_without_tokenpacker(
        f"""
        import json
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, pipeline
        folder = {str(folder)!r}
        messages = {messages!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[Image.open("image.png").convert("RGB")], text=prompt)
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answer = pipeline("image-text-to-text", model=folder, trust_remote_code=True)(text=messages, max_new_tokens=6)
        print(json.dumps({{
            "classes": [type(o).__module__.split(".")[0] for o in (processor, image_processor, model)],
            "tokenizer": type(processor.tokenizer).__name__,
            "ids": ids.tolist(),
            "answer": answer[0]["generated_text"][-1]["content"],
        }}))
        """,
        tmp_path,
    )
    assert remote["classes"] == ["transformers_modules"] * 3
    assert remote["tokenizer"] == "TokenizersBackend"
    assert remote["ids"] == expected_ids.tolist()
    assert remote["answer"] == expected_answer[0]["generated_text"][-1]["content"]
