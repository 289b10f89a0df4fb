"""Character-level tokenizer of the retrieval demo model, as a transformers fast tokenizer.

One token per character (the task's key and value symbols, ``?``), so token ids and characters
correspond one to one. The special tokens carry LLaDA's names (``<|mdm_mask|>``, ``<|endoftext|>`` as EOS and pad,
``<|startoftext|>`` as BOS) so code written for LLaDA finds them by attribute. Calling the
tokenizer prepends BOS; ``add_special_tokens=False`` does not. Saved with ``save_pretrained``
it loads offline through ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .task import BOS_ID, EOS_ID, KEY_BASE, KEY_SYMBOLS, MASK_ID, QUESTION_ID, UNK_ID, VALUE_BASE, VALUE_SYMBOLS

__all__ = [
    "BOS_TOKEN",
    "CHARACTERS",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "build_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"  # also the pad token, as in LLaDA
BOS_TOKEN = "<|startoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, MASK_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
# The question mark, then the key and the value symbols, so token ids match `task`'s constants.
CHARACTERS = "?" + KEY_SYMBOLS + VALUE_SYMBOLS


def build_tokenizer(model_max_length: int = 8192) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (vocabulary of ``len(SPECIAL_TOKENS + CHARACTERS)``).

    Args:
        model_max_length: recorded in the saved config; longer inputs only warn.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/eos/pad/mask/unk set; unknown characters (e.g.
        uppercase) map to ``<|unk|>``.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(CHARACTERS), "duplicate character"
    expected = {EOS_TOKEN: EOS_ID, BOS_TOKEN: BOS_ID, MASK_TOKEN: MASK_ID, UNK_TOKEN: UNK_ID, "?": QUESTION_ID,
                KEY_SYMBOLS[0]: KEY_BASE, VALUE_SYMBOLS[0]: VALUE_BASE}  # fmt: skip
    assert all(vocab[t] == i for t, i in expected.items()), "tokenizer ids disagree with the task's"
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # Every character (newline included) is its own pre-token; Fuse joins them back on decode.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        # transformers would otherwise rewrite " ." to "." and the like when decoding.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        # The diffusion samplers take left-padded batches.
        padding_side="left",
    )
