"""The vision tower equals transformers' Llama4 vision model + projector on a tiny random
multimodal checkpoint written by save_pretrained, and the prompt layout equals the reference processor's."""
import pytest
import torch
from conftest import PATCH_ID, VISION

from llama4.checkpoint import Checkpoint
from llama4.vision import VisionConfig, image_prompt
from llama4.weights import load_vision


def test_vision_tower_equals_transformers(multimodal):
    hf, path = multimodal
    tower = load_vision(Checkpoint(path), torch.float32, "cpu")
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.multi_modal_projector(hf.vision_model(pixels).last_hidden_state)
    got = tower(pixels)
    assert got.shape == want.shape == (3, tower.cfg.tokens_per_tile, 64)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_a_text_checkpoint_has_no_tower(reference_models):
    assert load_vision(Checkpoint(reference_models["tiny-scout"][1]), torch.float32, "cpu") is None


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (3, 1)])
def test_image_prompt_is_the_reference_processors(tiles):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    want = Llama4Processor._prompt_split_image(None, tiles, 4)
    assert "".join(image_prompt(*tiles, 4)) == want
    tiles_plus_global = tiles[0] * tiles[1] + (1 if tiles[0] * tiles[1] > 1 else 0)
    assert image_prompt(*tiles, 4).count("<|patch|>") == 4 * tiles_plus_global


def test_bad_vision_config_is_refused():
    from llama4.errors import HerdInputError

    with pytest.raises(HerdInputError, match="image_size=30 must be a multiple of patch_size=7"):
        VisionConfig.from_hf_dict({**VISION, "image_size": 30})


def test_image_features_fused_into_the_text_model_equal_transformers_logits(multimodal):
    from llama4.model import Llama4Model

    hf, path = multimodal
    ckpt = Checkpoint(path)
    model, tower = Llama4Model.load(ckpt), load_vision(ckpt, torch.float32, "cpu")
    assert ckpt.image_token_id == PATCH_ID
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(5, 3, 28, 28, generator=gen)  # an image of 2 x 2 tiles + its global tile
    layout = image_prompt(2, 2, tower.cfg.tokens_per_tile)
    stand_in = {"<|patch|>": PATCH_ID, "<|image_start|>": 6, "<|image_end|>": 7, "<|image|>": 8,
                "<|tile_x_separator|>": 9, "<|tile_y_separator|>": 10}
    ids = [1] + torch.randint(11, 1000, (7,), generator=gen).tolist() + [stand_in[t] for t in layout] + \
        torch.randint(11, 1000, (9,), generator=gen).tolist()
    tokens = torch.tensor(ids)
    rows = (tokens == PATCH_ID).nonzero()[:, 0]
    features = tower(pixels).reshape(-1, model.cfg.hidden_size)
    assert len(rows) == len(features)
    cache = model.new_cache(1024)
    cache.ensure(0, len(ids))
    got = model.forward(tokens, cache.plan([(0, 0, len(ids))]), cache, torch.arange(len(ids)), (rows, features))
    with torch.no_grad():
        want = hf(input_ids=tokens[None], pixel_values=pixels).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
    without = model.new_cache(1024)
    without.ensure(0, len(ids))
    plain = model.forward(tokens, without.plan([(0, 0, len(ids))]), without, torch.arange(len(ids)))
    assert (plain - want).abs().max().item() > 1e-2  # the image changed the answer


STAND_IN = {"<|patch|>": PATCH_ID, "<|image_start|>": 6, "<|image_end|>": 7, "<|image|>": 8,
            "<|tile_x_separator|>": 9, "<|tile_y_separator|>": 10}


def image_request_ids(tower, tiles, seed, before=7, after=9):
    gen = torch.Generator().manual_seed(seed)
    layout = image_prompt(*tiles, tower.cfg.tokens_per_tile)
    return ([1] + torch.randint(11, 1000, (before,), generator=gen).tolist() + [STAND_IN[t] for t in layout]
            + torch.randint(11, 1000, (after,), generator=gen).tolist())


def test_greedy_generation_with_an_image_equals_transformers_generate(multimodal):
    from llama4.engine import Engine, Request
    from llama4.model import Llama4Model
    from llama4.sampling import SamplingParams
    from llama4.vision import Image

    hf, path = multimodal
    model = Llama4Model.load(Checkpoint(path))
    pixels = torch.randn(7, 3, 28, 28, generator=torch.Generator().manual_seed(3))  # 2 x 3 tiles + global
    ids = image_request_ids(model.vision, (2, 3), 4)
    image = Image.of(pixels, (2, 3))
    # A small step budget: the image's rows arrive over several prefill chunks.
    (seq,) = Engine(model, max_step_tokens=16).run(
        [Request(ids, SamplingParams(max_tokens=16, ignore_eos=True), images=(image,))])
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=16, do_sample=False,
                           min_new_tokens=16)[0, len(ids):].tolist()
    assert seq.output_ids == want


@pytest.fixture(scope="module")
def mm_model(multimodal):
    from llama4.model import Llama4Model

    return Llama4Model.load(Checkpoint(multimodal[1]))


@pytest.mark.parametrize("case, message", [
    ("no image", "image patch tokens and no images"),
    ("too few patches", "its 1 images need"),
    ("text model", "no vision tower"),
    ("bad pixels", r"pixels of shape \[1, 3, 20, 28\]; expected \[1, 3, 28, 28\]"),
])
def test_bad_image_requests_are_refused(mm_model, reference_models, case, message):
    from llama4.engine import Engine, Request
    from llama4.errors import HerdInputError
    from llama4.model import Llama4Model
    from llama4.vision import Image

    ids = image_request_ids(mm_model.vision, (1, 1), 5)
    image = Image.of(torch.randn(1, 3, 28, 28), (1, 1))
    model, images = mm_model, (image,)
    if case == "no image":
        images = ()
    elif case == "bad pixels":
        images = (Image.of(torch.randn(1, 3, 20, 28), (1, 1)),)
    elif case == "too few patches":
        ids = [t for t in ids if t != PATCH_ID][:-1] + [PATCH_ID]
    else:
        model = Llama4Model.load(Checkpoint(reference_models["tiny-scout"][1]))
    with pytest.raises(HerdInputError, match=message):
        Engine(model).add(Request(ids, images=images))


def test_images_of_one_step_are_encoded_together_and_each_request_gets_its_own(mm_model):
    from llama4.engine import Engine, Request
    from llama4.sampling import SamplingParams
    from llama4.vision import Image

    gen = torch.Generator().manual_seed(9)
    requests = [Request(image_request_ids(mm_model.vision, tiles, seed), SamplingParams(max_tokens=6, ignore_eos=True),
                        images=(Image.of(torch.randn(n, 3, 28, 28, generator=gen), tiles),))
                for seed, tiles, n in ((11, (1, 1), 1), (12, (1, 2), 3), (13, (2, 2), 5))]
    alone = [Engine(mm_model).run([r])[0].output_ids for r in requests]
    calls = []
    tower = mm_model.vision
    mm_model.vision = type("Counting", (), {"cfg": tower.cfg, "__call__": lambda self, px: calls.append(len(px))
                                            or tower(px)})()
    try:
        together = [s.output_ids for s in Engine(mm_model).run(requests)]
    finally:
        mm_model.vision = tower
    assert together == alone
    assert calls == [1 + 3 + 5]  # one tower call for the step's nine tiles
