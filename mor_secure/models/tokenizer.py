"""An offline word-level tokenizer over the benchmark's vocabulary.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model wrapped in
``PreTrainedTokenizerFast``. Every family's image and layout markers are registered as
special ``AddedToken``s; otherwise a processor's expanded run of image tokens is not split
and the image-token count mismatches the vision features.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BASE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Markers used by the supported VLM families' processors (LLaVA/PaliGemma/Idefics3 image token,
# Idefics3 layout tokens, Qwen2-VL vision markers).
FAMILY_SPECIALS = (
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Words of the chat template (see CHAT_TEMPLATE).
CHAT_WORDS = ("user", "assistant", ":")

# A minimal chat template: ``user : <image> what colour is the shape ? assistant : red </s>``.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is the specials, chat words and ``words``."""
    ordered: list[str] = []
    for token in (*BASE_SPECIALS, *FAMILY_SPECIALS, *CHAT_WORDS, *sorted(set(words))):
        if token not in ordered:
            ordered.append(token)
    vocab = {token: index for index, token in enumerate(ordered)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in FAMILY_SPECIALS]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
