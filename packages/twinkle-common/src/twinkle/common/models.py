"""Model ids: where a ``model_id`` from the config comes from, and the built-in offline tiny model.

Accepted ids:

- ``builtin://tiny-qwen2`` — a real Qwen2-architecture causal LM (~5M parameters) with a locally trained
  byte-level BPE tokenizer and a ChatML chat template. It is built deterministically on first use into
  ``$TWINKLE_CACHE_DIR/models/`` (default ``~/.cache/twinkle``), so tests, CI and the local default run
  with no model hub;
- ``hf://org/name`` or a bare ``org/name`` — Hugging Face Hub (honours ``HF_HUB_OFFLINE`` and the HF cache);
- ``ms://org/name`` — ModelScope, when the ``modelscope`` package is installed;
- a local directory (absolute, ``./``-relative or ``~``-prefixed path).

Why the tokenizer is trained with Qwen's split regex and NFC: transformers 5 loads any ``model_type: qwen2``
tokenizer as ``Qwen2Tokenizer`` and rebuilds its pre-tokenizer from Qwen's definition. A BPE trained with a
different pre-tokenizer would change its ids after a save/load round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from .env import cache_dir, trust_remote_code

BUILTIN_SCHEME = "builtin://"
TINY_MODEL_ID = "builtin://tiny-qwen2"
_TINY_VERSION = "v1"

# Qwen2's pre-tokenization pattern (tokenizer.json of the Qwen2 family).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CONFIG = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
_TINY_VOCAB = 4096


class ModelResolutionError(ValueError):
    """A model id that cannot be turned into local files (bad id, hub unreachable, missing package)."""


def served_model_name(model_id: str) -> str:
    """The public name of a base model, as clients address it: the id without its scheme."""
    for scheme in (BUILTIN_SCHEME, "hf://", "ms://"):
        if model_id.startswith(scheme):
            return model_id[len(scheme):]
    if _looks_like_path(model_id):
        return Path(os.path.expanduser(model_id)).name
    return model_id


def resolve_model_path(model_id: str) -> str:
    """Return a local directory holding the model's config, weights and tokenizer."""
    if not model_id or not isinstance(model_id, str):
        raise ModelResolutionError("model_id must be a non-empty string")
    if model_id.startswith(BUILTIN_SCHEME):
        if model_id != TINY_MODEL_ID:
            raise ModelResolutionError(f"unknown built-in model {model_id!r}; the built-in model is {TINY_MODEL_ID!r}")
        return build_tiny_model()
    if model_id.startswith("ms://"):
        return _from_modelscope(model_id[len("ms://"):])
    if model_id.startswith("hf://"):
        return _from_hf(model_id[len("hf://"):])
    if _looks_like_path(model_id):
        path = os.path.abspath(os.path.expanduser(model_id))
        if not os.path.isdir(path):
            raise ModelResolutionError(f"model path {path!r} does not exist or is not a directory")
        return path
    return _from_hf(model_id)


def tokenizer_id(model_id: str) -> str:
    """What a client passes to ``AutoTokenizer.from_pretrained`` for this model: the hub id of a Hugging Face
    model, else the model's local directory (built-in, local and ModelScope models), which a client on the
    server's machine can load and a hub cannot resolve anyway."""
    if model_id.startswith("hf://"):
        return model_id[len("hf://"):]
    if model_id.startswith((BUILTIN_SCHEME, "ms://")) or _looks_like_path(model_id):
        return resolve_model_path(model_id)
    return model_id


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or os.path.isdir(model_id)


def _from_hf(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ModelResolutionError("huggingface_hub is not installed") from e
    try:
        return snapshot_download(repo_id)
    except Exception as e:  # noqa: BLE001 - hub errors are many; the message is what matters
        raise ModelResolutionError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {e}") from e


def _from_modelscope(repo_id: str) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ModelResolutionError(
            f"model id ms://{repo_id} needs the 'modelscope' package (pip install modelscope), "
            "or use hf://, a local path, or the built-in " + TINY_MODEL_ID
        ) from e
    try:
        return snapshot_download(repo_id)
    except Exception as e:  # noqa: BLE001
        raise ModelResolutionError(f"cannot fetch ms://{repo_id} from ModelScope: {e}") from e


def load_tokenizer(model_id: str):
    """The model's tokenizer. The class its ``tokenizer_config.json`` names is loaded directly when
    transformers has it: ``AutoTokenizer``'s module imports torch (~190 MB), which a process that only
    tokenizes (the processor) does not need. Anything else goes through ``AutoTokenizer``."""
    import transformers

    path = resolve_model_path(model_id)
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            declared = json.load(f).get("tokenizer_class")
        # AutoTokenizer would prefer the fast (tokenizers) variant of the declared class; so do we.
        names = [declared + "Fast", declared] if isinstance(declared, str) and not declared.endswith("Fast") else [declared]
        cls = next((getattr(transformers, n) for n in names if isinstance(n, str) and hasattr(transformers, n)), None)
    except (OSError, ValueError, AttributeError, ImportError):
        cls = None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(path, trust_remote_code=trust_remote_code())


def load_causal_lm(model_id: str, *, dtype=None, device: str | None = None):
    """Load the base model for training or sampling; float32 unless told otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_id),
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code(),
    )
    if device:
        model.to(device)
    return model


# --- the built-in tiny model --------------------------------------------------------------------------


def tiny_model_dir() -> str:
    return os.path.join(cache_dir(), "models", f"tiny-qwen2-{_TINY_VERSION}")


def build_tiny_model() -> str:
    """Build the tiny model once per machine. Safe when several processes race: each builds into its own
    temporary directory and the first rename wins."""
    target = tiny_model_dir()
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-qwen2-", dir=os.path.dirname(target))
    try:
        _write_tiny_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.exists(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_tiny_model(out: str) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = _train_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=_CHATML_TEMPLATE,
        model_max_length=_TINY_CONFIG["max_position_embeddings"],
    )
    fast.save_pretrained(out)
    # Make transformers pick Qwen2's tokenizer class, exactly as for a real Qwen2 checkpoint.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"
    tok_cfg["add_prefix_space"] = False
    tok_cfg["errors"] = "replace"
    tok_cfg["clean_up_tokenization_spaces"] = False
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)

    vocab_size = len(tok.get_vocab())
    padded_vocab = (vocab_size + 63) // 64 * 64
    config = Qwen2Config(
        vocab_size=padded_vocab,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        **_TINY_CONFIG,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.token_to_id("<|endoftext|>")
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "twinkle_builtin.json"), "w") as f:
        json.dump({"id": TINY_MODEL_ID, "version": _TINY_VERSION, "fingerprint": _corpus_fingerprint()}, f)


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        min_frequency=2,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(), trainer=trainer)
    return tok


_WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real life few "
    "north open seem together next white children begin got walk example ease paper group always music those "
    "both mark often letter until mile river car feet care second book carry took science eat room friend "
    "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
    "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
    "measure door product black short numeral class wind question happen complete ship area half rock order "
    "fire south problem piece told knew pass since top whole king space heard best hour better true during "
    "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
    "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
    "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
    "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
    "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
    "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
    "wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill "
    "east paint language among model train adapter loss gradient token sample weight learning rate step batch"
).split()


def _synthetic_corpus():
    """A deterministic English-like corpus (sentences, numbers, chat turns, a little code), ~1 MB."""
    rng = random.Random(20261127)
    punct = [".", ".", ".", "?", "!", ",", ";", ":"]
    for _ in range(6000):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        sentence = " ".join(words) + rng.choice(punct)
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 99999)} {rng.choice(['items', 'steps', 'tokens'])}."
        if rng.random() < 0.15:
            sentence = f"<|im_start|>user\n{sentence}<|im_end|>\n<|im_start|>assistant\n{sentence.lower()}<|im_end|>\n"
        if rng.random() < 0.05:
            a, b = rng.choice(_WORDS), rng.choice(_WORDS)
            sentence += f"\ndef {a}_{b}(x):\n    return x + {rng.randint(1, 9)}\n"
        yield sentence


def _corpus_fingerprint() -> str:
    h = hashlib.sha256()
    for line in _synthetic_corpus():
        h.update(line.encode())
    return h.hexdigest()[:16]
