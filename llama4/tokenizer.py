"""Tokenizers for Llama 4 checkpoints and the chat template.

Two encodings: a Hugging Face `tokenizer.json` (tokenizers) and Meta's `tokenizer.model`
(tiktoken BPE, 200,000 ranks + 2,048 special slots). The chat template comes from the
checkpoint (tokenizer_config.json or chat_template.jinja); Llama 4's header/eot format is
used only when the checkpoint has none.

Chat content is data: the template's own text is encoded with its special tokens, but a
message's content (and so a user typing "<|eot|>") is encoded as ordinary text, never as
control tokens; roles must be ones the template knows. Raw text prompts keep special tokens.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import re
import secrets
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama4.errors import HerdInputError

NUM_BASE_RANKS = 200000
NUM_SPECIAL = 2048
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# Named Llama 4 special tokens by offset from 200000; the other slots are reserved.
_NAMED_SPECIAL = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|fim_prefix|>", 3: "<|fim_middle|>", 4: "<|fim_suffix|>",
    5: "<|header_start|>", 6: "<|header_end|>", 7: "<|eom|>", 8: "<|eot|>", 9: "<|step|>",
    16: "<|python_start|>", 17: "<|python_end|>", 18: "<|finetune_right_pad|>",
    80: "<|image_start|>", 81: "<|image_end|>", 84: "<|tile_x_separator|>", 85: "<|tile_y_separator|>",
    90: "<|image|>", 92: "<|patch|>", 1142: "<|reasoning_thinking_start|>", 1143: "<|reasoning_thinking_end|>",
}

# Llama 4's format (reference §6): no newline between <|eot|> and the next header.
LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n{{ message['content'] | trim }}"
    "{% if message['role'] == 'ipython' %}<|eom|>{% else %}<|eot|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def meta_tokenizer_path() -> Path | None:
    """Meta's Llama 4 tokenizer.model as shipped by the `llama-models` package, if installed."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "llama4" / "tokenizer.model"
    return path if path.exists() else None


class Tokenizer:
    """encode / detokenize / chat over either backend; ids are plain ints."""

    def __init__(self, backend, chat_template: str, bos_token: str | None, stop_ids: set[int], add_bos: bool = True):
        self._backend = backend
        self.add_bos = add_bos  # whether plain-text prompts start with BOS (tokenizer_config add_bos_token)
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.stop_ids = stop_ids
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self._template = env.from_string(chat_template)
        self._trims: bool | None = None
        # system, user and assistant, and tool or ipython where the template names them.
        self.roles = frozenset({"system", "user", "assistant", *(r for r in ("tool", "ipython") if r in chat_template)})

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._backend.encode(text)
        return ([self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []) + ids

    def detokenize(self, ids: list[int], skip_special: bool = True) -> str:
        return self._backend.detokenize(ids, skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _check_messages(self, messages: list[dict]) -> None:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    isinstance(m.get("content"), str) or _is_parts(m.get("content"))):
                raise HerdInputError(f"messages[{i}] must have a string 'role' and a 'content' string or parts "
                                     "([{type: text, text}, {type: image}])")
            if m["role"] not in self.roles:
                raise HerdInputError(f"messages[{i}].role={m['role']!r} is invalid; allowed: {sorted(self.roles)}")

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token="")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        self._check_messages(messages)
        return self._render(messages, add_generation_prompt)

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The conversation's ids: the template's text (with BOS and its special tokens) encoded
        as such, each message's content encoded as ordinary text."""
        self._check_messages(messages)
        nonce = secrets.token_hex(8)  # unguessable: no content can forge a mark
        mark = re.compile("\ue000" + nonce + r":(\d+)\ue001")
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self._render(marked, add_generation_prompt)
        ids, pos = [], 0
        for found in mark.finditer(rendered):
            ids += self._backend.encode(rendered[pos : found.start()])
            ids += self._encode_content(messages[int(found.group(1))]["content"])
            pos = found.end()
        return ids + self._backend.encode(rendered[pos:])

    def _encode_content(self, content) -> list[int]:
        """Text as ordinary text; each image part as one <|image|> placeholder (expanded with its image)."""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if self._trims_content:
            texts = [i for i, p in enumerate(parts) if p["type"] == "text"]
            parts = [dict(p) for p in parts]
            if texts:
                parts[texts[0]]["text"] = parts[texts[0]]["text"].lstrip()
                parts[texts[-1]]["text"] = parts[texts[-1]]["text"].rstrip()
        ids = []
        for p in parts:
            if p["type"] == "image":
                placeholder = self.token_to_id("<|image|>")
                if placeholder is None:
                    raise HerdInputError("this tokenizer has no <|image|> token; allowed: text content")
                ids.append(placeholder)
            else:
                ids += self._backend.encode_ordinary(p["text"])
        return ids

    @property
    def _trims_content(self) -> bool:
        """Whether the template strips each message's content (Llama 4's `| trim`)."""
        if self._trims is None:
            probe = self._render([{"role": "user", "content": " \ue000 "}], False)
            self._trims = " \ue000 " not in probe
        return self._trims

    @classmethod
    def for_checkpoint(cls, path: str | Path | None, eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        """The checkpoint's tokenizer; Meta's Llama 4 tokenizer when the directory has none."""
        folder = Path(path) if path else None
        cfg = {}
        if folder and (folder / "tokenizer_config.json").exists():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if folder and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if folder and (folder / "tokenizer.json").exists():
            backend = _HFBackend(folder / "tokenizer.json")
        else:
            model_file = (folder / "tokenizer.model" if folder and (folder / "tokenizer.model").exists()
                          else meta_tokenizer_path())
            if model_file is None:
                raise HerdInputError(f"tokenizer: {path or 'preset'} has no tokenizer.json or tokenizer.model, "
                                     "and the llama-models package (Meta's Llama 4 tokenizer) is not installed")
            backend = _TiktokenBackend(model_file)
        bos = _token_text(cfg.get("bos_token")) or (
            "<|begin_of_text|>" if backend.token_to_id("<|begin_of_text|>") is not None else None)
        eos = _token_text(cfg.get("eos_token"))
        stop = set(eos_ids)
        if eos and backend.token_to_id(eos) is not None:
            stop.add(backend.token_to_id(eos))
        return cls(backend, template or LLAMA4_CHAT_TEMPLATE, bos, stop, bool(cfg.get("add_bos_token", True)))


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # older tokenizer_config.json: AddedToken as a dict
        return token.get("content")
    return token


def _raise_template_error(message: str):
    raise HerdInputError(f"chat template: {message}")


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self._plain = HFTokenizer.from_file(str(path))  # a second instance: the flag below is per tokenizer
        self._plain.encode_special_tokens = True  # special-token text encodes as ordinary text
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int], skip_special: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _TiktokenBackend:
    def __init__(self, path: Path):
        import tiktoken

        ranks = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HerdInputError(f"tokenizer: {path} is not a tiktoken BPE file ({exc})") from None
        base = len(ranks)
        self.special = {_NAMED_SPECIAL.get(i, f"<|reserved_special_token_{i}|>"): base + i for i in range(NUM_SPECIAL)}
        self.special_ids = set(self.special.values())
        self._enc = tiktoken.Encoding(name=path.name, pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special)
        self.vocab_size = base + NUM_SPECIAL

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def detokenize(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._enc.decode([i for i in ids if i < self.vocab_size])

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            return None


def _is_parts(content) -> bool:
    def ok(p) -> bool:
        return isinstance(p, dict) and (p.get("type") == "image"
                                        or (p.get("type") == "text" and isinstance(p.get("text"), str)))

    return isinstance(content, list) and all(ok(p) for p in content)


class Detokenizer:
    """Streaming detokenization: token ids in, text deltas out, holding back incomplete UTF-8.

    Only a short window is re-detokenized per token: the ids since the last emitted text,
    with the ones before them as context (tokenizers that drop a leading space on a lone
    token need it). The cost per token does not grow with the output."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok, self._ids = tokenizer, []
        self._prefix = self._read = 0  # window [prefix, read) is context; [read, end) is new

    def push(self, token: int) -> str:
        self._ids.append(token)
        context = self._tok.detokenize(self._ids[self._prefix : self._read])
        text = self._tok.detokenize(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(context):
            return ""  # an incomplete character (or nothing visible yet): wait for more ids
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]
