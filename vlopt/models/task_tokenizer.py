"""The tokenizer both trained tiny models share: a byte-level BPE trained on the synthetic task's text.

One tokenizer for both families means one model's tokens can be verified by the other. It is trained
on everything the task says — the system prompt, both families' prompt templates, every question and
answer of the grammar in `vlopt.scenes` — plus the benchmark's stock questions, so every task word is
one token and any other text still encodes (byte level). Ids as in the random presets' tokenizer:
`<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3; Video-LLaVA's placeholders `<image>`=4 and `<video>`=5 are
special tokens too. Training is deterministic and takes milliseconds.
"""

from __future__ import annotations

import functools

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
VOCAB_SIZE = 1024   # an upper bound: BPE runs out of pairs first (565 ids), every task word whole


def corpus() -> list[str]:
    from vlopt import scenes
    from vlopt.models import eventgpt, videollava
    from vlopt.models.tokenizer import QUESTIONS, SYSTEM_PROMPT

    task = scenes.task_texts()
    templates = [eventgpt.PROMPT.replace("{question}", ""), *(p.replace("{question}", "") for p in
                                                              videollava.PROMPT.values())]
    # Prompts repeat with every training example; weight them like the answers so their words merge too.
    # An answer follows "ASSISTANT:" after a space, so it is also seen with that space.
    return [SYSTEM_PROMPT, *templates] * 50 + list(QUESTIONS) + task + [" " + t for t in task]


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def build_task_tokenizer():
    """A `PreTrainedTokenizerFast` (right padding) for the trained tiny models of both families."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:])
    tok.padding_side = "right"
    return tok
