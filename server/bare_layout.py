"""Model directories given as a repository: what KServe's storage initializer leaves in
/mnt/models when a model is stored on its own, not in a Triton repository.

A `--model-repository` root is Triton's layout (`<root>/<model>/config.pbtxt`,
`<root>/<model>/<version>/model.*`). A root that is instead one model is served as one:
- a bare model file: `<root>/model.onnx` (or model.pt, model.pt2, model.py), with or without a
  `config.pbtxt` beside it (auto-complete fills in what it leaves out), served as version 1;
- one model's directory: `<root>/config.pbtxt` and/or `<root>/<version>/model.*`.
The model is named by `FUSERVE_MODEL_NAME` (the KServe runtime sets it to the InferenceService's
name) or else after the root directory. It is served through a private directory of symlinks in
Triton's layout (`<tmp>/<name>/config.pbtxt`, `<tmp>/<name>/1/model.onnx`), so the repository
code sees the one layout it knows; the operator's files are not touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MODEL_FILES = ("model.onnx", "model.pt", "model.pt2", "model.py")
CONFIG = "config.pbtxt"


def _is_version(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit() and any((p / f).is_file() for f in MODEL_FILES)


def kind(root: Path) -> str:
    """"bare" (a model file in the root), "model" (one model's directory) or "repository"."""
    if any((root / f).is_file() for f in MODEL_FILES):
        return "bare"
    if root.is_dir() and any(_is_version(p) for p in root.iterdir()):
        return "model"
    if (root / CONFIG).is_file():  # a config with versions yet to come, or a config-only model (ensemble)
        return "model"
    return "repository"


class Roots:
    """The repository roots to serve: each given root, or for one that is a single model, a
    private directory of symlinks holding it in Triton's layout. Remove them with `close`."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self._made: list[Path] = []
        self.roots: list[Path] = []
        self.named: list[tuple[Path, str]] = []  # (given root, the model it serves) for the log
        for root in roots:
            layout = kind(root)
            if layout == "repository":
                self.roots.append(root)
                continue
            model = os.environ.get("FUSERVE_MODEL_NAME") or root.resolve().name
            shadow = Path(tempfile.mkdtemp(prefix="fuserve_repo_"))
            self._made.append(shadow)
            folder = shadow / model
            folder.mkdir()
            src = root.resolve()
            if (src / CONFIG).is_file():
                (folder / CONFIG).symlink_to(src / CONFIG)
            if layout == "bare":
                (folder / "1").mkdir()
                for f in src.iterdir():  # the model file and what it needs beside it, in the version
                    if f.name != CONFIG:
                        (folder / "1" / f.name).symlink_to(f)
                    if f.name not in (CONFIG, *MODEL_FILES):  # and in the model's directory (label files)
                        (folder / f.name).symlink_to(f)
            else:
                for f in src.iterdir():
                    if f.name != CONFIG:
                        (folder / f.name).symlink_to(f)
            self.roots.append(shadow)
            self.named.append((root, model))

    def close(self) -> None:
        for folder in self._made:
            shutil.rmtree(folder, ignore_errors=True)
        self._made = []
