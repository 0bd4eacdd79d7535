"""`panoptic predict IMAGE... --model URI --out DIR`."""

from __future__ import annotations

import json
import os

import click


@click.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_uri", required=True,
              help="model.pt (path, s3://, URL) or MLflow URI, e.g. models:/panoptic-fpn@champion.")
@click.option("--out", required=True, help="Output folder.")
def predict_cmd(images, model_uri, out):
    """For each IMAGE (file or folder of images) write NAME.png (COCO panoptic ids),
    NAME_overlay.png (a picture of the segments) and NAME.json (segments_info)."""
    from components.common.coco_panoptic import decode_image, encode_png
    from components.evaluate.report import overlay
    from components.register.pyfunc import load_panoptic_model, predict_image
    from PIL import Image
    from tqdm import tqdm

    files = []
    for p in images:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        elif os.path.exists(p):
            files.append(p)
        else:
            raise click.ClickException(f"{p}: no such file or folder")
    model, cfg, cats = load_panoptic_model(model_uri)
    categories = {c["id"]: c for c in cats.to_json()}
    os.makedirs(out, exist_ok=True)
    for path in tqdm(files, desc="predict", unit="img", disable=len(files) < 2):
        try:
            image = decode_image(open(path, "rb").read(), path)
        except ValueError as e:
            raise click.ClickException(str(e))
        ids, info = predict_image(model, cfg, image)
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(os.path.join(out, f"{stem}.png"), "wb") as f:
            f.write(encode_png(ids))
        Image.fromarray(overlay(image, ids, info, categories)).save(os.path.join(out, f"{stem}_overlay.png"))
        for s in info:
            s["category_name"] = categories[s["category_id"]]["name"]
        with open(os.path.join(out, f"{stem}.json"), "w") as f:
            json.dump({"file_name": os.path.basename(path), "segments_info": info}, f, indent=1)
    click.echo(f"wrote {len(files)} predictions to {out}")


predict_cmd.name = "predict"
