import json

import pytest
import torch

from layouts import write_legacy_videollava, write_original_eventgpt
from vlopt.decode import teacher_forced_logits
from vlopt.errors import VloptError
from vlopt.models import get_workload, load_model


def _logits(vlm):
    wl = get_workload(vlm.default_workload)
    inp = vlm.run_stages(None, wl, "What is here?")
    return teacher_forced_logits(vlm, inp, [10, 20, 30, 40])


@pytest.mark.parametrize("tower", ["inside", "folder"])
def test_original_eventgpt_layout_loads_to_the_same_logits(eventgpt, tmp_path, tower):
    folder = write_original_eventgpt(eventgpt, tmp_path / "EventGPT-7b", tower=tower)
    loaded = load_model(path=str(folder), device="cpu")
    assert loaded.name == "eventgpt"
    assert loaded.hf.model.embed_tokens.weight.shape[0] == eventgpt.hf.config.vocab_size + 1  # <ev_patch>
    expected = _logits(eventgpt)
    torch.testing.assert_close(_logits(loaded)[:, : expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


def test_original_eventgpt_without_a_local_clip_folder_is_explained(eventgpt, tmp_path):
    folder = write_original_eventgpt(eventgpt, tmp_path / "ck", tower="folder")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mm_visual_tower"] = "openai/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VloptError, match="not a local CLIP folder.*edit it"):
        load_model(path=str(folder), device="cpu")


def test_legacy_videollava_layout_loads_to_the_same_logits(videollava, tmp_path):
    folder = write_legacy_videollava(videollava, tmp_path / "Video-LLaVA-7B-hf")
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert any(k.startswith("language_model.model.") for k in f.keys())
    loaded = load_model(path=str(folder), device="cpu")
    torch.testing.assert_close(_logits(loaded), _logits(videollava), rtol=0, atol=0)


def test_folders_that_are_not_checkpoints_are_explained(tmp_path):
    with pytest.raises(VloptError, match="not a checkpoint folder"):
        load_model(path=str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VloptError, match="'bert' is neither of the known layouts"):
        load_model(path=str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VloptError, match="not valid JSON"):
        load_model(path=str(tmp_path), device="cpu")


def test_eventgpt_checkpoint_with_wrong_weights_is_explained(eventgpt, tmp_path):
    folder = write_original_eventgpt(eventgpt, tmp_path / "ck", tower="inside")
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(VloptError, match="missing \\['model.norm.weight'\\]"):
        load_model(path=str(folder), device="cpu")
