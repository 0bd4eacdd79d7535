"""`panoptic predict IMAGE... --model URI --out DIR` (local paths or s3:// URIs, in and out)."""

from __future__ import annotations

import io
import json
import os
import posixpath

import click

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(inputs) -> list[str]:
    """Each input is an image file or a folder of them, local or s3://."""
    from components.common import storage

    files = []
    for p in inputs:
        if storage.is_dir(p):
            files += [storage.join(p, n) for n in storage.listdir(p) if n.lower().endswith(IMAGE_SUFFIXES)]
        elif storage.exists(p):
            files.append(p)
        else:
            raise click.ClickException(f"{p}: no such file or folder")
    return files


def output_stems(files: list[str]) -> list[str]:
    """The output name of each input, unique among them: the file's stem, and for the second and
    later inputs with the same stem (``a.jpg``, ``dir/a.jpg``, ``dir/a.png``) ``a-2``, ``a-3`` ...,
    so that no prediction overwrites another."""
    taken: set[str] = set()
    out = []
    for path in files:
        stem = posixpath.basename(str(path).replace("\\", "/")).rsplit(".", 1)[0]
        name, k = stem, 1
        while name.lower() in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name.lower())
        out.append(name)
    return out


def _utf8(name: str) -> bool:
    """Whether a file name is text (a name of other bytes arrives with surrogate escapes)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@click.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_uri", required=True,
              help="model.pt (path, s3://, URL) or MLflow URI, e.g. models:/panoptic-fpn@champion.")
@click.option("--out", required=True, help="Output folder (local or s3://).")
def predict_cmd(images, model_uri, out):
    """For each IMAGE (a file or a folder of images; local or s3://) write NAME.png (COCO
    panoptic ids), NAME_overlay.png (a picture of the segments) and NAME.json (segments_info)
    to OUT. An image that does not decode is skipped with its reason; the exit code is then 1."""
    from PIL import Image

    from components.common import storage
    from components.common.coco_panoptic import decode_image, encode_png
    from components.common.logs import progress as progress_bar
    from components.common.overlays import overlay
    from components.common.tracking import RegistryError
    from components.model.artifact import load_model
    from components.model.inference import predict_image
    from components.model.weights import WeightsError

    if storage.is_remote(out):
        try:
            storage.s3_parts(out)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--out") from None
    files = list_images(images)
    stems = output_stems(files)
    for path, stem in zip(files, stems):
        if _utf8(path) and stem != posixpath.basename(path).rsplit(".", 1)[0]:
            click.echo(f"{path}: written as {stem}.* (another input has the same name)", err=True)
    try:
        model, cfg, cats = load_model(model_uri, "cpu")
    except (WeightsError, FileNotFoundError, RegistryError, OSError) as e:
        raise click.ClickException(str(e))
    categories = {c["id"]: c for c in cats.to_json()}
    skipped = 0
    for path, stem in progress_bar(list(zip(files, stems)), desc="predict", unit="img", enabled=len(files) > 1):
        if not _utf8(path):
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            click.echo(f"skipped {shown}: its name is not UTF-8 text; rename it", err=True)
            skipped += 1
            continue
        try:
            image = decode_image(storage.read_bytes(path), path)
        except (ValueError, OSError) as e:
            click.echo(f"skipped {path}: {e}", err=True)
            skipped += 1
            continue
        ids, info = predict_image(model, cfg, image)
        storage.write_bytes(storage.join(out, f"{stem}.png"), encode_png(ids))
        buf = io.BytesIO()
        Image.fromarray(overlay(image, ids, info, categories)).save(buf, format="PNG")
        storage.write_bytes(storage.join(out, f"{stem}_overlay.png"), buf.getvalue())
        for s in info:
            s["category_name"] = categories[s["category_id"]]["name"]
        storage.write_text(storage.join(out, f"{stem}.json"),
                           json.dumps({"file_name": posixpath.basename(path), "segments_info": info}, indent=1))
    click.echo(f"wrote {len(files) - skipped} predictions to {out}" + (f"; skipped {skipped}" if skipped else ""))
    if skipped:
        raise SystemExit(1)


predict_cmd.name = "predict"
