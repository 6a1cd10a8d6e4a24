"""A GPTQ/AWQ checkpoint in transformers on the CPU: loads, answers a short chat, stops at end of turn."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from quantkit.serving import MESSAGES, ServeCheck, reference_prompt, short

log = logging.getLogger(__name__)


def check_checkpoint(*, model_dir: Path, source_dir: Path, max_tokens: int = 64, threads: int | None = None,
                     trust_remote_code: bool = False) -> ServeCheck:
    """Load ``model_dir`` (quantkit.scoring.hf.load_causal_lm), render the chat with its template and
    generate greedily up to ``max_tokens``; the reply must end with one of its EOS ids before the limit."""
    import torch

    from quantkit.scoring.hf import load_causal_lm

    check = ServeCheck("transformers (cpu)")
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        try:
            model, tok = load_causal_lm(model_dir, device="cpu", trust_remote_code=trust_remote_code)
        except Exception as e:  # a checkpoint transformers refuses is the verdict, not a crash of the run
            return check.fail(f"transformers cannot load it: {e.__class__.__name__}: {short(e)}")
        check.loads = True
        try:
            prompt = tok.apply_chat_template(list(MESSAGES), tokenize=False, add_generation_prompt=True)
        except Exception as e:
            check.chat_stops = False
            return check.fail(f"its chat template cannot render the chat: {e.__class__.__name__}: {short(e)}")
        try:
            check.template_matches = prompt == reference_prompt(source_dir, trust_remote_code=trust_remote_code)
        except Exception as e:
            check.fail(f"the source checkpoint's chat template cannot render the chat: {short(e)}")
        if check.template_matches is False:
            check.fail("its chat template renders the chat differently from the source checkpoint's")
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0))
            seconds = time.perf_counter() - start
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        check.tokens_per_s = len(new) / seconds if seconds > 0 else None
        text = tok.decode(new, skip_special_tokens=True)
        check.reply = short(text)
        stopped = bool(new) and new[-1] in eos
        check.chat_stops = stopped and bool(text.strip())
        if not stopped:
            check.fail(f"chat did not stop within {max_tokens} tokens: the model never emitted its EOS "
                       f"({sorted(eos)}); the end-of-turn token is missing or is not its EOS")
        elif not text.strip():
            check.fail("chat returned no text")
        return check
    finally:
        torch.set_num_threads(saved)
