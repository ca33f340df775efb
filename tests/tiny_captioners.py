"""Tiny random captioners of each architecture flux_lora drives (Florence-2, Qwen2.5-VL, Qwen3-VL,
LLaVA as JoyCaption is), built in code and saved as their hub folders are: the same classes,
tokenizers with the real models' special tokens, and small chat templates of the same shape."""

from __future__ import annotations

from pathlib import Path

import torch

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}\n{% else %}"
    "{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _tokenizer(specials: list[str], **kwargs):
    """A byte-level BPE tokenizer with no merges (any text encodes) plus the model's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", **kwargs)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _text_ids(tok) -> dict:
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


def llava(out: Path) -> Path:
    """LLaVA with a CLIP vision tower and a Llama text model: JoyCaption's architecture."""
    import transformers as T

    tok = _tokenizer(["<image>"])
    images = T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = T.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, chat_template=LLAVA_TEMPLATE,
                                 vision_feature_select_strategy="default", image_token="<image>",
                                 num_additional_image_tokens=1)
    config = T.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, **_text_ids(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    T.LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def qwen_vl(out: Path, version: str = "2.5") -> Path:
    """Qwen2.5-VL or Qwen3-VL, saved as tokenizer + image processor, the chat template in the
    tokenizer's config (Qwen2.5-VL) or beside it as chat_template.jinja (Qwen3-VL, as the hub has it)."""
    import transformers as T

    tok = _tokenizer(QWEN_TOKENS)
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    special = dict(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                   vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=256, **_text_ids(tok))
    if version == "3":
        patch = 16
        config = T.Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                              "mrope_interleaved": True}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                               num_position_embeddings=16), **special)
        model = T.Qwen3VLForConditionalGeneration(config)
    else:
        patch = 14
        config = T.Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, window_size=28,
                               fullatt_block_indexes=[0]), **special)
        model = T.Qwen2_5_VLForConditionalGeneration(config)
    images = T.Qwen2VLImageProcessorPil(min_pixels=(2 * patch) ** 2, max_pixels=(4 * patch) ** 2, patch_size=patch,
                                        merge_size=2)
    model.save_pretrained(out)
    if version == "3":
        tok.save_pretrained(out)
        (Path(out) / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    else:
        tok.chat_template = QWEN_TEMPLATE
        tok.save_pretrained(out)
    images.save_pretrained(out)
    return out


def florence2(out: Path) -> Path:
    """Florence-2 (DaViT vision encoder, BART text model) with its task-prompt processor."""
    import transformers as T

    tok = _tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    images = T.CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    images.image_seq_length = 5
    processor = T.Florence2Processor(image_processor=images, tokenizer=tok)
    config = T.Florence2Config(
        text_config=dict(model_type="bart", d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
                         decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None,
                         **_text_ids(tok)),
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], num_groups=[1, 1, 1, 1],
                           projection_dim=16, window_size=2, max_position_embeddings=8, max_temporal_embeddings=4),
        image_token_id=tok.convert_tokens_to_ids("<image>"))
    T.Florence2ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


BUILDERS = {"florence2": florence2, "qwen2_5_vl": qwen_vl, "qwen3_vl": lambda out: qwen_vl(out, "3"), "llava": llava}


def build(kind: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return BUILDERS[kind](Path(out))
