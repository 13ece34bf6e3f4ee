import pytest
import torch

from vlopt.decode import teacher_forced_logits
from vlopt.errors import VloptError
from vlopt.models import describe, get_workload, load_model
from vlopt.models.eventgpt import EVENT_TOKEN_INDEX


def test_7b_shapes_match_the_reference_counts():
    egpt, vl = describe("eventgpt", "7b"), describe("videollava", "7b")
    assert egpt["params"] == pytest.approx(7.080e9, rel=2e-3)
    assert egpt["visual_tokens"] == 582                      # 5 temporal + 577 spatial rows
    assert egpt["context_tokens"] == pytest.approx(641, abs=3)
    assert vl["params"] == pytest.approx(7.366e9, rel=2e-3)
    assert vl["visual_tokens"] == 2056                       # 8 × 257, CLS kept
    assert vl["context_tokens"] == pytest.approx(2076, abs=3)


def test_eventgpt_prompt_has_one_placeholder_and_vicuna_template(eventgpt):
    ids = eventgpt.prompt_ids("What is here?")
    assert ids.count(EVENT_TOKEN_INDEX) == 1 and ids[0] == 1
    text = eventgpt.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)
    assert text.startswith("A chat between") and "USER: <ev_start><ev_end>\nWhat is here? ASSISTANT:" in text


def test_eventgpt_pooling_is_temporal_then_spatial_means(eventgpt):
    wl = get_workload("eventgpt")
    prepared = eventgpt.preprocess(eventgpt.load_input(None, wl), "q", wl)
    pixels = prepared["pixel_values"]
    assert pixels.shape == (5, 3, 28, 28)
    hf = eventgpt.hf
    with torch.no_grad():
        per_frame = hf.model.feature_adaptor(hf.model.visual_projector(hf.model.visual_tower(pixels).last_hidden_state))
        pooled = hf.encode_frames(pixels)
    assert per_frame.shape == (5, 5, 64)                     # 4 patches + CLS per frame
    assert pooled.shape == (5 + 5, 64)
    torch.testing.assert_close(pooled[:5], per_frame.mean(1))
    torch.testing.assert_close(pooled[5:], per_frame.mean(0))
    inp = eventgpt.encode(prepared)
    start, end = inp.visual_spans[0]
    torch.testing.assert_close(inp.embeds[0, start:end], pooled)
    assert inp.context_tokens == len(prepared["input_ids"]) - 1 + 10


@pytest.mark.parametrize("workload,rows", [("videollava", 8 * 5), ("videollava-image", 4)])
def test_videollava_splice_equals_transformers_pixel_path(videollava, workload, rows):
    wl = get_workload(workload)
    prepared = videollava.preprocess(videollava.load_input(None, wl), "What is here?", wl)
    inp = videollava.encode(prepared)
    assert inp.visual_tokens == rows
    ids = torch.tensor([prepared["input_ids"]])
    pixel_kw = ({"pixel_values": prepared["pixels"]} if prepared["kind"] == "image"
                else {"pixel_values_videos": prepared["pixels"][None]})
    with torch.no_grad():
        ours = videollava.hf(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask).logits
        theirs = videollava.hf(input_ids=ids, **pixel_kw).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_stage4_is_the_same_code_for_both_models(tiny_model):
    wl = get_workload(tiny_model.default_workload)
    inp = tiny_model.run_stages(None, wl, "What is here?")
    result = tiny_model.stage4(inp, new_tokens=12, fixed=True)
    assert len(result.tokens) == 12
    # Greedy tokens are the argmax of teacher-forced logits (same numerics, same process).
    logits = teacher_forced_logits(tiny_model, inp, result.tokens)
    assert logits.argmax(-1).tolist() == result.tokens


def test_unknown_model_and_preset_are_explained():
    with pytest.raises(VloptError, match="unknown model 'llava-next'.*eventgpt"):
        load_model("llava-next", device="cpu")
    with pytest.raises(VloptError, match="unknown preset '13b'"):
        load_model("eventgpt", preset="13b", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_on_a_cpu_machine_is_explained():
    with pytest.raises(VloptError, match="no CUDA GPU.*--device cpu"):
        load_model("eventgpt", device="cuda")
