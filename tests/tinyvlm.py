"""A tiny vision-language model in SmolVLM's layout (transformers ``Idefics3ForConditionalGeneration``).

SmolVLM/Idefics3 is a family both the pinned converter (``conversion/smolvlm.py`` for ``--mmproj``, the
text model as ``VLlama3ForCausalLM``) and transformers support, with the smallest vision tower (SigLIP).
The text model is the trained tiny Llama (tests/tinyllama.py), so the GGUF ladder, scoring and the serve
check behave as with it; the vision tower and connector are random (a 64-wide, 1-layer SigLIP on 64x64
tiles). Four tokens llama.cpp's mtmd looks up by their text for this projector type
(``tools/mtmd/mtmd.cpp``: ``\\n\\n``, ``<fake_token_around_image>``, ``<global-img>``, and ``<image>`` for
transformers' processor) are added to the vocabulary.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import tinyllama
from chatstop import teach_to_stop

ADDED_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>", "\n\n")
IMAGE_SIZE = 64  # one tile; images are resized to at most LONGEST_EDGE and cut into tiles of this size
LONGEST_EDGE = 128
PATCH = 16
# tests/test_serve.py's TEMPLATE: turns separated by newlines, after which the taught tiny Llama ends its reply with EOS
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tiny_vlm(dest: pathlib.Path, *, text_model: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint to ``dest`` (built beside it and renamed, so a crash leaves nothing half-made)."""
    import torch
    from transformers import (AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, LlamaForCausalLM)

    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(text_model)
        tok.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)})
        tok.chat_template = TEMPLATE
        ids = tok.convert_tokens_to_ids(list(ADDED_TOKENS))
        text = LlamaForCausalLM.from_pretrained(text_model, dtype=torch.float32)
        teach_to_stop(text, tok, TEMPLATE)  # its chat ends on any CPU (test_serve's "chat" model)
        vocab = len(tok)
        tcfg = text.config.to_dict()
        tcfg.update(vocab_size=vocab, architectures=["VLlama3ForCausalLM"])  # as SmolVLM's config.json has it
        config = Idefics3Config(
            text_config=tcfg,
            vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH},
            scale_factor=2, image_token_id=ids[1], tie_word_embeddings=False,
            architectures=["Idefics3ForConditionalGeneration"])
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).eval()
        sd = text.state_dict()
        with torch.no_grad():
            lm = model.model.text_model
            lm.load_state_dict({k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")
                                and "embed_tokens" not in k}, strict=False)
            old = sd["model.embed_tokens.weight"].shape[0]
            lm.embed_tokens.weight[:old] = sd["model.embed_tokens.weight"]
            model.lm_head.weight[:old] = sd["lm_head.weight"]
            model.lm_head.weight[old:] = sd["lm_head.weight"][0]  # as <unk>, which the model never says
        model.generation_config.bos_token_id = tok.bos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(work, safe_serialization=True)
        tok.save_pretrained(work)
        shutil.copy2(pathlib.Path(text_model) / "tokenizer.model", work / "tokenizer.model")  # the converter's vocab
        # transformers 5 keeps added tokens in tokenizer.json only; the converter's sentencepiece path reads them here
        (work / "added_tokens.json").write_text(json.dumps(dict(zip(ADDED_TOKENS, ids)), indent=2) + "\n")
        (work / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": True, "do_resize": True,
            "do_rescale": True, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "size": {"longest_edge": LONGEST_EDGE}, "max_image_size": {"longest_edge": IMAGE_SIZE},
            "resample": 1, "rescale_factor": 1 / 255}, indent=2) + "\n")
        work.chmod(0o755)
        tinyllama.move_into_place(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
