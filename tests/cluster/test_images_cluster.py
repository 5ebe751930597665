"""Images through the whole cluster: the attention service decodes, tiles and encodes them under the
checkpoint's processor files; the router and expert workers see image tokens as tokens. Equal to the
monolithic model, and to transformers (its processor's prompt and pixels, its model's log-probabilities)."""
import concurrent.futures

import grpc
import pytest
import torch
from conftest import png
from processor_cases import checkpoint_with, image_runs, pixel_digest, prompt_digest, reference

from herd.client import Client
from herdpb import llama_pb2, llama_pb2_grpc
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.images import ImageProcessor
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams
from llama4.tokenizer import Tokenizer
from llama4.vision import expand_images
from plumbing.grpc_server import channel

WIDE, TALL = png(90, 40, seed=1), png(30, 70, seed=2)  # processor_cases.IMAGES 0 and 1
CONFIG = "clip-max6"  # at most 6 tiles (Meta's 16 would give WIDE 2 x 4) and CLIP's mean and std


@pytest.fixture(scope="module")
def checkpoint(multimodal_maverick, tmp_path_factory):
    return checkpoint_with(CONFIG, multimodal_maverick[1], tmp_path_factory.mktemp("multimodal-clip-max6"))


@pytest.fixture(scope="module")
def cluster(local_cluster, checkpoint):
    with local_cluster(model=str(checkpoint), workers=2, kv_tier=False) as c:
        yield c


@pytest.fixture(scope="module")
def mono(checkpoint):
    return Llama4Model.load(Checkpoint(checkpoint))


def stub(cluster):
    from herd.client import default_secret

    return llama_pb2_grpc.LlamaStub(channel(cluster.attention_address, 64 << 20, secret=default_secret()))


def prompt_request(text, images):
    return llama_pb2.ScoreRequest(text=text, images=[llama_pb2.ImagePart(data=d, media_type="image/png")
                                                     for d in images])


def test_image_prompt_scores_equal_monolithic_and_transformers(cluster, mono, multimodal_maverick, checkpoint):
    hf, path = multimodal_maverick[0], checkpoint
    text = "Compare <|image|> with <|image|> please."
    got = stub(cluster).Score(prompt_request(text, [WIDE, TALL]), timeout=120)
    tok = Tokenizer.for_checkpoint(path)
    # transformers' Llama4Processor on these processor files: each image's tokens and pixels
    refs = [reference(CONFIG, 0), reference(CONFIG, 1)]
    assert [prompt_digest(run) for run in image_runs(list(got.ids), tok.token_to_id)] == [r[3] for r in refs]
    proc = ImageProcessor.from_checkpoint(path, mono.vision.cfg)
    images = [proc(WIDE), proc(TALL)]
    assert [(img.tiles, pixel_digest(img.pixels)) for img in images] == [(r[0], r[2]) for r in refs]
    ids = expand_images(tok.encode(text, add_bos=True), images, tok.token_to_id, mono.vision.cfg.tokens_per_tile)
    assert list(got.ids) == ids
    (seq,) = Engine(mono).run([Request(ids, SamplingParams(max_tokens=0), prompt_logprobs=True,
                                       images=tuple(images))])
    mono_lp = torch.tensor(seq.prompt_logprobs[1:])
    assert (torch.tensor(list(got.logprobs)) - mono_lp).abs().max().item() <= 1e-5
    pixels = torch.cat([img.pixels for img in images]).float()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (mono_lp - want).abs().max().item() <= 1e-4


def test_chat_parts_and_generation_with_an_image(cluster, mono):
    chat = llama_pb2.ChatMessages(messages=[llama_pb2.ChatMessage(role="user", parts=[
        llama_pb2.ContentPart(image=llama_pb2.ImagePart(data=WIDE)), llama_pb2.ContentPart(text="Describe it.")])])
    req = llama_pb2.GenerateRequest(chat=chat, sampling=llama_pb2.SamplingParams(max_tokens=8, ignore_eos=True))
    out = [t for msg in stub(cluster).Generate(req, timeout=120) for t in msg.token_ids]
    assert len(out) == 8
    again = [t for msg in stub(cluster).Generate(req, timeout=120) for t in msg.token_ids]
    assert out == again


@pytest.mark.parametrize("images, text, message", [
    ([b"GIF89a not supported"], "<|image|>", "not a PNG or JPEG"),
    ([WIDE], "no placeholder here", "0 <|image|> placeholders for 1 images"),
    ([], "a placeholder <|image|> without its image", "1 <|image|> placeholders for 0 images"),
    ([WIDE] * 9, "<|image|>" * 9, "at most 8"),
    ([png(10000, 6000, mode="1")], "<|image|>", "pixels; allowed: at most"),
])
def test_bad_images_are_refused_and_others_are_served(cluster, images, text, message):
    client = Client(cluster.attention_address)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(lambda: [t for m in client.generate(ids=[200000, 1000, 2000], max_tokens=6,
                                                                 ignore_eos=True) for t in m.token_ids])
        with pytest.raises(grpc.RpcError) as err:
            stub(cluster).Score(prompt_request(text, images), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
        assert len(other.result(timeout=120)) == 6


def test_cli_score_and_generate_take_images(cluster, checkpoint, herd_home, tmp_path):
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "wide.png").write_bytes(WIDE)
    env = {**os.environ, "HERD_HOME": str(herd_home)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "herd", *a], capture_output=True, text=True, env=env,
                                    timeout=300)
    args = ["score", "--text", "Look: <|image|>", "--image", str(tmp_path / "wide.png"), "--json"]
    remote = run(*args, "--target", cluster.attention_address)
    local = run(*args, "--model", str(checkpoint))
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    r, m = json.loads(remote.stdout), json.loads(local.stdout)
    assert r["ids"] == m["ids"] and r["ids"].count(200092) == 7 * 4  # 2 x 3 tiles + global, 4 patches each
    assert max(abs(a - b) for a, b in zip(r["logprobs"][1:], m["logprobs"][1:], strict=True)) <= 1e-5
    chat = run("generate", "--chat", "--prompt", "What is it?", "--image", str(tmp_path / "wide.png"),
               "--max-tokens", "4", "--target", cluster.attention_address)
    assert chat.returncode == 0, chat.stderr
    bad = run("score", "--text", "Look", "--image", str(tmp_path / "wide.png"), "--target", cluster.attention_address)
    assert bad.returncode == 2 and "0 <|image|> placeholders for 1 images" in bad.stderr


def test_openai_chat_takes_image_url_data_urls(cluster):
    import base64

    import openai

    sdk = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key=cluster.api_key, max_retries=0)
    model = sdk.models.list().data[0].id
    url = "data:image/png;base64," + base64.b64encode(WIDE).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
    r = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=6,
                                    temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    chat = llama_pb2.ChatMessages(messages=[llama_pb2.ChatMessage(role="user", parts=[
        llama_pb2.ContentPart(image=llama_pb2.ImagePart(data=WIDE)), llama_pb2.ContentPart(text="Describe it.")])])
    req = llama_pb2.GenerateRequest(chat=chat, sampling=llama_pb2.SamplingParams(max_tokens=6, ignore_eos=True))
    grpc_tokens = [t for msg in stub(cluster).Generate(req, timeout=120) for t in msg.token_ids]
    assert r.choices[0].model_extra["token_ids"] == grpc_tokens
    assert r.usage.prompt_tokens > 28  # the image's 7 tiles x 4 patches are prompt tokens
    for bad_url, needle in (("https://example.com/cat.png", "data: URL"), ("data:image/png;base64,@@@", "base64")):
        bad = [{"type": "image_url", "image_url": {"url": bad_url}}]
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": bad}], max_tokens=2)
        assert needle in err.value.body["message"] and err.value.body["param"] == "messages[0].content[0]"
