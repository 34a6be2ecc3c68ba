"""A tiny randomly initialised sentence-transformers model for tests that need a real one: a BERT with a
WordLevel tokenizer trained here on a few sentences, saved to a local folder (no hub access). Load it with
``SentenceTransformer(folder, device="cpu")`` under HF_HUB_OFFLINE=1 (and USE_HUB_KERNELS=0, so that
transformers does not kernelize the model through the hub).
"""

from __future__ import annotations

import torch

SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "it is sunny outside today", "he drove to work by car",
    "she reads a book at night", "the train was late again", "we cooked pasta for dinner", "rain fell all day",
    "the market opens at nine", "children play in the garden", "a bird sang on the roof", "coffee keeps me awake",
    "the river flows to the sea", "my phone battery is empty", "they won the football match", "snow covers the hill",
]


def save_tiny_bert(folder, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> str:
    """Write a ``layers``-layer, ``hidden_size``-wide BERT (dropout 0.1, as BERT's default) with random weights
    and its tokenizer (32 tokens at most) to ``folder``; return the folder as a string."""
    import tokenizers
    import transformers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, tokenizers.trainers.WordLevelTrainer(special_tokens=special))
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                                model_max_length=32)
    fast.save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size,
                                     num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=2 * hidden_size, max_position_embeddings=64)
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(folder)
    return str(folder)
