"""`herd score --image` in this process on a checkpoint whose processor files are not Meta's: the prompt and
pixels are transformers' Llama4Processor's on those files, the scores its model's; bad files fail the run."""
import json

import torch
from conftest import png
from processor_cases import KIND, checkpoint_with, image_runs, pixel_digest, prompt_digest, reference

from herd.cli import main
from llama4.checkpoint import Checkpoint
from llama4.tokenizer import Tokenizer

CONFIG = "max4"  # at most 4 tiles: this image becomes 1 x 3 of them (under Meta's 16, 2 x 4)


def test_score_with_an_image_follows_the_checkpoints_processor(multimodal_maverick, tmp_path, capsys, herd_home):
    hf = multimodal_maverick[0]
    path = checkpoint_with(CONFIG, multimodal_maverick[1], tmp_path / "ckpt")
    (tmp_path / "wide.png").write_bytes(png(90, 40, seed=1))
    code = main(["score", "--text", "Look: <|image|>", "--image", str(tmp_path / "wide.png"), "--json",
                 "--model", str(path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    layout, _, digest, prompt = reference(CONFIG, 0)
    assert [prompt_digest(run) for run in image_runs(out["ids"], Tokenizer.for_checkpoint(path).token_to_id)] == \
        [prompt]
    img = Checkpoint(path).image_processor(png(90, 40, seed=1))
    assert img.tiles == layout and pixel_digest(img.pixels) == digest
    ids = torch.tensor([out["ids"]])
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=img.pixels.float()).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    assert (torch.tensor(out["logprobs"][1:]) - want).abs().max().item() <= 1e-4


def test_a_processor_file_herd_cannot_honour_fails_the_run(multimodal_maverick, tmp_path, capsys, herd_home):
    path = checkpoint_with(CONFIG, multimodal_maverick[1], tmp_path / "ckpt")
    (path / "preprocessor_config.json").write_text(json.dumps({**KIND, "resample": 5}))
    (tmp_path / "wide.png").write_bytes(png(90, 40, seed=1))
    code = main(["score", "--text", "Look: <|image|>", "--image", str(tmp_path / "wide.png"), "--model", str(path)])
    assert code == 2 and "preprocessor_config.json: resample=5 is invalid" in capsys.readouterr().err
