"""Stage-1 starting point: plain HF Llama/Qwen2 + SigLIP + a new random VILA projector.

The LLM and vision-tower tensors stream exactly as in ``vila_import``; the projector is freshly
initialised. The project checkpoint gets generated VILA glue (top-level ``config.json`` and
``mm_projector/config.json``), so it exports to an ordinary VILA layout. A full SiglipModel
(vision + text towers, as ``google/siglip-so400m-patch14-384`` ships) contributes only its
vision half, saved as a ``SiglipVisionModel``, as VILA does. The sources are read with the
same checks as a VILA import (``vila_import``: regular files inside each source folder,
floating parameter dtypes, finite values unless ``allow_nonfinite``).

By default the tokenizer and the LLM's vocabulary tables get what VILA's stage-1 trainer gives
them (``vocab_resize``: ``[BOS]``/``[PAD]`` when missing, tables resized to the tokenizer with
the new rows set to the mean of the old ones); the media tokens are added after those, so their
ids lie past the table as in the releases (the model never looks them up: ``LongVILA.embed``).
The copied ``llm/config.json`` and the glue ``llm_cfg`` then carry the new ``vocab_size``, and
the recorded LLM layout the new table shapes, so the checkpoint exports as a VILA layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from longvila_jax.ckpt import config_checks, hf_config, mapping, vocab_resize
from longvila_jax.ckpt.orbax_io import HF_DIR, checkpoint_dir, write_metadata
from longvila_jax.ckpt.safetensors_io import DTYPE_NAMES, WeightSet
from longvila_jax.ckpt.safetensors_writer import shard_plan
from longvila_jax.ckpt.vila_import import (
    SIGLIP_PREFIX,
    component_record,
    copy_aux_files,
    dump_json,
    hf_shape,
    plan_component,
    source_config,
    write_params,
)
from longvila_jax.config.base import ConfigError
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import trees
from longvila_jax.core.safe_paths import copy_file, is_regular
from longvila_jax.models.projector import Projector


def _torch_dtype(dtype: str) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]


def top_level_config(cfg: ModelConfig, configs: dict[str, dict]) -> dict:
    """A ``llava_llama`` glue config.json for a model assembled from plain HF parts."""
    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": configs["llm"],
        "vision_tower_cfg": configs["vision_tower"],
        "mm_projector_cfg": configs["mm_projector"],
        "hidden_size": cfg.llm.hidden_size,
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision.select_layer,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "model_dtype": f"torch.{_torch_dtype(cfg.param_dtype)}",
        "resume_path": None,
    }


def _table_rows(weights, data: dict) -> int:
    """Rows of the source LLM's embedding table, checked against its config."""
    name = vocab_resize.TABLES[0]
    rows = data["llm"]["vocab_size"]
    if name in weights.where and weights.info(name).shape[0] != rows:
        raise ConfigError(
            "llm.vocab_size",
            f"config says {rows}, embed_tokens has {weights.info(name).shape[0]} rows",
        )
    return rows


def _prepare_tokenizer(tokenizer, weights: dict, data: dict, stage1_tokens: bool):
    """Stage-1 tokens and table resize (when asked), then the media tokens.

    Returns:
      (data with the new ``vocab_size``, the changes made to the tokenizer); ``weights["llm"]``
      is replaced by a resized view when the table changes.
    """
    changes = vocab_resize.TokenChanges()
    if stage1_tokens:
        changes = vocab_resize.add_stage1_tokens(tokenizer)
    if changes.resizes:
        vocab_resize.check_resizes(_table_rows(weights["llm"], data), changes.resizes)
        weights["llm"] = vocab_resize.ResizedWeights(weights["llm"], changes.resizes)
        data = {**data, "llm": {**data["llm"], "vocab_size": changes.rows}}
    if config_checks.image_token_id(tokenizer) is None:
        # VILA's language_model/builder.py adds them when it builds a model (b760c34).
        media = list(config_checks.MEDIA_TOKENS[:2])
        tokenizer.add_tokens(media, special_tokens=True)
        changes.added.update({t: tokenizer.convert_tokens_to_ids(t) for t in media})
    return data, changes


def import_hf_parts(
    llm_dir: str | Path,
    vision_dir: str | Path,
    out: str | Path,
    *,
    projector_type: str,
    overrides: Sequence[str] = (),
    seed: int = 0,
    progress: bool = False,
    allow_nonfinite: bool = False,
    stage1_tokens: bool = True,
) -> ModelConfig:
    """Plain HF Llama/Qwen2 + SigLIP + a new random projector -> project checkpoint.

    With ``stage1_tokens`` (the default, VILA's behaviour) the tokenizer of ``llm_dir`` gets
    ``[BOS]`` when it has no BOS token, its pad becomes its unknown token, or ``[PAD]`` when it
    has none, and the LLM's tables are resized to the tokenizer (new rows: the mean of the rows
    before them; a padded table is truncated); False keeps the LLM's table and special tokens.
    Then the tokenizer gets VILA's media tokens (``<image>``, ``<vila/video>``) when it lacks
    them, as VILA does when it builds a model; the saved tokenizer has all of them.
    The exported layout is a VILA one (generated top-level and projector configs).
    ``allow_nonfinite`` accepts NaN/Inf weights with a logged warning instead of refusing them.

    Raises:
      ConfigError, CheckpointError: a malformed, inconsistent or unsafe source (named).
      FileExistsError: ``out`` exists.
    """
    data, source = hf_config.read_hf_parts(llm_dir, vision_dir, projector_type)
    weights = {c: WeightSet(source.dirs[c]) for c in ("llm", "vision_tower")}  # root: the dir
    vision_cfg = source.configs["vision_tower"]
    full_siglip = "vision_config" in vision_cfg
    if full_siglip:
        # A full SiglipModel (vision + text towers, e.g. google/siglip-so400m-patch14-384):
        # VILA keeps only the vision half, saved as a SiglipVisionModel.
        weights["vision_tower"].keep(lambda n: n.startswith(SIGLIP_PREFIX))
        vision_cfg = {
            **vision_cfg["vision_config"],
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
        }
    tokenizer = hf_config.load_tokenizer_dir(source.dirs["llm"], root=source.dirs["llm"])
    rows = data["llm"]["vocab_size"]
    data, changes = _prepare_tokenizer(tokenizer, weights, data, stage1_tokens)
    llm_cfg = dict(source.configs["llm"])
    notes = ["new random projector"]
    if changes.resizes:
        llm_cfg["vocab_size"] = changes.rows
        added = ", ".join(
            f"{t} {i}"
            for t, i in changes.added.items()
            if t in (vocab_resize.BOS, vocab_resize.PAD)
        )
        notes.append(
            f"stage-1 tokens ({added or 'none new'}): LLM tables resized from {rows} to "
            f"{changes.rows} rows, new rows = mean of the rows before them (VILA train.py)"
        )
    cfg = hf_config.build_config(data, tokenizer, weights, overrides)
    plans = {c: plan_component(cfg, c, weights[c]) for c in ("llm", "vision_tower")}
    with nnx.use_eager_sharding(False):
        projector = Projector(cfg, rngs=nnx.Rngs(seed))
    flat = trees.flatten(nnx.to_pure_dict(nnx.state(projector)))
    del projector
    pdtype = DTYPE_NAMES[np.dtype(cfg.param_dtype)]
    specs = []
    for path, value in flat.items():
        name = mapping.hf_name(cfg, "mm_projector", path, None)
        tr = mapping.resolve(cfg, "mm_projector", name).transform
        specs.append((name, pdtype, hf_shape(tr, value.shape)))
    proj_plan = shard_plan(sorted(specs), None)
    proj_config = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": projector_type,
        "model_type": "v2l_projector",
        "torch_dtype": _torch_dtype(cfg.param_dtype),
    }
    with checkpoint_dir(out) as tmp:
        files = [f"llm/{f}" for f in copy_aux_files(source.dirs["llm"], tmp / HF_DIR / "llm")]
        vdir = tmp / HF_DIR / "vision_tower"
        if full_siglip:
            vdir.mkdir(parents=True)
            dump_json(vdir / "config.json", vision_cfg)
            files.append("vision_tower/config.json")
            vsrc = source.dirs["vision_tower"]
            pre = vsrc / "preprocessor_config.json"
            if is_regular(pre, vsrc):  # never a link out of the folder, never a FIFO
                copy_file(pre, vdir / pre.name, f"{pre}", root=vsrc)
                files.append(f"vision_tower/{pre.name}")
        else:
            files += [
                f"vision_tower/{f}" for f in copy_aux_files(source.dirs["vision_tower"], vdir)
            ]
        llm_out = tmp / HF_DIR / "llm"
        if changes.resizes:
            dump_json(llm_out / "config.json", llm_cfg)
        if changes.changed:
            saved = [Path(p).name for p in tokenizer.save_pretrained(str(llm_out))]
            vocab_resize.update_tokenizer_files(llm_out, changes, saved)
            files = sorted({*files, *(f"llm/{p.name}" for p in llm_out.iterdir())})
        (tmp / HF_DIR / "mm_projector").mkdir()
        dump_json(tmp / HF_DIR / "mm_projector" / "config.json", proj_config)
        configs = {
            **source.configs,
            "llm": llm_cfg,
            "vision_tower": vision_cfg,
            "mm_projector": proj_config,
        }
        dump_json(tmp / HF_DIR / "config.json", top_level_config(cfg, configs))
        files += ["mm_projector/config.json", "config.json"]
        extra = [("mm_projector", p, np.asarray(v)) for p, v in flat.items()]
        write_params(cfg, plans, tmp, progress, extra, allow_nonfinite=allow_nonfinite)
        records = {c: component_record(p) for c, p in plans.items()}
        records["mm_projector"] = {
            "siglip_prefix": False,
            "plan": proj_plan,
            "index_text": None,
            "unused": [],
        }
        write_metadata(
            tmp,
            cfg,
            {
                "source": {
                    "layout": "hf_parts",
                    "path": str(llm_dir),
                    "vision_path": str(vision_dir),
                    "top_file": "config.json",
                    "notes": notes,
                },
                "source_model_config": source_config(cfg, data),
                "hf_files": files,
                "components": records,
            },
        )
    return cfg
