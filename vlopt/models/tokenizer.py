"""An offline tokenizer for the random-weight presets.

The real checkpoints bring LLaMA's 32000-piece SentencePiece model; the presets cannot download it.
A byte-level BPE trained here on the prompt vocabulary gives word-sized tokens, so the text part of a
prompt has about the length the real tokenizer gives (EventGPT: 59 text ids), and any text encodes.
Training is deterministic and takes milliseconds.
"""

from __future__ import annotations

import functools

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
DEFAULT_QUESTION = "What are the key elements in this scene?"

# The ten questions of the multi-question workload (the original evaluation asked ten per clip).
QUESTIONS = [
    DEFAULT_QUESTION,
    "Describe the scene in detail.",
    "What objects are moving in this scene?",
    "Is there any vehicle in the scene?",
    "What is the weather like?",
    "Are there pedestrians on the road?",
    "What direction is the camera moving?",
    "How many objects can you see?",
    "What is happening on the left side of the scene?",
    "Is it safe to drive forward?",
]

_CORPUS = [SYSTEM_PROMPT, *QUESTIONS, "USER: ASSISTANT: <ev_start> <ev_end>",
           "The scene shows a road with cars, a pedestrian, trees, buildings and a traffic light."]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=490,  # chosen so the EventGPT prompt has 59 text ids, as LLaMA's tokenizer gives
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def build_tokenizer(extra_specials: tuple[str, ...] = ()):
    """A `PreTrainedTokenizerFast` with `<s>`=1, `</s>`=2, `<pad>`=3 and any extra special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    if extra_specials:
        tok.add_special_tokens({"additional_special_tokens": list(extra_specials)})
    tok.padding_side = "right"
    return tok
