"""Tiny random pipelines of every family (and a tiny captioner) built in code, for tests, CI and the demo.

    python -m flux_lora make-tiny tiny-flux [--family flux1|flux1-kontext|flux2|flux2-klein]

The FLUX.1 one keeps FLUX.1-dev's structure (guidance embedding, double and single blocks, 3 rope axes, VAE
shift/scale factors, CLIP pooled + T5 sequence text) at toy sizes, and is saved with
`save_pretrained` so it is loaded exactly like the real model: `FluxPipeline.from_pretrained(DIR)`.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from flux_lora.outputs import files

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_TOKENS)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    pieces += ["▁" + c for c in string.ascii_letters + string.digits]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_TOKENS)


TEXT_HIDDEN = 16  # the FLUX.2 toy text encoders' width (the transformer reads 3 layers of it per token)
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                 "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}"
                    "[INST]{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}"
                    "{% endfor %}[/INST]{% endif %}{% endfor %}")


def clip_and_t5():
    """FLUX.1's two toy text encoders and their tokenizers: (clip, clip_tokenizer, t5, t5_tokenizer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS, projection_dim=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=max(len(tok2), 128), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return clip.eval(), tok, t5.eval(), tok2


def flux1_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def qwen3(seed: int = 0):
    """FLUX.2 [klein]'s text encoder at toy size: a Qwen3ForCausalLM deep enough for the hidden
    layers 9/18/27 the pipeline reads, and a byte-level Qwen2 tokenizer with a chat template."""
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(_bytes_to_unicode() + specials)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=T5_MAX_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN_TEMPLATE
    torch.manual_seed(seed + 1)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=T5_MAX_TOKENS,
        pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"]))
    return model.eval(), tokenizer


def mistral3(seed: int = 0):
    """FLUX.2 [dev]'s text encoder at toy size: a Mistral3ForConditionalGeneration deep enough for
    the hidden layers 10/20/30 the pipeline reads, and a byte-level tokenizer with a chat template
    of Mistral's shape (system prompt, [INST] ... [/INST])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + _bytes_to_unicode())}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", model_max_length=T5_MAX_TOKENS, chat_template=MISTRAL_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:8]})
    torch.manual_seed(seed + 1)
    model = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=24,
                         max_position_embeddings=T5_MAX_TOKENS, num_attention_heads=2, num_hidden_layers=31,
                         num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, pad_token_id=8),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=24, image_size=32, patch_size=8, num_channels=3, head_dim=8),
        image_token_index=7, spatial_merge_size=1, vision_feature_layer=-1, multimodal_projector_bias=False))
    return model.eval(), tokenizer


def build_pipeline(seed: int = 0, family: str = "flux1"):
    """The tiny pipeline of a family (flux1, flux1-kontext, flux2, flux2-klein), deterministic for a seed."""
    from flux_lora.models import families

    return families.by_name(family).build_tiny(seed)


def build_captioner(seed: int = 0):
    """A tiny random BLIP captioner (model, processor): same classes as the real default."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    torch.manual_seed(seed)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + list(string.ascii_lowercase) + [
        "a", "photo", "of", "the", "cat", "dog", "red", "blue", "on", "with", "tree", "sky"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=32)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                         sep_token_id=vocab["[SEP]"], pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    model = BlipForConditionalGeneration(config)
    model.config.flux_lora_random_weights = True  # saved in config.json: preprocess says its captions are noise
    return model, processor


def make_tiny(out_dir: str | Path, seed: int = 0, family: str = "flux1") -> Path:
    """Write the tiny pipeline to out_dir (diffusers layout) and a tiny captioner to out_dir/captioner."""
    pipe = build_pipeline(seed, family)
    model, processor = build_captioner(seed)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        model.save_pretrained(folder / "captioner", safe_serialization=True)
        processor.save_pretrained(folder / "captioner")

    files.commit_dir(Path(out_dir), write, every_rank=True)  # whole or not at all
    return Path(out_dir)
