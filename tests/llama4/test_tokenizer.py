"""Meta's real Llama 4 tokenizer.model (from llama-models) and the chat template."""
import json

import pytest

from llama4.tokenizer import Detokenizer, Tokenizer, meta_tokenizer_path

TEXT = "Hello, world! ¿Qué tal? 12345 naïve — tabs\tand\nnew lines; emoji 🦙 and 日本語."


@pytest.fixture(scope="module")
def meta_tok():
    assert meta_tokenizer_path() is not None, "llama-models must be installed (scripts/setup does it)"
    return Tokenizer.for_checkpoint(None)


def test_round_trip_and_known_ids(meta_tok):
    ids = meta_tok.encode(TEXT, add_bos=True)
    assert ids[0] == 200000 and meta_tok.vocab_size == 202048
    assert meta_tok.detokenize(ids) == TEXT
    assert meta_tok.token_to_id("<|eot|>") == 200008 and meta_tok.token_to_id("<|patch|>") == 200092
    assert all(i < 200000 for i in ids[1:])


def test_chat_template_system_and_user(meta_tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    text = meta_tok.render_chat(messages)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nHi!<|eot|><|header_start|>assistant<|header_end|>\n\n")
    ids = meta_tok.apply_chat(messages)
    assert ids[:2] == [200000, 200005] and ids.count(200008) == 2 and ids[-2:] == [200006, meta_tok.encode("\n\n")[0]]


def test_checkpoint_template_wins_over_default(tmp_path, meta_tok):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"}))
    import shutil
    shutil.copy(meta_tokenizer_path(), tmp_path / "tokenizer.model")
    tok = Tokenizer.for_checkpoint(tmp_path)
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "[user]x"


def test_incremental_decoder_never_splits_a_character(meta_tok):
    ids = meta_tok.encode("🦙 日本語 ok")
    dec = Detokenizer(meta_tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == "🦙 日本語 ok"
    assert all("\ufffd" not in p for p in pieces)
