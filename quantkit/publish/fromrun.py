"""The publish node: the run folder's manifest and the model's own files, handed to ``release``.

Reads ``runs/<recipe>/`` (``quantkit.runfolder``), checks every file about to go out against the manifest
(``quantkit.manifest``), and publishes under the run folder's lock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.errors import StoreError
from quantkit.manifest import Manifest, damaged_files
from quantkit.publish.release import release
from quantkit.recipe import Publish
from quantkit.runfolder import run_folder_lock
from quantkit.source import ModelSnapshot


def model_facts(model_dir: Path) -> dict:
    """What the report needs from the model's own files: config, chat template, EOS token."""
    def read(name: str) -> dict:
        p = model_dir / name
        return json.loads(p.read_text()) if p.is_file() else {}

    tok = read("tokenizer_config.json")
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else tok.get("chat_template")
    eos = tok.get("eos_token")
    if isinstance(eos, dict):  # older tokenizer configs wrap special tokens
        eos = eos.get("content")
    return {"config": read("config.json"), "chat_template": template if isinstance(template, str) else None,
            "eos_token": eos}


def publish_run(ctx, model: ModelSnapshot, manifest_path: Path) -> Any:
    """Render the report, apply the regression gate, publish (local store by default)."""
    from quantkit.tracking import record_for

    facts = model_facts(model.path)
    calib_readme = ctx.root / "calibration" / "README.md"
    manifest = Manifest.read(manifest_path)

    def verify() -> None:
        """Every file about to be published matches the manifest's sha256. The run folder holds hard links
        into the store, so a damaged file's store entry is checked too and moved aside if damaged: the next
        run rebuilds it and links the good file."""
        damaged = damaged_files(manifest_path.parent, manifest, digests=True)
        for step, key in dict.fromkeys((v.step, v.key) for v, _ in damaged):
            ctx.store.recheck(step, key)
        if damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise StoreError(f"not published: {damaged[0][1]}{more}; run again to rebuild it")

    with run_folder_lock(ctx.recipe, ctx.root):
        return release(run_dir=manifest_path.parent, manifest=manifest, root=ctx.root, verify=verify,
                       settings=ctx.recipe.publish or Publish(), recipe_yaml=ctx.recipe_file.read_text(),
                       config=facts["config"], chat_template=facts["chat_template"], eos_token=facts["eos_token"],
                       calibration_readme=calib_readme.read_text() if calib_readme.is_file() else None,
                       gguf_split=ctx.toolchain.binary("llama-gguf-split") if ctx.toolchain else None,
                       tracking=record_for(ctx.recipe_file))
