"""Where a base model named in settings lives, for training and serving alike: the packaged model's directory
(converted on first use), a hub id that can be loaded now (or its cached snapshot), or a local path as given."""

from pathlib import Path

from models.hub import locate_hub_model, looks_like_hub_id
from models.packaged import ensure_packaged_model, is_packaged


def locate_model(model: str, *, models_dir: str | Path) -> str:
    """What to hand to ``from_pretrained`` for ``model``.

    Raises:
        LoragError: the packaged model cannot be prepared, or a hub id is neither cached nor downloadable.
    """
    if is_packaged(model):
        return str(ensure_packaged_model(models_dir))
    if looks_like_hub_id(model):
        return locate_hub_model(model)
    return model
