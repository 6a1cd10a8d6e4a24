"""Teach a tiny test model the serve check's chat (kept apart from tinyllama.py: that file's digest keys its cache)."""

from __future__ import annotations

from tinyllama import EOS_ID


def teach_to_stop(model, tokenizer, template: str, steps: int = 30) -> None:
    """Train ``model`` in place for a few steps to answer the serve check's chat (quantkit.serving.MESSAGES,
    rendered with ``template``) in one word and end its turn with EOS. Trained on prose only, the tiny model
    ended that reply after 23 tokens with p(EOS) 0.51 on an AMX Xeon (its weights differ by CPU): whether a
    near-lossless Q8_0 or a 4-bit checkpoint of it still stopped was chance. Taught, each of them stops."""
    import torch

    from quantkit.serving import MESSAGES

    prompt = list(tokenizer.apply_chat_template(list(MESSAGES), chat_template=template, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
    answer = [*tokenizer.encode("Red.", add_special_tokens=False), EOS_ID]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if loss.item() > 0.05:
        raise RuntimeError(f"the tiny model did not learn the chat's answer (loss {loss.item():.3f})")
