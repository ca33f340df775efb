"""Model families (models/families): each family's encoders, packing and ids equal its diffusers
pipeline's own, and one training step's loss and LoRA gradients equal the lines of diffusers'
train_dreambooth_lora_flux_kontext.py / _flux2.py / _flux2_klein.py on the same batch (fp32).
Editing pairs are found as documented.   pytest -q tests/test_families.py"""

from pathlib import Path

import pytest
import torch

from flux_lora.data.sources import discover, pair_controls
from flux_lora.errors import ModelError
from flux_lora.models import families
from flux_lora.models.families import flux1, flux2
from flux_lora.training import flow, lora
from flux_lora.training.step import StepInputs, micro_loss

CPU = torch.device("cpu")
NAMES = ["flux1", "flux1-kontext", "flux2", "flux2-klein"]


@pytest.fixture
def pipes():
    """Fresh tiny pipelines (tests add LoRAs to their transformers); prompts encoded without grad."""
    torch.set_grad_enabled(False)
    try:
        return {name: families.by_name(name).build_tiny(0) for name in NAMES}
    finally:
        torch.set_grad_enabled(True)


def _encode(pipe, prompts, length=16):
    with torch.no_grad():
        if "prompt_2" in pipe.encode_prompt.__code__.co_varnames:
            return pipe.encode_prompt(prompt=prompts, prompt_2=None, device=CPU, max_sequence_length=length)
        return pipe.encode_prompt(prompt=prompts, device=CPU, max_sequence_length=length)


@pytest.mark.parametrize("name", NAMES)
def test_family_read_from_model_index(name, tmp_path):
    from flux_lora.models.tiny import make_tiny

    folder = make_tiny(tmp_path / name, family=name)
    assert families.of_model(str(folder)).name == name
    index = (folder / "model_index.json").read_text().replace(families.by_name(name).pipelines[0], "StableDiffusionPipeline")
    (folder / "model_index.json").write_text(index)
    with pytest.raises(ModelError, match="StableDiffusionPipeline, which flux_lora does not train; supported: FLUX.1"):
        families.of_model(str(folder))


@pytest.mark.parametrize("name", NAMES)
def test_cached_prompts_equal_the_pipelines_encode_prompt(pipes, name):
    family, pipe = families.by_name(name), pipes[name]
    prompts = ["sks, a red circle", "a blue square on grey"]
    got = family.encode_prompts(pipe, prompts, 32, CPU)
    assert set(got) == set(family.text_keys)
    if name.startswith("flux2"):
        want, _ = _encode(pipe, prompts, 32)
        assert torch.equal(got["text"], want)
        assert want.shape[-1] == 3 * 16  # three hidden layers per token: the pipeline's own choice of layers
    else:
        t5, pooled, _ = _encode(pipe, prompts, 32)
        assert torch.equal(got["t5"], t5) and torch.equal(got["clip"], pooled)


def test_flux2_latents_packing_and_ids_equal_the_pipelines(pipes):
    from diffusers import Flux2Pipeline

    pipe, family = pipes["flux2"], flux2.DEV
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = family.encode_latents(pipe.vae, pixels)
    assert torch.allclose(latents, pipe._encode_vae_image(pixels, generator=None), atol=1e-6)  # patchified, BN-normalised
    x = torch.randn(2, 16, 2, 3)
    assert torch.equal(family.pack(x), Flux2Pipeline._pack_latents(x))
    assert torch.equal(flux2.image_ids(2, 3), Flux2Pipeline._prepare_latent_ids(x)[0])
    assert torch.equal(flux2.text_ids(5), Flux2Pipeline._prepare_text_ids(torch.zeros(1, 5, 8))[0])
    raw = torch.randn(2, 4, 4, 6)
    assert torch.equal(flux2.patchify(raw), Flux2Pipeline._patchify_latents(raw))
    assert family.image_tokens(latents.shape) == family.pack(latents).shape[1] == 8 * 12  # 32×48 px, VAE ×2, patch ×2


def test_kontext_latents_and_control_ids_equal_the_pipelines(pipes):
    pipe, family = pipes["flux1-kontext"], families.by_name("flux1-kontext")
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(family.encode_latents(pipe.vae, pixels), pipe._encode_vae_image(pixels, None), atol=1e-6)
    control = torch.randn(1, 4, 8, 12)
    _, packed_control, latent_ids, control_ids = pipe.prepare_latents(control, 1, 4, 16, 24, torch.float32, CPU, None)  # tiny VAE: ×2
    batch = {"t5": torch.zeros(1, 3, 32), "clip": torch.zeros(1, 32), "control": control}
    got = family.transformer_kwargs(batch, 8, 12, CPU, torch.float32)
    assert torch.equal(got["extra_tokens"], packed_control)
    assert torch.equal(got["img_ids"], torch.cat([latent_ids, control_ids]))  # control ids start with 1


def _trainable(transformer, family):
    torch.manual_seed(0)
    lora.add_lora(transformer, 4, 4, "attention-mlp", 0.0, 0, family.lora_presets)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return transformer


def _ours(transformer, family, batch, guidance):
    inputs = StepInputs(7, guidance, "logit-normal", 0.0, 1.0, CPU, torch.float32, family)
    loss = micro_loss(transformer, batch, [0, 1], 3, inputs)
    loss.backward()
    noise, t = flow.sample_noise_and_t(tuple(batch["latents"].shape[1:]), 7, 3, [0, 1], "logit-normal", 0.0, 1.0,
                                       family.image_tokens(batch["latents"].shape), CPU)
    return loss.detach(), {n: p.grad.clone() for n, p in lora.lora_parameters(transformer)}, noise, t


def _grads(transformer):
    return {n: p.grad.clone() for n, p in lora.lora_parameters(transformer)}


def _assert_same(ours, reference):
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:  # fp32 on both sides; only the summation order of the mean differs
        assert torch.allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("name", ["flux2", "flux2-klein"])
def test_flux2_step_matches_diffusers_training_script(pipes, name):
    """train_dreambooth_lora_flux2(_klein).py: latents patchified and BN-normalised, noisy input
    packed, transformer(timestep=t, guidance), prediction unpacked with the ids, MSE to noise - x0."""
    from diffusers import Flux2KleinPipeline

    family, pipe = families.by_name(name), pipes[name]
    raw = torch.randn(2, 4, 8, 12)  # the VAE's latent_dist.mode() for a 64×96 image
    mean, std = flux2.bn_stats(pipe.vae)
    x0 = (Flux2KleinPipeline._patchify_latents(raw) - mean) / std
    prompt_embeds, text_ids = _encode(pipe, ["a", "b c"])
    guidance = 1.0 if pipe.transformer.config.guidance_embeds else None
    transformer = _trainable(pipe.transformer, family)
    loss, grads, noise, t = _ours(transformer, family, {"latents": x0, "text": prompt_embeds}, guidance)
    transformer.zero_grad()
    # the script's lines, with our noise and sigmas
    ids = Flux2KleinPipeline._prepare_latent_ids(x0)
    sigmas = t.view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = Flux2KleinPipeline._pack_latents(noisy)
    g = torch.full([1], 1.0).expand(2) if guidance is not None else None
    pred = transformer(hidden_states=packed, timestep=t, guidance=g, encoder_hidden_states=prompt_embeds,
                       txt_ids=text_ids, img_ids=ids, return_dict=False)[0][:, :packed.size(1)]
    pred = Flux2KleinPipeline._unpack_latents_with_ids(pred, ids)
    ref = torch.mean(((pred.float() - (noise - x0).float()) ** 2).reshape(2, -1), 1).mean()
    ref.backward()
    _assert_same((loss, grads), (ref.detach(), _grads(transformer)))


def test_kontext_step_matches_diffusers_training_script(pipes):
    """train_dreambooth_lora_flux_kontext.py: control latents packed and appended with ids whose
    first axis is 1, prediction cut to the target's tokens and unpacked, MSE to noise - x0."""
    from diffusers import FluxKontextPipeline

    family, pipe = families.by_name("flux1-kontext"), pipes["flux1-kontext"]
    x0, control = torch.randn(2, 4, 8, 12), torch.randn(2, 4, 8, 12)
    t5, pooled, text_ids = _encode(pipe, ["a", "b c"])
    transformer = _trainable(pipe.transformer, family)
    loss, grads, noise, t = _ours(transformer, family, {"latents": x0, "control": control, "t5": t5, "clip": pooled}, 1.0)
    transformer.zero_grad()
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(2, 4, 6, CPU, torch.float32)
    cond_ids = FluxKontextPipeline._prepare_latent_image_ids(2, 4, 6, CPU, torch.float32)
    cond_ids[..., 0] = 1
    latent_ids = torch.cat([latent_ids, cond_ids], dim=0)
    sigmas = t.view(-1, 1, 1, 1)
    packed = FluxKontextPipeline._pack_latents((1.0 - sigmas) * x0 + sigmas * noise, 2, 4, 8, 12)
    n = packed.shape[1]
    packed = torch.cat([packed, FluxKontextPipeline._pack_latents(control, 2, 4, 8, 12)], dim=1)
    pred = transformer(hidden_states=packed, timestep=t, guidance=torch.tensor([1.0]).expand(2),
                       pooled_projections=pooled, encoder_hidden_states=t5, txt_ids=text_ids, img_ids=latent_ids,
                       return_dict=False)[0][:, :n]
    pred = FluxKontextPipeline._unpack_latents(pred, height=8 * 2, width=12 * 2, vae_scale_factor=2)
    ref = torch.mean(((pred.float() - (noise - x0).float()) ** 2).reshape(2, -1), 1).mean()
    ref.backward()
    _assert_same((loss, grads), (ref.detach(), _grads(transformer)))


def test_flux1_packing_is_re_exported_unchanged():
    x = torch.randn(1, 4, 4, 6)
    assert torch.equal(flow.pack_latents(x), flux1.pack_latents(x))
    assert torch.equal(flux1.image_ids(4, 6, first=1.0)[:, 0], torch.ones(6))


def test_flux2_presets_cover_its_layers(pipes):
    t = pipes["flux2-klein"].transformer
    att = set(lora.matched_modules(t, flux2.PRESETS["attention"]))
    mlp = set(lora.matched_modules(t, flux2.PRESETS["attention-mlp"]))
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in att and "transformer_blocks.0.attn.to_out.0" in att
    assert "transformer_blocks.0.ff.linear_in" in mlp - att and "proj_out" not in mlp


def _png(path, size=(32, 32)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_editing_pairs_missing_extra_and_two_controls(tmp_path):
    for name in ("a.png", "b.jpg", "c.png", "d.png", "sub/e.png", "control/a.png", "b_control.png",
                 "control/x.png", "sub/control/e.webp", "d_control.png", "control/d.png"):
        _png(tmp_path / name)
    _png(tmp_path / "b_control.png", size=(64, 32))  # another aspect ratio: stretched, and said so
    (tmp_path / "a.txt").write_text("make it blue")
    pairs, problems = pair_controls(discover(tmp_path))
    got = {p.name: p.control.relative_to(tmp_path).as_posix() for p in pairs}
    assert got == {"a.png": "control/a.png", "b.jpg": "b_control.png", "d.png": "control/d.png",
                   "sub/e.png": "sub/control/e.webp"}
    assert next(p for p in pairs if p.name == "a.png").caption == "make it blue"
    named = dict(problems)
    assert "c.png has no control image" in named["c.png"]
    assert "matches no target" in named["control/x.png"]
    assert "two control images" in named["d.png"]
    b = next(p for p in pairs if p.name == "b.jpg")
    assert "b_control.png is 64×32, its target 32×32" in b.note
    assert next(p for p in pairs if p.name == "a.png").note is None


def test_text_encoder_offload_decision_and_same_embeddings(pipes):
    from flux_lora.models import placement

    assert placement.choose_offload("auto", 48 * 2**30, 40 * 2**30)[0]  # FLUX.2 [dev]'s Mistral on a 40 GB card
    assert not placement.choose_offload("auto", 48 * 2**30, 139 * 2**30)[0]
    assert not placement.choose_offload("auto", 48 * 2**30, 0)[0]  # no GPU: nothing to stream to
    assert placement.choose_offload("on", 1, 2**40) == (True, "preprocess.text_encoder_offload=on")
    pipe, family = pipes["flux2"], flux2.DEV
    want = family.encode_prompts(pipe, ["a red circle"], 16, CPU)["text"]
    placed = placement.place(pipe, CPU, offload=True)  # weights leave the module; hooks bring each layer back
    assert any(p.device.type == "meta" for p in placed.text_encoder.parameters())
    assert torch.equal(family.encode_prompts(placed, ["a red circle"], 16, CPU)["text"], want)


def test_flux2_dev_tokenizer_loads_without_torchvision(tmp_path, monkeypatch):
    """FLUX.2 [dev]'s tokenizer is a PixtralProcessor, which needs torchvision for images; prompts
    only need its tokenizer and chat template, which are then loaded alone (same embeddings)."""
    from flux_lora.models.families.base import Family
    from flux_lora.models.tiny import make_tiny

    folder = make_tiny(tmp_path / "dev", family="flux2")
    want = flux2.DEV.encode_prompts(flux2.DEV.load_text_pipeline(str(folder), torch.float32), ["a red circle"], 16, CPU)
    def as_without_torchvision(self, model, dtype, revision="", device=None):
        raise ImportError("PixtralProcessor requires the Torchvision library but it was not found in your environment.")

    monkeypatch.setattr(Family, "load_text_pipeline", as_without_torchvision)
    chat = (folder / "tokenizer" / "tokenizer_config.json").read_text()
    assert "chat_template" in chat or (folder / "tokenizer" / "chat_template.jinja").is_file()
    got = flux2.DEV.encode_prompts(flux2.DEV.load_text_pipeline(str(folder), torch.float32), ["a red circle"], 16, CPU)
    assert torch.equal(got["text"], want["text"])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's memory maps")
def test_base_loaded_to_the_host_is_the_files_pages(tiny_model):
    """A base loaded into host memory (FSDP2 shards it from there onto the GPUs) is its safetensors
    file memory-mapped, not a copy: the ranks of a node share the page cache's one copy instead of
    holding a whole base each (eight ranks × 24 GB for FLUX.1-dev)."""
    model = families.of_model(str(tiny_model)).load_transformer(str(tiny_model), torch.float32, device=CPU)
    spans = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in open("/proc/self/maps")
             if "diffusion_pytorch_model" in line]
    weights = [p for p in model.parameters() if p.numel() >= 1024]
    assert weights and all(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in weights)
